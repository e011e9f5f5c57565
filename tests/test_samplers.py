"""head.sampler / finetune.sampler: which rows an epoch draws, each sampler against its known shares."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from xfer.config import LINEAR_PROBE, ConfigError, HeadConfig, parse_params
from xfer.heads import HeadData, predict_proba, train_head
from xfer.samplers import SAMPLERS, epoch_rows, probabilities, torch_sampler

# A long tail: 1,000, 100 and 10 rows (imbalance ratio 100).
SIZES = (1000, 100, 10)
LABELS = np.repeat(np.arange(3), SIZES)


def class_shares(rows: torch.Tensor) -> np.ndarray:
    return np.bincount(LABELS[rows.numpy()], minlength=3) / len(rows)


def epochs(name: str, count: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([epoch_rows(name, LABELS, gen) for _ in range(count)])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("uniform", np.array(SIZES) / sum(SIZES)),
        ("class_balanced", np.full(3, 1 / 3)),
        ("sqrt", np.sqrt(SIZES) / np.sqrt(SIZES).sum()),
    ],
)
def test_each_sampler_draws_the_classes_in_its_known_shares(name, expected):
    assert probabilities(name, LABELS).sum() == pytest.approx(1)
    drawn = epochs(name, 20)
    # 20 epochs of 1,110 draws: a share's standard error is at most 0.0034; 0.015 is over four of them.
    np.testing.assert_allclose(class_shares(drawn), expected, atol=0.015)
    # And within one epoch, the batches a class-balanced head sees are balanced within a tolerance.
    if name == "class_balanced":
        np.testing.assert_allclose(class_shares(epochs(name, 1, seed=3)), expected, atol=0.05)


def test_uniform_is_a_permutation_and_every_sampler_is_seeded():
    gen = torch.Generator().manual_seed(0)
    assert sorted(epoch_rows("uniform", LABELS, gen).tolist()) == list(range(len(LABELS)))
    for name in SAMPLERS:
        assert torch.equal(epochs(name, 2, seed=5), epochs(name, 2, seed=5))
        assert not torch.equal(epochs(name, 1, seed=5), epochs(name, 1, seed=6))
    assert torch_sampler("uniform", LABELS, gen) is None  # the DataLoader's own seeded shuffle


def test_a_class_balanced_loader_draws_balanced_batches_from_its_generator():
    data = TensorDataset(torch.zeros(len(LABELS), 1), torch.as_tensor(LABELS))
    from xfer.finetune import dataset_labels

    assert (dataset_labels(data) == LABELS).all()
    shares = []
    for seed in (0, 0, 1):
        sampler = torch_sampler("class_balanced", dataset_labels(data), torch.Generator().manual_seed(seed))
        rows = torch.as_tensor(list(sampler))
        assert len(rows) == len(LABELS)
        shares.append(class_shares(rows))
    np.testing.assert_allclose(shares[0], 1 / 3, atol=0.05)
    assert (shares[0] == shares[1]).all() and (shares[0] != shares[2]).any()


def test_resampling_recovers_the_rare_class_a_uniform_head_misses():
    """A known answer: three overlapping classes at 1,000 / 100 / 10 source rows, balanced target.
    A uniform head all but ignores the rare class; resampling raises its recall (and macro recall)."""
    rng = np.random.default_rng(0)
    centers = np.eye(3, 8) * 2.0

    def rows(labels):
        return (centers[labels] + rng.normal(size=(len(labels), 8))).astype(np.float32)

    target_labels = np.repeat(np.arange(3), 300)
    data = HeadData((rows(LABELS), LABELS), (rows(LABELS[::5]), LABELS[::5]), rows(target_labels), None)
    x_test = rows(target_labels)
    recall = {}
    for name in SAMPLERS:
        cfg = HeadConfig(**{**LINEAR_PROBE, "epochs": 10, "lr": 0.01, "sampler": name, "selection": "last"})
        head, _ = train_head(cfg, data, 3, seed=0)
        predicted = predict_proba(head, x_test, "target").argmax(1)
        recall[name] = [float((predicted[target_labels == c] == c).mean()) for c in range(3)]
    assert recall["uniform"][2] < 0.3
    assert recall["class_balanced"][2] > recall["sqrt"][2] > recall["uniform"][2]
    assert np.mean(recall["class_balanced"]) > np.mean(recall["uniform"]) + 0.1


def test_an_unknown_sampler_or_a_weighted_one_with_several_processes_is_refused():
    with pytest.raises(ConfigError, match="head.sampler"):
        parse_params({"head": {"sampler": "balanced"}})
    with pytest.raises(ConfigError, match="sampler 'sqrt' runs in one process: set devices 1"):
        parse_params({"finetune": {"sampler": "sqrt", "devices": 2}})
    assert parse_params({"finetune": {"sampler": "sqrt"}}).finetune.sampler == "sqrt"
    with pytest.raises(ValueError, match="unknown sampler 'x'"):
        probabilities("x", LABELS)
