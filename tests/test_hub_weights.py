"""timm's pretrained weights through the Hugging Face hub cache (xfer/hub_weights.py).

Offline throughout: the tests build a hub-layout cache for timm's tiny test
model from weights they make, or serve them from a hub look-alike on
127.0.0.1, and load them through the real code path (timm's own loader).
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
from helpers import HUB_COMMIT, HUB_MODEL, free_port, hub_cache, hub_weights

from xfer.backbones import BackboneError, create_backbone, resolve_weights
from xfer.config import BackboneConfig
from xfer.hub_weights import hub_cache_dir

PRETRAINED = BackboneConfig(name=HUB_MODEL, pretrained=True, image_size=32)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty hub cache and no hub: HF_ENDPOINT is a closed port on 127.0.0.1."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def assert_loaded(model: torch.nn.Module, state: dict) -> None:
    mine = model.state_dict()
    shared = [k for k in state if k in mine]
    assert len(shared) > 50  # every tensor but the replaced classifier
    for key in shared:
        torch.testing.assert_close(mine[key], state[key], rtol=0, atol=0, msg=key)


def test_pretrained_weights_load_from_the_hub_cache_offline_and_name_the_file_loaded(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = hub_weights(seed=3)
    snapshot = hub_cache(hub_env, state)
    model, prep, source = create_backbone(PRETRAINED, num_classes=0)
    assert_loaded(model, {k: v for k, v in state.items() if not k.startswith("classifier")})
    # The feature cache key's digest is the sha256 of the file actually loaded.
    assert source.path == snapshot and source.digest == hashlib.sha256(snapshot.read_bytes()).hexdigest()
    # timm's pretrained config decides the normalisation, as for any timm user.
    assert prep.mean == (0.485, 0.456, 0.406)
    # Other weights in the cache are another key: the features stage cannot mistake one for the other.
    other = hub_cache(hub_env / "other", hub_weights(seed=4))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "other"))
    assert resolve_weights(PRETRAINED).digest == hashlib.sha256(other.read_bytes()).hexdigest() != source.digest


def test_a_pytorch_bin_in_the_cache_is_used_when_there_is_no_safetensors(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = hub_weights(seed=5)
    snapshot = hub_cache(hub_env, {}, filename="pytorch_model.bin")
    blob = snapshot.resolve()
    torch.save(state, blob)  # the blob's name is no longer its sha256: renamed as the hub would name it
    named = blob.with_name(hashlib.sha256(blob.read_bytes()).hexdigest())
    blob.rename(named)
    snapshot.unlink()
    snapshot.symlink_to(Path("../../blobs") / named.name)
    model, _, source = create_backbone(PRETRAINED, num_classes=0)
    assert source.path == snapshot
    assert_loaded(model, {k: v for k, v in state.items() if not k.startswith("classifier")})


def test_an_empty_cache_offline_or_without_a_hub_stops_with_what_to_do(hub_env, monkeypatch):
    with pytest.raises(BackboneError) as err:
        resolve_weights(PRETRAINED)  # HF_ENDPOINT refuses connections
    text = str(err.value)
    assert HUB_MODEL in text and str(hub_env) in text and "backbone.weights" in text and "cannot be reached" in text
    assert f"`hf download timm/{HUB_MODEL}`" in text  # the command huggingface_hub installs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE is set") as err:
        resolve_weights(PRETRAINED)
    assert str(hub_env) in str(err.value) and "backbone.weights" in str(err.value)
    assert list(hub_env.rglob("*.safetensors")) == []


def test_a_cache_file_that_does_not_match_the_hubs_hash_is_refused_and_removed(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hub_cache(hub_env, hub_weights(seed=3))
    blob = snapshot.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped
    blob.write_bytes(bytes(data))
    with pytest.raises(BackboneError, match="does not match the hub's sha256"):
        resolve_weights(PRETRAINED)
    assert not blob.exists() and not snapshot.is_symlink()
    with pytest.raises(BackboneError, match="not in the hub cache"):  # the next run fetches it again
        resolve_weights(PRETRAINED)


def test_the_hub_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == tmp_path / "elsewhere"


class FakeHub(http.server.ThreadingHTTPServer):
    """The hub's `resolve` endpoint for one file, on 127.0.0.1; `body` may differ from what it claims."""

    def __init__(self, claimed: bytes, body: bytes):
        self.claimed, self.body, self.requests = claimed, body, []
        super().__init__(("127.0.0.1", 0), _HubHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    def _answer(self, with_body: bool) -> None:
        hub: FakeHub = self.server
        hub.requests.append((self.command, self.path))
        if self.path != f"/timm/{HUB_MODEL}/resolve/main/model.safetensors":
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.send_header("X-Linked-Etag", f'"{hashlib.sha256(hub.claimed).hexdigest()}"')
        self.send_header("X-Linked-Size", str(len(hub.body)))
        self.send_header("Content-Length", str(len(hub.body)))
        self.end_headers()
        if with_body:
            self.wfile.write(hub.body)

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self._answer(with_body=False)

    def do_GET(self):  # noqa: N802
        self._answer(with_body=True)

    def log_message(self, *args):
        pass


def serve(hub: FakeHub):
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    return hub


def safetensors_bytes(state: dict, tmp_path: Path) -> bytes:
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    return (tmp_path / "w.safetensors").read_bytes()


def test_a_missing_file_is_downloaded_once_then_read_from_the_cache(hub_env, monkeypatch, tmp_path):
    state = hub_weights(seed=6)
    data = safetensors_bytes(state, tmp_path)
    hub = serve(FakeHub(data, data))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        model, _, source = create_backbone(PRETRAINED, num_classes=0)
        assert source.digest == hashlib.sha256(data).hexdigest()
        assert source.path.resolve().parent == hub_env / f"models--timm--{HUB_MODEL}" / "blobs"
        assert_loaded(model, {k: v for k, v in state.items() if not k.startswith("classifier")})
        assert ("GET", f"/timm/{HUB_MODEL}/resolve/main/model.safetensors") in hub.requests
        seen = len(hub.requests)
        assert resolve_weights(PRETRAINED).digest == source.digest
        assert len(hub.requests) == seen  # cached: the hub is not asked again
    finally:
        hub.shutdown()


def test_a_download_whose_bytes_do_not_match_the_hubs_hash_leaves_nothing_in_the_cache(hub_env, monkeypatch, tmp_path):
    good = safetensors_bytes(hub_weights(seed=6), tmp_path)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    hub = serve(FakeHub(good, bytes(bad)))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        with pytest.raises(BackboneError, match="does not match the hub's sha256"):
            resolve_weights(PRETRAINED)
    finally:
        hub.shutdown()
    assert [p for p in hub_env.rglob("*") if p.is_file() and p.stat().st_size > 1000] == []


def test_backbone_weights_takes_a_safetensors_file(tmp_path):
    state = hub_weights(seed=7)
    path = tmp_path / "mine.safetensors"
    path.write_bytes(safetensors_bytes(state, tmp_path))
    model, _, source = create_backbone(BackboneConfig(name=HUB_MODEL, pretrained=False, weights=str(path), image_size=32))
    assert source.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_loaded(model, {k: v for k, v in state.items() if not k.startswith("classifier")})
    path.write_bytes(b"not safetensors")
    with pytest.raises(BackboneError, match="not a readable safetensors file"):
        create_backbone(BackboneConfig(name=HUB_MODEL, weights=str(path), image_size=32))


def test_a_model_without_hub_weights_is_named_with_what_would_work():
    with pytest.raises(BackboneError, match="timm has no hub weights for .test_efficientnet_nope."):
        resolve_weights(BackboneConfig(name="test_efficientnet_nope", pretrained=True))
