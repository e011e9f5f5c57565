"""Prefect tasks, one module per stage: file IO, MLflow logging, progress.

Each task reads its inputs from files, calls into `xfer` for the work, and
writes files; results returned to Prefect stay small (paths, numbers).
"""
