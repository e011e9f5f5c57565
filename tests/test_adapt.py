"""Adaptation losses: each on its own, then each method against source-only on a known shift."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shifts import rotated_clusters, spurious_offset

from xfer.adapt import (
    ConditionalDomainAdversarialLoss,
    CoralLoss,
    DomainAdversarialLoss,
    MinimumClassConfusionLoss,
    MultiKernelMMD,
    PseudoLabelLoss,
    build_adaptation_loss,
)
from xfer.adapt.base import certainty_weights, warm_start
from xfer.adapt.cdan import MultilinearMap
from xfer.adapt.dann import reverse_gradient
from xfer.adapt.self_training import centroid_labels
from xfer.config import ADAPTATION_METHODS, FEATURE_ALIGNING_METHODS, LINEAR_PROBE, HeadConfig
from xfer.heads import HeadData, predict_proba, train_head

SEEDS = (0, 1, 2)


def gaussian(n, seed, shift=0.0, scale=1.0, dim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) * scale + shift


@pytest.mark.parametrize("loss", [CoralLoss(), MultiKernelMMD()])
def test_moment_and_kernel_losses_see_a_shift_and_not_its_absence(loss):
    same = loss(gaussian(1000, 0), gaussian(1000, 1)).item()
    shifted = loss(gaussian(1000, 0), gaussian(1000, 1, shift=1.0)).item()
    stretched = loss(gaussian(1000, 0), gaussian(1000, 1, scale=2.0)).item()
    assert shifted > 5 * abs(same) and stretched > 5 * abs(same)


def test_coral_cannot_be_lowered_by_shrinking_the_features():
    s, t = gaussian(100, 0), gaussian(100, 1, shift=1.0)
    assert CoralLoss()(s, t).item() == pytest.approx(CoralLoss()(s * 0.01, t * 0.01).item(), rel=1e-4)


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.ones(3, requires_grad=True)
    (reverse_gradient(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.5, -1.0, -1.5]))
    assert warm_start(0.0) == pytest.approx(0.0) and warm_start(1.0) > 0.99 and 0 < warm_start(0.2) < warm_start(0.5)


def test_domain_discriminator_learns_to_tell_shifted_domains_apart():
    torch.manual_seed(0)
    loss = DomainAdversarialLoss(8, hidden_dim=32)
    loss.set_progress(1.0)
    opt = torch.optim.Adam(loss.parameters(), lr=0.01)
    s, t = gaussian(128, 0), gaussian(128, 1, shift=1.5)
    first = loss(s, t).item()
    for _ in range(100):
        opt.zero_grad()
        loss(s, t).backward()
        opt.step()
    loss.eval()
    assert loss(s, t).item() < first and loss.domain_accuracy(s, t) > 0.9


def test_cdan_map_is_the_outer_product_or_its_randomised_form():
    f, g = torch.randn(4, 3), F.softmax(torch.randn(4, 2), 1)
    exact = MultilinearMap(3, 2)
    assert not exact.randomized and torch.allclose(exact(f, g)[1], torch.outer(g[1], f[1]).flatten())
    big = MultilinearMap(1280, 10)
    assert big.randomized and big(torch.randn(4, 1280), F.softmax(torch.randn(4, 10), 1)).shape == (4, 1024)
    loss = ConditionalDomainAdversarialLoss(3, 2, hidden_dim=8)
    assert loss(f, f + 1, torch.randn(4, 2), torch.randn(4, 2)).item() > 0


def test_certainty_weights_favour_confident_rows_and_average_one():
    probs = torch.tensor([[0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3]])
    w = certainty_weights(probs)
    assert w[0] > w[1] and w.mean().item() == pytest.approx(1.0)


def test_mcc_is_low_for_confident_distinct_predictions_and_high_for_confusion():
    mcc = MinimumClassConfusionLoss(temperature=1.0)
    confident = torch.eye(4).repeat(8, 1) * 20
    confused = torch.zeros(32, 4)
    assert mcc(None, None, None, confident).item() < 0.01 < mcc(None, None, None, confused).item()


def test_pseudo_labels_only_count_confident_rows():
    loss = PseudoLabelLoss(threshold=0.9)
    logits = torch.tensor([[10.0, 0.0], [0.1, 0.0], [0.0, 10.0], [0.0, 0.2]], requires_grad=True)
    value = loss(None, None, None, logits)
    assert loss.last_mask_rate == 0.5
    value.backward()
    # Unconfident rows get no gradient at all.
    assert torch.all(logits.grad[[1, 3]] == 0) and torch.any(logits.grad[[0, 2]] != 0)


def test_centroid_labels_correct_a_misplaced_boundary():
    # Two tight target clusters; the classifier splits them in the wrong place (a third of class 1 called 0).
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(60, 8, generator=g) * 0.3 + 2, torch.randn(60, 8, generator=g) * 0.3 - 2])
    truth = torch.cat([torch.zeros(60), torch.ones(60)]).long()
    wrong = truth.clone()
    wrong[60:80] = 0
    probs = F.one_hot(wrong, 2).float() * 0.8 + 0.1
    labels, similarity = centroid_labels(x, probs)
    assert (labels == truth).all() and similarity.shape == (120, 2)


def test_centroid_pseudo_labels_need_a_refresh_and_batch_rows():
    loss = PseudoLabelLoss(0.5, labelling="centroid")
    assert loss.wants_refresh and not PseudoLabelLoss(0.5).wants_refresh and not CoralLoss().wants_refresh
    with pytest.raises(RuntimeError, match="refresh"):
        loss(None, torch.randn(4, 3), None, torch.randn(4, 2), index_t=torch.arange(4))
    loss.refresh(torch.randn(10, 3), torch.randn(10, 2))
    assert loss(None, torch.randn(4, 3), None, torch.randn(4, 2) * 5, index_t=torch.arange(4)).item() >= 0


def test_every_method_name_builds_its_loss():
    for method in ADAPTATION_METHODS:
        loss = build_adaptation_loss(method, 16, 3)
        assert (loss is None) == (method == "source_only")
        if loss is not None:
            assert loss.aligns_features == (method in FEATURE_ALIGNING_METHODS)


# --- each method against source-only, on a shift where the right answer is known ---


def _target_accuracy(cfg: HeadConfig, data: HeadData, test) -> float:
    accs = []
    for seed in SEEDS:
        head, _ = train_head(cfg, data, 4, seed)
        accs.append((predict_proba(head, test[0], "target").argmax(1) == test[1]).mean())
    return float(np.mean(accs))


@pytest.fixture(scope="module")
def nuisance_shift():
    data = HeadData(spurious_offset(150, 0, False), spurious_offset(40, 1, False), spurious_offset(150, 2, True)[0], spurious_offset(40, 3, True))
    return data, spurious_offset(100, 4, True)


@pytest.fixture(scope="module")
def rotation_shift():
    data = HeadData(rotated_clusters(100, 0), rotated_clusters(30, 1), rotated_clusters(100, 2, 40)[0], rotated_clusters(30, 3, 40))
    return data, rotated_clusters(100, 4, 40)


# On the plain recipe (AdamW, constant lr, source-val epoch) these known answers were set with.
ALIGN = dict(LINEAR_PROBE, kind="mlp", hidden_dim=32, batch_size=64, epochs=60, lr=0.003, adapt_weight=3.0)
CLUSTER = dict(LINEAR_PROBE, kind="linear", batch_size=64, epochs=60, lr=0.01, pseudo_threshold=0.9, adapt_weight=3.0)


@pytest.fixture(scope="module")
def source_only_on_nuisance(nuisance_shift):
    return _target_accuracy(HeadConfig(**ALIGN), *nuisance_shift)


@pytest.fixture(scope="module")
def source_only_on_rotation(rotation_shift):
    return _target_accuracy(HeadConfig(**CLUSTER), *rotation_shift)


@pytest.mark.parametrize("method", FEATURE_ALIGNING_METHODS)
def test_aligning_methods_drop_a_nuisance_feature_that_source_only_trusts(method, nuisance_shift, source_only_on_nuisance):
    adapted = _target_accuracy(HeadConfig(**ALIGN | {"method": method}), *nuisance_shift)
    assert source_only_on_nuisance < 0.7
    assert adapted > source_only_on_nuisance + 0.08, (method, adapted, source_only_on_nuisance)


@pytest.mark.parametrize("method", ["mcc", "self_training"])
def test_cluster_methods_move_the_boundary_into_the_rotated_gaps(method, rotation_shift, source_only_on_rotation):
    adapted = _target_accuracy(HeadConfig(**CLUSTER | {"method": method}), *rotation_shift)
    assert source_only_on_rotation < 0.7
    assert adapted > source_only_on_rotation + 0.04, (method, adapted, source_only_on_rotation)


def test_domain_norm_undoes_a_per_feature_affine_shift():
    x, y = rotated_clusters(100, 0)
    xt, yt = rotated_clusters(100, 2)
    shift = (np.linspace(0.3, 3, x.shape[1]), np.random.default_rng(7).normal(scale=20, size=x.shape[1]))
    data = HeadData((x, y), rotated_clusters(30, 1), xt * shift[0] + shift[1])
    test = (rotated_clusters(100, 4)[0] * shift[0] + shift[1], rotated_clusters(100, 4)[1])
    plain = _target_accuracy(HeadConfig(**CLUSTER), data, test)
    normed = _target_accuracy(HeadConfig(**CLUSTER | {"domain_norm": True}), data, test)
    assert normed > 0.9 and normed > plain + 0.1, (plain, normed)
