"""sqrt: a class drawn in proportion to the square root of its size (a row's weight is 1 / sqrt(its class's size)),
between uniform (proportional to the size) and class_balanced (equal): rare classes gain without being
repeated as often as class_balanced repeats them."""

import numpy as np


def row_weights(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    return 1.0 / np.sqrt(np.bincount(labels)[labels])
