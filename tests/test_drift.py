"""Drift tests (xfer/drift/): each keeps its level on windows from one distribution and finds a real shift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xfer.drift import DRIFT_TESTS, DriftError, Window, run_tests
from xfer.drift.accuracy import calibrate
from xfer.drift.base import permutation_p_value
from xfer.drift.mmd import mmd2, squared_distances

DIMS, CLASSES = 16, 4
WEIGHTS = np.random.default_rng(123).normal(size=(DIMS, CLASSES))


def window(rng: np.random.Generator, n: int, shift: float = 0.0, class_weights=None) -> Window:
    """n rows of a 4-class mixture in 16 dims (class means apart), its probabilities from one fixed linear model.
    `shift` moves every feature by that many standard deviations; `class_weights` changes the class mix."""
    means = np.random.default_rng(7).normal(scale=1.5, size=(CLASSES, DIMS))
    labels = rng.choice(CLASSES, size=n, p=class_weights)
    x = means[labels] + rng.normal(size=(n, DIMS)) + shift
    logits = x @ WEIGHTS
    p = np.exp(logits - logits.max(1, keepdims=True))
    return Window(x, p / p.sum(1, keepdims=True))


@pytest.mark.parametrize("name", list(DRIFT_TESTS))
def test_reference_against_reference_raises_no_alarm_in_19_of_20_seeded_draws(name):
    alarms = 0
    for draw in range(20):
        rng = np.random.default_rng(1000 + draw)
        alarms += DRIFT_TESTS[name](window(rng, 150), window(rng, 100), alpha=0.05, seed=draw).drift
    assert alarms <= 1, f"{name}: {alarms} false alarms in 20 draws at alpha 0.05"


@pytest.mark.parametrize("name, shift, class_weights", [
    ("mmd", 0.5, None),
    ("domain_classifier", 0.5, None),
    ("class_ks", 0.0, [0.85, 0.05, 0.05, 0.05]),  # label shift: the features of each class are as before
])  # fmt: skip
def test_a_real_shift_is_found_in_every_seeded_draw(name, shift, class_weights):
    for draw in range(10):
        rng = np.random.default_rng(2000 + draw)
        result = DRIFT_TESTS[name](window(rng, 150), window(rng, 100, shift, class_weights), alpha=0.05, seed=draw)
        assert result.drift, (draw, result)


def test_the_classifiers_auc_is_half_without_drift_and_near_one_with_a_large_one():
    rng = np.random.default_rng(5)
    same = DRIFT_TESTS["domain_classifier"](window(rng, 200), window(rng, 200), alpha=0.05, seed=0)
    far = DRIFT_TESTS["domain_classifier"](window(rng, 200), window(rng, 200, shift=3.0), alpha=0.05, seed=0)
    assert abs(same.detail["auc"] - 0.5) < 0.1 and far.detail["auc"] > 0.99


def test_mmd_matches_its_definition_and_a_permutation_p_value_is_never_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    kernel = np.exp(-squared_distances(x) / 2.0)
    is_new = np.array([False] * 4 + [True] * 3)
    a, b = x[:4], x[4:]

    def k(u, v):
        return np.exp(-((u[:, None, :] - v[None, :, :]) ** 2).sum(-1) / 2.0)

    expected = k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()
    np.testing.assert_allclose(mmd2(kernel, is_new)[0], expected, rtol=1e-12)
    assert permutation_p_value(5.0, np.zeros(99)) == 0.01 and permutation_p_value(0.0, np.zeros(99)) == 1.0


def test_the_same_windows_and_seed_give_the_same_answer():
    rng = np.random.default_rng(9)
    ref, new = window(rng, 60), window(rng, 40, shift=0.2)
    first = run_tests(ref, new, alpha=0.05, seed=3)
    again = run_tests(ref, new, alpha=0.05, seed=3)
    assert {k: v.as_dict() for k, v in first.items()} == {k: v.as_dict() for k, v in again.items()}


def test_atc_finds_the_accuracy_when_the_mix_of_easy_and_hard_images_shifts():
    """Easy images: confidence 0.8-1.0, always right; hard ones: confidence 0.5-0.7, right one time in
    four (over-confident). Calibrated where 60% are easy, ATC's threshold falls where the hard images'
    right share is, so it follows the accuracy as that mix moves; the mean confidence does not."""
    rng = np.random.default_rng(0)

    def outputs(n, easy_share):
        easy = rng.random(n) < easy_share
        confidence = np.where(easy, rng.uniform(0.8, 1.0, n), rng.uniform(0.5, 0.7, n))
        right = easy | (rng.random(n) < 0.25)
        return np.column_stack([confidence, 1 - confidence]), np.where(right, 0, 1)

    threshold = calibrate(*outputs(4000, 0.6))
    assert abs(threshold.calibration_accuracy - 0.7) < 0.02
    for easy_share in (0.6, 0.3, 0.9):
        probs, labels = outputs(4000, easy_share)
        accuracy = float((probs.argmax(1) == labels).mean())
        assert abs(threshold.estimate(probs) - accuracy) < 0.03, (easy_share, threshold.estimate(probs), accuracy)
        if easy_share == 0.3:
            assert probs.max(1).mean() - accuracy > 0.15  # the naive estimate is far off here


def test_windows_a_test_cannot_use_are_refused_naming_the_problem():
    rng = np.random.default_rng(0)
    with pytest.raises(DriftError, match="same n rows"):
        Window(rng.normal(size=(10, 4)), rng.random((9, 2)))
    with pytest.raises(DriftError, match="too small"):
        Window(rng.normal(size=(3, 4)), rng.random((3, 2)))
    with pytest.raises(DriftError, match="non-finite"):
        Window(np.full((10, 4), np.nan), rng.random((10, 2)))
    with pytest.raises(DriftError, match="different models"):
        run_tests(Window(rng.normal(size=(10, 4)), rng.random((10, 2))), Window(rng.normal(size=(10, 5)), rng.random((10, 2))), alpha=0.05, seed=0)
    with pytest.raises(DriftError, match="unknown drift tests"):
        run_tests(window(rng, 10), window(rng, 10), alpha=0.05, seed=0, tests=("kl",))
    with pytest.raises(DriftError, match="alpha 1.5"):
        run_tests(window(rng, 10), window(rng, 10), alpha=1.5, seed=0)


# ---- the monitor flow's core: new images, the trigger and its cooldown, the target pool ----


def monitor_report(drift: bool, drop: float) -> dict:
    return {"drift": drift, "retrain_wanted": drift and drop > 0.1, "accuracy": {"drop": drop}}


def test_a_retrain_is_triggered_only_when_wanted_with_a_pool_and_outside_the_cooldown():
    import datetime as dt

    from xfer.config import MonitorConfig
    from xfer.monitor import trigger_decision

    cfg = MonitorConfig(max_drop=0.1, cooldown_hours=24)
    now = dt.datetime(2026, 12, 2, 12, tzinfo=dt.timezone.utc)
    recent = {"time": (now - dt.timedelta(hours=23, minutes=59)).isoformat()}
    old = {"time": (now - dt.timedelta(hours=24)).isoformat()}
    wanted = monitor_report(True, 0.3)
    assert trigger_decision(wanted, cfg, "data/pool", None, now).trigger
    assert trigger_decision(wanted, cfg, "data/pool", old, now).trigger  # the cooldown is over at exactly 24 h
    held = trigger_decision(wanted, cfg, "data/pool", recent, now)
    assert not held.trigger and "within monitor.cooldown_hours 24" in held.reason and "23.98 h ago" in held.reason
    no_pool = trigger_decision(wanted, cfg, None, None, now)
    assert not no_pool.trigger and "data.split.target_pool is not set" in no_pool.reason
    small = trigger_decision(monitor_report(True, 0.05), cfg, "data/pool", None, now)
    assert not small.trigger and "within monitor.max_drop 0.1" in small.reason
    calm = trigger_decision(monitor_report(False, 0.5), cfg, "data/pool", None, now)
    assert not calm.trigger and calm.reason == "no retrain wanted: no drift"
    assert trigger_decision(wanted, MonitorConfig(cooldown_hours=0), "data/pool", {"time": now.isoformat()}, now).trigger
    # max_drop null: drift alone wants a retrain (monitor_images sets retrain_wanted so), and the reason says why.
    drift_only = trigger_decision({**monitor_report(True, -0.2), "retrain_wanted": True}, MonitorConfig(max_drop=None), "data/pool", None, now)
    assert drift_only.trigger and "max_drop null" in drift_only.reason


def test_images_join_the_pool_once_by_content_and_a_batch_whole(tmp_path):
    from xfer.data.split import pool_images
    from xfer.io import sha256_file
    from xfer.monitor import MonitorError, add_to_pool

    images = []
    for i in range(4):
        path = tmp_path / "in" / f"img{i}.PNG"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i % 3]) * 100)  # img3 repeats img0's content
        images.append(path)
    pool = tmp_path / "pool"
    added = add_to_pool(images, pool, "b1")
    assert [p.name for p in added] == sorted(f"{sha256_file(images[i])}.png" for i in range(3))
    assert {p.read_bytes() for p in added} == {bytes([i]) * 100 for i in range(3)}
    assert add_to_pool(images[:2], pool, "b2") == [] and not (pool / "b2").exists()  # held already: no empty batch
    new = tmp_path / "in" / "new.png"
    new.write_bytes(b"new" * 50)
    assert len(add_to_pool([images[0], new], pool, "b3")) == 1
    other = new.with_name("other.png")
    other.write_bytes(b"other")
    with pytest.raises(MonitorError, match="never rewritten"):
        add_to_pool([other], pool, "b1")
    assert sorted(p.parent.name for p in pool_images(pool)) == ["b1", "b1", "b1", "b3"]
    assert not [p for p in pool.iterdir() if p.name.startswith(".")]  # no temporary left


def test_an_image_is_tested_once_by_content(tmp_path):
    from xfer.monitor import record_checked, unchecked

    paths = []
    for name, content in (("a.png", b"a"), ("b.png", b"b"), ("a_again.png", b"a")):
        (tmp_path / name).write_bytes(content)
        paths.append(tmp_path / name)
    checked = tmp_path / "monitor" / "checked.csv"
    new, digests = unchecked(paths, checked)
    assert new == paths[:2] and len(set(digests)) == 2  # a copy of a's content is one image
    record_checked(checked, new[:1], digests[:1], "2026-12-02T00:00:00+00:00")
    assert unchecked(paths, checked)[0] == [paths[1]]
    record_checked(checked, [paths[1]], [digests[1]], "2026-12-02T01:00:00+00:00")
    assert unchecked(paths, checked)[0] == []
    assert checked.read_text().count("\n") == 3  # header and two rows, appended


class ArrayModel:
    """A model's predict_with_features as arrays: image i's row is row i (the interface monitor_images uses)."""

    def __init__(self, features, probabilities):
        # float32, as xfer.predictor gives them
        self.features, self.probabilities = np.float32(features), np.float32(probabilities)

    def predict_with_features(self, images, batch_size, on_batch=None):
        rows = [int(Path(p).stem.split("_")[0]) for p in images]
        self.embedded = getattr(self, "embedded", 0) + len(rows)
        return self.features[rows], self.probabilities[rows]


def test_max_drop_null_wants_a_retrain_on_drift_alone():
    from xfer.config import MonitorConfig
    from xfer.drift import Window
    from xfer.drift.accuracy import ConfidenceThreshold
    from xfer.monitor import Reference, monitor_images

    rng = np.random.default_rng(0)
    probabilities = np.full((60, 3), 0.1)
    probabilities[:, 0] = 0.8  # every row passes the threshold: the estimate stays 1.0, no drop
    reference = Reference(Window(np.float32(rng.normal(size=(60, 8))), np.float32(probabilities)), ConfidenceThreshold(0.5, 1.0, 60), {})  # saved as float32
    shifted = ArrayModel(rng.normal(size=(60, 8)) + 2.0, probabilities)
    images = [Path(f"{i}.png") for i in range(60)]
    kept, _ = monitor_images(shifted, reference, images, MonitorConfig(max_drop=0.1), seed=0)
    assert kept["drift"] and kept["accuracy"]["drop"] == 0 and not kept["retrain_wanted"]
    wanted, _ = monitor_images(shifted, reference, images, MonitorConfig(max_drop=None), seed=0)
    assert wanted["drift"] and wanted["retrain_wanted"]
    calm, _ = monitor_images(ArrayModel(reference.window.features, probabilities), reference, images, MonitorConfig(max_drop=None), seed=0)
    assert not calm["drift"] and not calm["retrain_wanted"]


def test_the_ood_flag_marks_about_the_calibrated_share_in_domain_and_every_far_image():
    from xfer.drift import DriftError
    from xfer.drift.ood import NearestNeighbourOOD

    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    in_domain = lambda n: centre + 0.3 * rng.normal(size=(n, 16))  # noqa: E731
    ood = NearestNeighbourOOD.calibrate(in_domain(400), k=5, quantile=0.9)
    _, flags = ood.flags(in_domain(2000))
    assert 0.06 <= flags.mean() <= 0.14, flags.mean()  # about 1 - 0.9
    far = rng.normal(size=(50, 16)) * 3  # another direction in feature space
    scores, far_flags = ood.flags(far)
    assert far_flags.all() and scores.min() > ood.threshold
    # Only a feature vector's direction counts, not its length: a scaled reference row scores as the row.
    np.testing.assert_allclose(ood.scores(7.0 * ood.reference[:10]), ood.scores(ood.reference[:10]), atol=1e-9)
    back = NearestNeighbourOOD.from_meta(ood.reference, ood.as_meta())
    np.testing.assert_allclose(back.scores(far), scores, rtol=1e-12)
    assert ood.as_meta()["quantile"] == 0.9 and "reads no label" in ood.as_meta()["calibrated_on"]
    with pytest.raises(DriftError, match="quantile 1.0"):
        NearestNeighbourOOD.calibrate(in_domain(50), quantile=1.0)
    with pytest.raises(DriftError, match="more than k=5 reference rows; the window has 5"):
        NearestNeighbourOOD.calibrate(in_domain(5))
    with pytest.raises(DriftError, match="the reference window has 16 dims"):
        ood.scores(np.zeros((2, 8)))


def test_the_embedding_cache_embeds_each_content_once_per_model(tmp_path):
    from xfer.config import MonitorConfig
    from xfer.drift import Window
    from xfer.drift.accuracy import ConfidenceThreshold
    from xfer.monitor import EmbeddingCache, Reference, monitor_images

    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(3), size=40)
    reference = Reference(Window(np.float32(rng.normal(size=(40, 8))), np.float32(probabilities)), ConfidenceThreshold(0.5, 0.9, 40), {})
    model = ArrayModel(rng.normal(size=(40, 8)) + 1.0, probabilities)
    images = []
    for i in range(40):
        (tmp_path / f"{i}.png").write_bytes(f"image {i}".encode())
        images.append(tmp_path / f"{i}.png")
    cache = EmbeddingCache(tmp_path / "embeddings", "model-a")
    plain, _ = monitor_images(model, reference, images, MonitorConfig(), seed=0)
    first, _ = monitor_images(model, reference, images, MonitorConfig(), seed=0, cache=cache)
    assert model.embedded == 80 and first["embedded"] == 40
    # Again, and a copy of image 0 under another name: nothing embedded, the same report.
    (tmp_path / "0_copy.png").write_bytes(b"image 0")
    again, window = monitor_images(model, reference, [*images, tmp_path / "0_copy.png"][1:], MonitorConfig(), seed=0, cache=cache)
    assert model.embedded == 80 and again["embedded"] == 0
    np.testing.assert_array_equal(window.features[-1], model.features[0])
    second, _ = monitor_images(model, reference, images, MonitorConfig(), seed=0, cache=cache)
    assert {k: v for k, v in second.items() if k != "embedded"} == {k: v for k, v in plain.items() if k != "embedded"}
    # Another model's key has its own entries; a damaged chunk is passed over and embedded again.
    monitor_images(model, reference, images[:5], MonitorConfig(), seed=0, cache=EmbeddingCache(tmp_path / "embeddings", "model-b"))
    assert model.embedded == 85
    for chunk in (tmp_path / "embeddings" / "model-a").glob("*.npz"):
        chunk.write_bytes(b"truncated")
    assert monitor_images(model, reference, images[:5], MonitorConfig(), seed=0, cache=cache)[0]["embedded"] == 5
