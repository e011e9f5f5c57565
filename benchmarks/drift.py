"""Drift detection on the digits default: each test's power against the number of new images, and ATC's estimate.

    .venv/bin/python benchmarks/drift.py [--draws 20] [--sizes 10 30 100 300] [--seed 0]

Needs a finished default run (`make run`): it builds the model evaluate
registers (params.yaml's registry.model, from models/ and the feature cache)
and its reference window (xfer/monitor.py: up to monitor.reference_rows
target val images). The new images are the target test images (never in the
reference window), as they are ("none": every alarm is a false one)
and under three shifts generated from them, seeded:

  inverted  255 - pixel
  noisy     Gaussian noise, sd 15 grey levels, clipped
  rotated   turned 10 degrees

Each pool is embedded once by the model; then, per shift and window size n,
--draws seeded windows of n images are tested (xfer/drift/, each test at
monitor.alpha / 3, as `xfer monitor` does). Power is the share of windows
flagged: by each test, and by the verdict (any test). Also per shift: ATC's
accuracy estimate on the whole pool against the accuracy measured with its
labels, the share of images the per-image OOD flag marks (xfer/drift/ood.py,
calibrated to mark about 5% of target val) with the accuracy on the flagged
and on the other images, and the seconds per 1,000 images to embed and to
test a window of the largest size. Writes benchmarks/results/drift.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.selection import machine  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHIFTS = ("none", "inverted", "noisy", "rotated")
NOISE_SD = 15.0
ROTATION_DEGREES = 10


def shifted(image, shift: str, rng: np.random.Generator):
    """`image` (PIL) under `shift`."""
    from PIL import Image, ImageOps

    rgb = image.convert("RGB")
    if shift == "none":
        return rgb
    if shift == "inverted":
        return ImageOps.invert(rgb)
    if shift == "noisy":
        pixels = np.asarray(rgb, dtype=np.float64) + rng.normal(0.0, NOISE_SD, size=np.asarray(rgb).shape)
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if shift == "rotated":
        return rgb.rotate(ROTATION_DEGREES, resample=Image.Resampling.BILINEAR)
    raise ValueError(f"unknown shift {shift!r}; valid: {', '.join(SHIFTS)}")


def build_model(bundle_dir: Path):
    """The registered model as evaluate builds it, with its reference window: (predictor, reference)."""
    from tasks.registry import servable_parts
    from xfer.config import load_params
    from xfer.data.split import read_manifest
    from xfer.features import load_current
    from xfer.layout import Layout
    from xfer.monitor import read_reference, write_reference
    from xfer.predictor import load_bundle, write_bundle

    layout = Layout(REPO)
    params = load_params(layout.params)
    write_bundle(bundle_dir, params.registry.model, servable_parts(layout, params, load_current(layout.features_current)))
    predictor = load_bundle(bundle_dir)
    write_reference(bundle_dir, predictor, layout.root, read_manifest(layout.manifest), params.monitor, params.seed)
    return params, predictor, read_reference(bundle_dir)


def measure(draws: int, sizes: list[int], seed: int) -> dict:
    from PIL import Image

    from xfer.data.split import read_manifest, rows
    from xfer.drift import DRIFT_TEST_NAMES, Window, run_tests
    from xfer.layout import Layout

    layout = Layout(REPO)
    with tempfile.TemporaryDirectory(prefix="xfer-drift-") as tmp:
        params, predictor, reference = build_model(Path(tmp) / "bundle")
    alpha = params.monitor.alpha
    per_test = alpha / len(DRIFT_TEST_NAMES)
    test_rows = rows(read_manifest(layout.manifest), "target", "test")
    labels = test_rows.label.to_numpy()
    originals = []
    for path in test_rows.path:
        with Image.open(layout.root / path) as img:
            originals.append(img.copy())
    result = {
        "alpha": alpha,
        "alpha_per_test": per_test,
        "reference_rows": len(reference.window),
        "pool": len(originals),
        "ood_quantile": reference.ood.quantile,
        "shifts": {},
    }
    for s_index, shift in enumerate(SHIFTS):
        rng = np.random.default_rng(seed + s_index)
        images = [shifted(img, shift, rng) for img in originals]
        started = time.perf_counter()
        features, probabilities = predictor.predict_with_features(images)
        embed_s = time.perf_counter() - started
        measured = float((probabilities.argmax(1) == labels).mean())
        _, flags = reference.ood.flags(features)
        right = probabilities.argmax(1) == labels
        row = {
            "accuracy_measured": measured,
            "accuracy_estimate": reference.threshold.estimate(probabilities),
            "ood_share": float(flags.mean()),
            "accuracy_flagged": float(right[flags].mean()) if flags.any() else None,
            "accuracy_unflagged": float(right[~flags].mean()) if (~flags).any() else None,
            "embed_s_per_1000": 1000 * embed_s / len(images),
            "power": {},
        }
        for n in sizes:
            flagged = {name: 0 for name in (*DRIFT_TEST_NAMES, "verdict")}
            seconds = []
            for draw in range(draws):
                pick = np.random.default_rng([seed, s_index, n, draw]).choice(len(images), size=min(n, len(images)), replace=False)
                started = time.perf_counter()
                tests = run_tests(reference.window, Window(features[pick], probabilities[pick]), alpha=per_test, seed=seed + draw)
                seconds.append(time.perf_counter() - started)
                for name, outcome in tests.items():
                    flagged[name] += outcome.drift
                flagged["verdict"] += any(t.drift for t in tests.values())
            row["power"][str(n)] = {name: count / draws for name, count in flagged.items()}
            row.setdefault("test_s", {})[str(n)] = float(np.median(seconds))
        result["shifts"][shift] = row
        print(
            f"  {shift:<9} accuracy {measured:.3f}, ATC {row['accuracy_estimate']:.3f}; verdict power "
            + ", ".join(f"n={n} {row['power'][str(n)]['verdict']:.2f}" for n in sizes),
            file=sys.stderr,
        )
    return result


def markdown(result: dict, draws: int, sizes: list[int], seed: int) -> str:
    from xfer.drift import DRIFT_TEST_NAMES

    largest = str(max(sizes))
    lines = [
        "# Drift detection on the digits default: power against window size, and the label-free accuracy estimate",
        "",
        f"`python benchmarks/drift.py --draws {draws} --sizes {' '.join(map(str, sizes))} --seed {seed}`; {result['machine']}. "
        f"Reference window: {result['reference_rows']} target val images; new images: windows drawn from the "
        f"{result['pool']} target test images, as they are (none) or shifted. Each test at alpha {result['alpha']} / 3 = "
        f"{result['alpha_per_test']:.4f}; the verdict is drift when any test is below that.",
        "",
        "Share of the draws flagged (for `none` a false alarm, for a shift the power), by the verdict and by each test:",
        "",
        "| shift | n | verdict | " + " | ".join(DRIFT_TEST_NAMES) + " |",
        "|---|---:|---:|" + "---:|" * len(DRIFT_TEST_NAMES),
    ]
    for shift, row in result["shifts"].items():
        for n in sizes:
            power = row["power"][str(n)]
            lines.append(f"| {shift} | {n} | {power['verdict']:.2f} | " + " | ".join(f"{power[t]:.2f}" for t in DRIFT_TEST_NAMES) + " |")
    lines += [
        "",
        "Accuracy on the whole pool: measured with its labels, and estimated without them (ATC, calibrated on target val); "
        f"the share of images the per-image OOD flag marks (threshold: the {result['ood_quantile']} quantile of the reference "
        "window's own scores) and the measured accuracy on the flagged and on the other images; "
        f"seconds per 1,000 images to embed them, and per window of {largest} to run the three tests:",
        "",
        "| shift | measured | ATC estimate | estimate - measured | flagged OOD | accuracy flagged | accuracy not flagged | embed s / 1,000 | tests s / window |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def share(value):
        return "-" if value is None else f"{value:.3f}"

    for shift, row in result["shifts"].items():
        gap = row["accuracy_estimate"] - row["accuracy_measured"]
        lines.append(
            f"| {shift} | {row['accuracy_measured']:.3f} | {row['accuracy_estimate']:.3f} | {gap:+.3f} | {row['ood_share']:.3f} | "
            f"{share(row['accuracy_flagged'])} | {share(row['accuracy_unflagged'])} | {row['embed_s_per_1000']:.1f} | {row['test_s'][largest]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20, help="windows per shift and size (default 20)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 100, 300], help="new images per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.draws < 1 or min(args.sizes) < 5:
        parser.error(f"--draws {args.draws} must be >= 1 and every --sizes value >= 5 (got {args.sizes})")
    result = measure(args.draws, args.sizes, args.seed)
    result |= {"machine": machine(), "draws": args.draws, "sizes": args.sizes, "seed": args.seed}
    write_json(args.out / "drift.json", result)
    text = markdown(result, args.draws, args.sizes, args.seed)
    write_text(args.out / "drift.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
