import numpy as np
import pytest
import torch

from xfer.config import LINEAR_PROBE, ConfigError, HeadConfig, parse_params
from xfer.heads import HeadData, HeadNet, best_epoch, build_head, class_weights, load_head, predict_proba, save_head, train_head


def head_config(**overrides) -> HeadConfig:
    """The plain supervised linear head these tests were written against (the default searches, on a bottleneck)."""
    return HeadConfig(**{**LINEAR_PROBE, **overrides})


def blobs(n, seed, shift=0.0, sizes=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n) if sizes is None else np.repeat(np.arange(len(sizes)), sizes)
    centers = np.eye(3, 16) * 4
    x = centers[y] + rng.normal(size=(len(y), 16)) + shift
    return x.astype(np.float32), y.astype(np.int64)


def accuracy(head, data, domain="target"):
    return (predict_proba(head, data[0], domain).argmax(1) == data[1]).mean()


def test_linear_head_learns_separable_classes_and_reports_every_epoch():
    seen = []
    data = HeadData(blobs(300, 0), blobs(90, 1), target_val=blobs(90, 2, shift=0.5))
    head, history = train_head(head_config(epochs=15, lr=0.05), data, 3, seed=0, on_epoch=lambda e, r: seen.append(e))
    assert seen == list(range(1, 16)) and len(history) == 15
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert accuracy(head, blobs(200, 3)) > 0.95 and "target_val_accuracy" in history[0]


def test_best_epoch_by_the_selection_rule_is_kept():
    # Target val is shifted: the two rules disagree on some epochs.
    data = HeadData(blobs(200, 0), blobs(60, 1), target_val=blobs(60, 2, shift=1.2))
    for selection, val in (("source_val", blobs(60, 1)), ("target_val", blobs(60, 2, shift=1.2))):
        cfg = head_config(epochs=6, lr=0.05, selection=selection)
        head, history = train_head(cfg, data, 3, seed=0)
        kept = accuracy(head, val)
        assert np.isclose(kept, max(r[f"{selection}_accuracy"] for r in history))
        assert np.isclose(history[best_epoch(cfg, history) - 1][f"{selection}_accuracy"], kept)
    assert HeadConfig(selection="target_val").uses_target_labels and not HeadConfig().uses_target_labels


def test_early_stopping_ends_after_patience_epochs_without_progress():
    data = HeadData(blobs(200, 0), blobs(60, 1))
    _, history = train_head(head_config(epochs=200, lr=0.05, patience=3), data, 3, seed=0)
    scores = [r["source_val_accuracy"] for r in history]
    best = len(scores) - scores[::-1].index(max(scores))
    assert len(history) < 200 and len(history) == best + 3


def test_class_balanced_loss_weights_rare_classes_and_recovers_their_recall():
    w = class_weights(np.array([0] * 90 + [1] * 10), 3)
    assert w[1] / w[0] == pytest.approx(9.0) and w[2] == 0 and w[:2].mean() == pytest.approx(1.0)
    # 300 vs 300 vs 12 rows, overlapping classes: the rare class loses its recall unweighted.
    rng = np.random.default_rng(0)
    sizes = [300, 300, 12]
    y = np.repeat(np.arange(3), sizes)
    x = (np.eye(3, 16)[y] * 1.5 + rng.normal(size=(len(y), 16))).astype(np.float32)
    ty = np.repeat(np.arange(3), 200)
    tx = (np.eye(3, 16)[ty] * 1.5 + rng.normal(size=(600, 16))).astype(np.float32)
    data = HeadData((x, y), (x, y))
    recall = {}
    for balanced in (False, True):
        head, _ = train_head(head_config(epochs=30, lr=0.02, class_balanced=balanced), data, 3, seed=0)
        pred = predict_proba(head, tx, "source").argmax(1)
        recall[balanced] = (pred[ty == 2] == 2).mean()
    assert recall[True] > recall[False] + 0.2, recall


def test_the_source_only_head_trains_with_its_own_label_smoothing_and_an_adapted_head_ignores_it():
    """head.source_only_label_smoothing replaces label_smoothing for method source_only, and only there."""
    data = HeadData(blobs(200, 0), blobs(60, 1), target_train=blobs(200, 2, shift=0.5)[0])

    def weights(**overrides) -> torch.Tensor:
        head, _ = train_head(head_config(epochs=5, lr=0.05, selection="last", **overrides), data, 3, seed=0)
        return torch.cat([p.detach().flatten() for p in head.parameters()])

    own = weights(label_smoothing=0.0, source_only_label_smoothing=0.3)
    assert torch.equal(own, weights(label_smoothing=0.3, source_only_label_smoothing=None))
    assert not torch.equal(own, weights(label_smoothing=0.0, source_only_label_smoothing=0.0))
    assert torch.equal(weights(method="mcc", source_only_label_smoothing=0.3), weights(method="mcc", source_only_label_smoothing=0.0))
    assert not torch.equal(weights(method="mcc", label_smoothing=0.3), weights(method="mcc"))


def test_label_smoothing_keeps_predictions_less_certain():
    data = HeadData(blobs(200, 0), blobs(60, 1))
    top = {}
    for smoothing in (0.0, 0.3):
        head, _ = train_head(head_config(epochs=30, lr=0.05, label_smoothing=smoothing), data, 3, seed=0)
        top[smoothing] = predict_proba(head, blobs(100, 2)[0], "source").max(1).mean()
    assert top[0.3] < top[0.0] - 0.05 and top[0.3] < 0.9


def test_adaptation_without_target_features_or_oracle_without_target_val_is_refused():
    with pytest.raises(ValueError, match="unlabelled target"):
        train_head(head_config(method="mcc"), HeadData(blobs(30, 0), blobs(9, 1)), 3, seed=0)
    with pytest.raises(ValueError, match="target_val"):
        train_head(head_config(selection="target_val"), HeadData(blobs(30, 0), blobs(9, 1)), 3, seed=0)


def test_aligning_method_on_a_linear_head_is_a_config_error_naming_the_fix():
    with pytest.raises(ConfigError) as err:
        parse_params({"head": {"kind": "linear", "method": "dann"}})
    assert "head" in str(err.value) and "kind: mlp" in str(err.value)
    with pytest.raises(ConfigError, match="head.method"):
        parse_params({"head": {"method": "fancy"}})


def test_mlp_head_with_domain_norm_save_load_round_trip(tmp_path):
    cfg = head_config(kind="mlp", hidden_dim=8, epochs=2, domain_norm=True, method="coral")
    data = HeadData(blobs(60, 0), blobs(30, 1), target_train=blobs(60, 2, shift=3.0)[0])
    head, _ = train_head(cfg, data, 3, seed=0)
    assert isinstance(build_head(cfg, 16, 3), HeadNet) and head.embed_dim == 8
    # The stored target statistics are the target train features'.
    assert torch.allclose(head.feature_mean[1], torch.as_tensor(data.target_train.mean(0)), atol=1e-5)
    save_head(tmp_path, head, cfg, 16, ["a", "b", "c"], "key")
    loaded, spec = load_head(tmp_path)
    x = torch.as_tensor(blobs(5, 2)[0])
    with torch.no_grad():
        for domain in ("source", "target"):
            assert torch.equal(head(x, domain), loaded(x, domain))
        assert not torch.equal(loaded(x, "source"), loaded(x, "target"))
    assert spec["class_names"] == ["a", "b", "c"] and spec["features_key"] == "key" and spec["head"]["method"] == "coral"


def test_labelled_target_rows_train_the_head_with_the_source():
    """A few labelled target rows (semi-supervised budget) fix a shift source rows alone cannot."""
    from shifts import rotated_clusters

    source = rotated_clusters(100, seed=0)
    target_test = rotated_clusters(100, seed=2, angle_deg=60)
    shots = rotated_clusters(5, seed=1, angle_deg=60)
    cfg = head_config(epochs=40, lr=0.02)
    plain, _ = train_head(cfg, HeadData(source, rotated_clusters(30, seed=3)), 4, seed=0)
    semi, _ = train_head(cfg, HeadData(source, rotated_clusters(30, seed=3), target_labeled=shots), 4, seed=0)
    assert accuracy(semi, target_test) > accuracy(plain, target_test) + 0.15


def test_every_epoch_carries_every_validator_and_the_validator_rule_keeps_its_best_epoch():
    """selection: <validator> keeps the epoch whose recorded score is highest (ties: the later one)."""
    from xfer.config import VALIDATOR_NAMES
    from xfer.heads import VALIDATOR_PREFIX, outputs_of, selection_evidence
    from xfer.validators import score

    data = HeadData(blobs(200, 0), blobs(60, 1), target_train=blobs(150, 4, shift=1.0)[0], target_val=blobs(60, 2, shift=1.0))
    for selection in ("info_max", "ensv"):
        cfg = head_config(method="mcc", epochs=8, lr=0.05, selection=selection)
        head, history = train_head(cfg, data, 3, seed=0)
        assert all(f"{VALIDATOR_PREFIX}{n}" in r for r in history for n in VALIDATOR_NAMES if n != "source_val")
        scores = [r[f"{VALIDATOR_PREFIX}{selection}"] for r in history]
        kept = best_epoch(cfg, history)
        assert scores[kept - 1] == max(scores) and all(s < max(scores) for s in scores[kept:])
        if selection == "info_max":  # the returned head is that epoch's: its own score matches the record
            evidence = selection_evidence(data, 3, 0)
            out = outputs_of(head, torch.as_tensor(data.source_val[0]), torch.as_tensor(data.target_train))
            assert score("info_max", [out], evidence)[0] == pytest.approx(scores[kept - 1], abs=1e-5)
    cfg = head_config(epochs=5, lr=0.05, selection="last")
    _, history = train_head(cfg, data, 3, seed=0)
    assert best_epoch(cfg, history) == 5


def test_ensv_selection_cannot_stop_early():
    with pytest.raises(ValueError, match="ensv.*patience"):
        HeadConfig(selection="ensv", patience=3)


def test_config_names_exactly_the_validators_there_are():
    from typing import get_args

    from xfer.config import VALIDATOR_NAMES, Selection
    from xfer.validators import VALIDATORS

    assert VALIDATOR_NAMES == tuple(VALIDATORS)
    assert set(get_args(Selection)) == set(VALIDATOR_NAMES) | {"last", "target_val"}


def shifted_domains(offset: float = 8.0):
    """Source blobs and target blobs far from them (every feature shifted by `offset`)."""
    return HeadData(blobs(240, 0), blobs(60, 1), target_train=blobs(240, 2, shift=offset)[0], target_val=blobs(60, 3, shift=offset))


def bottleneck_config(**overrides) -> HeadConfig:
    recipe = dict(kind="bottleneck", hidden_dim=16, optimizer="sgd", lr=0.01, lr_schedule="inverse_decay", weight_decay=1e-3, batch_size=32, selection="last")
    return head_config(**{**recipe, **overrides})


def test_bottleneck_batchnorm_sees_source_and_target_rows_together():
    data = shifted_domains()
    head, _ = train_head(bottleneck_config(method="mcc", epochs=3), data, 3, seed=0)
    linear, bn = head.hidden[0], head.hidden[1]
    assert head.has_batchnorm and isinstance(bn, torch.nn.BatchNorm1d)
    with torch.no_grad():
        pre_s, pre_t = linear(torch.as_tensor(data.source_train[0])), linear(torch.as_tensor(data.target_train))
    # The running statistics are those of joint batches (half source, half target): the mean near
    # the midpoint of the two domains' means, the variance holding the gap between them. Separate
    # passes per domain would leave each domain's own variance only.
    gap = (pre_t.mean(0) - pre_s.mean(0)).abs()
    wide = gap > 1.0
    assert wide.sum() >= 4
    off_mid = (bn.running_mean - (pre_s.mean(0) + pre_t.mean(0)) / 2).abs()
    assert bool((off_mid[wide] < 0.25 * gap[wide]).all()), (off_mid[wide], gap[wide])
    within = (pre_s.var(0) + pre_t.var(0)) / 2
    assert bool((bn.running_var[wide] > within[wide] + 0.5 * (gap[wide] / 2) ** 2).all()), (bn.running_var[wide], within[wide], gap[wide])


def test_joint_feature_norm_statistics_are_stored_and_survive_save_and_load(tmp_path):
    data = shifted_domains()
    cfg = bottleneck_config(method="dann", epochs=2, feature_norm="joint")
    head, _ = train_head(cfg, data, 3, seed=0)
    both = torch.as_tensor(np.concatenate([data.source_train[0], data.target_train]))
    for row in (0, 1):  # the same joint statistics for either domain
        assert torch.allclose(head.feature_mean[row], both.mean(0), atol=1e-4)
        assert torch.allclose(head.feature_std[row], both.std(0), atol=1e-4)
    x = data.target_val[0]
    with torch.no_grad():  # the statistics are applied, to either domain
        standardised = (torch.as_tensor(x) - both.mean(0)) / both.std(0)
        for domain in ("source", "target"):
            assert torch.allclose(head.embed(torch.as_tensor(x), domain), head.hidden(standardised), atol=1e-5)
    save_head(tmp_path, head, cfg, 16, ["a", "b", "c"], "key")
    loaded, spec = load_head(tmp_path)
    assert spec["head"]["feature_norm"] == "joint"
    for domain in ("source", "target"):
        assert np.array_equal(predict_proba(head, x, domain), predict_proba(loaded, x, domain))


def test_inverse_decay_schedule_ends_at_lr_times_eleven_to_the_minus_three_quarters():
    from xfer.heads import scheduled_lr

    cfg = bottleneck_config(lr=0.01)
    assert scheduled_lr(cfg, 100, 100) == pytest.approx(0.01 * 11**-0.75)
    assert scheduled_lr(cfg, 50, 100) == pytest.approx(0.01 * 6**-0.75)
    assert scheduled_lr(cfg, 1, 100) == pytest.approx(0.01 * 1.1**-0.75)
    assert scheduled_lr(cfg.model_copy(update={"lr_schedule": "constant"}), 100, 100) == 0.01


def test_domain_norm_and_joint_feature_norm_are_refused_together():
    with pytest.raises(ConfigError, match="domain_norm.*feature_norm"):
        parse_params({"head": {"domain_norm": True, "feature_norm": "joint"}})
    # A bottleneck head has a hidden layer: the feature-aligning methods take it, and auto's grid tries them.
    from xfer.head_search import candidate_grid

    cfg = HeadConfig(kind="bottleneck", method="auto", feature_norm="joint", search_methods=["coral", "mmd", "dann", "cdan"])
    assert {"coral", "mmd", "dann", "cdan"} <= {c.config.method for c in candidate_grid(cfg)}
