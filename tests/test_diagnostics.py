import numpy as np
import pytest

from xfer.diagnostics import proxy_a_distance, tsne_coordinates
from xfer.metrics import confusion_matrix, per_class_accuracy


def test_proxy_a_distance_is_near_zero_for_one_distribution_and_near_two_for_separated_ones():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 5)), rng.normal(size=(300, 5))
    assert proxy_a_distance(a, b) < 0.3
    assert proxy_a_distance(a, b + 5.0) > 1.9
    with pytest.raises(ValueError, match="at least 4"):
        proxy_a_distance(a[:2], b)


def test_tsne_keeps_domains_and_row_numbers_of_unequal_domains():
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(40, 6)), rng.normal(size=(25, 6)) + 8
    coords, domain, rows = tsne_coordinates(source, target, max_per_domain=30)
    assert coords.shape == (55, 2) and (domain == 0).sum() == 30 and (domain == 1).sum() == 25
    assert rows[domain == 0].max() < 40 and rows[domain == 1].max() < 25
    # Well separated domains stay apart in the picture.
    gap = np.linalg.norm(coords[domain == 0].mean(0) - coords[domain == 1].mean(0))
    assert gap > 3 * coords[domain == 0].std(0).mean()


def test_per_class_accuracy_is_each_true_class_recall():
    cm = confusion_matrix(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 0, 0]), 4)
    np.testing.assert_allclose(per_class_accuracy(cm), [0.5, 2 / 3, 0.0, 0.0])
