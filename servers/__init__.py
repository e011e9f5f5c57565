"""Servers a project runs beside its pipeline; neither is a Prefect flow.

supervisor.py         `make servers` / `make stop`: a Prefect server and an MLflow
                      server kept running in the background
temporary_prefect.py  `make run`: one temporary Prefect server for the whole of one
                      command (`dvc repro`), stopped when it ends
"""
