"""Fetch from archives served on 127.0.0.1: download, resume, verify, refuse unsafe archives.

Every refusal leaves no partial dataset, no temporary folder, and any
earlier good copy as it was.
"""

import json
import zipfile

import pytest
from datasets import add_tar_member, image_folder, tar_folder, zip_folder
from http_server import serve_directory

from xfer.config import parse_params
from xfer.data.archives import UnsafeArchiveError
from xfer.data.download import ChecksumError
from xfer.data.fetch import fetch_dataset
from xfer.data.validate import read_catalog
from xfer.io import sha256_file


@pytest.fixture
def served(tmp_path):
    """Two domains of images as shop.zip and shop.tar.gz, served from 127.0.0.1."""
    image_folder(tmp_path / "src", {"a": 6, "b": 4}, wrapper="shop")
    www = tmp_path / "www"
    www.mkdir()
    zip_folder(tmp_path / "src", www / "shop.zip")
    tar_folder(tmp_path / "src", www / "shop.tar.gz")
    with serve_directory(www) as server:
        yield tmp_path, www, server


def cfg_for(url, sha256, **data):
    return parse_params({"data": {"dataset": url, "sha256": sha256, "name": "shop", "source_domain": "a", "target_domain": "b", **data}}).data


def fetch(root, cfg):
    return fetch_dataset(cfg, root / "data/raw", root / "data/downloads", root=root, progress=False)


def dataset_files(root):
    folder = root / "data/raw/shop"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else None


def temporaries(root):
    return [
        p.name for d in ("data/raw", "data/downloads") if (root / d).exists() for p in (root / d).iterdir() if p.name.startswith(".") or p.suffix == ".part"
    ]


@pytest.mark.parametrize("archive", ["shop.zip", "shop.tar.gz"])
def test_a_good_archive_is_downloaded_verified_and_unpacked(served, archive):
    root, www, server = served
    summary = fetch(root, cfg_for(server.url(archive), sha256_file(www / archive)))
    assert {d: v["images"] for d, v in summary["domains"].items()} == {"a": 18, "b": 12}
    catalog = read_catalog(root / "data/raw/shop")
    assert (root / "data/raw/shop" / catalog.path[0]).read_bytes() == (root / "src/shop" / catalog.path[0]).read_bytes()
    # The verified archive is kept: fetching again makes no request.
    fetch(root, cfg_for(server.url(archive), sha256_file(www / archive)))
    assert len(server.requests_for(archive)) == 1
    assert temporaries(root) == []


def test_a_dropped_connection_resumes_with_a_range_request(served):
    root, www, server = served
    size = (www / "shop.zip").stat().st_size
    server.drop_after("shop.zip", size // 3)
    fetch(root, cfg_for(server.url("shop.zip"), sha256_file(www / "shop.zip")))
    first, second = server.requests_for("shop.zip")
    assert first.sent == size // 3 and second.range == f"bytes={size // 3}-" and second.status == 206
    assert second.sent == size - size // 3
    assert len(read_catalog(root / "data/raw/shop")) == 30


def test_a_checksum_mismatch_names_both_digests_and_keeps_the_earlier_copy(served):
    root, www, server = served
    fetch(root, cfg_for(server.url("shop.zip"), sha256_file(www / "shop.zip")))
    before = dataset_files(root)
    actual = sha256_file(www / "shop.tar.gz")
    with pytest.raises(ChecksumError) as err:
        fetch(root, cfg_for(server.url("shop.tar.gz"), "0" * 64))
    assert "0" * 64 in str(err.value) and actual in str(err.value)
    assert dataset_files(root) == before and temporaries(root) == []
    assert not any(p.name.endswith("shop.tar.gz") for p in (root / "data/downloads").iterdir())


@pytest.mark.parametrize(
    "member",
    [
        {"name": "../escaped.png"},
        {"name": "shop/a/cat/../../../../escaped.png"},
        {"name": "/tmp/absolute.png"},
        {"name": "shop/a/cat/link.png", "symlink_to": "../../../../../etc/passwd"},
    ],
)
def test_an_archive_with_an_entry_outside_the_destination_is_refused_whole(served, member):
    root, www, server = served
    fetch(root, cfg_for(server.url("shop.zip"), sha256_file(www / "shop.zip")))
    before = dataset_files(root)
    evil = www / "evil.tar.gz"
    evil.write_bytes((www / "shop.tar.gz").read_bytes())
    add_tar_member(evil, **member)
    with pytest.raises(UnsafeArchiveError, match=member["name"].lstrip("/").split("/")[-1]):
        fetch(root, cfg_for(server.url("evil.tar.gz"), sha256_file(evil)))
    assert dataset_files(root) == before and temporaries(root) == []
    assert not (root / "data" / "escaped.png").exists() and not (root / "escaped.png").exists()


def test_a_zip_with_a_dotdot_entry_is_refused(served):
    root, www, server = served
    evil = www / "evil.zip"
    evil.write_bytes((www / "shop.zip").read_bytes())
    with zipfile.ZipFile(evil, "a") as zf:
        zf.writestr("../../outside.png", b"x")
    with pytest.raises(UnsafeArchiveError, match="outside.png"):
        fetch(root, cfg_for(server.url("evil.zip"), sha256_file(evil)))
    assert dataset_files(root) is None and temporaries(root) == []


def test_an_archive_over_the_size_limit_is_refused(served):
    root, www, server = served
    with pytest.raises(ValueError, match="limit"):
        fetch(root, cfg_for(server.url("shop.tar.gz"), sha256_file(www / "shop.tar.gz"), max_unpacked_gb=1e-6))
    assert dataset_files(root) is None and temporaries(root) == []


def test_corrupt_jpeg_in_an_archive_is_counted_and_left_out(served):
    root, www, server = served
    archive = www / "shop.tar.gz"
    add_tar_member(archive, "shop/b/dog/broken.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF truncated")
    add_tar_member(archive, "shop/b/dog/readme.txt", b"not an image")
    fetch(root, cfg_for(server.url("shop.tar.gz"), sha256_file(archive), max_corrupt_fraction=0.1))
    report = json.loads((root / "data/raw/shop/validation.json").read_text())
    assert report["domains"]["b"]["corrupt"] == 1 and report["domains"]["b"]["non_image_files"] == 1
    assert report["domains"]["b"]["corrupt_files"][0]["path"] == "shop/b/dog/broken.jpg"
    assert "b/dog/broken.jpg" not in set(read_catalog(root / "data/raw/shop").path)


def test_the_fetch_task_retries_a_failed_download_but_never_a_bad_checksum(served, prefect_api):
    """Prefect's retry resumes the download; a checksum mismatch fails at once."""
    from helpers import TINY_PARAMS, write_params
    from prefect import flow

    from tasks.fetch import fetch as fetch_task
    from xfer.config import load_params
    from xfer.layout import Layout

    root, www, server = served
    params = json.loads(json.dumps(TINY_PARAMS))
    params["data"].update(dataset=server.url("shop.zip"), sha256=sha256_file(www / "shop.zip"), name="shop", source_domain="a", target_domain="b")
    write_params(root, params)

    @flow
    def fetch_flow():
        return fetch_task.with_options(retry_delay_seconds=0)(Layout(root), load_params(root / "params.yaml"))

    server.fail("shop.zip", 404)  # the download gives up at once (DownloadError), the task tries again
    assert fetch_flow() == {"images": {"a": 18, "b": 12}}
    assert [r.status for r in server.requests_for("shop.zip")] == [404, 200]

    params["data"].update(sha256="f" * 64)
    write_params(root, params)
    with pytest.raises(ChecksumError):
        fetch_flow()
    assert [r.status for r in server.requests_for("shop.zip")] == [404, 200, 200]


@pytest.mark.parametrize(
    "defect, message",
    [
        ("empty_class_folder", r"'owl' is missing in b \(empty folder\)"),
        ("class_in_one_domain", r"'fox' is missing in b \(no folder\)"),
    ],
)
def test_served_archive_whose_domains_disagree_on_classes_leaves_nothing(served, defect, message):
    root, www, server = served
    fetch(root, cfg_for(server.url("shop.zip"), sha256_file(www / "shop.zip")))
    before = dataset_files(root)
    src = root / "src"
    if defect == "empty_class_folder":
        for image in (src / "shop/b/owl").iterdir():
            image.unlink()
    else:
        image_folder(src, {"a": 2}, classes=("fox",), wrapper="shop", seed=9)
    archive = tar_folder(src, www / f"{defect}.tar.gz")
    with pytest.raises(ValueError, match=message):
        fetch(root, cfg_for(server.url(archive.name), sha256_file(archive)))
    assert dataset_files(root) == before and temporaries(root) == []
    # Dropping the class makes the same archive usable.
    drop = "owl" if defect == "empty_class_folder" else "fox"
    summary = fetch(root, cfg_for(server.url(archive.name), sha256_file(archive), classes={"drop": [drop]}))
    assert summary["classes"] == sorted({"cat", "dog", "owl"} - {drop})


def test_user_named_domains_and_classes_log_as_one_json_param_each():
    """Folder names may hold characters MLflow param keys refuse; their mappings are logged whole."""
    from tasks.tracking import loggable_params

    data = cfg_for("./shop.zip", None, domains={"a": "Shop A (2019)", "b": "b"}, classes={"rename": {"Back Pack!": "back_pack"}})
    logged = loggable_params({"data": data.model_dump(mode="json")})
    assert json.loads(logged["data.domains"]) == {"a": "Shop A (2019)", "b": "b"}
    assert json.loads(logged["data.classes.rename"]) == {"Back Pack!": "back_pack"}
    assert not any("!" in key or "(" in key for key in logged)


def test_a_dataset_in_several_archives_is_merged_and_clashing_archives_are_refused(served, tmp_path):
    """DomainNet's layout: one archive per domain, unpacked side by side into one dataset."""
    from xfer.data.fetch import materialise, normalise_and_validate
    from xfer.data.sources import Archive, DatasetSource

    root, www, server = served
    for domain in ("a", "b"):
        zip_folder(root / "src" / "shop" / domain, www / f"{domain}.zip")

    def archive(name):
        return Archive(server.url(name), sha256_file(www / name), name)

    cfg = cfg_for("./unused.zip", None)
    source = DatasetSource("archive", "shop", {"a": "a", "b": "b"}, (archive("a.zip"), archive("b.zip")))
    staging = tmp_path / "staging"
    staging.mkdir()
    # Each zip holds <class>/<image> at its root: the classes of a and b would land on each other.
    with pytest.raises(ValueError, match="two archives both hold a top-level 'cat'"):
        materialise(source, cfg, root, root / "data/downloads", staging, progress=False)

    for domain in ("a", "b"):
        (www / f"{domain}.zip").unlink()
        with zipfile.ZipFile(www / f"{domain}.zip", "w") as zf:
            for path in sorted((root / "src/shop" / domain).rglob("*.png")):
                zf.write(path, f"{domain}/{path.relative_to(root / 'src/shop' / domain).as_posix()}")
    source = DatasetSource("archive", "shop", {"a": "a", "b": "b"}, (archive("a.zip"), archive("b.zip")))
    staging = tmp_path / "staging2"
    staging.mkdir()
    tree, owned = materialise(source, cfg, root, root / "data/downloads", staging, progress=False)
    assert owned and sorted(p.name for p in tree.iterdir()) == ["a", "b"]
    out = tmp_path / "out"
    out.mkdir()
    summary = normalise_and_validate(tree, source, cfg, out, move=True, progress=False)
    assert {d: v["images"] for d, v in summary["domains"].items()} == {"a": 18, "b": 12}
