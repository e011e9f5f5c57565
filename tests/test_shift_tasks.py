"""benchmarks/shift_tasks.py writes each task's images shifted as its docstring says (no features)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shift_tasks as st  # noqa: E402

# Small draws keep the test fast; the shifts do not depend on the counts.
PRINTED, HANDWRITTEN, SEED = 3, 4, 0


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """Every task written once, into its own folder."""
    roots = {}
    for name in ("digits", "handwritten_to_printed", "printed_to_inverted", "printed_to_noisy", "printed_to_rotated"):
        roots[name] = tmp_path_factory.mktemp(name)
        st.write_task_images(name, roots[name], PRINTED, HANDWRITTEN, SEED)
    return roots


def domain(written: dict[str, Path], task: str, role: int) -> tuple[np.ndarray, np.ndarray]:
    return st.read_domain(written[task] / st.TASK_DOMAINS[task][role])


def test_every_task_has_distinct_domains_and_a_description():
    assert set(st.TASKS) == set(st.TASK_DOMAINS) and len(st.TASKS) >= 6
    assert all(source != target for source, target in st.TASK_DOMAINS.values())


def test_digits_is_printed_to_handwritten(written):
    printed, labels = domain(written, "digits", 0)
    hand, hand_labels = domain(written, "digits", 1)
    assert printed.shape == (10 * PRINTED, 8, 8) and np.array_equal(np.bincount(labels), [PRINTED] * 10)
    assert np.array_equal(np.bincount(hand_labels), [HANDWRITTEN] * 10)
    assert hand.max() <= 16


def test_roles_swapped(written):
    for role in (0, 1):
        a, la = domain(written, "digits", role)
        b, lb = domain(written, "handwritten_to_printed", 1 - role)
        assert np.array_equal(a, b) and np.array_equal(la, lb)


def test_inverted_target_is_16_minus_the_handwritten_digits(written):
    hand, labels = domain(written, "digits", 1)
    inv, inv_labels = domain(written, "printed_to_inverted", 1)
    assert np.array_equal(labels, inv_labels)
    assert np.array_equal(inv.astype(int), 16 - hand.astype(int))


def test_noise_and_rotation_change_the_handwritten_digits_but_keep_their_ink(written):
    hand, labels = domain(written, "digits", 1)
    for task in ("printed_to_noisy", "printed_to_rotated"):
        shifted, shifted_labels = domain(written, task, 1)
        assert np.array_equal(labels, shifted_labels)
        changed = (shifted != hand).reshape(len(hand), -1).any(1)
        assert changed.all(), f"{task}: {int((~changed).sum())} images left as they were"
        # Still the same digits: each shifted image is closer to its own original than to the average other one.
        dist = ((shifted[:, None].astype(float) - hand[None].astype(float)) ** 2).sum(axis=(2, 3))
        assert (np.diag(dist) < dist.mean(1)).mean() > 0.9, task


def test_rotation_is_20_to_30_degrees():
    bar = np.zeros((1, 8, 8), dtype=np.uint8)
    bar[0, :, 3:5] = 16  # a vertical bar: its principal axis tilts by the rotation angle
    for seed in range(5):
        turned = st.rotated(bar, np.random.default_rng(seed))[0].astype(float)
        ys, xs = np.nonzero(turned)
        cov = np.cov(np.stack([xs, ys]), aweights=turned[ys, xs])
        axis = np.linalg.eigh(cov)[1][:, -1]
        tilt = np.degrees(np.arctan2(abs(axis[0]), abs(axis[1])))
        assert 15 <= tilt <= 35, tilt


def test_fonts_task_splits_the_fonts_and_thickens_the_target(tmp_path):
    dejavu, others = st._font_family_split()
    assert dejavu and others and not set(dejavu) & set(others)
    st.write_task_images("fonts_to_fonts", tmp_path, PRINTED, HANDWRITTEN, SEED)
    source, _ = st.read_domain(tmp_path / st.TASK_DOMAINS["fonts_to_fonts"][0])
    target, _ = st.read_domain(tmp_path / st.TASK_DOMAINS["fonts_to_fonts"][1])
    thin, _ = st.render_printed(others, PRINTED, SEED + 1)
    assert target.astype(float).mean() > thin.astype(float).mean() + 1  # thicker strokes: more ink
    assert source.shape == target.shape == (10 * PRINTED, 8, 8)


def test_same_seed_same_bytes(tmp_path, written):
    again = tmp_path / "again"
    st.write_task_images("printed_to_noisy", again, PRINTED, HANDWRITTEN, SEED)
    first = sorted(p.relative_to(written["printed_to_noisy"]) for p in written["printed_to_noisy"].rglob("*.png"))
    assert first == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((written["printed_to_noisy"] / p).read_bytes() == (again / p).read_bytes() for p in first)
