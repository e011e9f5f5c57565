"""The builtin `digits` dataset: printed digits (source) -> handwritten digits (target).

Both domains are 8x8 images of 0..16 in the format of UCI optdigits, so that
the only gap between them is the one we want to study: print vs handwriting.

- Source "printed": the digits 0-9 drawn with the TrueType fonts matplotlib
  ships, mildly augmented (rotation, shear, stretch, stroke width, threshold),
  then reduced the way optdigits was made: the glyph is cropped to its
  bounding box, scaled to fill a 32x32 box with its aspect ratio kept,
  binarised, and each non-overlapping 4x4 block becomes the count of its "on"
  pixels (0..16).
- Target "handwritten": the 1,797 real optdigits images scikit-learn bundles
  (`sklearn.datasets.load_digits`), so nothing is downloaded.

`write_digits` materialises both as ImageFolders of 8x8 grayscale PNGs.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SOURCE_DOMAIN = "printed"
TARGET_DOMAIN = "handwritten"
CLASS_NAMES = [str(d) for d in range(10)]

GLYPH_SIZE = 32  # optdigits bitmaps are 32x32 ...
BLOCK = 4  # ... reduced by 4x4 block counts to 8x8 of 0..16
RENDER_PX = 96  # large enough that the area-downscale to 32 gives smooth strokes
REFERENCE_FONT = "DejaVuSans.ttf"  # matplotlib's default font, so always shipped

# Augmentation ranges: mild, so printed digits still look printed.
MAX_ROTATION_DEG = 6.0
MAX_SHEAR = 0.15
MAX_STRETCH = 0.15  # horizontal scale in [1 - s, 1 + s]
MAX_STROKE_PX = 3  # extra stroke at RENDER_PX, i.e. < 1 px once scaled to 32
THRESHOLD_RANGE = (0.35, 0.65)  # fraction of a 32-grid cell that must be inked
DEFAULT_THRESHOLD = 0.5


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


# ---------------------------------------------------------------------------
# Rendering and the optdigits reduction


def _draw_digit_text(font_path: str | Path, text: str, stroke_px: int = 0) -> Image.Image:
    """`text` drawn white on black, antialiased, centred on a canvas with room to rotate."""
    font = ImageFont.truetype(str(font_path), RENDER_PX)
    side = 3 * RENDER_PX
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((side / 2, side / 2), text, fill=255, font=font, anchor="mm", stroke_width=stroke_px, stroke_fill=255)
    return canvas


def _affine(canvas: Image.Image, rotation_deg: float, shear: float, stretch: float) -> Image.Image:
    """Rotate, shear and stretch horizontally about the canvas centre."""
    if rotation_deg == 0 and shear == 0 and stretch == 1:
        return canvas
    a = math.radians(rotation_deg)
    rotate = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    forward = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([stretch, 1.0])
    # Pillow wants the output -> input map.
    inverse = np.linalg.inv(forward)
    cx = cy = canvas.width / 2
    offset = np.array([cx, cy]) - inverse @ np.array([cx, cy])
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    return canvas.transform(canvas.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def _crop_to_ink(on: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(on.any(axis=1))
    cols = np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        raise ValueError("glyph is empty: the font does not draw this character")
    return on[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _fitted_shape(height: int, width: int, box: int) -> tuple[int, int]:
    """(h, w) with the longer side = box and the aspect ratio kept."""
    scale = box / max(height, width)
    return max(1, min(box, round(height * scale))), max(1, min(box, round(width * scale)))


def _centre_in_box(glyph: np.ndarray, box: int) -> np.ndarray:
    out = np.zeros((box, box), dtype=bool)
    top = (box - glyph.shape[0]) // 2
    left = (box - glyph.shape[1]) // 2
    out[top : top + glyph.shape[0], left : left + glyph.shape[1]] = glyph
    return out


def _resize_bool(on: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """Resize a bool mask; returns the inked fraction per output pixel in 0..1."""
    img = Image.fromarray(on.astype(np.uint8) * 255, mode="L")
    return np.asarray(img.resize((width, height), resample), dtype=np.float64) / 255.0


def normalise_glyph(gray: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Antialiased glyph (uint8) -> 32x32 bool: cropped, scaled to fill, centred.

    `threshold` is the inked fraction a 32-grid cell needs to be "on": it sets
    how heavy the strokes come out, as a scanner's threshold would.
    """
    ink = _crop_to_ink(gray >= 128)
    height, width = _fitted_shape(*ink.shape, GLYPH_SIZE)
    small = _resize_bool(ink, height, width, Image.Resampling.BOX) >= threshold
    # Area rounding can drop a faint extreme row (the tip of a serif 4, the top
    # of a round 0); refit so the glyph still fills the box as optdigits' did.
    small = _crop_to_ink(small)
    height, width = _fitted_shape(*small.shape, GLYPH_SIZE)
    if small.shape != (height, width):
        small = _resize_bool(small, height, width, Image.Resampling.NEAREST) >= 0.5
    return _centre_in_box(small, GLYPH_SIZE)


def _augmentation(rng: np.random.Generator | None) -> dict:
    if rng is None:
        return {"rotation_deg": 0.0, "shear": 0.0, "stretch": 1.0, "stroke_px": 0, "threshold": DEFAULT_THRESHOLD}
    # Always draw all five, in a fixed order, so one sample's draws never shift another's.
    return {
        "rotation_deg": float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)),
        "shear": float(rng.uniform(-MAX_SHEAR, MAX_SHEAR)),
        "stretch": float(rng.uniform(1 - MAX_STRETCH, 1 + MAX_STRETCH)),
        "stroke_px": int(rng.integers(0, MAX_STROKE_PX + 1)),
        "threshold": float(rng.uniform(*THRESHOLD_RANGE)),
    }


def render_glyph(font_path: str | Path, digit: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """32x32 bool image of `digit` in the font, normalised as optdigits; rng None = no augmentation."""
    aug = _augmentation(rng)
    canvas = _draw_digit_text(font_path, str(digit), aug["stroke_px"])
    canvas = _affine(canvas, aug["rotation_deg"], aug["shear"], aug["stretch"])
    return normalise_glyph(np.asarray(canvas), aug["threshold"])


def to_optdigits(glyph32: np.ndarray) -> np.ndarray:
    """32x32 bool -> 8x8 uint8 of 0..16: the on-pixel count of each 4x4 block."""
    glyph32 = np.asarray(glyph32)
    if glyph32.shape != (GLYPH_SIZE, GLYPH_SIZE):
        raise ValueError(f"expected a {GLYPH_SIZE}x{GLYPH_SIZE} glyph, got shape {glyph32.shape}")
    n = GLYPH_SIZE // BLOCK
    blocks = glyph32.astype(bool).reshape(n, BLOCK, n, BLOCK)
    return blocks.sum(axis=(1, 3)).astype(np.uint8)


# ---------------------------------------------------------------------------
# Which fonts really draw digits


NOT_A_CHARACTER = "\U0010fffd"  # private use: no font draws it, so it renders .notdef
MIN_RECOGNISED = 6  # of 10; real fonts (even italics) score >= 7, symbol fonts <= 2


def _draws_every_digit(font_path: Path) -> bool:
    """Every digit renders ink and is not the font's .notdef glyph (what a missing character gets)."""
    notdef = np.asarray(_draw_digit_text(font_path, NOT_A_CHARACTER))
    for digit in range(10):
        drawn = np.asarray(_draw_digit_text(font_path, str(digit)))
        if drawn.max() < 128 or np.array_equal(drawn, notdef):
            return False
    return True


def _plain_digits(font_path: Path) -> np.ndarray:
    """(10, 8, 8) float: the unaugmented digits in optdigits form."""
    return np.stack([to_optdigits(render_glyph(font_path, d)).astype(np.float64) for d in range(10)])


def _looks_like_digits(digits: np.ndarray, reference: np.ndarray) -> bool:
    """The ten glyphs are distinct and most look like the reference font's same digit.

    Distinctness rejects fonts that draw one box for everything (LastResort);
    the nearest-reference vote rejects symbol fonts (cmsy10, cmex10) whose
    '0'..'9' code points hold arrows, brackets and the like. A vote rather than
    all ten because slanted fonts legitimately confuse a few (italic 1 vs 7).
    """
    if len({g.tobytes() for g in digits}) < 10:
        return False
    distances = ((digits[:, None] - reference[None]) ** 2).sum(axis=(2, 3))
    return int((distances.argmin(axis=1) == np.arange(10)).sum()) >= MIN_RECOGNISED


def _is_usable(font_path: Path, reference: np.ndarray) -> bool:
    try:
        return _draws_every_digit(font_path) and _looks_like_digits(_plain_digits(font_path), reference)
    except OSError:  # not a font FreeType can open
        return False
    except ValueError:  # a digit with so little ink it vanishes at 32x32
        return False


@functools.lru_cache(maxsize=None)
def _usable_fonts(folder: Path) -> tuple[Path, ...]:
    reference_path = folder / REFERENCE_FONT
    if not reference_path.is_file():
        raise FileNotFoundError(f"reference font {REFERENCE_FONT} not found in {folder}")
    reference = _plain_digits(reference_path)
    return tuple(path for path in sorted(folder.glob("*.ttf")) if _is_usable(path, reference))


def font_paths() -> list[Path]:
    """matplotlib's fonts that draw every digit 0-9, sorted by path."""
    return list(_usable_fonts(font_dir()))


# ---------------------------------------------------------------------------
# The two domains as arrays


def _font_schedule(n_fonts: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` font indices, every font used equally often (+-1) in a seeded order."""
    rounds = -(-count // n_fonts)
    return np.concatenate([rng.permutation(n_fonts) for _ in range(rounds)])[:count]


def render_source(per_class: int, seed: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Printed digits: images (10*per_class, 8, 8) uint8 of 0..16, labels (N,) int64."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    fonts = font_paths()
    if not fonts:
        raise RuntimeError(f"no font in {font_dir()} draws all ten digits")
    rng = np.random.default_rng(seed)
    jobs = [(digit, font) for digit in range(10) for font in _font_schedule(len(fonts), per_class, rng)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="rendering printed digits", unit="img")
    images = np.stack([to_optdigits(render_glyph(fonts[font], digit, rng)) for digit, font in jobs])
    labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
    return images, labels


def optdigits_file() -> Path:
    """The optdigits file scikit-learn bundles (1,797 rows of 64 pixels and a label), found without
    importing scikit-learn: that import took 1.5 s of every fetch process, to read a 57 kB file."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the digits dataset needs scikit-learn installed (it bundles the handwritten digits)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def load_target(per_class: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Handwritten digits (sklearn's optdigits, what `sklearn.datasets.load_digits` returns): all of
    them, or `per_class` per class in a seeded draw."""
    rows = np.loadtxt(optdigits_file(), delimiter=",")
    images = rows[:, :-1].reshape(-1, 8, 8).astype(np.uint8)
    labels = rows[:, -1].astype(np.int64)
    if per_class is None:
        return images, labels
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1 or None, got {per_class}")
    order = np.random.default_rng(seed).permutation(len(labels))
    picked = []
    for digit in range(10):
        of_digit = order[labels[order] == digit]
        if len(of_digit) < per_class:
            raise ValueError(f"only {len(of_digit)} handwritten {digit}s, asked for {per_class}")
        picked.append(np.sort(of_digit[:per_class]))  # sorted: keep sklearn's order within a class
    keep = np.concatenate(picked)
    return images[keep], labels[keep]


# ---------------------------------------------------------------------------
# On disk


def to_pixels(images: np.ndarray) -> np.ndarray:
    """0..16 -> 0..255 as round(v * 255 / 16), so 16 -> 255 (8 -> 127.5 -> 128)."""
    return np.rint(images.astype(np.float64) * 255 / 16).astype(np.uint8)


def write_domain(root: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """One ImageFolder root/<class>/<class>_<index>.png; returns its counts."""
    pixels = to_pixels(images)
    counts = {name: 0 for name in CLASS_NAMES}
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for image, label in zip(pixels, labels):
        name = CLASS_NAMES[int(label)]
        path = root / name / f"{name}_{counts[name]:05d}.png"
        Image.fromarray(image, mode="L").save(path, format="PNG")
        counts[name] += 1
    return {"images": int(len(labels)), "per_class": counts}


def write_digits(root: Path, source_per_class: int, target_per_class: int | None, seed: int, progress: bool = True) -> dict:
    """Write root/printed and root/handwritten as ImageFolders of 8x8 PNGs; returns a summary."""
    root = Path(root)
    fonts = font_paths()
    source = render_source(source_per_class, seed, progress=progress)
    target = load_target(target_per_class, seed)
    return {
        "domains": {
            SOURCE_DOMAIN: write_domain(root / SOURCE_DOMAIN, *source),
            TARGET_DOMAIN: write_domain(root / TARGET_DOMAIN, *target),
        },
        "fonts": [path.name for path in fonts],
    }
