import pytest
import torch

from xfer.io import atomic_dir, save_torch, save_with, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "out.json"
    write_json(dest, {"v": 1})

    def crash(tmp):
        tmp.write_text('{"v": 2, "half')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        save_with(dest, crash)
    assert dest.read_text().strip().endswith("}") and '"v": 1' in dest.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_swaps_whole_folders(tmp_path):
    dest = tmp_path / "data"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_dir(dest) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]


def test_failed_atomic_dir_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "data"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise RuntimeError("crash")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_saved_weights_are_byte_identical_and_load_back(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    a, b = save_torch(tmp_path / "a.pt", state), save_torch(tmp_path / "b.pt", state)
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(torch.load(a, weights_only=True)["w"], state["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def test_a_full_disk_is_named_with_the_path_and_what_it_needed():
    """/dev/full answers every write with ENOSPC, as a full file system does (the file-size limit,
    EFBIG, is tested on a real stage in test_faults_nan.py)."""
    import errno

    from xfer.io import NoSpaceError, naming_no_space

    with pytest.raises(NoSpaceError) as caught:
        with naming_no_space("/dev/full", size=4096):
            with open("/dev/full", "wb", buffering=0) as f:
                f.write(b"x" * 4096)
    assert caught.value.errno == errno.ENOSPC
    assert "no room to write /dev/full: it needs 4,096 bytes" in str(caught.value) and "ENOSPC" in str(caught.value)
