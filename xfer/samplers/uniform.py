"""uniform: every row alike (an epoch is a permutation: each row once)."""

import numpy as np


def row_weights(labels: np.ndarray) -> np.ndarray:
    return np.ones(len(labels))
