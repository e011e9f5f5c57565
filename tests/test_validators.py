"""Each validator against a constructed case whose right ranking is known (target labels never enter)."""

from __future__ import annotations

import numpy as np
import pytest

from xfer.validators import VALIDATOR_NAMES, Evidence, Outputs, panel, score

C = 3


def onehot(labels, confidence=0.98, classes=C):
    p = np.full((len(labels), classes), (1 - confidence) / (classes - 1))
    p[np.arange(len(labels)), labels] = confidence
    return p


def three_clusters(n_per=40, dim=8, seed=0):
    """Target features in three well separated blobs; blob i is class i."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:C] * 10
    y = np.repeat(np.arange(C), n_per)
    return centres[y] + rng.normal(0, 0.5, (len(y), dim)), y


def evidence(target_features=None, source_val_labels=None, source_val_features=None, source_train_features=None):
    xt, yt = three_clusters()
    labels = np.arange(60) % C if source_val_labels is None else source_val_labels
    return Evidence(
        source_val_labels=labels,
        source_val_features=np.zeros((len(labels), 8)) if source_val_features is None else source_val_features,
        target_features=xt if target_features is None else target_features,
        source_train_features=source_train_features,
        num_classes=C,
    )


def test_source_val_ranks_the_candidate_right_on_source_first():
    e = evidence()
    right = Outputs(target=onehot(np.zeros(120, int)), source_val=onehot(e.source_val_labels))
    half = e.source_val_labels.copy()
    half[::2] = (half[::2] + 1) % C
    wrong = Outputs(target=onehot(np.zeros(120, int)), source_val=onehot(half))
    s = score("source_val", [wrong, right], e)
    assert s[1] == 1.0 and s[0] == pytest.approx(0.5, abs=0.02)


def test_entropy_prefers_confident_target_predictions():
    e = evidence()
    y = three_clusters()[1]
    confident = Outputs(target=onehot(y, 0.95), source_val=onehot(e.source_val_labels))
    vague = Outputs(target=onehot(y, 0.4), source_val=onehot(e.source_val_labels))
    s = score("entropy", [vague, confident], e)
    assert s[1] > s[0]


@pytest.mark.parametrize("name", ["info_max", "soft_info_max", "bnm"])
def test_diversity_aware_validators_rank_a_collapsed_model_last(name):
    """All rows in one class with certainty has the lowest entropy; these two must see through it."""
    e = evidence()
    y = three_clusters()[1]
    collapsed = Outputs(target=onehot(np.zeros_like(y), 0.999), source_val=onehot(e.source_val_labels))
    diverse = Outputs(target=onehot(y, 0.95), source_val=onehot(e.source_val_labels))
    assert score("entropy", [diverse, collapsed], e).argmax() == 1  # the trap
    assert score(name, [diverse, collapsed], e).argmax() == 0


def margin_rows(labels, margin, classes=10):
    """Probabilities whose labelled class leads every other by `margin` logits."""
    logits = np.zeros((len(labels), classes))
    logits[np.arange(len(labels)), labels] = margin
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_soft_info_max_sees_margins_where_info_max_has_saturated():
    """Two balanced models, every target row at margin 12 or every row at 20: info_max can hardly
    tell them apart (row entropies 7e-4 and 4e-7), the softened reading prefers the wider margins
    clearly."""
    e = evidence()
    y = np.arange(200) % 10
    sv = margin_rows(e.source_val_labels, 5)
    narrow = Outputs(target=margin_rows(y, 12), source_val=sv)
    wide = Outputs(target=margin_rows(y, 20), source_val=sv)
    plain, soft = score("info_max", [narrow, wide], e), score("soft_info_max", [narrow, wide], e)
    assert plain[1] - plain[0] < 1e-3
    assert soft[1] - soft[0] > 0.05
    # The trade it reads differently: every row at margin 8, against nine rows in ten at 20 and the
    # tenth barely decided (margin 1). info_max sees only the undecided rows; the softened reading
    # also sees how far the other nine sit from the boundary.
    moderate = Outputs(target=margin_rows(y, 8), source_val=sv)
    torn = margin_rows(y, 20)
    torn[::10] = margin_rows(y[::10], 1)
    mixed = Outputs(target=torn, source_val=sv)
    assert score("info_max", [moderate, mixed], e).argmax() == 0
    assert score("soft_info_max", [moderate, mixed], e).argmax() == 1


def test_softening_divides_each_margin_by_the_temperature():
    from xfer.validators.soft_info_max import soften

    p = margin_rows(np.array([3, 7]), 9.0)
    q = soften(p, 2.0)
    assert np.allclose(np.log(q[[0, 1], [3, 7]]) - np.log(q[:, 0]), 4.5)
    assert np.allclose(q.sum(1), 1) and (q.argmax(1) == p.argmax(1)).all()
    assert np.allclose(soften(p, 1.0), p)


def test_snd_prefers_predictions_that_form_dense_neighbourhoods():
    """Predictions shared by a cluster give each row many close neighbours; scattered ones give few."""
    e = evidence()
    y = three_clusters()[1]
    rng = np.random.default_rng(1)
    clustered = Outputs(target=onehot(y, 0.9), source_val=onehot(e.source_val_labels))
    scattered = Outputs(target=rng.dirichlet(np.ones(C) * 0.3, len(y)), source_val=onehot(e.source_val_labels))
    s = score("snd", [scattered, clustered], e)
    assert s[1] > s[0]


def test_dev_follows_the_target_where_source_val_accuracy_does_not():
    """Source val rows come from region A (many) and B (few); the target lies in B.

    Candidate `fits_a` is right on A and wrong on B: best by plain source val
    accuracy. `fits_b` is right on B only: the importance weights must make DEV prefer it.
    """
    rng = np.random.default_rng(0)
    a = rng.normal(-3, 1, (90, 2))
    b = rng.normal(3, 1, (30, 2))
    source_val_features = np.concatenate([a, b])
    labels = np.arange(120) % C
    in_b = np.r_[np.zeros(90, bool), np.ones(30, bool)]
    target = rng.normal(3, 1, (150, 2))
    source_train = np.concatenate([rng.normal(-3, 1, (300, 2)), rng.normal(3, 1, (100, 2))])
    e = evidence(target_features=target, source_val_labels=labels, source_val_features=source_val_features, source_train_features=source_train)
    wrong = (labels + 1) % C
    fits_a = Outputs(target=onehot(np.zeros(150, int)), source_val=onehot(np.where(in_b, wrong, labels), 0.9))
    fits_b = Outputs(target=onehot(np.zeros(150, int)), source_val=onehot(np.where(in_b, labels, wrong), 0.9))
    assert score("source_val", [fits_a, fits_b], e).argmax() == 0
    assert score("dev", [fits_a, fits_b], e).argmax() == 1


def test_class_ami_prefers_predictions_that_follow_the_target_clusters():
    e = evidence()
    y = three_clusters()[1]
    follows = Outputs(target=onehot((y + 1) % C), source_val=onehot(e.source_val_labels))  # a relabelling still follows
    ignores = Outputs(target=onehot(np.random.default_rng(0).integers(0, C, len(y))), source_val=onehot(e.source_val_labels))
    s = score("class_ami", [ignores, follows], e)
    assert s[1] > 0.9 and s[0] < 0.2


def test_ensv_ranks_the_odd_one_out_last():
    e = evidence()
    y = three_clusters()[1]
    rng = np.random.default_rng(0)
    flip = lambda frac: np.where(rng.random(len(y)) < frac, (y + 1) % C, y)  # noqa: E731
    candidates = [Outputs(target=onehot(flip(f), 0.8), source_val=onehot(e.source_val_labels)) for f in (0.05, 0.1, 0.6)]
    s = score("ensv", candidates, e)
    assert s.argmin() == 2 and s[0] > s[2]


def test_panel_scores_every_candidate_with_every_validator():
    e = evidence()
    y = three_clusters()[1]
    candidates = [Outputs(target=onehot(y, c), source_val=onehot(e.source_val_labels, c)) for c in (0.5, 0.9)]
    scores = panel(candidates, e)
    assert set(scores) == set(VALIDATOR_NAMES)
    assert all(len(v) == 2 and np.isfinite(v).all() for v in scores.values())


def test_an_unknown_validator_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown validator 'oracle'.*source_val.*ensv"):
        score("oracle", [], evidence())


def test_a_dataset_smaller_than_the_projection_still_gets_every_score():
    """30 rows of 100 features (a user's tiny folder): fewer rows than PCA's 64 components."""
    rng = np.random.default_rng(0)
    labels = np.arange(10) % C
    e = Evidence(
        source_val_labels=labels,
        source_val_features=rng.normal(size=(10, 100)),
        target_features=rng.normal(size=(12, 100)),
        source_train_features=rng.normal(size=(8, 100)),
        num_classes=C,
    )
    candidates = [Outputs(target=onehot(rng.integers(0, C, 12)), source_val=onehot(labels)) for _ in range(2)]
    scores = panel(candidates, e)
    assert all(np.isfinite(v).all() for v in scores.values())
