import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from xfer import features as feats
from xfer.backbones import Preprocessing, create_backbone
from xfer.config import BackboneConfig

PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        path = f"img/{i}.png"
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(tmp_path / path)
        role, split = ("source", "train") if i < 6 else ("target", "test")
        rows.append({"path": path, "label": i % 2, "class_name": str(i % 2), "domain": role, "role": role, "split": split, "sha256": f"{i:064d}"})
    return pd.DataFrame(rows)


def backbone():
    torch.manual_seed(0)
    return create_backbone(BackboneConfig(name="test_efficientnet", pretrained=False, image_size=32))[0]


def test_extract_matches_a_direct_forward_pass_in_any_batching(tmp_path, manifest):
    model = backbone()
    a = feats.extract(model, manifest, PREP, batch_size=3, root=tmp_path, progress=False)
    b = feats.extract(model, manifest, PREP, batch_size=10, root=tmp_path, progress=False)
    assert a.shape == (10, model.num_features) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    from xfer.data.images import to_tensor

    with torch.no_grad():
        direct = model.eval()(to_tensor(Image.open(tmp_path / "img/7.png"), PREP)[None]).numpy()[0]
    np.testing.assert_allclose(a[7], direct, atol=1e-5)


def test_key_changes_with_every_input(manifest):
    base = feats.cache_key("m", "w1", PREP, manifest)
    assert base == feats.cache_key("m", "w1", PREP, manifest.copy())
    changed = manifest.copy()
    changed.loc[3, "sha256"] = "f" * 64
    assert len({
        base,
        feats.cache_key("m2", "w1", PREP, manifest),
        feats.cache_key("m", "w2", PREP, manifest),
        feats.cache_key("m", "w1", Preprocessing(64, PREP.mean, PREP.std), manifest),
        feats.cache_key("m", "w1", PREP, changed),
    }) == 5


def test_entry_round_trip_and_selection(tmp_path, manifest):
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    feats.write_entry(tmp_path / "cache", "k1", x, manifest, {"backbone": "m"})
    feats.set_current(tmp_path / "cache", "k1")
    fs = feats.load_current(tmp_path / "cache")
    assert fs.meta["key"] == "k1" and fs.meta["dim"] == 2
    sx, sy = fs.select("target", "test")
    np.testing.assert_array_equal(sx, x[6:])
    np.testing.assert_array_equal(sy, manifest.label.to_numpy()[6:])


def test_incomplete_entry_is_refused(tmp_path, manifest):
    feats.write_entry(tmp_path, "k1", np.zeros((10, 2), np.float32), manifest, {})
    (tmp_path / "k1" / feats.INDEX_FILE).unlink()
    assert not feats.is_complete(tmp_path / "k1")
    with pytest.raises(feats.FeatureCacheError, match="incomplete"):
        feats.load_entry(tmp_path / "k1")
    with pytest.raises(feats.FeatureCacheError, match="features stage"):
        feats.load_current(tmp_path / "empty")
