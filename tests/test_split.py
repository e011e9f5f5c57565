"""Split: stratified, seeded, multi-source, labelled target budgets, no test leak."""

import json
import shutil

import pytest
from datasets import image_folder

from xfer.config import ConfigError, parse_params
from xfer.data.fetch import fetch_dataset
from xfer.data.split import SOURCE_SPLITS, SplitError, build_manifest

SPLIT = {"source_val": 0.2, "source_test": 0.2, "target_val": 0.25, "target_test": 0.25}


def data_cfg(source="a", target="b", **split):
    return parse_params({"data": {"dataset": "./mine", "source_domain": source, "target_domain": target, "split": {**SPLIT, **split}}}).data


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """Three domains fetched once: a (20 per class), b (12), c (16)."""
    root = tmp_path_factory.mktemp("split")
    image_folder(root / "mine", {"a": 20, "b": 12, "c": 16})
    fetch_dataset(data_cfg(), root / "data/raw", root / "data/downloads", root=root, progress=False)
    return root


def manifest(root, cfg, seed=0):
    return build_manifest(root / "data/raw/mine", cfg, seed, root=root)


def per_class(m, role, split):
    return m[(m.role == role) & (m.split == split)].groupby("class_name").size().to_dict()


def test_split_is_stratified_disjoint_and_complete(fetched):
    m, report = manifest(fetched, data_cfg())
    assert len(m) == 3 * 20 + 3 * 12 and m.path.is_unique
    # Per class: 20 * 0.2 = 4 test, 4 val, 12 train; 12 * 0.25 = 3 test, 3 val, 6 unlabeled, no labelled target.
    assert per_class(m, "source", "train") == {"cat": 12, "dog": 12, "owl": 12}
    assert per_class(m, "source", "test") == per_class(m, "source", "val") == {"cat": 4, "dog": 4, "owl": 4}
    assert per_class(m, "target", "unlabeled") == {"cat": 6, "dog": 6, "owl": 6}
    assert per_class(m, "target", "test") == {"cat": 3, "dog": 3, "owl": 3}
    assert per_class(m, "target", "train") == {}
    assert dict(zip(m.class_name, m.label)) == {"cat": 0, "dog": 1, "owl": 2}
    assert m.path.str.startswith("data/raw/mine/").all() and (fetched / m.path.iloc[0]).is_file()
    assert report["rows"]["source/train"] == 36 and report["duplicates_removed"]["dropped"] == 0


def test_same_seed_gives_a_byte_identical_manifest(fetched, tmp_path):
    a, b = manifest(fetched, data_cfg())[0], manifest(fetched, data_cfg())[0]
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert not a.split.equals(manifest(fetched, data_cfg(), seed=1)[0].split)


@pytest.mark.parametrize("budget, expected", [({"target_shots": 2}, 2), ({"target_labeled": 0.25}, 3)])
def test_labelled_target_budget_gives_the_stated_count_per_class(fetched, budget, expected):
    m, report = manifest(fetched, data_cfg(**budget))
    assert per_class(m, "target", "train") == {c: expected for c in ("cat", "dog", "owl")}
    # The budget comes out of the unlabeled pool; val and test keep their size.
    assert per_class(m, "target", "unlabeled") == {c: 6 - expected for c in ("cat", "dog", "owl")}
    assert per_class(m, "target", "test") == {c: 3 for c in ("cat", "dog", "owl")}
    assert report["rows"]["target/train"] == 3 * expected


def test_too_many_shots_name_the_class_and_counts(fetched):
    with pytest.raises(SplitError, match=r"class 'cat' of target domain 'b' has 12 images.*3 test \+ 3 val \+ 7 labelled"):
        manifest(fetched, data_cfg(target_shots=7))
    with pytest.raises(ConfigError, match="give the labelled target budget once"):
        data_cfg(target_shots=2, target_labeled=0.1)


def test_several_source_domains(fetched):
    m, _ = manifest(fetched, data_cfg(source=["a", "c"]))
    src = m[m.role == "source"]
    assert set(src.domain) == {"a", "c"} and set(src.split) == set(SOURCE_SPLITS)
    # Stratified within each source domain: c has 16 per class -> 3 test, 3 val, 10 train.
    c_train = src[(src.domain == "c") & (src.split == "train")].groupby("class_name").size()
    assert c_train.to_dict() == {"cat": 10, "dog": 10, "owl": 10}
    with pytest.raises(SplitError, match=r"domain\(s\) \['z'\] not in 'mine'; its domains are \['a', 'b', 'c'\]"):
        manifest(fetched, data_cfg(source=["a", "z"]))


def test_target_test_never_appears_in_training_or_selection(tmp_path):
    """Not by path, and not by content: a test image copied into source train is removed from test."""
    image_folder(tmp_path / "mine", {"a": 20, "b": 12})
    # The same picture in both domains (and twice inside b): a leak if it lands in b's test split.
    for i in range(4):
        shutil.copyfile(tmp_path / f"mine/b/cat/{i:03d}.png", tmp_path / f"mine/a/cat/copy{i}.png")
    shutil.copyfile(tmp_path / "mine/b/dog/000.png", tmp_path / "mine/b/dog/zz_again.png")
    fetch_dataset(data_cfg(), tmp_path / "data/raw", tmp_path / "data/downloads", root=tmp_path, progress=False)
    # Fetch's report already names them: 4 pictures in both domains, 1 twice inside b.
    report = json.loads((tmp_path / "data/raw/mine/validation.json").read_text())["duplicates"]
    assert report["across_domains"]["groups"] == 4 and report["within_domain"]["groups"] == 1
    assert report["within_domain"]["examples"][0]["paths"] == ["b/dog/000.png", "b/dog/zz_again.png"]
    for seed in range(5):
        for budget in ({}, {"target_shots": 2}):
            m, report = manifest(tmp_path, data_cfg(**budget), seed=seed)
            test = m[(m.role == "target") & (m.split == "test")]
            seen = m.drop(test.index)
            assert not set(test.path) & set(seen.path)
            assert not set(test.sha256) & set(seen.sha256)
            assert m.sha256.is_unique
            assert report["duplicates_removed"]["dropped"] == 5
