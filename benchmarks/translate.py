"""The CycleGAN-style translator on the digits default: its time on this machine, and whether heads gain from it.

    .venv/bin/python benchmarks/translate.py [--seeds 0 1 2] [--epochs 10]

The digits default (benchmarks/shift_tasks.py, task digits: its images, split
and cached lite0 features). Per seed, xfer/translate.py's translator (its
default translate section: 32 px, 10 epochs) trains on the source train images
and the unlabelled target train images, then writes a target-styled copy of
every source train image; the frozen backbone embeds the copies. params.yaml's
head section with method source_only is then trained on the source train
features as they are (original), on the translated copies' (translated), and
on both (both: every source row twice, once each way), and scored on target
test. No target label trains or chooses anything: the epochs are the
translator's default, the head's epoch is its label-free selection.

Writes benchmarks/results/translate.{md,json} and translate_grid.png (seed 0:
source images, their translations, target images).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shift_tasks  # noqa: E402
from benchmarks.imbalance import mean_std  # noqa: E402
from benchmarks.selection import machine  # noqa: E402
from xfer import features as feats  # noqa: E402
from xfer.backbones import create_backbone  # noqa: E402
from xfer.config import TranslateConfig, load_params  # noqa: E402
from xfer.head_stage import head_data  # noqa: E402
from xfer.heads import HeadData, predict_proba, train_head  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402
from xfer.plots import save_figure, translation_grid_figure  # noqa: E402
from xfer.translate import load_images, to_uint8, train_translator, translate, write_translated  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
OUT = shift_tasks.CACHE / "translate"
VARIANTS = ("original", "translated", "both")


def paths(fs: feats.FeatureSet, role: str, split: str) -> list[str]:
    return fs.index[(fs.index.role == role) & (fs.index.split == split)].path.tolist()


def translated_features(generator, fs: feats.FeatureSet, cfg: TranslateConfig, seed: int, params) -> np.ndarray:
    """The frozen backbone's features of every source train image's translation, in manifest order."""
    out_dir = OUT / f"seed{seed}"
    written = write_translated(generator, shift_tasks.CACHE, paths(fs, "source", "train"), cfg.image_size, out_dir)
    rows = fs.index[(fs.index.role == "source") & (fs.index.split == "train")]
    manifest = pd.DataFrame({"path": [str(out_dir.relative_to(shift_tasks.CACHE) / p) for p in written], "label": rows.label.to_numpy()})
    model, prep, _ = create_backbone(params.backbone, num_classes=0)
    return feats.extract(model, manifest, prep, params.features.batch_size, root=shift_tasks.CACHE, progress=False)


def run(seeds: list[int], epochs: int) -> dict:
    params = load_params(REPO / "params.yaml")
    fs = shift_tasks.task_features("digits", params)
    cfg = TranslateConfig(epochs=epochs)
    source = load_images(shift_tasks.CACHE, paths(fs, "source", "train"), cfg.image_size)
    target = load_images(shift_tasks.CACHE, paths(fs, "target", "unlabeled"), cfg.image_size)
    data = head_data(fs)
    x_test, y_test = shift_tasks.target_test(fs)
    classes = int(fs.index.label.max()) + 1
    head_cfg = params.head.model_copy(update={"method": "source_only"})
    results: dict = {}
    for seed in seeds:
        start = time.perf_counter()
        model = train_translator(cfg, source, target, seed, progress=False)
        seconds = time.perf_counter() - start
        if seed == seeds[0]:
            picks = np.random.default_rng(0).choice(len(source), 10, replace=False)
            grid = translation_grid_figure(
                to_uint8(source[picks]),
                to_uint8(translate(model.source_to_target, source[picks])),
                to_uint8(target[np.random.default_rng(1).choice(len(target), 10, replace=False)]),
                f"digits default: source (printed), translated, target (handwritten); seed {seed}, {epochs} epochs",
            )
            save_figure(RESULTS / "translate_grid.png", grid)
        x_translated = translated_features(model.source_to_target, fs, cfg, seed, params)
        (xs, ys) = data.source_train
        train_sets = {"original": (xs, ys), "translated": (x_translated, ys), "both": (np.concatenate([xs, x_translated]), np.concatenate([ys, ys]))}
        row = {"translator_seconds": seconds, "seconds_per_epoch": seconds / epochs, "final_losses": model.history[-1]}
        for variant, train in train_sets.items():
            head, _ = train_head(head_cfg, HeadData(train, data.source_val, data.target_train, data.target_val), classes, seed)
            row[variant] = float((predict_proba(head, x_test, "target").argmax(1) == y_test).mean())
        results[str(seed)] = row
        print(f"seed {seed}: translator {seconds:.0f} s; " + ", ".join(f"{v} {row[v]:.3f}" for v in VARIANTS), flush=True)
    return {
        "seeds": results,
        "meta": {
            "seeds": seeds,
            "translator": cfg.__dict__,
            "head": head_cfg.model_dump(),
            "machine": machine(),
            "threads": torch.get_num_threads(),
            "backbone": params.backbone.name,
        },
    }


def markdown(result: dict) -> str:
    meta, by_seed = result["meta"], result["seeds"]
    t = meta["translator"]
    seconds = [r["translator_seconds"] for r in by_seed.values()]
    lines = [
        f"The translator (xfer/translate.py: {t['image_size']} px, {t['epochs']} epochs, batch {t['batch_size']}, {t['residual_blocks']} residual blocks "
        f"of width {2 * t['channels']}) on the digits default's 1,540 source train and 989 unlabelled target train images: "
        f"{np.mean(seconds):.0f} s per training ({np.mean(seconds) / t['epochs']:.1f} s per epoch) on {meta['machine']}, {meta['threads']} threads.",
        "",
        f"Target test accuracy of params.yaml's head ({meta['head']['kind']}, method source_only, selection {meta['head']['selection']}) on frozen "
        f"{meta['backbone']} features of the source train images as they are, of their translations, and of both; mean ± std over translator and "
        f"head seeds {', '.join(map(str, meta['seeds']))}. No target label trains or chooses anything.",
        "",
        "| source train images | target test accuracy | per seed |",
        "|---|---:|---|",
    ]
    for variant in VARIANTS:
        values = [r[variant] for r in by_seed.values()]
        lines.append(f"| {variant} | {mean_std(values)} | {', '.join(f'{v:.3f}' for v in values)} |")
    lines += ["", "Images: `benchmarks/results/translate_grid.png`. Written by `benchmarks/translate.py`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=TranslateConfig().epochs)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = run(args.seeds, args.epochs)
    write_json(args.out / "translate.json", result)
    text = markdown(result)
    write_text(args.out / "translate.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
