"""Feature extraction throughput against the backbone's own ceiling, and a cache hit's cost.

    python benchmarks/features.py [--rows 2000] [--size 64] [--batch 128]
        [--backbone tf_efficientnet_lite0] [--workers 0 [1 ...]] [--device cpu]

In a temporary folder it writes `--rows` real 8x8 greyscale PNGs (the default
dataset's images are 8x8 of 0..16) and their manifest, then measures in one run:

  extract     images/s of `xfer.features.extract` over the files: what the
              features stage does (decode, resize, normalise, forward), once
              per `--workers` value
  loader      images/s of the same DataLoader without the model: the input
              side alone
  forward     the ceiling: images/s of the same backbone (num_classes=0, eval,
              inference_mode) on the same batches preloaded as tensors
  ratio       extract / forward: 1.0 means the input side costs nothing
  cache hit   seconds of a hit: `get_or_compute` + `load_entry` alone, and
              with building the backbone for its weights digest and the key
              first, as the features stage does on a hit

Everything is warmed up before it is timed; each figure is the median of
`--repeats` rounds, and every round times all of them one after the other. Prints a table and writes benchmarks/results/features.json
and benchmarks/results/features.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xfer import features as feats  # noqa: E402
from xfer.backbones import create_backbone, offline_pretrained_names  # noqa: E402
from xfer.config import BackboneConfig  # noqa: E402
from xfer.data.images import ImageRows  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def write_images(root: Path, rows: int, seed: int = 0) -> pd.DataFrame:
    """`rows` 8x8 PNGs of 0..16 scaled to 0..255 (optdigits-like), and their manifest."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    records = []
    for i in range(rows):
        path = f"img/{i:06d}.png"
        pixels = (rng.integers(0, 17, (8, 8)) * 255 // 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root / path)
        role, split = ("source", "train") if i % 2 == 0 else ("target", "train")
        records.append({
            "path": path, "label": i % 10, "class_name": str(i % 10), "domain": role, "role": role, "split": split,
            "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest(),
        })
    return pd.DataFrame(records, columns=[*feats.INDEX_COLUMNS, "class_name"])


def backbone_config(name: str, size: int) -> BackboneConfig:
    # Offline ImageNet weights where xfer has them (lite0), else seeded random init.
    return BackboneConfig(name=name, pretrained=name in offline_pretrained_names(), image_size=size)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader workers; several values are compared side by side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the features stage extracts on the CPU")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    # A busy machine slows torch's threads many times over (they wait on each other); record the load.
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="xfer-bench-features-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_images(root, args.rows)
        print(f"wrote {args.rows} PNGs (8x8 grey) in {time.perf_counter() - t0:.1f} s")

        cfg = backbone_config(args.backbone, args.size)
        model, prep, weights = create_backbone(cfg, num_classes=0)
        model = model.eval().to(device)
        data = ImageRows(manifest.path.tolist(), manifest.label.tolist(), prep, root)
        n = len(data)

        # (ii) the ceiling: the same batches, already tensors in memory.
        batches = [x for x, _ in DataLoader(data, batch_size=args.batch, shuffle=False)]
        batches = [x.to(device) for x in batches]

        @torch.inference_mode()
        def forward_only():
            for x in batches:
                model(x)
            sync(device)

        # The input side alone, with the loader settings extract uses.
        def loader_only(workers: int):
            for _ in feats.feature_loader(data, args.batch, device, workers):
                pass

        # (i) the features stage's path.
        def run_extract(workers: int, frame: pd.DataFrame = manifest):
            out = feats.extract(model, frame, prep, args.batch, root=root, device=device, progress=False, num_workers=workers)
            sync(device)
            return out

        # Warm-up: first-call allocations, oneDNN/cuDNN kernel choice, page cache.
        forward_only()
        for workers in args.workers:
            run_extract(workers, manifest.iloc[: min(n, 2 * args.batch)])
            loader_only(workers)

        # Rounds interleave every measurement, so a load that comes and goes on the
        # machine hits the ceiling and the extraction alike, not just one of them.
        times: dict[str, list[float]] = {}

        def timed(name: str, fn) -> None:
            start = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - start)

        for _ in range(args.repeats):
            timed("forward", forward_only)
            for workers in args.workers:
                timed(f"extract{workers}", lambda: run_extract(workers))
                timed(f"loader{workers}", lambda: loader_only(workers))
        forward_s = statistics.median(times["forward"])
        extract_rows = []
        for workers in args.workers:
            extract_s = statistics.median(times[f"extract{workers}"])
            extract_rows.append({
                "workers": workers,
                "extract_img_s": n / extract_s,
                "loader_img_s": n / statistics.median(times[f"loader{workers}"]),
                "ratio_to_forward": forward_s / extract_s,
            })
        features = run_extract(args.workers[0])
        # The two paths must compute the same thing, or the ratio compares different work.
        with torch.inference_mode():
            reference = np.concatenate([model(x).float().cpu().numpy() for x in batches])
        np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-4)

        # (iv) a cache hit: the entry exists; what does finding and opening it cost?
        cache = root / "cache"
        key = feats.cache_key(cfg.name, weights.digest, prep, manifest)
        meta = {"backbone": cfg.name, "weights_digest": weights.digest, "preprocessing": prep.as_dict()}
        feats.get_or_compute(cache, key, lambda: features, manifest, meta)

        def never():
            raise AssertionError("a cache hit ran compute")

        def lookup():
            entry, hit = feats.get_or_compute(cache, key, never, manifest, meta)
            assert hit
            return feats.load_entry(entry)

        def lookup_with_backbone():
            _, p, w = create_backbone(cfg, num_classes=0)
            k = feats.cache_key(cfg.name, w.digest, p, manifest)
            entry, hit = feats.get_or_compute(cache, k, never, manifest, meta)
            assert hit
            return feats.load_entry(entry)

        lookup(), lookup_with_backbone()  # warm-up
        hit_s = median_time(lookup, max(args.repeats, 5))
        hit_backbone_s = median_time(lookup_with_backbone, args.repeats)

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} torch threads, {os.cpu_count()} cores"
    result = {
        "backbone": args.backbone,
        "pretrained": cfg.pretrained,
        "rows": n,
        "image_size": args.size,
        "batch_size": args.batch,
        "device": where,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "forward_img_s": n / forward_s,
        "extract": extract_rows,
        "cache_hit_lookup_s": hit_s,
        "cache_hit_with_backbone_s": hit_backbone_s,
        "rounds_s": times,
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }

    title = f"{args.backbone} at {args.size} px, {n} images of 8x8, batch {args.batch}, on {where}"
    lines = [
        f"{'workers':>8}{'extract img/s':>15}{'loader img/s':>14}{'forward img/s':>15}{'ratio':>8}",
        *[f"{r['workers']:>8}{r['extract_img_s']:>15.0f}{r['loader_img_s']:>14.0f}{n / forward_s:>15.0f}{r['ratio_to_forward']:>8.2f}" for r in extract_rows],
        "",
        f"cache hit: get_or_compute + load_entry {hit_s * 1e3:.1f} ms; "
        f"with create_backbone + cache_key first {hit_backbone_s * 1e3:.0f} ms",
        f"load average (1 min) before {result['loadavg_1min']['before']:.2f}, after {result['loadavg_1min']['after']:.2f}",
    ]
    print(f"\n{title}\n")
    print("\n".join(lines))

    RESULTS.mkdir(parents=True, exist_ok=True)
    from xfer.io import write_json, write_text

    write_json(RESULTS / "features.json", result)
    md = [
        f"# Feature extraction: {title}",
        "",
        "`python benchmarks/features.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| workers | extract img/s | loader img/s | forward img/s (ceiling) | extract / forward |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {r['workers']} | {r['extract_img_s']:.0f} | {r['loader_img_s']:.0f} | {n / forward_s:.0f} | {r['ratio_to_forward']:.2f} |" for r in extract_rows],
        "",
        "| cache hit | seconds |",
        "|---|---:|",
        f"| get_or_compute + load_entry | {hit_s:.4f} |",
        f"| create_backbone + cache_key + get_or_compute + load_entry | {hit_backbone_s:.3f} |",
        "",
        f"Load average (1 min) before {result['loadavg_1min']['before']:.2f}, after {result['loadavg_1min']['after']:.2f} on {os.cpu_count()} cores.",
        "",
    ]
    write_text(RESULTS / "features.md", "\n".join(md))
    print(f"\nwrote {RESULTS / 'features.json'} and {RESULTS / 'features.md'}")


if __name__ == "__main__":
    main()
