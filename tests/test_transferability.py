"""Each transferability score against a constructed case whose right answer is known, and the ranking built on them."""

from __future__ import annotations

import numpy as np
import pytest

from xfer.transferability import RULE, SCORE_NAMES, Features, rank_table, recommend, score
from xfer.transferability.base import capped
from xfer.transferability.domain_gap import domain_auc, proxy_a_distance
from xfer.transferability.hscore import hscore
from xfer.transferability.knn import fold_count, knn
from xfer.transferability.logme import class_log_evidence, log_evidence, logme, maximise_evidence

C = 4


def labels_for(n: int) -> np.ndarray:
    return np.arange(n) % C


def separated(labels: np.ndarray, dim: int, seed: int, spread: float = 10.0, noise: float = 0.5) -> np.ndarray:
    """Rows at their class's mean (means `spread` apart along orthogonal axes) plus small noise: a good backbone."""
    rng = np.random.default_rng(seed)
    means = np.eye(dim)[: labels.max() + 1] * spread
    return means[labels] + rng.normal(0, noise, (len(labels), dim))


def noise(n: int, dim: int, seed: int) -> np.ndarray:
    """Features that ignore the label: a bad backbone."""
    return np.random.default_rng(seed).normal(size=(n, dim))


def source_only(x: np.ndarray, labels: np.ndarray) -> Features:
    return Features(source=x, source_labels=labels, target=np.empty((0, x.shape[1])))


# --- every score: separated classes above noise, with more rows than dimensions and with fewer ---


@pytest.mark.parametrize("rows, dim", [(200, 32), (40, 256)], ids=["n>d", "n<d"])
@pytest.mark.parametrize("name", ["logme", "hscore", "knn"])
def test_each_source_score_ranks_separated_classes_above_noise(name, rows, dim):
    labels = labels_for(rows)
    good = source_only(separated(labels, dim, seed=0), labels)
    bad = source_only(noise(rows, dim, seed=1), labels)
    good_score, bad_score = score(name, good, 0), score(name, bad, 0)
    assert np.isfinite([good_score, bad_score]).all()
    assert good_score > bad_score


@pytest.mark.parametrize("rows, dim", [(200, 32), (40, 256)], ids=["n>d", "n<d"])
def test_domain_gap_ranks_a_target_like_the_source_above_a_shifted_one(rows, dim):
    labels = labels_for(rows)
    source = separated(labels, dim, seed=0)
    close = Features(source, labels, target=separated(labels, dim, seed=1))
    far = Features(source, labels, target=separated(labels, dim, seed=1) + 3.0)
    assert score("domain_gap", close, 0) > score("domain_gap", far, 0)


# --- LogME ---


def dense_log_evidence(f: np.ndarray, y: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The paper's L(alpha, beta), term by term with dense D x D matrices, for arrays of alpha and beta."""
    n, d = f.shape
    alpha, beta = np.broadcast_arrays(alpha, beta)
    a = alpha[..., None, None] * np.eye(d) + beta[..., None, None] * (f.T @ f)  # A = alpha I + beta F^T F
    m = np.linalg.solve(a, (beta[..., None] * (f.T @ y))[..., None])[..., 0]  # m = beta A^-1 F^T y
    residual = np.sum((m @ f.T - y) ** 2, axis=-1)
    return (
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * residual
        - alpha / 2 * np.sum(m**2, axis=-1)
        - np.linalg.slogdet(a)[1] / 2
    )


def grid_maximum(f: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """max L over a log-spaced (alpha, beta) grid, zoomed in around the best point: (L, alpha, beta)."""
    centre, half_width = np.zeros(2), 6.0  # log10 alpha, log10 beta in [-6, 6]
    for _ in range(5):
        la = np.linspace(centre[0] - half_width, centre[0] + half_width, 61)
        lb = np.linspace(centre[1] - half_width, centre[1] + half_width, 61)
        values = dense_log_evidence(f, y, 10.0 ** la[:, None], 10.0 ** lb[None, :])
        i, j = np.unravel_index(np.argmax(values), values.shape)
        centre, half_width = np.array([la[i], lb[j]]), half_width / 10
    return float(values[i, j]), 10.0 ** la[i], 10.0 ** lb[j]


def tiny_case(rows: int = 30, dim: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A few informative, noisy features of 3 classes."""
    labels = np.arange(rows) % 3
    return separated(labels, dim, seed, spread=1.0, noise=0.8), labels


def test_logme_fixed_point_reaches_the_brute_force_maximum_of_the_evidence():
    f, labels = tiny_case()
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    per_class = []
    for c in range(3):
        y = (labels == c).astype(float)
        best, grid_alpha, grid_beta = grid_maximum(f, y)
        z = u.T @ y
        alpha, beta = maximise_evidence(s, z, float(y @ y - z @ z), len(y))
        fixed = log_evidence(s, z, float(y @ y - z @ z), len(y), alpha, beta)
        assert fixed == pytest.approx(float(dense_log_evidence(f, y, alpha, beta)), abs=1e-9)  # the SVD form is the paper's
        assert fixed >= best - 1e-9  # a grid cannot beat the maximum...
        assert fixed == pytest.approx(best, abs=1e-6)  # ...and the fixed point sits on the grid's optimum
        assert np.log10([alpha, beta]) == pytest.approx(np.log10([grid_alpha, grid_beta]), abs=1e-3)
        assert class_log_evidence(u, s, y) == pytest.approx(best / len(y), abs=1e-7)
        per_class.append(best / len(y))
    assert logme(source_only(f, labels), 0) == pytest.approx(np.mean(per_class), abs=1e-7)


def test_logme_with_fewer_rows_than_dims_is_finite_and_ignores_rotations_and_zero_columns():
    """The evidence reads F only through F F^T: rotating the features or padding them changes nothing."""
    labels = labels_for(20)
    f = separated(labels, 50, seed=0, spread=1.0, noise=1.0)
    base = logme(source_only(f, labels), 0)
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(50, 50)))[0]
    assert np.isfinite(base)
    assert logme(source_only(f @ rotation, labels), 0) == pytest.approx(base, abs=1e-6)
    assert logme(source_only(np.hstack([f, np.zeros((20, 70))]), labels), 0) == pytest.approx(base, abs=1e-9)
    # the SVD form matches the paper's D-dimensional formula with D > n, at the fixed point it reaches
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    y = (labels == 0).astype(float)
    z = u.T @ y
    alpha, beta = maximise_evidence(s, z, float(y @ y - z @ z), 20)
    assert log_evidence(s, z, float(y @ y - z @ z), 20, alpha, beta) == pytest.approx(float(dense_log_evidence(f, y, alpha, beta)), rel=1e-6)


# --- H-score ---


def test_hscore_in_one_dimension_is_the_between_class_share_of_the_variance():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30, int), np.ones(70, int)]  # unbalanced: the class weights p_c matter
    x = np.where(labels == 1, 2.0, -1.0) + rng.normal(0, 1.5, 100)
    class_means = np.array([x[labels == c].mean() for c in (0, 1)])
    between = np.sum(np.array([0.3, 0.7]) * (class_means - x.mean()) ** 2)
    assert hscore(source_only(x[:, None], labels), 0) == pytest.approx(between / x.var(), rel=1e-5)


def test_hscore_is_the_closed_form_with_ledoit_wolf_shrinkage():
    """tr(cov_w^-1 (1 - w) cov(E[f | y])), cov_w Ledoit-Wolf's shrunk covariance, computed here directly."""
    from sklearn.covariance import LedoitWolf

    labels = labels_for(60)
    x = separated(labels, 6, seed=0, spread=1.0, noise=1.0) @ np.random.default_rng(1).normal(size=(6, 6))  # correlated
    lw = LedoitWolf().fit(x)
    class_means = np.stack([x[labels == c].mean(0) for c in range(C)])
    between = np.cov(class_means[labels].T, bias=True)  # each row replaced by its class mean
    expected = np.trace(np.linalg.inv(lw.covariance_) @ ((1 - lw.shrinkage_) * between))
    assert lw.shrinkage_ > 1e-3  # the shrinkage is really in play here
    assert hscore(source_only(x, labels), 0) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("rows, dim", [(40, 256), (40, 2048)])
def test_hscore_stays_within_its_bounds_when_rows_are_fewer_than_dims(rows, dim):
    """Without shrinkage any features separate n < d rows, and H would be C - 1 for noise too."""
    labels = labels_for(rows)
    for x in (separated(labels, dim, seed=0), noise(rows, dim, seed=1)):
        assert 0 <= hscore(source_only(x, labels), 0) <= C - 1 + 1e-9
    assert hscore(source_only(noise(rows, dim, seed=1), labels), 0) < C - 1.5


# --- k-NN ---


def test_knn_is_perfect_on_separated_clusters_and_near_chance_on_label_free_features():
    labels = labels_for(400)
    assert knn(source_only(separated(labels, 8, seed=0), labels), 0) == 1.0
    assert knn(source_only(noise(400, 8, seed=1), labels), 0) == pytest.approx(1 / C, abs=0.08)


def test_knn_finds_neighbours_by_direction_not_norm():
    """Four classes 20 degrees apart in a plane, each row at a norm from 0.01 to 100: by Euclidean
    distance a row's nearest neighbours are the rows of similar norm, whatever their class; after
    L2 normalisation, the rows of its own direction."""
    rng = np.random.default_rng(0)
    labels = labels_for(200)
    angle = np.radians(20.0 * labels + rng.uniform(-2, 2, 200))
    x = np.column_stack([np.cos(angle), np.sin(angle)]) * 10.0 ** rng.uniform(-2, 2, (200, 1))
    assert knn(source_only(x, labels), 0) == 1.0


def test_knn_votes_among_five_neighbours():
    """20 of class A's 100 rows each have a class-B twin at (almost) the same point, the other B rows
    far away. One neighbour would be that twin; five out-vote it. So the A rows are right (but for
    the odd one whose five nearest hold three twins), and of B only the twins are wrong: about 200 / 220,
    where one neighbour follows most twins (174 / 220 here)."""
    rng = np.random.default_rng(0)
    a = separated(np.zeros(100, int), 8, seed=0, spread=10.0, noise=1.0)
    twins = a[:20] + rng.normal(0, 1e-3, (20, 8))
    b = separated(np.ones(100, int), 8, seed=1, spread=10.0, noise=1.0)
    labels = np.r_[np.zeros(100, int), np.ones(120, int)]
    assert 195 / 220 <= knn(source_only(np.vstack([a, twins, b]), labels), 0) <= 200 / 220


def test_knn_uses_fewer_folds_for_small_classes_and_is_seeded():
    assert fold_count(np.repeat(np.arange(3), 9)) == 5
    assert fold_count(np.repeat(np.arange(3), 3)) == 3
    assert fold_count(np.r_[0, np.ones(9, int)]) == 2
    labels = np.repeat(np.arange(3), 3)
    x = noise(9, 5, seed=0)
    assert np.isfinite(knn(source_only(x, labels), 0))
    big = labels_for(120)
    features = source_only(noise(120, 5, seed=0), big)
    assert knn(features, 3) == knn(features, 3)
    assert len({knn(features, seed) for seed in range(5)}) > 1  # the seed does shuffle the folds


# --- domain gap ---


def test_domain_gap_is_near_zero_for_one_distribution_and_near_two_for_disjoint_ones():
    """300 source rows against 100 target rows: the error is balanced, so the imbalance is no gap."""
    labels = labels_for(300)
    source = separated(labels, 8, seed=0)
    same = Features(source, labels, target=separated(labels_for(100), 8, seed=1))
    disjoint = Features(source, labels, target=separated(labels_for(100), 8, seed=1) + 20.0)
    assert proxy_a_distance(same, 0) == pytest.approx(0, abs=0.25)
    assert domain_auc(same, 0) == pytest.approx(0.5, abs=0.1)
    assert proxy_a_distance(disjoint, 0) == pytest.approx(2, abs=0.02)
    assert domain_auc(disjoint, 0) > 0.99
    # the registry's score is minus the distance: higher = closer domains, like every other score
    assert score("domain_gap", disjoint, 0) == pytest.approx(-proxy_a_distance(disjoint, 0))
    assert score("domain_gap", same, 0) > score("domain_gap", disjoint, 0)


def test_domain_gap_weighs_each_domains_error_rate_equally():
    """Half of 300 source rows sit where 100 target rows do, half far away. A classifier can be right
    on the far half only, so each domain's error rate is: source 1/2 (or 0), target 0 (or 1): the
    balanced error is 1/4 and PAD = 1, where the plain error rate (3/8 with this imbalance) would read 1/2;
    the AUC is 1/2 x 1 + 1/2 x 1/2 = 3/4."""
    rng = np.random.default_rng(0)
    source = np.r_[rng.normal(0, 0.5, (150, 2)) - [5, 0], rng.normal(0, 0.5, (150, 2))]
    features = Features(source, labels_for(300), target=rng.normal(0, 0.5, (100, 2)))
    assert proxy_a_distance(features, 0) == pytest.approx(1, abs=0.15)
    assert domain_auc(features, 0) == pytest.approx(0.75, abs=0.05)


def test_domain_gap_without_target_rows_names_what_is_missing():
    labels = labels_for(40)
    features = source_only(separated(labels, 8, seed=0), labels)
    with pytest.raises(ValueError, match="domain_gap needs target features: Features.target is empty"):
        score("domain_gap", features, 0)
    with pytest.raises(ValueError, match="target is empty"):
        rank_table({"a": features}, 0)
    rows = rank_table({"a": features}, 0, names=("logme", "hscore", "knn"))  # the source-only scores still work
    assert set(rows[0]) == {"candidate", "logme", "hscore", "knn"}


# --- the table and the recommendation ---


def candidates(dim: int = 16) -> dict[str, Features]:
    """A clear backbone, a blurred one and a useless one, each with target rows like its source."""
    labels = labels_for(120)

    def backbone(noise_scale: float, seed: int) -> Features:
        x = separated(labels, dim, seed=seed, noise=noise_scale)
        return Features(x, labels, target=separated(labels_for(60), dim, seed=seed + 1, noise=noise_scale))

    useless = Features(noise(120, dim, seed=7), labels, target=noise(60, dim, seed=8))
    return {"blurred": backbone(4.0, 0), "useless": useless, "clear": backbone(0.5, 2)}


def test_rank_table_has_a_row_per_candidate_with_every_score():
    rows = rank_table(candidates(), 0)
    assert [row["candidate"] for row in rows] == ["blurred", "useless", "clear"]
    assert all(set(row) == {"candidate", *SCORE_NAMES} for row in rows)
    assert all(np.isfinite([row[name] for name in SCORE_NAMES]).all() for row in rows)
    assert recommend(rows)[0] == "clear"
    assert rank_table(candidates(), 0) == rows  # seeded: the same table again


def row(candidate: str, logme: float, knn: float, hscore: float = 0.0) -> dict:
    return {"candidate": candidate, "logme": logme, "hscore": hscore, "knn": knn, "domain_gap": 0.0}


def test_recommend_follows_logme_over_every_other_score():
    rows = [row("c", logme=float("nan"), knn=1.0), row("a", logme=0.10, knn=0.99, hscore=3.0), row("b", logme=0.20, knn=0.50, hscore=0.1)]
    name, text = recommend(rows)
    assert name == "b"
    assert text.startswith(RULE) and "'b'" in text and "LogME" in text


def test_recommend_breaks_a_logme_tie_by_knn_accuracy():
    tied = [row("a", logme=0.5, knn=0.7), row("b", logme=0.5 + 1e-10, knn=0.6), row("c", logme=0.5 - 5e-10, knn=0.9)]
    name, text = recommend(tied)
    assert name == "c" and "tied with 'a', 'b'" in text
    not_tied = [row("a", logme=0.5, knn=0.7), row("b", logme=0.5 + 1e-6, knn=0.6)]
    assert recommend(not_tied)[0] == "b"
    assert recommend([row("a", logme=0.5, knn=0.7), row("b", logme=0.5, knn=0.7)])[0] == "a"  # then the first in the table
    with pytest.raises(ValueError, match="no candidates"):
        recommend([])


def test_an_unknown_score_names_the_valid_ones():
    labels = labels_for(8)
    with pytest.raises(ValueError, match="unknown transferability score 'leep'.*logme, hscore, knn, domain_gap"):
        score("leep", source_only(noise(8, 3, seed=0), labels), 0)


# --- subsampling ---


def test_each_domain_is_subsampled_to_the_cap_the_same_way_for_a_seed():
    labels = labels_for(50)
    x = np.column_stack([labels, np.arange(50)]).astype(float)  # column 0 is the label: alignment shows
    features = Features(x, labels, target=np.arange(60.0)[:, None] * np.ones((1, 2)))
    kept = capped(features, seed=3, limit=20)
    assert kept.source.shape == (20, 2) and kept.target.shape == (20, 2)
    assert (kept.source[:, 0] == kept.source_labels).all()
    assert len(np.unique(kept.source[:, 1])) == 20 and len(np.unique(kept.target[:, 0])) == 20
    again = capped(features, seed=3, limit=20)
    assert (again.source == kept.source).all() and (again.target == kept.target).all()
    assert not (capped(features, seed=4, limit=20).source == kept.source).all()
    whole = capped(features, seed=3, limit=50)
    assert (whole.source == x).all() and whole.target.shape == (50, 2)  # 50 source rows are all kept, 60 target are not
