"""`xfer cache list` / `xfer cache gc` on real caches: real entries, real locks held by other processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pandas as pd
import pytest

from cli.main import main as xfer
from xfer import feature_cache as fc
from xfer import features as feats
from xfer.layout import Layout


def _manifest(rows: int = 6) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [f"img/{i}.png" for i in range(rows)],
            "label": [i % 2 for i in range(rows)],
            "domain": "a",
            "role": "source",
            "split": "train",
            "sha256": [f"{i:064d}" for i in range(rows)],
        }
    )


def _entry(layout: Layout, key: str, backbone: str, size: int, dim: int = 4):
    meta = {"backbone": backbone, "weights_digest": "w", "preprocessing": {"image_size": size, "mean": [0.5] * 3, "std": [0.5] * 3}}
    return feats.write_entry(layout.feature_cache, key, np.ones((6, dim), np.float32), _manifest(), meta)


@pytest.fixture
def project(tmp_path):
    """A cache holding the current entry, one member, one stale entry and a crashed run's shards."""
    layout = Layout(tmp_path)
    current = _entry(layout, "aaaaaaaaaaaaaaaa", "test_efficientnet", 32)
    member = _entry(layout, "bbbbbbbbbbbbbbbb", "test_resnet", 40, dim=8)
    _entry(layout, "cccccccccccccccc", "test_convnext", 48, dim=64)
    feats.write_shard(feats.shard_path(feats.shards_dir(layout.feature_cache, "dddddddddddddddd"), 0, 6), np.ones((6, 4)), 6)
    feats.publish_current(current, layout.features_current)
    feats.publish_members({"head_test_resnet_40px": member}, layout.features_members)
    return layout


def _dirs(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_list_names_every_entry_and_what_uses_it(project):
    entries = {e.key: e for e in fc.list_entries(project.feature_cache, project.features_current, project.features_members)}
    assert set(entries) == {"aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc", "dddddddddddddddd"}
    a, b, c, d = (entries[k * 16] for k in "abcd")
    assert (a.backbone, a.image_size, a.rows, a.used_by) == ("test_efficientnet", 32, 6, ["current"])
    assert (b.backbone, b.image_size, b.used_by) == ("test_resnet", 40, ["member head_test_resnet_40px"])
    assert (c.backbone, c.image_size, c.used_by, c.kind) == ("test_convnext", 48, [], "entry")
    assert d.kind == "shards" and d.used_by == []
    assert c.bytes == sum(p.stat().st_size for p in c.path.iterdir()) and c.bytes > 6 * 64 * 4
    # The published entries share their inodes with the outputs: removing them would free nothing.
    assert a.reclaimable == 0 and c.reclaimable == c.bytes


def test_list_cli_prints_a_row_per_entry(project, capsys):
    assert xfer(["cache", "list", "--root", str(project.root)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line[:16] in {k * 16 for k in "abcd"} or line.startswith("dddd")}
    assert rows["aaaaaaaaaaaaaaaa"].split()[1:4] == ["test_efficientnet", "32", "6"] and rows["aaaaaaaaaaaaaaaa"].endswith("current")
    assert rows["bbbbbbbbbbbbbbbb"].endswith("member head_test_resnet_40px")
    assert rows["cccccccccccccccc"].endswith(" -")
    assert "shards of an unfinished computation" in rows["dddddddddddddddd"]
    assert out.splitlines()[0].startswith(f"{project.feature_cache}: 3 entries")


def test_list_verify_reports_a_damaged_entry_and_fails(project, capsys):
    stale = project.feature_cache / "cccccccccccccccc" / feats.FEATURES_FILE
    data = bytearray(stale.read_bytes())
    data[-1] ^= 0xFF
    stale.write_bytes(bytes(data))
    assert xfer(["cache", "list", "--root", str(project.root)]) == 0  # without --verify nothing reads the files
    assert xfer(["cache", "list", "--verify", "--root", str(project.root)]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines()[::-1] if x.startswith("cccc"))
    assert "DAMAGED: features.npy has sha256" in line


def test_gc_dry_run_removes_nothing_and_says_what_it_would_free(project, capsys):
    before = _dirs(project.feature_cache)
    stale = fc.list_entries(project.feature_cache, project.features_current, project.features_members)
    expected = sum(e.bytes for e in stale if not e.used_by)
    assert xfer(["cache", "gc", "--dry-run", "--root", str(project.root)]) == 0
    out = capsys.readouterr().out
    assert "would remove cccccccccccccccc (test_convnext 48px" in out and "would remove dddddddddddddddd (shards" in out
    assert f"would free {fc.human_bytes(expected)}" in out
    assert _dirs(project.feature_cache) == before
    assert not (project.feature_cache / "cccccccccccccccc.lock").exists()  # a dry run creates no lock file


def test_gc_removes_what_no_output_holds_and_keeps_current_and_members(project, capsys):
    result = fc.gc(project.feature_cache, project.features_current, project.features_members, project.features)
    assert sorted(e.key for e in result.removed) == ["cccccccccccccccc", "dddddddddddddddd"]
    assert sorted(e.key for e in result.kept) == ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]
    assert _dirs(project.feature_cache) == ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]
    assert result.reclaimed == sum(e.bytes for e in result.removed) > 0
    # What later stages read is untouched and whole.
    assert feats.load_current(project.features_current).meta["key"] == "aaaaaaaaaaaaaaaa"
    assert feats.load_member(project.features_members, "head_test_resnet_40px").features.shape == (6, 8)
    again = fc.gc(project.feature_cache, project.features_current, project.features_members, project.features)
    assert again.removed == [] and again.reclaimed == 0


def _hold(lock, ready, release, cache_root, key):
    try:
        with feats.key_lock(cache_root, key) if lock == "key" else feats.cache_in_use(cache_root):
            ready.set()
            release.wait(60)
    finally:
        os._exit(0)  # skip the parent's atexit hooks (Prefect's) in the forked child


@pytest.fixture
def holder():
    ctx = mp.get_context("fork")
    procs = []

    def start(lock: str, cache_root, key: str = ""):
        ready, release = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_hold, args=(lock, ready, release, cache_root, key))
        proc.start()
        assert ready.wait(30)
        procs.append((proc, release))

    yield start
    for proc, release in procs:
        release.set()
        proc.join(30)


def test_gc_never_removes_an_entry_another_process_holds_the_lock_for(project, holder):
    holder("key", project.feature_cache, "cccccccccccccccc")
    result = fc.gc(project.feature_cache, project.features_current, project.features_members)
    assert [e.key for e in result.busy] == ["cccccccccccccccc"]
    assert [e.key for e in result.removed] == ["dddddddddddddddd"]
    assert "cccccccccccccccc" in _dirs(project.feature_cache)


def test_gc_refuses_while_a_features_stage_uses_the_cache(project, holder, capsys):
    holder("in-use", project.feature_cache)
    before = _dirs(project.feature_cache)
    assert xfer(["cache", "gc", "--root", str(project.root)]) == 2
    assert "a features stage is using the feature cache" in capsys.readouterr().err
    assert _dirs(project.feature_cache) == before


def test_gc_refuses_without_a_current_output(project, capsys):
    import shutil

    shutil.rmtree(project.features_current)
    before = _dirs(project.feature_cache)
    assert xfer(["cache", "gc", "--root", str(project.root)]) == 2
    err = capsys.readouterr().err
    assert f"{project.features_current} holds no features" in err and "run the features stage first" in err
    assert _dirs(project.feature_cache) == before


def test_gc_removes_the_old_layouts_entries_from_the_features_folder(project, capsys):
    """An older xfer kept its cache in data/features/ itself: `<key>/`, current.json, locks."""
    old = project.features / "eeeeeeeeeeeeeeee"
    old.mkdir()
    (old / "features.npy").write_bytes(b"x" * 1000)
    (project.features / "current.json").write_text(json.dumps({"key": "eeeeeeeeeeeeeeee"}))
    (project.features / "eeeeeeeeeeeeeeee.lock").write_text("")
    assert xfer(["cache", "list", "--root", str(project.root)]) == 0
    assert "3 files or folders of the old cache layout" in capsys.readouterr().out
    assert xfer(["cache", "gc", "--root", str(project.root)]) == 0
    out = capsys.readouterr().out
    assert f"removed {old} (old cache layout)" in out
    assert _dirs(project.features) == ["current", "members"] and sorted(p.name for p in project.features.iterdir()) == ["current", "members"]


def test_cache_cli_names_what_is_valid(project, capsys):
    with pytest.raises(SystemExit) as exit_:
        xfer(["cache", "prune"])
    assert exit_.value.code == 2 and "invalid choice: 'prune'" in capsys.readouterr().err


def test_gc_removes_what_interrupted_writes_left_unless_the_key_is_being_written(project, holder, capsys):
    """A process killed mid-write leaves `.<key>.<random>.tmp` (xfer.io.atomic_dir); gc frees it, but not one being written now."""
    crashed = project.feature_cache / ".eeeeeeeeeeeeeeee.k3j_x9a1.tmp"
    live = project.feature_cache / ".ffffffffffffffff.p0q1r2s3.tmp"
    published = project.features / ".current.z9y8x7w6.tmp"
    for folder in (crashed, live, published):
        folder.mkdir()
        (folder / feats.FEATURES_FILE).write_bytes(b"x" * 5000)
    holder("key", project.feature_cache, "ffffffffffffffff")
    assert xfer(["cache", "gc", "--dry-run", "--root", str(project.root)]) == 0
    out = capsys.readouterr().out
    assert f"would remove {crashed} (left by an interrupted write)" in out and f"would remove {published}" in out
    assert str(live) not in out and crashed.is_dir()
    result = fc.gc(project.feature_cache, project.features_current, project.features_members, project.features)
    assert result.leftovers == [crashed, published] and result.other_bytes == 10000
    assert not crashed.exists() and not published.exists() and live.is_dir()


def test_gc_dry_run_too_refuses_while_a_features_stage_runs(project, holder, capsys):
    holder("in-use", project.feature_cache)
    assert xfer(["cache", "gc", "--dry-run", "--root", str(project.root)]) == 2
    assert "a features stage is using the feature cache" in capsys.readouterr().err
