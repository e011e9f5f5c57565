"""Augmentations: random per read on train rows, never on val/test rows, each knob doing its job."""

import numpy as np
import torch
from PIL import Image

from xfer.backbones import Preprocessing
from xfer.config import AugmentConfig
from xfer.data.augment import build_augmentation
from xfer.data.images import ImageRows

PREP = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def arrow(path):
    """An asymmetric colour picture: a warm bar on the left third of a mid-tone background."""
    a = np.empty((16, 16, 3), np.uint8)
    a[:] = (60, 90, 140)
    a[:, :5] = (200, 120, 60)
    Image.fromarray(a).save(path)
    return path


# Every knob off (the defaults are params.yaml's recipe: crops and rotations on).
OFF = {"crop_scale": None, "flip": False, "rotation_deg": 0.0, "color_jitter": 0.0}


def test_no_knob_means_no_augmentation_and_rows_load_as_always(tmp_path):
    assert build_augmentation(AugmentConfig(**OFF)) is None
    rows = ImageRows([arrow(tmp_path / "a.png").name], [0], PREP, tmp_path)
    assert torch.equal(rows[0][0], rows[0][0])


def test_flip_mirrors_about_half_the_reads_and_leaves_the_rest(tmp_path):
    path = arrow(tmp_path / "a.png")
    plain = ImageRows([path.name], [0], PREP, tmp_path)[0][0]
    flipping = ImageRows([path.name], [0], PREP, tmp_path, augment=build_augmentation(AugmentConfig(**{**OFF, "flip": True})))
    torch.manual_seed(0)
    reads = [flipping[0][0] for _ in range(200)]
    mirrored = sum(torch.equal(x, plain.flip(-1)) for x in reads)
    unchanged = sum(torch.equal(x, plain) for x in reads)
    assert mirrored + unchanged == 200 and 70 < mirrored < 130


def test_crop_rotation_and_jitter_change_reads_randomly_but_reproducibly(tmp_path):
    path = arrow(tmp_path / "a.png")
    plain = ImageRows([path.name], [0], PREP, tmp_path)[0][0]
    for knob in ({"crop_scale": 0.5}, {"rotation_deg": 30.0}, {"color_jitter": 0.5}):
        rows = ImageRows([path.name], [0], PREP, tmp_path, augment=build_augmentation(AugmentConfig(**{**OFF, **knob})))
        torch.manual_seed(1)
        first = [rows[0][0] for _ in range(5)]
        torch.manual_seed(1)
        again = [rows[0][0] for _ in range(5)]
        assert all(torch.equal(a, b) for a, b in zip(first, again)), knob  # drawn from torch's generator
        assert sum(not torch.equal(x, plain) for x in first) >= 4, knob
        assert first[0].shape == plain.shape
