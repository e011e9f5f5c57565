import fcntl
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO
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


def test_extract_with_loader_workers_gives_the_same_rows_in_the_same_order(tmp_path, manifest):
    model = backbone()
    inline = feats.extract(model, manifest, PREP, batch_size=3, root=tmp_path, progress=False)
    workers = feats.extract(model, manifest, PREP, batch_size=3, root=tmp_path, progress=False, num_workers=2)
    np.testing.assert_array_equal(inline, workers)


# A thread-exit hook like the one Prefect 3.8's log service registers in a flow
# run: harmless in the process that registered it, fatal in a forked copy.
_HOOK = {"armed": False, "registered": False, "parent": os.getpid()}


def _hook_that_fails_in_forked_copies():
    if _HOOK["armed"] and os.getpid() != _HOOK["parent"]:
        raise AssertionError("a thread-exit hook of the parent ran in a forked child")


def test_loader_workers_do_not_inherit_the_callers_thread_exit_hooks(tmp_path, manifest):
    if not _HOOK["registered"]:
        # Private, as in Prefect (prefect/_internal/concurrency/services.py); there is no way to unregister.
        threading._register_atexit(_hook_that_fails_in_forked_copies)
        _HOOK["registered"] = True
    _HOOK["armed"] = True
    try:
        model = backbone()
        for _ in range(3):
            got = feats.extract(model, manifest, PREP, batch_size=4, root=tmp_path, progress=False, num_workers=1)
            assert got.shape == (10, model.num_features)
    finally:
        _HOOK["armed"] = False


def _to_tensor_reference(img, prep):
    """to_tensor as it was before it was made faster: the numbers it must still give."""
    img = img.convert("RGB").resize((prep.image_size, prep.image_size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "LA"])
@pytest.mark.parametrize("shape", [(8, 8), (70, 100), (5, 3)])
def test_to_tensor_gives_exactly_the_reference_numbers(mode, shape):
    from xfer.data.images import to_tensor

    rng = np.random.default_rng(sum(map(ord, mode)) + shape[0])
    img = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), mode="RGB").convert(mode)
    for prep in (PREP, Preprocessing(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), Preprocessing(17, (0.1, 0.9, 0.3), (2.0, 0.7, 1.3))):
        got, want = to_tensor(img, prep), _to_tensor_reference(img, prep)
        assert got.dtype == torch.float32 and got.shape == (3, prep.image_size, prep.image_size)
        assert torch.equal(got, want), f"{mode} {shape} {prep}: max diff {(got - want).abs().max()}"


def test_key_changes_with_every_input(manifest):
    base = feats.cache_key("m", "w1", PREP, manifest)
    assert base == feats.cache_key("m", "w1", PREP, manifest.copy())
    assert base == feats.cache_key("m", "w1", PREP, manifest, dtype="float32")
    changed = manifest.copy()
    changed.loc[3, "sha256"] = "f" * 64
    assert (
        len(
            {
                base,
                feats.cache_key("m2", "w1", PREP, manifest),
                feats.cache_key("m", "w2", PREP, manifest),
                feats.cache_key("m", "w1", Preprocessing(64, PREP.mean, PREP.std), manifest),
                feats.cache_key("m", "w1", PREP, changed),
                feats.cache_key("m", "w1", PREP, manifest, dtype="float16"),
            }
        )
        == 6
    )


def test_cpu_keys_are_the_keys_from_before_devices_were_a_choice():
    """The CPU path keeps its keys (so its entries, meta.json and dvc.lock), and each device and
    precision gets a key of its own. The two literals were computed before `compute` existed."""
    m = pd.DataFrame(
        {
            "path": [f"img/{i}.png" for i in range(4)],
            "label": [0, 1, 0, 1],
            "domain": ["a", "a", "b", "b"],
            "role": ["source", "source", "target", "target"],
            "split": ["train", "val", "test", "unlabeled"],
            "sha256": [str(i) * 64 for i in range(4)],
        }
    )
    args = ("tf_efficientnet_lite0", "w" * 64, PREP, m)
    assert feats.cache_key(*args) == feats.cache_key(*args, compute=feats.Compute("cpu")) == "876748ee92920762"
    assert feats.cache_key(*args, dtype="float16") == "c3e97ce5f404b34b"
    keys = {feats.cache_key(*args), feats.cache_key(*args, compute=feats.Compute("cuda")), feats.cache_key(*args, compute=feats.Compute("cuda", half=True))}
    assert len(keys) == 3


@pytest.mark.parametrize(
    "setting, half, cuda, want",
    [
        ("auto", False, False, feats.Compute("cpu")),
        ("auto", True, False, feats.Compute("cpu")),  # half is for CUDA: a laptop runs float32
        ("cpu", False, True, feats.Compute("cpu")),
        ("auto", False, True, feats.Compute("cuda")),
        ("auto", True, True, feats.Compute("cuda", half=True)),
        ("cuda", True, True, feats.Compute("cuda", half=True)),
    ],
)
def test_features_device_resolves_to_what_the_machine_has(setting, half, cuda, want):
    assert feats.compute_for(setting, half, cuda_available=cuda) == want


def test_a_device_the_machine_lacks_is_refused_before_any_work():
    with pytest.raises(feats.FeatureCacheError, match="'cuda' was asked for but no CUDA device"):
        feats.compute_for("cuda", False, cuda_available=False)
    with pytest.raises(feats.FeatureCacheError, match="'tpu' is not one of auto, cpu, cuda"):
        feats.compute_for("tpu", False)
    # This machine: its real answer, whatever it is, agrees with torch.
    assert feats.compute_for("auto", False).device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_half_precision_is_refused_on_the_cpu(manifest, tmp_path):
    from xfer.config import FeaturesConfig

    with pytest.raises(ValueError, match="features.half: true runs float16 on CUDA only"):
        FeaturesConfig(device="cpu", half=True)
    with pytest.raises(feats.FeatureCacheError, match="CUDA only"):
        feats.extract(backbone(), manifest, PREP, batch_size=4, root=tmp_path, progress=False, half=True)


def test_unknown_dtype_is_refused_with_the_choices(manifest, tmp_path):
    with pytest.raises(feats.FeatureCacheError, match="float32, float16"):
        feats.cache_key("m", "w1", PREP, manifest, dtype="bfloat16")
    with pytest.raises(feats.FeatureCacheError, match="float64"):
        feats.get_or_compute(tmp_path, "k", lambda: np.zeros((10, 2)), manifest, {}, dtype="float64")
    assert list(tmp_path.iterdir()) == [tmp_path / "img"]


def test_entry_round_trip_and_selection(tmp_path, manifest):
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    entry = feats.write_entry(tmp_path / "cache", "k1", x, manifest, {"backbone": "m"})
    feats.publish_current(entry, tmp_path / "out" / "current")
    fs = feats.load_current(tmp_path / "out" / "current")
    assert fs.meta["key"] == "k1" and fs.meta["dim"] == 2 and fs.meta["dtype"] == "float32"
    sx, sy = fs.select("target", "test")
    np.testing.assert_array_equal(sx, x[6:])
    np.testing.assert_array_equal(sy, manifest.label.to_numpy()[6:])


def test_float16_entry_is_memory_mapped_and_selects_as_float32(tmp_path, manifest):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, (10, 64)).astype(np.float32)
    entry, hit = feats.get_or_compute(tmp_path / "cache", "k16", lambda: x, manifest, {}, dtype="float16")
    assert not hit
    fs = feats.load_entry(entry)
    assert isinstance(fs.features, np.memmap) and fs.features.dtype == np.float16
    assert fs.meta["dtype"] == "float16"
    # float16 keeps 11 significant bits: a relative error of at most 2**-11.
    np.testing.assert_allclose(fs.features, x, rtol=2**-11, atol=0)
    sx, _ = fs.select("source", "train")
    assert type(sx) is np.ndarray and sx.dtype == np.float32
    np.testing.assert_array_equal(sx, x[:6].astype(np.float16).astype(np.float32))
    # Half the bytes on disk (plus the same .npy header).
    f32 = feats.write_entry(tmp_path / "cache", "k32", x, manifest, {})
    size = lambda e: (e / feats.FEATURES_FILE).stat().st_size  # noqa: E731
    assert size(entry) - 128 == (size(f32) - 128) // 2


def test_float16_overflow_is_refused_not_stored_as_inf(tmp_path, manifest):
    x = np.full((10, 2), 1e6, np.float32)
    with pytest.raises(feats.FeatureCacheError, match="1e[+]06, beyond the float16 range; store them as float32"):
        feats.write_entry(tmp_path, "k", x, manifest, {}, dtype="float16")
    assert list(tmp_path.iterdir()) == [tmp_path / "img"]


def test_a_hit_never_computes(tmp_path, manifest):
    calls = []

    def compute():
        calls.append(1)
        if len(calls) > 1:
            raise AssertionError("compute ran on a cache hit")
        return np.ones((10, 4), np.float32)

    first = feats.get_or_compute(tmp_path, "k", compute, manifest, {"backbone": "m"})
    second = feats.get_or_compute(tmp_path, "k", compute, manifest, {"backbone": "m"})
    assert first == (tmp_path / "k", False) and second == (tmp_path / "k", True)
    assert len(calls) == 1
    np.testing.assert_array_equal(feats.load_entry(tmp_path / "k").features, np.ones((10, 4)))


# --- two real processes on one key -------------------------------------------------


def _compute_slowly_and_count(counter: str) -> np.ndarray:
    # O_APPEND: both processes' lines land whole, so a second computation would show.
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    return np.arange(20, dtype=np.float32).reshape(10, 2)


def _racer(cache_root, manifest, counter, barrier, results):
    code = 1
    try:
        barrier.wait(timeout=30)
        entry, hit = feats.get_or_compute(cache_root, "shared", lambda: _compute_slowly_and_count(counter), manifest, {"backbone": "m"})
        results.put((os.getpid(), str(entry), hit))
        results.close()
        results.join_thread()
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        # A forked child inherits the parent's atexit hooks, and Prefect's (registered once the
        # suite has started a Prefect server) fail outside the parent: skip them.
        os._exit(code)


def _die_while_computing(cache_root, manifest, started):
    def compute():
        started.set()
        time.sleep(30)  # killed long before this ends

    feats.get_or_compute(cache_root, "k", compute, manifest, {})


def _mp():
    # fork, not spawn: a spawned child re-imports torch (seconds each). Forked
    # children are separate processes all the same: each opens its own lock
    # file descriptor after the fork, and they touch no torch thread pool.
    return mp.get_context("fork")


def test_two_processes_on_one_key_compute_it_once(tmp_path, manifest):
    ctx = _mp()
    cache, counter = tmp_path / "cache", tmp_path / "calls.txt"
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(cache, manifest, str(counter), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = sorted((results.get(timeout=60) for _ in procs), key=lambda r: r[2])
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1
    (miss_pid, miss_entry, miss_hit), (_, hit_entry, hit_hit) = outcomes
    assert (miss_hit, hit_hit) == (False, True) and miss_entry == hit_entry == str(cache / "shared")
    assert counter.read_text().split() == [str(miss_pid)]
    fs = feats.load_entry(cache / "shared")
    np.testing.assert_array_equal(fs.features, np.arange(20, dtype=np.float32).reshape(10, 2))
    assert sorted(p.name for p in cache.iterdir()) == ["shared", "shared.lock"]


def _assert_lock_is_free(cache_root, key):
    fd = os.open(feats.lock_path(cache_root, key), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
    finally:
        os.close(fd)


def test_a_crash_in_compute_leaves_nothing_and_no_held_lock(tmp_path, manifest):
    def crash():
        raise RuntimeError("out of memory mid-extraction")

    with pytest.raises(RuntimeError, match="mid-extraction"):
        feats.get_or_compute(tmp_path / "cache", "k", crash, manifest, {})
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k.lock"]
    _assert_lock_is_free(tmp_path / "cache", "k")
    entry, hit = feats.get_or_compute(tmp_path / "cache", "k", lambda: np.ones((10, 2), np.float32), manifest, {})
    assert not hit and feats.is_complete(entry)


def test_a_process_killed_while_computing_does_not_block_the_key(tmp_path, manifest):
    ctx = _mp()
    cache, started = tmp_path / "cache", ctx.Event()
    proc = ctx.Process(target=_die_while_computing, args=(cache, manifest, started))
    proc.start()
    assert started.wait(timeout=60), "the child never started computing"
    with pytest.raises(BlockingIOError):  # it really holds the lock while it computes
        _assert_lock_is_free(cache, "k")
    proc.kill()
    proc.join(timeout=30)
    assert [p.name for p in cache.iterdir()] == ["k.lock"]
    _assert_lock_is_free(cache, "k")
    entry, hit = feats.get_or_compute(cache, "k", lambda: np.ones((10, 2), np.float32), manifest, {})
    assert not hit and feats.is_complete(entry)


def test_incomplete_entry_is_refused(tmp_path, manifest):
    feats.write_entry(tmp_path, "k1", np.zeros((10, 2), np.float32), manifest, {})
    (tmp_path / "k1" / feats.INDEX_FILE).unlink()
    assert not feats.is_complete(tmp_path / "k1")
    with pytest.raises(feats.FeatureCacheError, match="incomplete"):
        feats.load_entry(tmp_path / "k1")
    with pytest.raises(feats.FeatureCacheError, match="features stage"):
        feats.load_current(tmp_path / "empty")


def test_an_incomplete_entry_is_recomputed_whole(tmp_path, manifest):
    feats.write_entry(tmp_path, "k1", np.zeros((10, 2), np.float32), manifest, {})
    (tmp_path / "k1" / feats.META_FILE).unlink()
    entry, hit = feats.get_or_compute(tmp_path, "k1", lambda: np.ones((10, 2), np.float32), manifest, {})
    assert not hit
    np.testing.assert_array_equal(feats.load_entry(entry).features, np.ones((10, 2)))


# --- published outputs and damage -------------------------------------------------


def _flip_a_byte(path, offset=-1):
    """Change one byte in place, as a disk error or a stray write would: same size, same inode."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_an_entry_records_its_digests_and_a_damaged_one_is_refused(tmp_path, manifest):
    entry = feats.write_entry(tmp_path, "k1", np.ones((10, 2), np.float32), manifest, {})
    meta = feats.load_entry(entry).meta
    assert set(meta[feats.DIGESTS]) == {feats.FEATURES_FILE, feats.INDEX_FILE}
    assert feats.entry_problem(entry) is None
    _flip_a_byte(entry / feats.FEATURES_FILE)
    with pytest.raises(feats.FeatureCacheError, match=f"{feats.FEATURES_FILE} has sha256 .* but meta.json records"):
        feats.load_entry(entry)
    # The loader still opens it when told not to check: the check, not the format, caught it.
    assert feats.load_entry(entry, verify=False).features.shape == (10, 2)


def test_a_damaged_index_is_refused(tmp_path, manifest):
    entry = feats.write_entry(tmp_path, "k1", np.ones((10, 2), np.float32), manifest, {})
    text = (entry / feats.INDEX_FILE).read_text()
    (entry / feats.INDEX_FILE).write_text(text.replace("target,test", "source,train", 1))
    with pytest.raises(feats.FeatureCacheError, match=f"{feats.INDEX_FILE} has sha256"):
        feats.load_entry(entry)


def test_a_damaged_cache_entry_is_computed_again_never_a_hit(tmp_path, manifest, caplog):
    entry, hit = feats.get_or_compute(tmp_path, "k", lambda: np.ones((10, 2), np.float32), manifest, {})
    _flip_a_byte(entry / feats.FEATURES_FILE)
    with caplog.at_level("WARNING", logger="xfer.features"):
        entry, hit = feats.get_or_compute(tmp_path, "k", lambda: np.full((10, 2), 2, np.float32), manifest, {})
    assert not hit and "is damaged" in caplog.text
    np.testing.assert_array_equal(feats.load_entry(entry).features, np.full((10, 2), 2))


def test_an_entry_without_digests_is_not_trusted(tmp_path, manifest):
    import json

    entry = feats.write_entry(tmp_path, "k", np.ones((10, 2), np.float32), manifest, {})
    meta = json.loads((entry / feats.META_FILE).read_text())
    del meta[feats.DIGESTS]
    (entry / feats.META_FILE).write_text(json.dumps(meta))
    assert "no file digests" in feats.entry_problem(entry)
    _, hit = feats.get_or_compute(tmp_path, "k", lambda: np.ones((10, 2), np.float32), manifest, {})
    assert not hit and feats.entry_problem(entry) is None


def test_publish_links_the_entry_and_replaces_the_old_output_whole(tmp_path, manifest):
    cache, out = tmp_path / "cache", tmp_path / "features" / "current"
    a = feats.write_entry(cache, "ka", np.ones((10, 2), np.float32), manifest, {})
    b = feats.write_entry(cache, "kb", np.zeros((10, 3), np.float32), manifest, {})
    assert feats.publish_current(a, out) is True
    for name in feats.ENTRY_FILES:
        assert (out / name).stat().st_ino == (a / name).stat().st_ino  # a hard link: no bytes copied
    assert feats.load_current(out).meta["key"] == "ka"
    feats.publish_current(b, out)
    assert feats.load_current(out).meta["key"] == "kb" and feats.load_current(out).features.shape == (10, 3)
    # Nothing left beside the output: no temporary or old folders.
    assert sorted(p.name for p in out.parent.iterdir()) == ["current"]


def test_publish_copies_across_filesystems(tmp_path, manifest):
    """/dev/shm is a tmpfs: a hard link from the test's folder to it is impossible (EXDEV)."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temporary folder")
    entry = feats.write_entry(tmp_path / "cache", "k", np.arange(20, dtype=np.float32).reshape(10, 2), manifest, {})
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        out = feats.Path(shm) / "current"
        assert feats.publish_current(entry, out) is False
        assert (out / feats.FEATURES_FILE).stat().st_ino != (entry / feats.FEATURES_FILE).stat().st_ino
        np.testing.assert_array_equal(feats.load_current(out).features, np.arange(20).reshape(10, 2))


def test_a_damaged_entry_is_never_published_and_the_old_output_stays(tmp_path, manifest):
    cache, out = tmp_path / "cache", tmp_path / "features"
    good = feats.write_entry(cache, "good", np.ones((10, 2), np.float32), manifest, {})
    bad = feats.write_entry(cache, "bad", np.zeros((10, 2), np.float32), manifest, {})
    feats.publish_current(good, out / "current")
    feats.publish_members({"m1": good}, out / "members")
    _flip_a_byte(bad / feats.FEATURES_FILE)
    with pytest.raises(feats.FeatureCacheError, match="damaged"):
        feats.publish_current(bad, out / "current")
    with pytest.raises(feats.FeatureCacheError, match="damaged"):
        feats.publish_members({"m1": good, "m2": bad}, out / "members")
    assert feats.load_current(out / "current").meta["key"] == "good"
    assert feats.load_member(out / "members", "m1").meta["key"] == "good"
    assert sorted(p.name for p in out.iterdir()) == ["current", "members"]


def test_a_damaged_published_output_is_refused_by_its_readers(tmp_path, manifest):
    cache, out = tmp_path / "cache", tmp_path / "features"
    entry = feats.write_entry(cache, "k", np.ones((10, 2), np.float32), manifest, {})
    feats.publish_current(entry, out / "current")
    feats.publish_members({"m1": entry}, out / "members")
    # Replaced, not changed in place: the cache entry keeps its bytes.
    damaged = np.ones((10, 2), np.float32)
    damaged[3, 1] = 7
    for path in (out / "current" / feats.FEATURES_FILE, out / "members" / "m1" / feats.FEATURES_FILE):
        path.unlink()
        np.save(path, damaged)
    with pytest.raises(feats.FeatureCacheError, match="current are damaged .*features.npy has sha256"):
        feats.load_current(out / "current")
    with pytest.raises(feats.FeatureCacheError, match="m1 are damaged .*features.npy has sha256"):
        feats.load_member(out / "members", "m1")
    assert feats.entry_problem(entry) is None


def test_members_output_lists_its_members_and_drops_removed_ones(tmp_path, manifest):
    import json

    cache, members = tmp_path / "cache", tmp_path / "features" / "members"
    a = feats.write_entry(cache, "ka", np.ones((10, 2), np.float32), manifest, {})
    b = feats.write_entry(cache, "kb", np.zeros((10, 4), np.float32), manifest, {})
    feats.publish_members({"head_a_32px": a, "head_b_40px": b}, members)
    assert json.loads((members / feats.MEMBERS_FILE).read_text()) == {"head_a_32px": "ka", "head_b_40px": "kb"}
    assert feats.load_member(members, "head_b_40px").features.shape == (10, 4)
    feats.publish_members({"head_a_32px": a}, members)
    assert sorted(p.name for p in members.iterdir()) == ["head_a_32px", feats.MEMBERS_FILE]
    with pytest.raises(feats.FeatureCacheError, match=r"head_b_40px .* \(it has: head_a_32px\)"):
        feats.load_member(members, "head_b_40px")
    feats.publish_members({}, members)
    assert [p.name for p in members.iterdir()] == [feats.MEMBERS_FILE]
    with pytest.raises(feats.FeatureCacheError, match="it has: none"):
        feats.load_member(members, "head_a_32px")


def test_a_member_folder_whose_key_members_json_does_not_name_is_refused(tmp_path, manifest):
    import json

    cache, members = tmp_path / "cache", tmp_path / "features" / "members"
    a = feats.write_entry(cache, "ka", np.ones((10, 2), np.float32), manifest, {})
    feats.publish_members({"m1": a}, members)
    (members / feats.MEMBERS_FILE).write_text(json.dumps({"m1": "kother"}))
    with pytest.raises(feats.FeatureCacheError, match="holds the features of key ka, but .* names kother"):
        feats.load_member(members, "m1")


def test_concatenated_features_sit_side_by_side_row_for_row():
    index = pd.DataFrame({"path": ["a.png", "b.png", "c.png"]})
    a = feats.FeatureSet(np.arange(6, dtype=np.float32).reshape(3, 2), index, {"key": "ka", "backbone": "m1"})
    b = feats.FeatureSet(np.arange(9, dtype=np.float16).reshape(3, 3), index.copy(), {"key": "kb", "backbone": "m2"})
    both = feats.concatenate([a, b])
    assert both.features.dtype == np.float32 and both.features.shape == (3, 5)
    np.testing.assert_array_equal(both.features[1], [2, 3, 3, 4, 5])
    assert both.meta["key"] == "ka+kb" and both.meta["dim"] == 5
    shuffled = feats.FeatureSet(b.features, index.iloc[[1, 0, 2]].reset_index(drop=True), b.meta)
    with pytest.raises(feats.FeatureCacheError, match="not in the rows of m1"):
        feats.concatenate([a, shuffled])


def test_feature_fusion_needs_a_member():
    from xfer.config import BackboneConfig, FusionConfig

    with pytest.raises(ValueError, match="fusion.backbones is empty"):
        FusionConfig(mode="features")
    member = BackboneConfig(name="test_resnet", pretrained=False)
    assert FusionConfig(backbones=[member]).probability_members == [member]
    assert FusionConfig(backbones=[member], mode="features").probability_members == []


def test_a_killed_writes_leftover_is_removed_when_its_key_is_computed_again(tmp_path, manifest):
    """Before: `.<key>.<random>.tmp` of a write killed mid-way stayed in the cache until `xfer cache gc`."""
    cache = tmp_path / "cache"
    code = (
        "import os, signal, sys\n"
        "from xfer.io import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'features.npy').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    for key in ("k", "other"):
        proc = subprocess.run([sys.executable, "-c", code, str(cache / key)], cwd=REPO, capture_output=True, timeout=120)
        assert proc.returncode == -9, proc.stderr
    assert len(list(cache.glob(".k.*.tmp"))) == 1 and len(list(cache.glob(".other.*.tmp"))) == 1

    entry, hit = feats.get_or_compute(cache, "k", lambda: np.ones((10, 2), np.float32), manifest, {})

    assert not hit and feats.is_complete(entry)
    # Its own key's leftover is gone; another key's is left to `xfer cache gc` (or that key's next computation).
    assert list(cache.glob(".k.*")) == [] and len(list(cache.glob(".other.*.tmp"))) == 1
