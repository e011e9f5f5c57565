"""Constants and helpers the tests share (importable, unlike conftest)."""

from __future__ import annotations

from pathlib import Path

import yaml

from xfer.config import parse_params

REPO = Path(__file__).resolve().parents[1]

# The smallest pipeline that still exercises every stage: a 0.1 M-parameter
# timm test model at 32 px on a few images per class.
_TINY_OVERRIDES = {
    "seed": 0,
    "data": {
        "dataset": "digits",
        "digits": {"source_per_class": 12, "target_per_class": 12},
        "split": {"source_val": 0.25, "source_test": 0.25, "target_val": 0.25, "target_test": 0.25},
    },
    "backbone": {"name": "test_efficientnet", "pretrained": False, "image_size": 32},
    "features": {"batch_size": 64},
    "head": {"epochs": 4, "lr": 0.01, "batch_size": 32},
    "finetune": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 3, "device": "cpu"},
    "evaluate": {"batch_size": 64},
}
# Written out in full, as DVC needs every key a stage names under `params:`.
TINY_PARAMS = parse_params(_TINY_OVERRIDES).model_dump(mode="json")



def write_params(root: Path, params: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
