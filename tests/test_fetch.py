"""Fetch: any source -> data/raw/<name>/<domain>/<class>/<image>, validated, never half-written."""

import json
import shutil

import pandas as pd
import pytest
from datasets import CLASSES, image_folder, tar_folder, zip_folder

from xfer.config import ConfigError, parse_params
from xfer.data.fetch import REPORT, fetch_dataset
from xfer.data.normalise import LayoutError
from xfer.data.sources import SourceError, check_source, registry, registry_entry_problems, resolve_source
from xfer.data.validate import ValidationError, read_catalog
from xfer.io import sha256_file


def data_cfg(dataset, **data):
    domains = data.pop("domains_used", ("a", "b"))
    return parse_params({"data": {"dataset": str(dataset), "source_domain": domains[0], "target_domain": domains[1], **data}}).data


def fetch(tmp_path, cfg):
    return fetch_dataset(cfg, tmp_path / "data" / "raw", tmp_path / "data" / "downloads", root=tmp_path, progress=False)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(tmp_path):
    """Temporary folders a failed fetch might leave behind."""
    raw, downloads = tmp_path / "data" / "raw", tmp_path / "data" / "downloads"
    return [p.name for d in (raw, downloads) if d.exists() for p in d.iterdir() if p.name.startswith(".")]


def test_nested_folder_is_normalised_into_domain_class_image(tmp_path):
    # office31-like: wrapper/<domain>/images/<class>/<image>
    image_folder(tmp_path / "mine", {"a": 3, "b": 2}, wrapper="office", inner="images")
    summary = fetch(tmp_path, data_cfg("./mine"))
    out = tmp_path / "data" / "raw" / "mine"
    assert summary["classes"] == list(CLASSES)
    assert {d: v["images"] for d, v in summary["domains"].items()} == {"a": 9, "b": 6}
    catalog = read_catalog(out)
    assert sorted(catalog.path) == sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*.png"))
    assert (out / "a" / "cat" / "000.png").read_bytes() == (tmp_path / "mine/office/a/images/cat/000.png").read_bytes()
    assert all(catalog.sha256 == [sha256_file(out / p) for p in catalog.path])
    report = json.loads((out / REPORT).read_text())
    assert report["domains"]["b"]["per_class"] == {"cat": 2, "dog": 2, "owl": 2}
    # The user's folder is copied, never moved or changed.
    assert len(list((tmp_path / "mine").rglob("*.png"))) == 15


def test_corrupt_image_and_non_image_file_are_excluded_and_counted(tmp_path):
    image_folder(tmp_path / "mine", {"a": 30, "b": 30})
    (tmp_path / "mine/b/dog/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 a truncated jpeg")
    (tmp_path / "mine/b/dog/notes.txt").write_text("not an image")
    summary = fetch(tmp_path, data_cfg("./mine", max_corrupt_fraction=0.05))
    out = tmp_path / "data" / "raw" / "mine"
    report = json.loads((out / REPORT).read_text())
    assert report["domains"]["b"]["corrupt"] == 1 and report["domains"]["a"]["corrupt"] == 0
    assert report["domains"]["b"]["corrupt_files"][0]["path"].endswith("dog/broken.jpg")
    assert report["domains"]["b"]["non_image_files"] == 1
    assert summary["domains"]["b"]["images"] == 90
    assert not (out / "b" / "dog" / "broken.jpg").exists() and not (out / "b" / "dog" / "notes.txt").exists()
    assert "b/dog/broken.jpg" not in set(read_catalog(out).path)


def test_too_many_corrupt_images_stop_the_fetch_and_keep_the_earlier_copy(tmp_path):
    image_folder(tmp_path / "mine", {"a": 5, "b": 5})
    fetch(tmp_path, data_cfg("./mine"))
    before = snapshot(tmp_path / "data" / "raw" / "mine")
    (tmp_path / "mine/a/owl/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValidationError, match=r"a: 1 of 16.*max_corrupt_fraction"):
        fetch(tmp_path, data_cfg("./mine", max_corrupt_fraction=0.01))
    assert snapshot(tmp_path / "data" / "raw" / "mine") == before
    assert leftovers(tmp_path) == []


def test_empty_class_folder_is_an_error_unless_dropped(tmp_path):
    image_folder(tmp_path / "mine", {"a": 3, "b": 3})
    shutil.rmtree(tmp_path / "mine/b/owl")
    (tmp_path / "mine/b/owl").mkdir()
    with pytest.raises(LayoutError, match=r"(?s)'owl' is missing in b \(empty folder\).*data.classes.drop"):
        fetch(tmp_path, data_cfg("./mine"))
    assert not (tmp_path / "data" / "raw" / "mine").exists() and leftovers(tmp_path) == []
    summary = fetch(tmp_path, data_cfg("./mine", classes={"drop": ["owl"]}))
    assert summary["classes"] == ["cat", "dog"] and summary["domains"]["a"]["images"] == 6
    report = json.loads((tmp_path / "data/raw/mine" / REPORT).read_text())
    assert report["domains"]["b"]["empty_class_folders"] == ["owl"]


def test_class_in_one_domain_only_is_an_error_unless_mapped_or_dropped(tmp_path):
    image_folder(tmp_path / "mine", {"a": 2, "b": 2})
    image_folder(tmp_path / "mine", {"a": 2}, classes=("Back_Pack",), seed=1)
    image_folder(tmp_path / "mine", {"b": 2}, classes=("back_pack",), seed=2)
    with pytest.raises(LayoutError) as err:
        fetch(tmp_path, data_cfg("./mine"))
    msg = str(err.value)
    assert "'Back_Pack' is missing in b (no folder)" in msg and "the same as 'back_pack'?" in msg
    summary = fetch(tmp_path, data_cfg("./mine", classes={"rename": {"Back_Pack": "back_pack"}}))
    assert summary["classes"] == ["back_pack", *CLASSES]
    summary = fetch(tmp_path, data_cfg("./mine", classes={"drop": ["Back_Pack", "back_pack"]}))
    assert summary["classes"] == list(CLASSES)
    with pytest.raises(LayoutError, match=r"drop names \['zebra'\]"):
        fetch(tmp_path, data_cfg("./mine", classes={"drop": ["zebra"]}))


def test_explicit_domains_and_a_folder_that_is_not_domains(tmp_path):
    image_folder(tmp_path / "mine", {"x/photos": 2, "y/drawings": 2})
    summary = fetch(tmp_path, data_cfg("./mine", domains={"a": "x/photos", "b": "y/drawings"}))
    assert set(summary["domains"]) == {"a", "b"}
    # One domain's class folders, without a domain folder above them.
    image_folder(tmp_path / "flat", {"": 2})
    with pytest.raises(LayoutError, match="cat holds images but no class folders"):
        fetch(tmp_path, data_cfg("./flat"))
    with pytest.raises(LayoutError, match="'nope' not found"):
        fetch(tmp_path, data_cfg("./mine", domains={"a": "x/photos", "b": "nope"}))


def test_local_archives_zip_and_tar_give_the_same_catalog_as_the_folder(tmp_path):
    image_folder(tmp_path / "mine", {"a": 2, "b": 2}, wrapper="top")
    fetch(tmp_path, data_cfg("./mine", name="set"))
    expected = read_catalog(tmp_path / "data/raw/set")
    for archive in (zip_folder(tmp_path / "mine", tmp_path / "mine.zip"), tar_folder(tmp_path / "mine", tmp_path / "mine.tar.gz")):
        fetch(tmp_path, data_cfg(f"./{archive.name}", name="set", sha256=sha256_file(archive)))
        pd.testing.assert_frame_equal(read_catalog(tmp_path / "data/raw/set"), expected)


def test_switching_dataset_leaves_only_the_current_one_in_raw(tmp_path):
    image_folder(tmp_path / "one", {"a": 2, "b": 2})
    image_folder(tmp_path / "two", {"a": 2, "b": 2}, seed=3)
    fetch(tmp_path, data_cfg("./one"))
    fetch(tmp_path, data_cfg("./two"))
    assert [p.name for p in (tmp_path / "data" / "raw").iterdir()] == ["two"]


def test_sources_resolve_and_bad_ones_say_what_is_valid(tmp_path):
    assert resolve_source(data_cfg("digits", domains_used=("printed", "handwritten"))).kind == "digits"
    assert resolve_source(data_cfg("builtin:digits", domains_used=("printed", "handwritten"))).kind == "digits"
    url = resolve_source(data_cfg("https://example.org/dl/PACS.tar.gz", sha256="ab" * 32))
    assert (url.kind, url.name, url.archives[0].filename) == ("archive", "PACS", "PACS.tar.gz")
    with pytest.raises(ConfigError, match="data.sha256 is required"):
        data_cfg("https://example.org/PACS.zip")
    with pytest.raises(ConfigError, match="only http:// and https://"):
        data_cfg("ftp://example.org/PACS.zip", sha256="ab" * 32)
    with pytest.raises(ConfigError, match=r"not a known dataset; choose from \[.*'digits'"):
        data_cfg("ofice31")
    with pytest.raises(ConfigError, match=r"target_domain \['sketch'\] not a domain of 'digits'"):
        data_cfg("digits", domains_used=("printed", "sketch"))
    with pytest.raises(SourceError, match="folder not found"):
        check_source(resolve_source(data_cfg("./missing")), tmp_path)


def test_registry_entries_are_data_with_url_sha256_and_layout():
    entries = registry()
    assert "digits" in entries and len(entries) >= 2
    for name, entry in entries.items():
        assert registry_entry_problems(name, entry) == []
        assert len(entry["domains"]) >= 2
        if entry["loader"] != "digits":
            for archive in entry["archives"]:
                assert archive["url"].startswith(("https://", "http://"))
                # sha256, or the md5 where that is all the publisher gives; or no digest and
                # the entry says why, in which case fetch refuses it (below).
                assert len(archive.get("sha256", "")) == 64 or len(archive.get("md5", "")) == 32 or entry["unverified"]
    with_sha256 = [n for n, e in entries.items() if e["loader"] != "digits" and all("sha256" in a for a in e["archives"])]
    assert "domainnet" in with_sha256
    # The check itself catches what a bad entry would lack.
    assert registry_entry_problems("x", {"loader": "archive", "domains": {"a": "a"}, "archives": [{"url": "https://h/x.zip"}]})
    assert registry_entry_problems("x", {"loader": "archive", "domains": {"a": "a"}, "archives": [{"url": "https://h/x.zip", "sha256": "abc"}]})
    assert registry_entry_problems("x", {"loader": "archive", "domains": {}, "archives": [{"url": "https://h/x.zip", "sha256": "0" * 64}]})


def test_a_registry_entry_without_published_digests_is_refused_before_any_download(tmp_path):
    cfg = data_cfg("visda2017", domains_used=("synthetic", "real"))
    with pytest.raises(SourceError, match=r"no checksum.*set data.dataset to the unpacked folder"):
        check_source(resolve_source(cfg), tmp_path)
    with pytest.raises(SourceError):
        fetch(tmp_path, cfg)
    assert not (tmp_path / "data" / "downloads").exists()


def _staging_child(downloads: str, die: bool) -> None:
    """A process inside a fetch's staging folder: SIGKILLed there (die) or alive until the test ends it."""
    import os
    import signal
    import time

    from xfer.data.fetch import STAGING_PREFIX
    from xfer.procs import owned_tempdir

    with owned_tempdir(downloads, STAGING_PREFIX) as staging:
        (staging / "tree").mkdir()
        (staging / "tree" / "half.png").write_bytes(b"half")
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)


def test_a_killed_fetchs_staging_folder_is_removed_by_the_next_fetch_and_a_live_ones_kept(tmp_path):
    """Before: a fetch killed mid-way left data/downloads/.staging-* for ever (SIGKILL runs no cleanup)."""
    import multiprocessing as mp
    import time

    downloads = tmp_path / "data" / "downloads"
    ctx = mp.get_context("fork")
    dead = ctx.Process(target=_staging_child, args=(str(downloads), True))
    dead.start()
    dead.join(timeout=60)
    assert dead.exitcode == -9
    live = ctx.Process(target=_staging_child, args=(str(downloads), False))
    live.start()
    try:
        deadline = time.monotonic() + 60
        while len(list(downloads.glob(".staging-*/tree/half.png"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        left = sorted(p.name for p in downloads.glob(".staging-*"))
        assert len(left) == 2, left
        live_one = next(n for n in left if f"-{live.pid}-" in n)
        (downloads / ".staging-tmpabc123").mkdir()  # another naming (an older xfer's): not ours to judge

        image_folder(tmp_path / "mine", {"a": 3, "b": 2})
        fetch(tmp_path, data_cfg("./mine"))

        assert sorted(p.name for p in downloads.iterdir() if p.name.startswith(".staging-")) == sorted([live_one, ".staging-tmpabc123"])
        assert (downloads / live_one / "tree" / "half.png").read_bytes() == b"half"
    finally:
        live.kill()
        live.join(timeout=30)
