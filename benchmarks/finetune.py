"""Fine-tuning strategies and adaptation methods on the digits default: target test accuracy.

    .venv/bin/python benchmarks/finetune.py [--seeds 0 1 2] [--epochs 2] [--only lp_ft full [--merge]]

Each recipe overrides one fixed base recipe, RECIPE_BASE below (two epochs of
LP-FT without adaptation or augmentation, kept on its best source-val epoch;
neither params.yaml nor the library defaults, so the table stays what this
script measures when the pipeline's default recipe changes; a recipe may set
its own epochs) and, for
the labelled rows, the split; each runs once per training seed on the same
split (the params seed), through the stage's own code
(xfer/finetune_job.py). Writes benchmarks/results/finetune.{md,json}: recipe ->
mean, std and per-seed target test accuracy, epochs, and the target labels it
trained on. `--only` runs some recipes and prints them; with `--merge` their
rows replace or join those already in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from xfer import features as feats  # noqa: E402
from xfer.backbones import create_backbone  # noqa: E402
from xfer.config import FinetuneConfig, Params, load_params, parse_params  # noqa: E402
from xfer.data.fetch import fetch_dataset  # noqa: E402
from xfer.data.images import ImageRows  # noqa: E402
from xfer.data.split import build_manifest, rows  # noqa: E402
from xfer.finetune import predict_logits  # noqa: E402
from xfer.finetune_job import run as run_finetune  # noqa: E402
from xfer.io import save_with, write_json, write_text  # noqa: E402
from xfer.layout import Layout  # noqa: E402
from xfer.translate_stage import stage_paths, translate_stage  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache" / "finetune"
RESULTS = REPO / "benchmarks" / "results"

# The base every recipe overrides: the library's finetune defaults as they were when
# the first rows of the table were measured (before the default became a recipe of it).
RECIPE_BASE = {
    "method": "source_only", "adapt_weight": 1.0, "pseudo_threshold": 0.9, "epochs": 2, "lr": 1e-4,
    "schedule": "constant", "warmup_epochs": 0.0, "selection": "source_val",
    "augment": {"crop_scale": None, "flip": False, "rotation_deg": 0.0, "color_jitter": 0.0},
}  # fmt: skip
LONGER = {
    "strategy": "lp_ft", "selection": "last", "epochs": 8, "lr": 3e-4, "schedule": "cosine", "warmup_epochs": 0.5,
    "augment": {"rotation_deg": 10.0, "crop_scale": 0.7},
}  # fmt: skip
# recipe -> (finetune overrides, split overrides)
RECIPES: dict[str, tuple[dict, dict]] = {
    "head_only": ({"strategy": "head_only"}, {}),
    "partial_4": ({"strategy": "partial", "frozen_blocks": 4}, {}),
    "full": ({"strategy": "full"}, {}),
    "lp_ft": ({"strategy": "lp_ft"}, {}),
    "gradual": ({"strategy": "gradual", "unfreeze_every": 1}, {}),
    "lp_ft+mcc": ({"strategy": "lp_ft", "method": "mcc"}, {}),
    "lp_ft+self_training": ({"strategy": "lp_ft", "method": "self_training", "adapt_weight": 3.0}, {}),
    "lp_ft+10_labels": ({"strategy": "lp_ft"}, {"target_shots": 10}),
    "lp_ft+mcc, last epoch": ({"strategy": "lp_ft", "method": "mcc", "selection": "last"}, {}),
    "lp_ft+self_training, last epoch": ({"strategy": "lp_ft", "method": "self_training", "adapt_weight": 3.0, "selection": "last"}, {}),
    "lp_ft+10_labels, last epoch": ({"strategy": "lp_ft", "selection": "last"}, {"target_shots": 10}),
    # Longer, with augmentation and a cosine schedule: the best found on the CPU so far.
    "lp_ft+self_training+augment, cosine, last": ({**LONGER, "method": "self_training", "adapt_weight": 3.0}, {}),
    "lp_ft+10_labels+augment, cosine, last": (LONGER, {"target_shots": 10}),
    "lp_ft+10_labels+augment, cosine, last, 16 epochs": ({**LONGER, "epochs": 16}, {"target_shots": 10}),
    # A lower pseudo-label threshold: more of the target's centroid labels train from the start.
    "lp_ft+self_training+augment, cosine, last, threshold 0.5": ({**LONGER, "method": "self_training", "adapt_weight": 3.0, "pseudo_threshold": 0.5}, {}),
    "lp_ft+self_training+augment, cosine, last, threshold 0.3": ({**LONGER, "method": "self_training", "adapt_weight": 3.0, "pseudo_threshold": 0.3}, {}),
    # Fourier domain adaptation (augment.fda) on lp_ft: beta 0.01 (the FDA paper's smallest) swaps only each
    # image's mean on the digits' 8 x 8 images; 0.125 the smallest window beyond it (3 x 3). Not chosen on target labels.
    "lp_ft+fda 0.01": ({"strategy": "lp_ft", "augment": {**RECIPE_BASE["augment"], "fda": 0.01}}, {}),
    "lp_ft+fda 0.125": ({"strategy": "lp_ft", "augment": {**RECIPE_BASE["augment"], "fda": 0.125}}, {}),
    # The translate stage's target-styled copies of the source train images (params.yaml's translate
    # section, the translator seeded with the training seed): in place of the originals, or beside them.
    "lp_ft+translated source": ({"strategy": "lp_ft", "source_images": "translated"}, {}),
    "lp_ft+translated and original source": ({"strategy": "lp_ft", "source_images": "both"}, {}),
    # The ten labels per class repeated 8 times per epoch (otherwise 6% of the rows), and
    # self-training on the unlabelled rest of the target.
    "lp_ft+10_labels x8+self_training+augment, cosine, last": (
        {**LONGER, "labeled_target_repeats": 8, "method": "self_training", "adapt_weight": 3.0},
        {"target_shots": 10},
    ),
}


def project(base: Params, split_overrides: dict) -> Path:
    """A project root holding the digits, a manifest for this split, and its cached features."""
    name = "labels_" + "_".join(f"{k}{v}" for k, v in sorted(split_overrides.items())) if split_overrides else "no_labels"
    root = CACHE / name
    layout = Layout(root)
    params = with_overrides(base, {}, split_overrides)
    if not (layout.features_current / feats.META_FILE).is_file():
        dataset = fetch_dataset(params.data, layout.raw, CACHE / "downloads", root=root)
        manifest, _ = build_manifest(layout.raw / dataset["dataset"], params.data, params.seed, root=root)
        save_with(layout.manifest, lambda tmp: manifest.to_csv(tmp, index=False))
        model, prep, weights = create_backbone(params.backbone, num_classes=0)
        key = feats.cache_key(params.backbone.name, weights.digest, prep, manifest, params.features.dtype)
        meta = {"backbone": params.backbone.name, "weights_digest": weights.digest, "preprocessing": prep.as_dict()}
        entry, _ = feats.get_or_compute(
            layout.feature_cache,
            key,
            lambda: feats.extract(model, manifest, prep, params.features.batch_size, root=root),
            manifest,
            meta,
            params.features.dtype,
        )
        feats.publish_current(entry, layout.features_current)
    return root


def with_overrides(base: Params, finetune: dict, split: dict, seed: int | None = None, epochs: int | None = None) -> Params:
    raw = base.model_dump(mode="json")
    # Recipes change RECIPE_BASE, not params.yaml's finetune section nor the library's
    # defaults, so the table stays what the script measures when the default recipe changes.
    raw["finetune"] = FinetuneConfig(**RECIPE_BASE).model_dump(mode="json")
    if epochs is not None:
        raw["finetune"]["epochs"] = epochs
    # A recipe's own epochs beat the command line's.
    raw["finetune"].update(finetune, device="auto")
    raw["data"]["split"].update(split)
    # The translated source images exist only with the translate stage on.
    raw["translate"]["enabled"] = raw["finetune"]["source_images"] != "original"
    if seed is not None:
        raw["seed"] = seed
    return parse_params(raw, "benchmark recipe")


def target_test_accuracy(layout: Layout, model, spec) -> float:
    from xfer.data.split import read_manifest

    part = rows(read_manifest(layout.manifest), "target", "test")
    data = ImageRows(part.path.tolist(), part.label.tolist(), spec.prep(), layout.root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits, labels = predict_logits(model, data, 256, device)
    return float((logits.argmax(1) == labels).mean())


def run_recipe(base: Params, name: str, seeds: list[int], epochs: int) -> dict:
    finetune, split = RECIPES[name]
    layout = Layout(project(base, split))
    accs, seconds, labels, translator_seconds = [], [], 0, []
    for seed in seeds:
        # The manifest keeps the split made with the params seed; the training seed varies.
        params = with_overrides(base, finetune, split, seed=seed, epochs=epochs)
        if params.translate.enabled:
            # Cached by content: trained once per seed, then published again for free.
            translated = translate_stage(**stage_paths(layout), params=params, progress=False)
            translator_seconds.append(translated.seconds)
        start = time.perf_counter()
        result = run_finetune(layout, params, progress=False)
        seconds.append(time.perf_counter() - start)
        accs.append(target_test_accuracy(layout, result.model, result.spec))
        labels = int(split.get("target_shots", 0)) * result.spec.num_classes
        print(f"{name:24s} seed {seed}: target test {accs[-1]:.3f} ({seconds[-1]:.0f} s)", flush=True)
    return {
        "mean": round(statistics.mean(accs), 4),
        "std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
        "per_seed": {str(s): round(a, 4) for s, a in zip(seeds, accs)},
        "target_labels": labels,
        "epochs": params.finetune.epochs,
        "finetune": finetune,
        "split": split,
        "seconds_per_run": round(statistics.mean(seconds), 1),
        # The translate stage's time per seed, not in seconds_per_run (0 where its cache had the entry).
        **({"translator_seconds": [round(t, 1) for t in translator_seconds]} if translator_seconds else {}),
    }


def markdown(results: dict, seeds: list[int], epochs: int, device: str) -> str:
    lines = [
        f"# Fine-tuning on the digits default: tf_efficientnet_lite0 at 64 px, seeds {seeds}, on {device}",
        "",
        "| recipe | epochs | target labels | target test (mean ± std) | per seed | s / run |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, r in results.items():
        per_seed = ", ".join(f"{v:.3f}" for v in r["per_seed"].values())
        lines.append(
            f"| {name} | {r.get('epochs', epochs)} | {r['target_labels']} | {r['mean']:.3f} ± {r['std']:.3f} | {per_seed} | {r['seconds_per_run']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="run these recipes only (results are not written)")
    parser.add_argument("--merge", action="store_true", help="with --only: write their rows into the existing results")
    args = parser.parse_args()
    if args.merge and not args.only:
        parser.error("--merge needs --only")
    os.environ.setdefault("TQDM_DISABLE", "1")
    base = load_params(REPO / "params.yaml")
    names = args.only or list(RECIPES)
    results = {name: run_recipe(base, name, args.seeds, args.epochs) for name in names}
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    table = markdown(results, args.seeds, args.epochs, device)
    print(table)
    if args.merge:
        written = json.loads((RESULTS / "finetune.json").read_text())
        if written["seeds"] != args.seeds or written["device"] != device:
            sys.exit(f"cannot merge: the results were measured with seeds {written['seeds']} on {written['device']}")
        results = {**written["recipes"], **results}
        results = {name: results[name] for name in RECIPES if name in results}
        args.epochs = written["epochs"]
    if args.only is None or args.merge:
        write_json(RESULTS / "finetune.json", {"epochs": args.epochs, "seeds": args.seeds, "device": device, "recipes": results})
        write_text(RESULTS / "finetune.md", markdown(results, args.seeds, args.epochs, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
