import numpy as np
import pytest
from PIL import Image

from xfer.config import SplitConfig
from xfer.data.images import ImageReadError
from xfer.data.split import SOURCE_SPLITS, TARGET_SPLITS, SplitError, build_manifest


def make_folder(root, domain, per_class, classes=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / domain / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(d / f"{i}.png")


@pytest.fixture
def raw(tmp_path):
    make_folder(tmp_path / "raw", "src", 20)
    make_folder(tmp_path / "raw", "tgt", 12, seed=1)
    return tmp_path


CFG = SplitConfig(source_val=0.2, source_test=0.2, target_val=0.25, target_test=0.25)


def test_split_is_stratified_disjoint_and_complete(raw):
    m = build_manifest(raw / "raw", "src", "tgt", CFG, seed=0, root=raw)
    assert len(m) == 3 * 20 + 3 * 12 and m.path.is_unique
    src, tgt = m[m.role == "source"], m[m.role == "target"]
    assert set(src.split) == set(SOURCE_SPLITS) and set(tgt.split) == set(TARGET_SPLITS)
    # Per class: 20 * 0.2 = 4 test, 4 val, 12 train; 12 * 0.25 = 3 test, 3 val, 6 unlabeled.
    assert (src.groupby(["class_name", "split"]).size().unstack()[["train", "val", "test"]].values == [12, 4, 4]).all()
    assert (tgt.groupby(["class_name", "split"]).size().unstack()[["unlabeled", "val", "test"]].values == [6, 3, 3]).all()
    assert (m.domain[m.role == "source"] == "src").all()
    assert dict(zip(m.class_name, m.label)) == {"a": 0, "b": 1, "c": 2}
    assert m.sha256.str.len().eq(64).all()
    assert (raw / m.path.iloc[0]).is_file()


def test_split_is_seeded(raw):
    a = build_manifest(raw / "raw", "src", "tgt", CFG, seed=0, root=raw)
    b = build_manifest(raw / "raw", "src", "tgt", CFG, seed=0, root=raw)
    c = build_manifest(raw / "raw", "src", "tgt", CFG, seed=1, root=raw)
    assert a.equals(b)
    assert not a.split.equals(c.split)


def test_corrupt_image_is_named(raw):
    bad = raw / "raw" / "tgt" / "b" / "5.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageReadError, match="5.png"):
        build_manifest(raw / "raw", "src", "tgt", CFG, seed=0, root=raw)


def test_target_class_unknown_to_source(raw):
    make_folder(raw / "raw", "tgt", 12, classes=("zebra",))
    with pytest.raises(SplitError, match="zebra"):
        build_manifest(raw / "raw", "src", "tgt", CFG, seed=0, root=raw)


def test_missing_domain_and_too_small_class(raw):
    with pytest.raises(SplitError, match="not found"):
        build_manifest(raw / "raw", "src", "nope", CFG, seed=0, root=raw)
    make_folder(raw / "raw", "tiny", 2)
    with pytest.raises(SplitError, match="too few"):
        build_manifest(raw / "raw", "tiny", "tgt", CFG, seed=0, root=raw)
