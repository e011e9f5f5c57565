"""Split: stratified, seeded, multi-source, labelled target budgets, no test leak."""

import json
import shutil

import pytest
from datasets import image_folder

from xfer.config import ConfigError, parse_params
from xfer.data.fetch import fetch_dataset
from xfer.data.split import SOURCE_SPLITS, SplitError, build_manifest, check_params
from xfer.io import sha256_file

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


# ---- a filled label file (data.split.target_labels) -------------------------------------------


def write_labels(path, rows, header="path,label,suggested_rank,predicted"):
    """A filled `xfer suggest-labels` file: (path, label) rows, with the command's other columns."""
    lines = [header] + [f"{p},{label},{i + 1},cat" for i, (p, label) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def pool(m, split="unlabeled"):
    return m[(m.role == "target") & (m.split == split)]


def test_a_filled_label_file_gives_exactly_those_labelled_target_rows(fetched, tmp_path):
    before, plain = manifest(fetched, data_cfg())
    assert plain["target_labeled"] == {"fraction": 0.0, "shots": None}  # without a file: the report as it always was
    unlabeled = pool(before)
    chosen = unlabeled.groupby("class_name").head(2)  # 2 of each class
    # The person's labels: as the folders say, except one cat they call an owl.
    labels = dict(zip(chosen.path, chosen.class_name))
    relabelled = chosen.path[chosen.class_name == "cat"].iloc[0]
    labels[relabelled] = "owl"
    csv = write_labels(tmp_path / "labels.csv", labels.items())
    m, report = manifest(fetched, data_cfg(target_labels=str(csv)))
    train = pool(m, "train")
    assert dict(zip(train.path, train.class_name)) == labels
    assert dict(zip(train.path, train.label)) == {p: {"cat": 0, "dog": 1, "owl": 2}[c] for p, c in labels.items()}
    # Taken from the unlabeled pool only: val and test are the same images as without the file.
    for split in ("val", "test"):
        assert pool(m, split).path.tolist() == pool(before, split).path.tolist()
    assert set(pool(m).path) == set(unlabeled.path) - set(labels)
    assert m[m.role == "source"].equals(before[before.role == "source"])
    assert report["rows"]["target/train"] == 6
    assert report["target_labeled"]["labels_file"] == {"file": str(csv), "sha256": sha256_file(csv), "rows": 6, "differ_from_folder": 1}


def test_a_spreadsheet_saved_label_file_reads_the_same(fetched, tmp_path):
    """A byte-order mark, spaces around names and labels, CRLF line ends: what a spreadsheet may save."""
    row = pool(manifest(fetched, data_cfg())[0]).iloc[0]
    csv = tmp_path / "labels.csv"
    csv.write_bytes(f"path , label\r\n{row.path}, dog \r\n".encode("utf-8-sig"))
    m, _ = manifest(fetched, data_cfg(target_labels=str(csv)))
    assert pool(m, "train")[["path", "class_name"]].values.tolist() == [[row.path, "dog"]]


def test_a_relative_label_file_is_read_from_the_project_root(fetched):
    row = pool(manifest(fetched, data_cfg())[0]).iloc[0]
    write_labels(fetched / "labels.csv", [(row.path, row.class_name)])
    try:
        m, _ = manifest(fetched, data_cfg(target_labels="labels.csv"))
    finally:
        (fetched / "labels.csv").unlink()
    assert pool(m, "train").path.tolist() == [row.path]


def _bad_files(m):
    """name -> (rows or raw text, the error's words)."""
    unlabeled, test, val = pool(m), pool(m, "test"), pool(m, "val")
    one, two = unlabeled.path.iloc[0], unlabeled.path.iloc[1]
    source = m[m.role == "source"].path.iloc[0]
    return {
        "unknown path": (
            [(one, "cat"), ("data/raw/mine/b/cat/nope.png", "dog")],
            r"1 path\(s\) not a target image of the dataset: 'data/raw/mine/b/cat/nope.png'",
        ),
        "a source image": ([(source, "cat")], r"not a target image of the dataset: .*is of a source domain"),
        "unknown class": ([(one, "cat"), (two, "kitten")], r"unknown class name\(s\) 'kitten'; the classes are \['cat', 'dog', 'owl'\]"),
        "empty label": ([(one, "cat"), (two, "")], r"empty label on line\(s\) 3: give every listed image a class name"),
        "repeated path": ([(one, "cat"), (two, "dog"), (one, "dog")], r"path\(s\) listed more than once: '" + one),
        "a test image": (
            [(one, "cat"), (test.path.iloc[0], "cat")],
            r"1 listed image\(s\) are held out for evaluation: '.*' \(target test\); labelled rows must come from the unlabeled pool",
        ),
        "a val image": ([(val.path.iloc[0], "dog")], r"held out for evaluation: '.*' \(target val\)"),
        "no label column": ("path,class\n" + one + ",cat\n", r"lacks column\(s\) \['label'\]; it needs \['path', 'label'\]"),
        "no rows": ("path,label\n", "has no rows"),
    }


@pytest.mark.parametrize(
    "case", ["unknown path", "a source image", "unknown class", "empty label", "repeated path", "a test image", "a val image", "no label column", "no rows"]
)
def test_each_bad_label_file_is_refused_naming_the_problem(fetched, tmp_path, case):
    content, words = _bad_files(manifest(fetched, data_cfg())[0])[case]
    csv = tmp_path / "labels.csv"
    csv.write_text(content) if isinstance(content, str) else write_labels(csv, content)
    with pytest.raises(SplitError, match=r"data\.split\.target_labels: .*labels\.csv.*" + words):
        manifest(fetched, data_cfg(target_labels=str(csv)))


def test_a_missing_label_file_says_how_to_write_one(fetched, tmp_path):
    with pytest.raises(SplitError, match=r"target_labels: .*missing\.csv not found \(write one with `xfer suggest-labels N`"):
        manifest(fetched, data_cfg(target_labels=str(tmp_path / "missing.csv")))


def test_a_label_file_with_another_budget_is_refused_naming_both():
    for budget in ({"target_shots": 2}, {"target_labeled": 0.1}):
        with pytest.raises(
            ConfigError, match=r"target_labels \('l.csv'\) names the labelled target rows itself: set target_labeled to 0.*target_shots to null"
        ):
            data_cfg(target_labels="l.csv", **budget)


def test_the_stage_check_wants_the_file_and_dvc_yaml_to_list_it(fetched, tmp_path):
    params = parse_params({"data": {"dataset": "./mine", "split": {"target_labels": "labels.csv"}}})
    with pytest.raises(SplitError, match="labels.csv not found"):
        check_params(params, tmp_path)
    row = pool(manifest(fetched, data_cfg())[0]).iloc[0]
    write_labels(tmp_path / "labels.csv", [(row.path, "cat")])
    check_params(params, tmp_path)  # no dvc.yaml: nothing to keep in step
    (tmp_path / "dvc.yaml").write_text("stages:\n  split:\n    deps:\n    - data/raw\n")
    with pytest.raises(SplitError, match=r"labels.csv is not a dep of the split stage in .*dvc.yaml.*`python -m xfer.contract --write`"):
        check_params(params, tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  split:\n    deps:\n    - data/raw\n    - labels.csv\n")
    check_params(params, tmp_path)


def copy_into_pool(root, pool_dir, sources):
    pool_dir.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sources):
        shutil.copy(root / src, pool_dir / f"{i:02d}{(root / src).suffix}")


def test_a_target_pool_joins_target_unlabeled_only_and_moves_no_dataset_row(fetched, tmp_path):
    """data.split.target_pool: its images become target unlabeled rows with an unknown label (-1);
    a copy of a dataset image (here of target test images) is left out, so val and test stay as they are;
    hidden folders (an unfinished write) are not read."""
    from PIL import Image

    before, _ = manifest(fetched, data_cfg())
    pool_dir = fetched / "data" / "pool"
    # New content: source-domain images flipped (a domain the split does not read), plus copies of target test images.
    new = pool_dir / "batch1"
    new.mkdir(parents=True)
    for i, src in enumerate(sorted((fetched / "data/raw/mine/c").rglob("*.png"))[:4]):
        with Image.open(src) as img:
            img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(new / f"{i}.png")
    copy_into_pool(fetched, pool_dir / "batch2", pool(before, "test").path[:3])
    copy_into_pool(fetched, pool_dir / ".batch3.tmp", pool(before, "test").path[3:5])
    digests = [sha256_file(new / f"{i}.png") for i in range(4)]
    try:
        m, report = manifest(fetched, data_cfg(target_pool="data/pool"))
        again, _ = manifest(fetched, data_cfg(target_pool="data/pool"))
    finally:
        shutil.rmtree(pool_dir)
    added = m[m.path.str.startswith("data/pool/")]
    assert sorted(added.path) == [f"data/pool/batch1/{i}.png" for i in range(4)]
    assert (added.role == "target").all() and (added.split == "unlabeled").all() and (added.domain == "b").all()
    assert (added.label == -1).all() and (added.class_name == "").all()
    assert added.sha256.tolist() == digests
    rest = m[~m.path.str.startswith("data/pool/")].reset_index(drop=True)
    assert rest.equals(before.reset_index(drop=True))  # every dataset row where it was
    assert report["target_pool"] == {"folder": "data/pool", "images": 7, "left_out_as_copies": 3}
    assert m.equals(again)
    from xfer.data.split import class_names

    assert class_names(m) == ["cat", "dog", "owl"]


def test_a_bad_target_pool_is_refused_naming_the_fix(fetched, tmp_path):
    from xfer.data.split import check_pool

    with pytest.raises(SplitError, match=r"data/pool: no such folder .*\(`mkdir -p data/pool && dvc add data/pool`\)"):
        check_pool("data/pool", tmp_path)
    for bad, why in (("/abs/pool", "relative to the project root"), ("../pool", "relative to the project root"), ("data/raw/pool", "fetch stage's output")):
        with pytest.raises(SplitError, match=why):
            check_pool(bad, tmp_path)
    broken = fetched / "data" / "pool2"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    try:
        with pytest.raises(SplitError, match=r"1 image\(s\) cannot be read: .*x.png"):
            manifest(fetched, data_cfg(target_pool="data/pool2"))
    finally:
        shutil.rmtree(broken)
    params = parse_params({"data": {"dataset": "./mine", "split": {"target_pool": "pool"}}})
    (tmp_path / "pool").mkdir()
    check_params(params, tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  split:\n    deps:\n    - data/raw\n")
    with pytest.raises(SplitError, match=r"target_pool: pool is not a dep of the split stage"):
        check_params(params, tmp_path)
