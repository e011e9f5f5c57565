"""Constants and helpers the tests share (importable, unlike conftest)."""

from __future__ import annotations

import os
import socket
import subprocess
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
    # One method, not the default search: the tests that want `auto` ask for it (test_dvc).
    "head": {"epochs": 4, "lr": 0.01, "batch_size": 32, "method": "self_training"},
    "finetune": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 3, "device": "cpu", "method": "self_training"},
    "evaluate": {"batch_size": 64},
}
# Written out in full, as DVC needs every key a stage names under `params:`.
TINY_PARAMS = parse_params(_TINY_OVERRIDES).model_dump(mode="json")


def write_params(root: Path, params: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a socket listening on `port`, from /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                if len(addr) == 8:
                    found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.add("ipv6:" + addr)
    return found


def local_and_ci_verdicts(test: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Run one test in a fresh pytest twice, as `make test` would and as CI would (CI=true)."""
    import sys

    base = {**os.environ, **env}
    base.pop("CI", None)
    command = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", test]
    local = subprocess.run(command, cwd=REPO, env=base, capture_output=True, text=True, timeout=120)
    ci = subprocess.run(command, cwd=REPO, env={**base, "CI": "true"}, capture_output=True, text=True, timeout=120)
    return local, ci


HUB_MODEL = "test_efficientnet.r160_in1k"  # timm's tiny test model; its hub repo is timm/<name>
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_weights(seed: int = 0) -> dict:
    """Weights for HUB_MODEL that xfer's random init (seed 0) does not give: timm's init under
    another seed, so the weights are a working network (BatchNorm variances stay positive)."""
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1000 + seed)
        model = timm.create_model(HUB_MODEL, pretrained=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def hub_cache(cache: Path, state: dict, filename: str = "model.safetensors") -> Path:
    """`state` saved as HUB_MODEL's hub weights in a cache laid out as huggingface_hub lays it
    out (blobs named by sha256, refs/main naming the snapshot); returns the snapshot file."""
    import hashlib

    from safetensors.torch import save_file

    repo = cache / f"models--timm--{HUB_MODEL}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    tmp = repo / "blobs" / "incoming"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    blob = repo / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    snapshot = repo / "snapshots" / HUB_COMMIT / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    return snapshot
