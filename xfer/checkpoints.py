"""Resumable training state: written atomically after every epoch, read back exactly.

A checkpoint holds everything the next epoch depends on: model, optimiser,
scheduler, EMA and best weights, history, and every random generator the
loop draws from (torch, the loader's shuffling generator, numpy, python,
CUDA). Restarted after a SIGKILL, a deterministic CPU run therefore ends
with the weights of an uninterrupted one. A checkpoint names the run it
belongs to (`key`: config, data and initial weights); another run's
checkpoint is ignored, never resumed.

A checkpoint carries the sha256 of its own bytes and is checked on load.
The one it replaces is kept as previous.pt, so a damaged last.pt (truncated
or changed on disk) is set aside, renamed `<name>.damaged[-N]`, never
deleted, and training resumes from previous.pt, or from scratch, saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xfer.io import write_bytes

CHECKPOINT_FILE = "last.pt"
# The checkpoint last.pt replaced: what a damaged last.pt falls back to.
PREVIOUS_FILE = "previous.pt"
# The file holds {"format", "sha256", "state"}: `state` is torch.save's bytes of the
# checkpoint itself, `sha256` their digest.
FORMAT = "xfer-checkpoint/1"

log = logging.getLogger(__name__)


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


def _dump(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, lists, dicts) to folder/last.pt with its digest, atomically.

    The checkpoint it replaces becomes previous.pt (a rename: no copy).
    """
    folder = Path(folder)
    payload = _dump(state)
    blob = _dump({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "state": torch.frombuffer(bytearray(payload), dtype=torch.uint8)})
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(folder / CHECKPOINT_FILE, folder / PREVIOUS_FILE)
    return write_bytes(folder / CHECKPOINT_FILE, blob)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in `path`; CheckpointError if the file is unreadable or not what it says it holds."""
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged archive
        raise CheckpointError(f"not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError("not an xfer checkpoint with a digest (written by an older xfer, or another program)")
    payload = outer["state"].numpy().tobytes()
    got = hashlib.sha256(payload).hexdigest()
    if got != outer.get("sha256"):
        raise CheckpointError(f"its state has sha256 {got[:12]}, but the file records {str(outer.get('sha256'))[:12]}")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted; the message says why."""


def _set_aside(path: Path) -> Path | None:
    """Rename a damaged checkpoint out of the way (never delete it): `<name>.damaged`, then `.damaged-2`..."""
    n = 1
    while True:
        dest = path.with_name(f"{path.name}.damaged" + (f"-{n}" if n > 1 else ""))
        if not dest.exists():
            break
        n += 1
    try:
        os.replace(path, dest)
    except FileNotFoundError:  # another rank of the same run set it aside first
        return None
    return dest


def load_checkpoint(folder: Path | None, key: str) -> dict[str, Any] | None:
    """The newest sound checkpoint in `folder` if it belongs to run `key`, else None.

    A damaged one is set aside with a warning, and the one before it tried.
    """
    if folder is None:
        return None
    damaged = []
    for name in (CHECKPOINT_FILE, PREVIOUS_FILE):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            state = read_checkpoint(path)
        except CheckpointError as err:
            moved = _set_aside(path)
            damaged.append(path)
            log.warning("checkpoint %s is damaged (%s); set aside as %s", path, err, moved.name if moved else "(already moved)")
            continue
        if not isinstance(state, dict) or state.get("key") != key:
            return None
        if damaged:
            log.warning("resuming from %s (after epoch %s), the last sound checkpoint", path, state.get("epoch"))
        return state
    if damaged:
        log.warning("no sound checkpoint left in %s: training from scratch", folder)
    return None


def remove_checkpoint(folder: Path | None) -> None:
    """After a finished run: its checkpoint would only ever resume to the end."""
    if folder is not None:
        (Path(folder) / CHECKPOINT_FILE).unlink(missing_ok=True)
        (Path(folder) / PREVIOUS_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # left if something else lives there
            Path(folder).rmdir()
