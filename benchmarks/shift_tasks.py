"""Six two-domain digit tasks built offline, their features, and reference rows for benchmarks/selection.py.

    .venv/bin/python benchmarks/shift_tasks.py [--tasks digits printed_to_rotated ...]

Every task has the 10 digit classes in a labelled source domain and an
unlabelled target domain, made from the builtin digits machinery
(xfer/data/digits.py) with fixed seeds, so a rebuild writes the same bytes:

- digits: the default, printed -> handwritten (params.yaml's data section;
  the same dataset folder and feature cache as benchmarks/adaptation.py).
- handwritten_to_printed: the default with the roles swapped.
- printed_to_inverted: target = the handwritten digits with intensities
  inverted (16 - x): dark strokes on a light background.
- printed_to_noisy: target = the handwritten digits blurred (Gaussian,
  sigma 0.5 px) with seeded Gaussian noise (sigma 1.5 of 16) added.
- printed_to_rotated: target = the handwritten digits rotated by 20-30
  degrees, clockwise or anticlockwise (seeded per image).
- fonts_to_fonts: printed digits in the DejaVu fonts -> printed digits in
  the STIX and Computer Modern fonts with strokes thickened (the 32x32
  glyph dilated by 2 px before the optdigits reduction).

"printed" is the default's printed domain (params.data.digits), "handwritten"
sklearn's 1,797 optdigits images; each domain holds at most ~2,200 images.
Each non-default task is written as ImageFolders of 8x8 PNGs under
benchmarks/.cache/selection/<task>/images/<domain>/<class>/ and then goes
through the pipeline's own fetch, split (params.yaml's fractions, seed 0)
and feature extraction (params.yaml's backbone), cached on disk.

The reference rows frame the selection benchmark's targets: a scikit-learn
logistic regression on the source, and a common adaptation training recipe
(bottleneck + SGD, last iterate) around xfer's own adaptation losses.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xfer import features as feats  # noqa: E402
from xfer.adapt import build_adaptation_loss  # noqa: E402
from xfer.backbones import create_backbone  # noqa: E402
from xfer.config import DataConfig, Params, load_params  # noqa: E402
from xfer.data import digits  # noqa: E402
from xfer.data.fetch import fetch_dataset  # noqa: E402
from xfer.data.sources import resolve_source  # noqa: E402
from xfer.data.split import build_manifest  # noqa: E402
from xfer.head_stage import head_data  # noqa: E402
from xfer.heads import predict_proba, train_head  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache"
SELECTION = CACHE / "selection"
DEFAULT_TASK = "digits"
# Splits never vary with the benchmark's seeds: those vary training only.
SPLIT_SEED = 0
# Bump when a shift's code changes, so cached images (and so features) are rebuilt;
# a change of the constants below is noticed by itself (they are in the marker).
IMAGES_VERSION = 1
MARKER = "task.json"

TASKS: dict[str, str] = {
    "digits": "printed -> handwritten (the default)",
    "handwritten_to_printed": "handwritten -> printed (roles swapped)",
    "printed_to_inverted": "printed -> handwritten with inverted intensities (16 - x)",
    "printed_to_noisy": "printed -> handwritten blurred (sigma 0.5 px) plus Gaussian noise (sigma 1.5 of 16)",
    "printed_to_rotated": "printed -> handwritten rotated by 20-30 degrees either way",
    "fonts_to_fonts": "printed in DejaVu fonts -> printed in STIX / Computer Modern fonts, strokes thickened 2 px",
}
# (source domain, target domain): the folder names under images/.
TASK_DOMAINS: dict[str, tuple[str, str]] = {
    "digits": (digits.SOURCE_DOMAIN, digits.TARGET_DOMAIN),
    "handwritten_to_printed": (digits.TARGET_DOMAIN, digits.SOURCE_DOMAIN),
    "printed_to_inverted": (digits.SOURCE_DOMAIN, "handwritten_inverted"),
    "printed_to_noisy": (digits.SOURCE_DOMAIN, "handwritten_noisy"),
    "printed_to_rotated": (digits.SOURCE_DOMAIN, "handwritten_rotated"),
    "fonts_to_fonts": ("printed_dejavu", "printed_other_fonts_thick"),
}

NOISE_SIGMA = 1.5  # of the 0..16 scale
BLUR_SIGMA = 0.5  # pixels of the 8x8 image
ROTATION_DEG = (20.0, 30.0)
THICKEN_PX = 2  # dilation of the 32x32 glyph, i.e. half an 8x8 cell
FONTS_PER_CLASS = 200  # fonts_to_fonts: images per class in each domain

Images = tuple[np.ndarray, np.ndarray]  # (N, 8, 8) uint8 of 0..16, (N,) int64 labels


# ---------------------------------------------------------------------------
# The shifts, on arrays of optdigits images (0..16)


def inverted(images: np.ndarray) -> np.ndarray:
    return (16 - images.astype(np.int16)).astype(np.uint8)


def blurred_and_noisy(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    smooth = np.stack([ndimage.gaussian_filter(im.astype(np.float64), BLUR_SIGMA) for im in images])
    noisy = smooth + rng.normal(0.0, NOISE_SIGMA, size=smooth.shape)
    return np.clip(np.rint(noisy), 0, 16).astype(np.uint8)


def rotated(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image turned by a seeded angle of 20-30 degrees, sign drawn too, about its centre."""
    angles = rng.uniform(*ROTATION_DEG, size=len(images)) * rng.choice([-1.0, 1.0], size=len(images))
    turned = [ndimage.rotate(im.astype(np.float64), a, reshape=False, order=1, mode="constant", cval=0.0) for im, a in zip(images, angles)]
    return np.clip(np.rint(np.stack(turned)), 0, 16).astype(np.uint8)


def _font_family_split() -> tuple[list[Path], list[Path]]:
    """DejaVu (sans, mono, serif) vs the rest (STIX and Computer Modern): a change of type design."""
    fonts = digits.font_paths()
    dejavu = [f for f in fonts if f.name.startswith("DejaVu")]
    others = [f for f in fonts if not f.name.startswith("DejaVu")]
    return dejavu, others


def render_printed(fonts: list[Path], per_class: int, seed: int, thicken_px: int = 0) -> Images:
    """Printed digits in `fonts` (each used about equally), augmented like the default's source."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for digit in range(10):
        order = np.concatenate([rng.permutation(len(fonts)) for _ in range(-(-per_class // len(fonts)))])[:per_class]
        for font in order:
            glyph = digits.render_glyph(fonts[font], digit, rng)
            if thicken_px:
                glyph = ndimage.binary_dilation(glyph, iterations=thicken_px)
            images.append(digits.to_optdigits(glyph))
            labels.append(digit)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------------
# Each task's two domains


@functools.lru_cache(maxsize=4)
def _printed(per_class: int, seed: int) -> Images:
    # Cached: five tasks share the default's printed domain.
    return digits.render_source(per_class, seed)


def _handwritten(per_class: int | None, seed: int) -> Images:
    return digits.load_target(per_class, seed)


def task_images(name: str, printed_per_class: int, handwritten_per_class: int | None, seed: int) -> dict[str, Images]:
    """{domain: (images, labels)} for task `name`; `seed` seeds rendering, draws and every shift."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose from {list(TASKS)}")
    source, target = TASK_DOMAINS[name]
    shift_rng = np.random.default_rng([seed, list(TASKS).index(name)])
    if name == "fonts_to_fonts":
        dejavu, others = _font_family_split()
        # Half the default's count per domain would starve the split; the same per-class count as the rest.
        per_class = min(printed_per_class, FONTS_PER_CLASS)
        return {
            source: render_printed(dejavu, per_class, seed),
            target: render_printed(others, per_class, seed + 1, thicken_px=THICKEN_PX),
        }
    printed = _printed(printed_per_class, seed)
    hand_images, hand_labels = _handwritten(handwritten_per_class, seed)
    shifted: dict[str, Callable[[], np.ndarray]] = {
        "digits": lambda: hand_images,
        "handwritten_to_printed": lambda: hand_images,
        "printed_to_inverted": lambda: inverted(hand_images),
        "printed_to_noisy": lambda: blurred_and_noisy(hand_images, shift_rng),
        "printed_to_rotated": lambda: rotated(hand_images, shift_rng),
    }
    hand = (shifted[name](), hand_labels)
    if name == "handwritten_to_printed":
        return {source: hand, target: printed}
    return {source: printed, target: hand}


def write_task_images(name: str, root: Path, printed_per_class: int, handwritten_per_class: int | None, seed: int) -> dict:
    """Write task `name` as root/<domain>/<class>/<class>_<i>.png (the digits format); returns the counts."""
    root = Path(root)
    return {domain: digits.write_domain(root / domain, *pair) for domain, pair in task_images(name, printed_per_class, handwritten_per_class, seed).items()}


def read_domain(root: Path) -> Images:
    """An ImageFolder written by write_task_images back as 0..16 arrays, in class and file order."""
    images, labels = [], []
    for label, name in enumerate(digits.CLASS_NAMES):
        for path in sorted((Path(root) / name).glob("*.png")):
            pixels = np.asarray(Image.open(path), dtype=np.float64)
            images.append(np.rint(pixels * 16 / 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------------
# Features through the pipeline's own core functions


def task_data_config(name: str, params: Params) -> DataConfig:
    """params.data with the task's folder and domains (the digits task: params.data itself)."""
    if name == DEFAULT_TASK:
        return params.data
    source, target = TASK_DOMAINS[name]
    raw = params.data.model_dump() | {
        "dataset": f"./selection/{name}/images",  # relative to CACHE, the root every call below gets
        "name": name,
        "sha256": None,
        "domains": {source: source, target: target},
        "source_domain": source,
        "target_domain": target,
    }
    return DataConfig(**raw)


def _ensure_images(name: str, params: Params) -> bool:
    """Write the task's images unless the same build is already there; True when (re)written."""
    folder = SELECTION / name / "images"
    spec = {
        "task": name,
        "version": IMAGES_VERSION,
        "printed_per_class": params.data.digits.source_per_class,
        "handwritten_per_class": params.data.digits.target_per_class,
        "seed": params.data.digits.seed,
        "shift": {"noise": NOISE_SIGMA, "blur": BLUR_SIGMA, "rotation": list(ROTATION_DEG), "thicken": THICKEN_PX, "fonts_per_class": FONTS_PER_CLASS},
    }
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return False
    staging = folder.with_name("images.partial")
    shutil.rmtree(staging, ignore_errors=True)
    counts = write_task_images(name, staging, spec["printed_per_class"], spec["handwritten_per_class"], spec["seed"])
    (staging / MARKER).write_text(json.dumps(spec))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    # New images: the copy fetch made of the old ones is stale.
    shutil.rmtree(SELECTION / name / "raw", ignore_errors=True)
    print(f"{name}: wrote {json.dumps({d: c['images'] for d, c in counts.items()})}", flush=True)
    return True


def _dataset_dir(name: str, data: DataConfig) -> Path:
    """Fetch (copy, decode, hash) the task's dataset into its own raw folder, once.

    Each task has its own raw root: fetch keeps one dataset per raw root and deletes the others.
    """
    raw_root = CACHE / "data" / "raw" if name == DEFAULT_TASK else SELECTION / name / "raw"
    dataset_dir = raw_root / resolve_source(data).name
    if not dataset_dir.is_dir():
        fetch_dataset(data, raw_root, CACHE / "data" / "downloads", root=CACHE, progress=False)
    return dataset_dir


def task_features(name: str, params: Params | None = None) -> feats.FeatureSet:
    """Task `name`'s features (params.yaml's backbone): built on first use, read from the cache after."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose from {list(TASKS)}")
    params = params or load_params(REPO / "params.yaml")
    if name != DEFAULT_TASK:
        _ensure_images(name, params)
    data = task_data_config(name, params)
    manifest, _ = build_manifest(_dataset_dir(name, data), data, SPLIT_SEED, root=CACHE)
    model, prep, weights = create_backbone(params.backbone, num_classes=0)
    key = feats.cache_key(params.backbone.name, weights.digest, prep, manifest, params.features.dtype)
    meta = {"backbone": params.backbone.name, "weights_digest": weights.digest, "preprocessing": prep.as_dict(), "task": name}
    entry, _ = feats.get_or_compute(
        CACHE / "features",
        key,
        lambda: feats.extract(model, manifest, prep, params.features.batch_size, root=CACHE, progress=False),
        manifest,
        meta,
        params.features.dtype,
    )
    return feats.load_entry(entry)


# ---------------------------------------------------------------------------
# Reference rows


def _num_classes(fs: feats.FeatureSet) -> int:
    return int(fs.index.label.max()) + 1


def target_test(fs: feats.FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    return fs.select("target", "test")


def source_only_head_accuracy(fs: feats.FeatureSet, params: Params, seed: int = 0) -> float:
    """xfer's own head (params.yaml's head section) with method source_only, on target test."""
    cfg = params.head.model_copy(update={"method": "source_only"})
    head, _ = train_head(cfg, head_data(fs), _num_classes(fs), seed)
    x, y = target_test(fs)
    return float((predict_proba(head, x, "target").argmax(1) == y).mean())


def logistic_regression_accuracy(fs: feats.FeatureSet) -> float:
    """scikit-learn's logistic regression on standardised source train features, scored on target test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = fs.select("source", "train")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(x, y)
    xt, yt = target_test(fs)
    return float((model.predict(xt) == yt).mean())


REFERENCE_METHODS = ("dann", "cdan", "mcc")
REFERENCE_STEPS = 1500
BOTTLENECK_DIM = 256
BATCH_PER_DOMAIN = 32


class BottleneckClassifier(nn.Module):
    """features -> Linear-BatchNorm-ReLU bottleneck -> linear classifier."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.bottleneck = nn.Sequential(nn.Linear(in_dim, BOTTLENECK_DIM), nn.BatchNorm1d(BOTTLENECK_DIM), nn.ReLU())
        self.classifier = nn.Linear(BOTTLENECK_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.bottleneck(x)
        return f, self.classifier(f)


def _shuffled_batches(n: int, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices, `size` at a time, epoch after epoch in a fresh order; a short last batch is skipped."""
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def _standardised_over_both(fs: feats.FeatureSet) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, tuple[torch.Tensor, np.ndarray]]:
    """Source train, target train (no labels) and target test, standardised with source + target train statistics."""
    (xs, ys), (xt, _) = fs.select("source", "train"), fs.select("target", "unlabeled")
    x_test, y_test = target_test(fs)
    both = np.concatenate([xs, xt])
    mean, std = both.mean(0), both.std(0)
    std = np.where(std > 1e-6, std, 1.0)  # a constant feature stays as it is

    def scale(x):
        return torch.as_tensor((x - mean) / std, dtype=torch.float32)

    return (scale(xs), torch.as_tensor(ys, dtype=torch.long)), scale(xt), (scale(x_test), y_test)


def reference_recipe_accuracy(fs: feats.FeatureSet, method: str, seed: int, steps: int = REFERENCE_STEPS) -> float:
    """The usual adaptation recipe on frozen features, with xfer's loss for `method`; target test accuracy.

    Bottleneck + linear classifier, SGD (momentum 0.9, weight decay 1e-3) at
    lr 0.01 * (1 + 10 p)^-0.75, 32 source + 32 target rows a step, and the
    last iterate kept: no model selection, so no target label but the score.
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"method must be one of {REFERENCE_METHODS}, got {method!r}")
    (xs, ys), xt, (x_test, y_test) = _standardised_over_both(fs)
    torch.manual_seed(seed)
    model = BottleneckClassifier(xs.shape[1], _num_classes(fs))
    adapt = build_adaptation_loss(method, BOTTLENECK_DIM, _num_classes(fs))
    opt = torch.optim.SGD([*model.parameters(), *adapt.parameters()], lr=0.01, momentum=0.9, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (1 + 10 * step / steps) ** -0.75)
    gen = torch.Generator().manual_seed(seed)
    source_batches, target_batches = _shuffled_batches(len(xs), BATCH_PER_DOMAIN, gen), _shuffled_batches(len(xt), BATCH_PER_DOMAIN, gen)
    model.train()
    adapt.train()
    for step in range(steps):
        i_s, i_t = next(source_batches), next(target_batches)
        adapt.set_progress(step / steps)
        # One pass over both domains: BatchNorm normalises the joint batch.
        f, logits = model(torch.cat([xs[i_s], xt[i_t]]))
        f_s, f_t = f.split(BATCH_PER_DOMAIN)
        logits_s, logits_t = logits.split(BATCH_PER_DOMAIN)
        loss = F.cross_entropy(logits_s, ys[i_s]) + adapt(f_s, f_t, logits_s, logits_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        _, logits = model(x_test)
    return float((logits.argmax(1).numpy() == y_test).mean())


# ---------------------------------------------------------------------------


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _sizes(fs: feats.FeatureSet) -> str:
    counts = fs.index.groupby(["role", "split"]).size()
    return " ".join(f"{role[0]}.{split}={n}" for (role, split), n in counts.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--steps", type=int, default=1500, help="reference recipe steps")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    columns = ["source_only_head", "logreg", *(f"ref_{m}" for m in REFERENCE_METHODS)]
    rows = []
    for name in args.tasks:
        fs, build_s = _timed(lambda: task_features(name, params))
        print(f"{name}: {TASKS[name]}\n  features {fs.features.shape} in {build_s:.1f} s; {_sizes(fs)}", flush=True)
        results = {
            "source_only_head": _timed(lambda: source_only_head_accuracy(fs, params)),
            "logreg": _timed(lambda: logistic_regression_accuracy(fs)),
        }
        for method in REFERENCE_METHODS:
            results[f"ref_{method}"] = _timed(lambda: reference_recipe_accuracy(fs, method, seed=0, steps=args.steps))
        print("  " + "  ".join(f"{c} {acc:.3f} ({s:.1f} s)" for c, (acc, s) in results.items()), flush=True)
        rows.append((name, results))
    print()
    print("| task | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, results in rows:
        print(f"| {name} | " + " | ".join(f"{results[c][0]:.3f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
