"""Prefect flows: composition only; the work lives in tasks/ and xfer/."""

import tasks  # noqa: F401  (sets the offline defaults before prefect is imported)
