"""timm's pretrained weights from the Hugging Face hub cache, downloaded once.

A timm model's pretrained config names its weights' hub repository
(`hf_hub_id`, e.g. `timm/convnext_tiny.fb_in22k_ft_in1k`). The file is looked
up in the hub cache first, without the network; only when it is missing, and
downloads are allowed, is it fetched into that cache (huggingface_hub's own
download, with its progress bar). Either way its bytes are checked against
the hub's own hash: the cache names a large (LFS) file's blob by its sha256.
With `HF_HUB_OFFLINE=1`, or no network, the cache alone decides, and a miss
is an error that says how to provide the file.

Everything is read from the environment when called (HF_HUB_CACHE, HF_HOME,
HF_HUB_OFFLINE, HF_ENDPOINT), not when huggingface_hub was imported.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import timm
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from xfer.io import sha256_file
from xfer.redact import redact

# timm saves both; safetensors first, as timm's own loader prefers it (no pickle at all).
WEIGHT_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_ENDPOINT = "https://huggingface.co"
# One quick connection attempt before a download: without it huggingface_hub retries
# a refused or unresolvable host with backoff for about 23 s per file name.
PROBE_TIMEOUT_S = 5
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubWeightsError(ValueError):
    """The hub weights of a timm model cannot be found, fetched or trusted."""


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use in this environment."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_source(name: str) -> tuple[str, str | None, tuple[str, ...]]:
    """(repo id, revision, file names to try) of a timm model's pretrained weights."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise HubWeightsError(
            f"backbone.name: timm has no hub weights for {name!r}. "
            "Set backbone.pretrained: false, or backbone.weights: a local weight file (.pt, .pth or .safetensors)."
        )
    if cfg.custom_load:
        raise HubWeightsError(f"backbone.name: {name!r}'s pretrained weights need timm's custom loader, which xfer does not run; use backbone.weights")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else WEIGHT_FILENAMES
    return repo, revision or None, names


def _cached(repo: str, revision: str | None, names: tuple[str, ...], cache: Path) -> Path | None:
    for filename in names:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, local_files_only=True))
        except (LocalEntryNotFoundError, EntryNotFoundError):
            continue
    return None


def _unreachable(endpoint: str) -> str | None:
    """Why the hub cannot be reached (one connection attempt of PROBE_TIMEOUT_S), or None."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows; let huggingface_hub try through it
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{parts.hostname}:{port}: {err.strerror or type(err).__name__}"
    return None


def _download(repo: str, revision: str | None, names: tuple[str, ...], cache: Path) -> Path | None:
    endpoint = os.environ.get("HF_ENDPOINT") or None
    why = _unreachable(endpoint or DEFAULT_ENDPOINT)
    if why is not None:
        raise OSError(why)
    for filename in names:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, endpoint=endpoint))
        except EntryNotFoundError:  # this repository has the other file name
            continue
    return None


def _verified(path: Path) -> str:
    """The file's sha256, checked against the blob name the hub gave it (LFS files are named by it)."""
    digest = sha256_file(path)
    blob = path.resolve()
    if _SHA256.fullmatch(blob.name) and blob.name != digest:
        # A damaged entry would fail every later run: remove it so the next one fetches it again.
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise HubWeightsError(
            f"hub cache file {path} does not match the hub's sha256 {blob.name} (it has {digest}): removed; "
            "run again to download it, or set backbone.weights to a good copy"
        )
    return digest


def hub_weight_file(name: str) -> tuple[Path, str]:
    """The verified cache file holding `name`'s pretrained weights, and its sha256.

    Downloads it into the cache when missing, unless HF_HUB_OFFLINE is set.
    """
    repo, revision, names = hub_source(name)
    cache = hub_cache_dir()
    path = _cached(repo, revision, names, cache)
    if path is None:
        how = (
            f"Put {' or '.join(names)} of the hub repository {repo} into that cache "
            f"(e.g. `hf download {repo}` where the hub is reachable; huggingface_hub installs `hf`), "
            "or set backbone.weights to a local weight file (.pt, .pth or .safetensors)."
        )
        if hub_offline():
            raise HubWeightsError(f"pretrained weights for {name!r} are not in the hub cache {cache} and HF_HUB_OFFLINE is set. {how}")
        try:
            path = _download(repo, revision, names, cache)
        except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            first = redact(str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
            raise HubWeightsError(f"pretrained weights for {name!r} are not in the hub cache {cache} and the hub cannot be reached ({first}). {how}") from None
        if path is None:
            raise HubWeightsError(f"the hub repository {repo} has none of {', '.join(names)}. {how}")
    return path, _verified(path)
