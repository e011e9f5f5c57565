"""Resumable training state: written atomically after every epoch, read back exactly.

A checkpoint holds everything the next epoch depends on: model, optimiser,
scheduler, EMA and best weights, history, and every random generator the
loop draws from (torch, the loader's shuffling generator, numpy, python,
CUDA). Restarted after a SIGKILL, a deterministic CPU run therefore ends
with the weights of an uninterrupted one. A checkpoint names the run it
belongs to (`key`: config, data and initial weights); another run's
checkpoint is ignored, never resumed.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xfer.io import save_torch

CHECKPOINT_FILE = "last.pt"


def rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
        # numpy / python states as plain tensors and lists, so weights_only loading reads them.
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), None if gauss is None else float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, lists, dicts) to folder/last.pt, atomically."""
    return save_torch(Path(folder) / CHECKPOINT_FILE, state)


def load_checkpoint(folder: Path | None, key: str) -> dict[str, Any] | None:
    """The checkpoint in `folder` if it belongs to run `key`, else None."""
    if folder is None:
        return None
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if state.get("key") == key else None


def remove_checkpoint(folder: Path | None) -> None:
    """After a finished run: its checkpoint would only ever resume to the end."""
    if folder is not None:
        (Path(folder) / CHECKPOINT_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # left if something else lives there
            Path(folder).rmdir()
