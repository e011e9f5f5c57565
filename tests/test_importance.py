"""Importance weighting (xfer/importance.py): weights against a covariate shift whose right weights are known."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xfer.config import LINEAR_PROBE, ConfigError, HeadConfig, parse_params
from xfer.heads import HeadData, predict_proba, source_loss, train_head
from xfer.importance import clip_and_normalise, effective_sample_size, importance_weights
from xfer.samplers import probabilities, torch_sampler


def gaussian_shift(seed: int, n: int = 2000, dim: int = 8):
    """Source N(0, I), target N(mu, I): the density ratio is exp(mu.x - |mu|^2 / 2), known exactly."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(dim)
    mu[:2] = (0.6, 0.3)
    source = rng.normal(size=(n, dim))
    target = rng.normal(size=(n, dim)) + mu
    true_ratio = np.exp(source @ mu - mu @ mu / 2)
    return source.astype(np.float32), target.astype(np.float32), true_ratio


def test_clip_and_normalise_matches_the_answer_by_hand():
    # c (1, 1, 1, 100) capped at 2 with mean 1: 3c + 2 = 4, so c = 2/3.
    w = clip_and_normalise(np.array([1.0, 1.0, 1.0, 100.0]), max_weight=2.0)
    np.testing.assert_allclose(w, [2 / 3, 2 / 3, 2 / 3, 2.0], rtol=1e-9)
    # Uncapped: the ratios scaled to mean 1; a cap of 1 leaves every row at 1.
    np.testing.assert_allclose(clip_and_normalise(np.array([1.0, 3.0]), max_weight=100.0), [0.5, 1.5], rtol=1e-9)
    np.testing.assert_array_equal(clip_and_normalise(np.array([1.0, 3.0]), max_weight=1.0), [1.0, 1.0])
    assert effective_sample_size(np.array([1.0, 1.0, 1.0, 1.0])) == 4.0
    assert effective_sample_size(np.array([0.0, 0.0, 0.0, 4.0])) == 1.0
    with pytest.raises(ValueError, match="at least 1"):
        clip_and_normalise(np.array([1.0]), max_weight=0.5)


def test_weights_recover_a_known_density_ratio():
    source, target, true_ratio = gaussian_shift(0)
    got = importance_weights(source, target, max_weight=1e6, seed=0)
    expected = true_ratio / true_ratio.mean()
    assert got.weights.mean() == pytest.approx(1.0)
    assert got.clipped == 0
    # The log-weights follow the true log-ratio closely, row by row.
    assert np.corrcoef(np.log(got.weights), np.log(expected))[0, 1] > 0.97
    assert np.median(np.abs(got.weights / expected - 1)) < 0.15
    assert effective_sample_size(got.weights) == pytest.approx(effective_sample_size(expected), rel=0.15)
    # A domain classifier that sees the shift: true AUC of mu.x between the domains is Phi(|mu| / sqrt 2) = 0.68.
    assert 0.63 < got.domain_auc < 0.73


def test_without_a_shift_the_weights_stay_near_one_and_a_cap_holds():
    rng = np.random.default_rng(1)
    same = importance_weights(rng.normal(size=(1500, 8)).astype(np.float32), rng.normal(size=(1500, 8)).astype(np.float32), 10.0, seed=0)
    assert same.effective_sample_size > 0.95 * 1500
    assert same.domain_auc < 0.56
    source, target, _ = gaussian_shift(2)
    capped = importance_weights(source, target, max_weight=3.0, seed=0)
    assert capped.weights.max() <= 3.0 + 1e-9 and capped.weights.mean() == pytest.approx(1.0)
    assert capped.clipped > 0 and capped.summary()["clipped"] == capped.clipped


def parabola_domain(n: int, centre: float, spread: float, rng: np.random.Generator):
    """Covariate shift with a curved boundary: label = x1 > x0^2 - 1 in both domains, only x0's spread moves.
    A linear head fitted on the whole source misses the boundary's slope where the target lives."""
    x0, x1 = rng.normal(centre, spread, n), rng.normal(0, 3, n)
    return np.c_[x0, x1, rng.normal(size=(n, 2))].astype(np.float32), (x1 > x0**2 - 1).astype(np.int64)


def test_importance_weighting_fixes_a_linear_head_under_covariate_shift():
    rng = np.random.default_rng(0)
    source, source_val = parabola_domain(1500, 0.0, 1.0, rng), parabola_domain(300, 0.0, 1.0, rng)
    target, target_test = parabola_domain(800, 1.5, 0.4, rng), parabola_domain(800, 1.5, 0.4, rng)
    # The right weights: the ratio of the two x0 densities, N(1.5, 0.4) over N(0, 1).
    x0 = source[0][:, 0]
    true_ratio = np.exp(-((x0 - 1.5) ** 2) / (2 * 0.4**2) + x0**2 / 2)
    data = HeadData(source, source_val, target[0])

    def target_accuracy(weighting: bool, weights: np.ndarray | None = None) -> float:
        cfg = HeadConfig(**{**LINEAR_PROBE, "epochs": 30, "lr": 0.05, "selection": "last", "importance_weighting": weighting})
        head, _ = train_head(cfg, HeadData(*[getattr(data, f) for f in ("source_train", "source_val", "target_train")], source_weights=weights), 2, seed=0)
        return float((predict_proba(head, target_test[0], "target").argmax(1) == target_test[1]).mean())

    plain, weighted = target_accuracy(False), target_accuracy(True)
    known = target_accuracy(True, clip_and_normalise(true_ratio, 10.0))
    assert weighted >= plain + 0.1, (plain, weighted)
    # Estimated weights do about as well as the known ones.
    assert weighted >= known - 0.03, (weighted, known)


def test_source_loss_is_the_plain_loss_with_unit_weights_and_a_weighted_mean_otherwise():
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 4), torch.randint(4, (12,))
    class_weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    for cw in (None, class_weight):
        plain = F.cross_entropy(logits, labels, weight=cw, label_smoothing=0.1)
        assert source_loss(logits, labels, cw, 0.1, torch.ones(12)).item() == pytest.approx(plain.item(), rel=1e-6)
    w = torch.rand(12) + 0.1
    per_row = F.cross_entropy(logits, labels, reduction="none")
    assert source_loss(logits, labels, None, 0.0, w).item() == pytest.approx(((per_row * w).sum() / w.sum()).item(), rel=1e-6)
    # Doubling one row's weight counts it as if it were there twice.
    twice = torch.cat([logits, logits[:1]]), torch.cat([labels, labels[:1]])
    w2 = torch.ones(12)
    w2[0] = 2
    assert source_loss(logits, labels, class_weight, 0.0, w2).item() == pytest.approx(F.cross_entropy(*twice, weight=class_weight).item(), rel=1e-6)


def test_fine_tuning_draws_rows_in_proportion_to_their_weights():
    labels = np.array([0, 0, 0, 1])
    weights = np.array([4.0, 1.0, 1.0, 2.0])
    np.testing.assert_allclose(probabilities("uniform", labels, weights), weights / weights.sum())
    # class_balanced: each class half the draws, then the weights within and across classes.
    np.testing.assert_allclose(probabilities("class_balanced", labels, weights), np.array([4, 1, 1, 6]) / 12)
    sampler = torch_sampler("uniform", labels, torch.Generator().manual_seed(0), weights)
    assert sampler is not None and torch_sampler("uniform", labels, torch.Generator()) is None
    draws = np.bincount(np.concatenate([list(sampler) for _ in range(2000)]), minlength=4) / (2000 * 4)
    np.testing.assert_allclose(draws, weights / weights.sum(), atol=0.02)


def test_importance_weighting_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="importance_max_weight"):
        parse_params({"head": {"importance_max_weight": 0.5}})
    with pytest.raises(ConfigError, match="importance_weighting draws weighted rows in one process"):
        parse_params({"finetune": {"importance_weighting": True, "devices": 2}})
    source, target, _ = gaussian_shift(3, n=50)
    cfg = HeadConfig(**{**LINEAR_PROBE, "importance_weighting": True})
    with pytest.raises(ValueError, match="importance_weighting"):
        train_head(cfg, HeadData((source, np.zeros(50, np.int64)), (source, np.zeros(50, np.int64))), 2, seed=0)
    with pytest.raises(ValueError, match="at least 5 rows in each domain"):
        importance_weights(source, target[:3], 10.0, seed=0)
