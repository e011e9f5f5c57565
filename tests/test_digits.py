"""The builtin digits dataset: optdigits reduction, fonts, both domains, the files on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xfer.data import digits as D


def ink_bbox(glyph: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(glyph.any(axis=1))
    cols = np.flatnonzero(glyph.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


def read_folder(domain_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and labels back from an ImageFolder, in class then file order."""
    images, labels = [], []
    for label, name in enumerate(D.CLASS_NAMES):
        for path in sorted((domain_root / name).glob("*.png")):
            with Image.open(path) as img:
                assert img.mode == "L"
                assert img.size == (8, 8)
                images.append(np.asarray(img))
            labels.append(label)
    return np.stack(images), np.array(labels)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- to_optdigits -----------------------------------------------------------


def test_to_optdigits_all_on_is_all_16():
    out = D.to_optdigits(np.ones((32, 32), dtype=bool))
    assert out.dtype == np.uint8 and out.shape == (8, 8)
    assert (out == 16).all()


def test_to_optdigits_all_off_is_all_0():
    assert (D.to_optdigits(np.zeros((32, 32), dtype=bool)) == 0).all()


def test_to_optdigits_single_pixel_lands_in_its_block():
    glyph = np.zeros((32, 32), dtype=bool)
    glyph[13, 30] = True  # row block 3, column block 7
    expected = np.zeros((8, 8), dtype=np.uint8)
    expected[3, 7] = 1
    np.testing.assert_array_equal(D.to_optdigits(glyph), expected)


def test_to_optdigits_checkerboard_is_all_8():
    glyph = (np.add.outer(np.arange(32), np.arange(32)) % 2).astype(bool)
    assert (D.to_optdigits(glyph) == 8).all()


def test_to_optdigits_blocks_do_not_overlap():
    # One full row of pixels: each of the 8 blocks it crosses counts exactly 4.
    glyph = np.zeros((32, 32), dtype=bool)
    glyph[5] = True
    expected = np.zeros((8, 8), dtype=np.uint8)
    expected[1] = 4
    np.testing.assert_array_equal(D.to_optdigits(glyph), expected)


def test_to_optdigits_rejects_wrong_shape():
    with pytest.raises(ValueError):
        D.to_optdigits(np.ones((28, 28), dtype=bool))


# --- render_glyph and fonts ---------------------------------------------------


@pytest.fixture(scope="module")
def fonts() -> list[Path]:
    return D.font_paths()


def test_font_paths_are_sorted_and_skip_fonts_without_digits(fonts):
    names = [p.name for p in fonts]
    assert fonts == sorted(fonts)
    assert len(fonts) >= 10
    assert "DejaVuSans.ttf" in names
    # Symbol fonts: empty at '0'..'9' (STIXSize*, STIXNonUni*), .notdef boxes
    # (LastResort), or arrows and brackets at the digit code points (cmsy10, cmex10).
    for rejected in ("cmsy10.ttf", "cmex10.ttf", "LastResortHE-Regular.ttf", "STIXSizOneSymReg.ttf", "STIXNonUni.ttf"):
        assert rejected not in names


def test_every_font_renders_ten_distinct_non_blank_digits(fonts):
    for font in fonts:
        glyphs = [D.render_glyph(font, d) for d in range(10)]
        assert all(g.any() for g in glyphs), font.name
        assert len({g.tobytes() for g in glyphs}) == 10, font.name


@pytest.mark.parametrize("digit", [0, 1, 4, 7])
def test_render_glyph_fills_the_box_along_its_longer_side(fonts, digit):
    rng = np.random.default_rng(3)
    for font in fonts[::3]:
        for r in (None, rng):
            glyph = D.render_glyph(font, digit, r)
            assert glyph.shape == (32, 32) and glyph.dtype == bool
            assert glyph.any()
            top, bottom, left, right = ink_bbox(glyph)
            height, width = bottom - top + 1, right - left + 1
            if height >= width:
                assert (top, bottom) == (0, 31), (font.name, digit)
            else:
                assert (left, right) == (0, 31), (font.name, digit)
            # Centred along the shorter side (within one pixel of rounding).
            margin_a, margin_b = (left, 31 - right) if height >= width else (top, 31 - bottom)
            assert abs(margin_a - margin_b) <= 1


def test_render_glyph_without_rng_is_repeatable_and_rng_varies_it(fonts):
    font = fonts[0]
    np.testing.assert_array_equal(D.render_glyph(font, 5), D.render_glyph(font, 5))
    rng = np.random.default_rng(0)
    variants = {D.render_glyph(font, 5, rng).tobytes() for _ in range(5)}
    assert len(variants) > 1


def test_tall_digit_one_stays_narrow():
    # Aspect kept, not stretched to a square: a '1' must not fill the width.
    glyph = D.render_glyph(Path(D.font_dir()) / "DejaVuSans.ttf", 1)
    _, _, left, right = ink_bbox(glyph)
    assert right - left + 1 < 24


# --- render_source ------------------------------------------------------------


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, np.ndarray]:
    return D.render_source(per_class=4, seed=0)


def test_render_source_shapes_values_and_balance(source):
    images, labels = source
    assert images.shape == (40, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (40,) and labels.dtype == np.int64
    assert images.max() <= 16
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [4] * 10)
    assert (images.reshape(40, -1).sum(axis=1) > 0).all(), "a blank source image"


def test_render_source_is_deterministic_per_seed(source):
    images, labels = source
    again_images, again_labels = D.render_source(per_class=4, seed=0)
    assert images.tobytes() == again_images.tobytes()
    np.testing.assert_array_equal(labels, again_labels)
    other, _ = D.render_source(per_class=4, seed=1)
    assert not np.array_equal(images, other)


def test_render_source_rejects_empty_classes():
    with pytest.raises(ValueError):
        D.render_source(per_class=0, seed=0)


# --- load_target ----------------------------------------------------------------


def test_load_target_all():
    images, labels = D.load_target(None, seed=0)
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.max() == 16 and images.min() == 0
    assert set(np.unique(labels)) == set(range(10))


def test_load_target_reads_what_sklearn_load_digits_returns():
    from sklearn.datasets import load_digits

    images, labels = D.load_target(None, seed=0)
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images.astype(np.uint8))
    np.testing.assert_array_equal(labels, bunch.target)


def test_load_target_cap_is_balanced_deterministic_and_seeded():
    images, labels = D.load_target(5, seed=0)
    assert images.shape == (50, 8, 8)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [5] * 10)
    again, _ = D.load_target(5, seed=0)
    np.testing.assert_array_equal(images, again)
    other, _ = D.load_target(5, seed=1)
    assert not np.array_equal(images, other)
    # Every capped image is a real handwritten one with the right label.
    all_images, all_labels = D.load_target(None, seed=0)
    for image, label in zip(images, labels):
        matches = (all_images == image).all(axis=(1, 2))
        assert matches.any() and label in all_labels[matches]


# --- write_digits -----------------------------------------------------------------


def test_to_pixels_maps_0_16_onto_0_255():
    values = np.arange(17, dtype=np.uint8)
    expected = [round(v * 255 / 16) for v in range(17)]
    np.testing.assert_array_equal(D.to_pixels(values), expected)
    assert D.to_pixels(values)[[0, 16]].tolist() == [0, 255]


def test_write_digits_layout_and_round_trip(tmp_path):
    root = tmp_path / "not" / "yet" / "there"
    summary = D.write_digits(root, source_per_class=3, target_per_class=2, seed=7, progress=False)

    assert sorted(p.name for p in root.iterdir()) == [D.TARGET_DOMAIN, D.SOURCE_DOMAIN]
    for domain, per_class in ((D.SOURCE_DOMAIN, 3), (D.TARGET_DOMAIN, 2)):
        assert sorted(p.name for p in (root / domain).iterdir()) == sorted(D.CLASS_NAMES)
        for name in D.CLASS_NAMES:
            files = sorted(p.name for p in (root / domain / name).iterdir())
            assert files == [f"{name}_{i:05d}.png" for i in range(per_class)]
        assert summary["domains"][domain] == {
            "images": 10 * per_class,
            "per_class": {name: per_class for name in D.CLASS_NAMES},
        }
    assert summary["fonts"] == [p.name for p in D.font_paths()]

    # The PNG pixels are exactly round(v * 255 / 16) of the arrays.
    for domain, arrays in (
        (D.SOURCE_DOMAIN, D.render_source(3, seed=7)),
        (D.TARGET_DOMAIN, D.load_target(2, seed=7)),
    ):
        pixels, labels = read_folder(root / domain)
        np.testing.assert_array_equal(labels, arrays[1])
        np.testing.assert_array_equal(pixels, D.to_pixels(arrays[0]))
        back = np.rint(pixels.astype(float) * 16 / 255).astype(np.uint8)
        np.testing.assert_array_equal(back, arrays[0])


def test_write_digits_is_byte_identical_for_the_same_seed(tmp_path):
    first = D.write_digits(tmp_path / "a", 3, 2, seed=1, progress=False)
    second = D.write_digits(tmp_path / "b", 3, 2, seed=1, progress=False)
    assert first == second
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    D.write_digits(tmp_path / "c", 3, 2, seed=2, progress=False)
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")


def test_write_digits_writes_only_under_root(tmp_path):
    root = tmp_path / "out"
    D.write_digits(root, 3, None, seed=0, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert len(list((root / D.TARGET_DOMAIN).rglob("*.png"))) == 1797
