"""Fetch a dataset into data/raw/<dataset>/<domain>/<class>/<image>."""

from __future__ import annotations

from pathlib import Path

from xfer.config import DataConfig
from xfer.io import atomic_dir, write_json


def fetch_dataset(cfg: DataConfig, raw_root: Path, seed: int, progress: bool = True) -> dict:
    """Materialise `cfg.dataset` under raw_root/<dataset>; replaced whole, never half-written."""
    dest = Path(raw_root) / cfg.dataset
    with atomic_dir(dest) as tmp:
        if cfg.dataset == "digits":
            from xfer.data.digits import write_digits

            summary = write_digits(
                tmp,
                source_per_class=cfg.digits.source_per_class,
                target_per_class=cfg.digits.target_per_class,
                seed=seed,
                progress=progress,
            )
        else:  # pragma: no cover - config validation allows only builtin datasets today
            raise ValueError(f"unknown dataset {cfg.dataset!r}")
        summary = {"dataset": cfg.dataset, **summary}
        write_json(tmp / "dataset.json", summary)
    return summary
