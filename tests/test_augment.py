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


def test_fourier_swap_with_the_smallest_window_moves_only_the_mean():
    """b = 0: only the DC term (each channel's mean) comes from the target; the rest is the source's."""
    from xfer.data.augment import fourier_amplitude_swap

    rng = np.random.default_rng(0)
    source, target = rng.uniform(60, 120, (8, 8, 3)), rng.uniform(100, 200, (8, 8, 3))
    out = fourier_amplitude_swap(source, target, beta=0.1)  # floor(0.8) = 0
    np.testing.assert_allclose(out.mean(axis=(0, 1)), target.mean(axis=(0, 1)), rtol=1e-9)
    np.testing.assert_allclose(out - out.mean(axis=(0, 1)), source - source.mean(axis=(0, 1)), atol=1e-9)


def test_fourier_swap_keeps_the_source_phase_and_takes_the_target_amplitude_in_the_window():
    from xfer.data.augment import fourier_amplitude_swap

    rng = np.random.default_rng(1)
    source, target = rng.uniform(80, 170, (9, 9)), rng.uniform(80, 170, (9, 9))
    out = fourier_amplitude_swap(source, target, beta=0.25)  # b = 2: the centred 5 x 5 of 9 x 9
    assert out.min() > 0 and out.max() < 255  # nothing clipped: the spectra below are exact
    shift = lambda a: np.fft.fftshift(np.fft.fft2(a))  # noqa: E731
    got, src, trg = shift(out), shift(source), shift(target)
    window = (slice(2, 7), slice(2, 7))
    np.testing.assert_allclose(np.abs(got)[window], np.abs(trg)[window], rtol=1e-7, atol=1e-7)
    outside = np.ones((9, 9), bool)
    outside[window] = False
    np.testing.assert_allclose(np.abs(got)[outside], np.abs(src)[outside], rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(np.angle(got), np.angle(src), atol=1e-7)


def test_fda_restyles_source_reads_from_the_given_target_images_only_and_reproducibly(tmp_path):
    from xfer.data.augment import FourierStyle

    source = arrow(tmp_path / "source.png")
    # Two target images of another size: one darker, one lighter, both flat (and not so far that a channel clips).
    for name, value in (("dark.png", 70), ("light.png", 150)):
        Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(tmp_path / name)
    style = FourierStyle(0.01, ["dark.png", "light.png"], tmp_path)
    rows = ImageRows(
        [source.name],
        [0],
        Preprocessing(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        tmp_path,
        augment=build_augmentation(AugmentConfig(**{**OFF, "fda": 0.01}), style),
    )
    torch.manual_seed(0)
    means = [rows[0][0].mean().item() * 255 for _ in range(40)]
    # Each read takes the mean brightness of one of the two targets, each often.
    dark = sum(abs(m - 70) < 0.5 for m in means)
    light = sum(abs(m - 150) < 0.5 for m in means)
    assert dark + light == 40 and 10 < dark < 30, means
    torch.manual_seed(0)
    assert [rows[0][0].mean().item() * 255 for _ in range(40)] == means
    assert build_augmentation(AugmentConfig(**OFF), style) is not None  # fda alone is an augmentation
    import pytest

    with pytest.raises(ValueError, match="needs unlabelled target train images"):
        FourierStyle(0.05, [], tmp_path)
