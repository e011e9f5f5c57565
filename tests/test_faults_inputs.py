"""Fault campaign, inputs (issue 17, Paths / Predict / Names and files, Part 6): hostile names,
special files and decompression bombs are refused or skipped with a clear message, never a
traceback, a hang or a write outside the project; odd but valid class names work end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml
from datasets import image_folder, write_image
from helpers import REPO, TINY_PARAMS, write_params
from PIL import Image

from xfer.config import ConfigError, DataConfig, parse_params
from xfer.data.fetch import REPORT, fetch_dataset
from xfer.data.normalise import LayoutError
from xfer.data.validate import ValidationError, read_catalog
from xfer.predictor import as_pil, image_files

NAMES = ("NA", "None", "a+b", "café au lait")


@pytest.fixture(autouse=True)
def pil_limit():
    """Fetch sets PIL's process-wide pixel limit from its params: give the next test PIL's own."""
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


def data_cfg(dataset: str, **data) -> DataConfig:
    return parse_params({"data": {"dataset": dataset, "source_domain": "a", "target_domain": "b", **data}}).data


def fetch(root: Path, cfg: DataConfig) -> dict:
    return fetch_dataset(cfg, root / "data" / "raw", root / "data" / "downloads", root=root, progress=False)


def report(root: Path, name: str = "mine") -> dict:
    return json.loads((root / "data" / "raw" / name / REPORT).read_text())


# --- Paths: data.domains keys and numbers are refused by config, before any work ----------------


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("{outside}", "is a path"),
        ("..", "is '..'"),
        ("x/../../y", "is a path"),
        ("back\\slash", "is a path"),
        ("bell\x07", "control character"),
        ("new\nline", "control character"),
        (".hidden", "starts with '.'"),
    ],
)
def test_a_domain_key_that_is_not_one_plain_folder_name_stops_every_stage_before_any_write(tmp_path, tiny_params, capsys, key, problem):
    """Before: an absolute key passed config and fetch wrote images outside the project;
    `..` was stopped only by MLflow refusing the param name, after the data was fetched."""
    from flows.stages import main

    outside = tmp_path / "outside"
    key = key.format(outside=outside)
    root = tmp_path / "project"
    root.mkdir()
    image_folder(root / "mine", {"x": 2, "b": 2})
    tiny_params["data"].update(dataset="./mine", domains={key: "x", "b": "b"}, source_domain=key, target_domain="b")
    write_params(root, tiny_params)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["fetch", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "data.domains" in err and repr(key) in err and problem in err, err
    assert "plain folder name" in err and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not outside.exists()


def test_class_rename_targets_are_plain_names_too():
    with pytest.raises(ConfigError, match=r"data\.classes\.rename: .*class name '\.\./up' is a path"):
        parse_params({"data": {"classes": {"rename": {"x": "../up"}}}})
    # Odd but plain names pass.
    assert parse_params({"data": {"classes": {"rename": {"x": "café au lait", "y": "a+b", "z": "NA"}}}})


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("data", "max_unpacked_gb", ".inf", "finite number"),
        ("data", "max_unpacked_gb", ".nan", "finite number"),
        ("data", "max_unpacked_gb", "1.0e+300", "less than or equal to 1000000"),
        ("data", "max_image_pixels", "0", "greater than or equal to 1"),
        ("data", "max_corrupt_fraction", ".nan", "finite number"),
        ("finetune", "warmup_epochs", ".inf", "finite number"),
    ],
)
def test_non_finite_or_absurd_numbers_are_refused_by_config(tmp_path, tiny_params, capsys, section, key, value, message):
    """Before: `data.max_unpacked_gb: .inf` passed config, then fetch died with OverflowError."""
    from flows.stages import main

    text = yaml.safe_dump(tiny_params, sort_keys=False).replace(f"  {key}: {tiny_params[section][key]}\n", f"  {key}: {value}\n", 1)
    assert f"{key}: {value}" in text
    (tmp_path / "params.yaml").write_text(text)
    assert main(["fetch", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{section}.{key}" in err and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# --- Names and files: folder names checked, special files never opened ----------------------


def test_a_class_folder_name_that_is_not_utf8_is_refused_naming_it_and_nothing_is_written(tmp_path):
    """Before: UnicodeEncodeError ('surrogates not allowed') from deep inside fetch.
    Refused, not renamed: the name must be the same text in images.csv, the manifest, MLflow and
    the model's class names, and no param could name a folder whose name is not text."""
    image_folder(tmp_path / "mine", {"a": 2, "b": 2})
    for domain in ("a", "b"):
        folder = os.fsencode(tmp_path / "mine" / domain) + b"/caf\xe9"
        os.mkdir(folder)
        write_image(Path(os.fsdecode(folder + b"/0.png")), seed=7)
    with pytest.raises(LayoutError) as err:
        fetch(tmp_path, data_cfg("./mine"))
    msg = str(err.value)
    assert "class folder 'caf\\xe9'" in msg and "not valid UTF-8" in msg and "convmv" in msg, msg
    assert msg.encode("utf-8")  # the message itself prints anywhere
    assert not (tmp_path / "data" / "raw").exists() or not any((tmp_path / "data" / "raw").iterdir())


def test_an_image_name_with_a_newline_is_refused_naming_it(tmp_path):
    image_folder(tmp_path / "mine", {"a": 2, "b": 2})
    write_image(tmp_path / "mine" / "b" / "dog" / "two\nlines.png", seed=9)
    with pytest.raises(LayoutError, match=r"image file 'two\\nlines.png' \(at 'b/dog/two\\nlines.png'\) contains a control character"):
        fetch(tmp_path, data_cfg("./mine"))


def _unblock_reader(fifo: Path) -> bool:
    """If someone is blocked opening `fifo` for reading, let them read EOF; True if someone was."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


def test_fifo_socket_and_dangling_link_in_a_class_folder_are_skipped_counted_and_never_opened(tmp_path):
    """Before: a FIFO hung fetch (which then ignored SIGTERM); a dangling link gave a FileNotFoundError traceback.
    A link to a device (/dev/zero) is skipped the same way."""
    image_folder(tmp_path / "mine", {"a": 4, "b": 4})
    dog = tmp_path / "mine" / "b" / "dog"
    os.mkfifo(dog / "pipe.png")
    os.symlink(tmp_path / "gone.png", dog / "dangling.png")
    os.symlink(dog / "000.png", dog / "alias.png")  # a link to a real image is an image
    os.symlink("/dev/zero", dog / "zero.png")  # a device: reading it would never end
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(dog / "sock.png"))
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(summary=fetch(tmp_path, data_cfg("./mine"))), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # the FIFO was opened: let the read end, then fail
        _unblock_reader(dog / "pipe.png")
        worker.join(30)
        pytest.fail("fetch opened the FIFO and blocked on it")
    sock.close()
    assert "summary" in outcome, "fetch failed"
    assert outcome["summary"]["domains"]["b"]["special_files"] == 4
    b = report(tmp_path)["domains"]["b"]
    assert b["special_files"] == 4 and b["corrupt"] == 0
    assert sorted((e["path"], e["kind"]) for e in b["special_examples"]) == [
        ("b/dog/dangling.png", "a dangling link"),
        ("b/dog/pipe.png", "a FIFO, not a regular file"),
        ("b/dog/sock.png", "a socket, not a regular file"),
        ("b/dog/zero.png", "a device, not a regular file"),
    ]
    assert report(tmp_path)["domains"]["a"]["special_files"] == 0
    catalog = read_catalog(tmp_path / "data" / "raw" / "mine")
    assert set(catalog[catalog.domain == "b"].path.str.rsplit("/", n=1).str[1]) == {"000.png", "001.png", "002.png", "003.png", "alias.png"}
    assert (tmp_path / "data/raw/mine/b/dog/alias.png").read_bytes() == (dog / "000.png").read_bytes()


def bomb(path: Path, side: int) -> Path:
    """A PNG of side x side pixels that compresses to almost nothing (one colour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (side, side)).save(path)
    return path


def test_decompression_bombs_are_counted_as_unreadable_at_fetch_from_the_param(tmp_path):
    """data.max_image_pixels sets the limit. 120x120 is over it but under twice it (where PIL
    only warns); 300x300 is over twice it (where PIL itself refuses). Both are unreadable images,
    counted like corrupt ones; too many stop the fetch naming them."""
    image_folder(tmp_path / "mine", {"a": 3, "b": 3})
    bomb(tmp_path / "mine" / "a" / "cat" / "warn.png", 120)
    bomb(tmp_path / "mine" / "b" / "owl" / "bomb.png", 300)
    summary = fetch(tmp_path, data_cfg("./mine", max_image_pixels=10_000, max_corrupt_fraction=0.2))
    assert {d: (v["images"], v["corrupt"]) for d, v in summary["domains"].items()} == {"a": (9, 1), "b": (9, 1)}
    errors = {e["path"]: e["error"] for d in ("a", "b") for e in report(tmp_path)["domains"][d]["corrupt_files"]}
    assert set(errors) == {"a/cat/warn.png", "b/owl/bomb.png"}
    assert errors["a/cat/warn.png"].startswith("DecompressionBombError: 120x120 = 14400 pixels, more than data.max_image_pixels (10000)")
    assert "DecompressionBombError" in errors["b/owl/bomb.png"]
    # The same images pass under a limit they fit.
    summary = fetch(tmp_path, data_cfg("./mine", max_image_pixels=100_000))
    assert {d: v["corrupt"] for d, v in summary["domains"].items()} == {"a": 0, "b": 0}
    with pytest.raises(ValidationError, match=r"too many unreadable images.*a/cat/warn.png"):
        fetch(tmp_path, data_cfg("./mine", max_image_pixels=10_000))


def test_predict_inputs_skip_special_files_and_name_a_bomb(tmp_path):
    """The predictor's own checks: folders list only regular files (the rest counted), a path
    that is not one is refused without opening it, and a bomb is an ImageReadError naming it."""
    from xfer.data.formats import set_max_image_pixels
    from xfer.data.images import ImageReadError

    good = write_image(tmp_path / "in" / "good.png", seed=1)
    os.mkfifo(tmp_path / "in" / "pipe.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "in" / "dangling.png")
    skipped: list = []
    assert image_files([tmp_path / "in"], skipped) == [good]
    assert sorted((p.name, kind) for p, kind in skipped) == [("dangling.png", "a dangling link"), ("pipe.png", "a FIFO, not a regular file")]
    outcome: dict = {}

    def read_fifo():
        try:
            as_pil(tmp_path / "in" / "pipe.png")
        except Exception as err:  # noqa: BLE001 - inspected below
            outcome["error"] = err

    worker = threading.Thread(target=read_fifo, daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():
        _unblock_reader(tmp_path / "in" / "pipe.png")
        pytest.fail("the predictor opened the FIFO and blocked on it")
    assert isinstance(outcome.get("error"), ImageReadError) and "pipe.png: a FIFO, not a regular file" in str(outcome["error"])
    set_max_image_pixels(10_000)
    big = bomb(tmp_path / "in" / "big.png", 120)
    with pytest.raises(ImageReadError, match=rf"cannot read image {big}: DecompressionBombError: 120x120 = 14400 pixels"):
        as_pil(big)
    assert as_pil(good).size == (12, 12)


# --- End to end: odd class names through every stage, MLflow and `xfer predict` --------------


# The six stages' entry point (`python -m flows.stages <stage>`: check, then the stage's flow), one
# after the other in one process: each stage reads what the one before wrote to disk, as under
# `dvc repro`, without paying five more imports of torch, Prefect and MLflow.
STAGES_IN_ONE_PROCESS = """
import sys
from flows.stages import main
for stage in ("fetch", "split", "features", "head", "finetune", "evaluate"):
    if main([stage, "--root", sys.argv[1]]) != 0:
        sys.exit(f"stage {stage} failed")
"""


@pytest.fixture(scope="module")
def names_project(tmp_path_factory, prefect_api):
    """Classes NA, None, a+b and café au lait in a local two-domain folder, through all six stages
    in a real process. Before: NA/None crashed head (pandas read them as NaN); a+b ran five stages,
    then evaluate failed on the MLflow metric key."""
    root = tmp_path_factory.mktemp("names")
    image_folder(root / "shop", {"a": 8, "b": 8}, classes=NAMES)
    params = json.loads(json.dumps(TINY_PARAMS))
    params["data"].update(dataset="./shop", source_domain="a", target_domain="b", max_image_pixels=10_000)
    write_params(root, params)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env.pop("XFER_PIPELINE_RUN_ID", None)
    command = [sys.executable, "-c", STAGES_IN_ONE_PROCESS, str(root)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return root, env


def test_classes_named_na_none_a_plus_b_and_cafe_au_lait_work_end_to_end(names_project):
    import mlflow

    from tasks.tracking import metric_key

    root, _ = names_project
    manifest = pd.read_csv(root / "data" / "splits" / "manifest.csv", dtype=str, keep_default_na=False)
    assert sorted(manifest.class_name.unique()) == sorted(NAMES)
    scores = json.loads((root / "metrics" / "eval.json").read_text())
    per_class = scores["head"]["target_test"]["per_class_accuracy"]
    assert sorted(per_class) == sorted(NAMES)
    # MLflow: each class under its own key; a+b mapped, the rest as they are.
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("xfer").experiment_id], "tags.`xfer.stage` = 'evaluate'")
    logged = {k.split(".")[3]: v for k, v in run.data.metrics.items() if k.startswith("head.target_test.per_class_accuracy.")}
    expected = {metric_key(f"x.{n}").removeprefix("x."): per_class[n] for n in NAMES}
    assert logged == pytest.approx(expected)
    assert "NA" in logged and "None" in logged and "café au lait" in logged
    assert [k for k in logged if k.startswith("a_b-")] == [metric_key("x.a+b").removeprefix("x.")]
    versions = client.search_model_versions("name = 'xfer'")
    assert len(versions) == 1


def test_metric_keys_are_deterministic_valid_and_never_collide():
    from mlflow.utils.validation import _validate_metric_name

    from tasks.tracking import metric_key, metric_keys

    odd = ["a+b", "a-b", "a_b", "a b", "a*b", "a?b", " a", "a ", "NA", "None", "café au lait", "x..y", "日本"]
    keys = [metric_key(f"eval.per_class.{n}.accuracy") for n in odd]
    for key in keys:
        _validate_metric_name(key)
    assert len(set(keys)) == len(odd)
    assert [k.split(".")[2] for k in keys if k.split(".")[2] in odd] == ["a-b", "a_b", "a b", "NA", "None", "café au lait", "日本"]
    assert metric_key("eval.per_class.a+b.accuracy") == keys[0]  # the same in every run
    with pytest.raises(ValueError, match="both become"):
        metric_keys({"a+b": 1.0, metric_key("a+b"): 2.0})


def test_xfer_predict_skips_special_files_and_names_a_bomb_without_a_traceback(names_project, tmp_path):
    """Before: a decompression bomb in `xfer predict` gave exit 1 and a DecompressionBombError traceback."""
    root, env = names_project
    folder = tmp_path / "in"
    for i in range(3):
        write_image(folder / f"{i}.png", seed=100 + i)
    os.mkfifo(folder / "pipe.png")
    os.symlink(tmp_path / "gone.png", folder / "dangling.png")

    def predict(*inputs: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cli", "predict", *map(str, inputs), "--root", str(root), "--out", str(tmp_path / "p.csv")]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    ok = predict(folder)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "skipped 2 file(s) that are not regular files" in ok.stderr and "pipe.png (a FIFO" in ok.stderr
    frame = pd.read_csv(tmp_path / "p.csv", keep_default_na=False, dtype={"class": str})
    assert len(frame) == 3 and set(frame["class"]) <= set(NAMES)
    assert sorted(frame.columns[3:-2]) == sorted(NAMES) and list(frame.columns[-2:]) == ["ood_score", "out_of_distribution"]
    # Over data.max_image_pixels (10,000 in the project's params.yaml): one line naming the file.
    big = bomb(folder / "big.png", 120)
    (tmp_path / "p.csv").unlink()
    bad = predict(folder)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert f"cannot read image {big}: DecompressionBombError: 120x120 = 14400 pixels" in bad.stderr and "nothing written" in bad.stderr
    assert not (tmp_path / "p.csv").exists()
