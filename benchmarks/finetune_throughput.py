"""Fine-tuning throughput: the training loop against the ceiling of its own model and batch.

    python benchmarks/finetune_throughput.py [--device auto] [--sizes 64 224] [--batch 64]

1. The ceiling: images per second of one training step (forward, backward,
   AdamW) of xfer's Classifier on tensors already on the device; on CUDA fp32
   and bf16 autocast side by side.
2. The pipeline: `xfer.finetune.finetune` reading the real digits from disk
   (decode, resize, normalise, copy to the device), at the pipeline's image
   size, with 0 and 2 DataLoader workers; printed as images/s and as a ratio
   to the ceiling measured in the same run (goal on a GPU: >= 0.85).
3. The pipeline's own probe-then-fine-tune on the digits, as a check that
   training works on this device.

Writes benchmarks/results/finetune_throughput.{md,json} (the ceiling and the
pipeline ratio, with the device they were measured on).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xfer.backbones import create_backbone  # noqa: E402
from xfer.config import BackboneConfig, FinetuneConfig  # noqa: E402
from xfer.finetune import Classifier, finetune, freeze_batchnorm, select_device  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402

# The training loop as it was measured: plain supervised steps on source images (no
# target batches, no augmentation), whatever the pipeline's default recipe is now.
LOOP_BASE = {
    "method": "source_only", "schedule": "constant", "warmup_epochs": 0.0, "lr": 1e-4, "selection": "source_val",
    "augment": {"crop_scale": None, "rotation_deg": 0.0},
}  # fmt: skip


def step_throughput(model: Classifier, size: int, batch: int, device: torch.device, bf16: bool, steps: int) -> float:
    model.train().to(device)
    freeze_batchnorm(model)  # as the stage trains by default (finetune.freeze_bn), so the two compare
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def classifier(backbone: str) -> Classifier:
    body, _, _ = create_backbone(BackboneConfig(name=backbone, image_size=64))
    return Classifier(body, torch.nn.Linear(body.num_features, 10))


def real_finetune(backbone: str, device: torch.device, amp_modes: list[bool], epochs: int) -> None:
    """The pipeline's path on the real digits: linear probe on frozen features, then fine-tune."""
    from xfer.config import LINEAR_PROBE, DataConfig, HeadConfig
    from xfer.data.fetch import fetch_dataset
    from xfer.data.images import ImageRows
    from xfer.data.split import build_manifest, rows
    from xfer.features import extract
    from xfer.heads import HeadData, train_head

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fetch_dataset(DataConfig(), root / "data/raw", root / "data/downloads", root=root, progress=False)
        manifest, _ = build_manifest(root / "data/raw/digits", DataConfig(), seed=0, root=root)
        body, prep, _ = create_backbone(BackboneConfig(name=backbone, image_size=64))
        feats = extract(body, manifest, prep, 256, root=root, device=str(device), progress=False)

        def select(role, split):
            mask = ((manifest.role == role) & (manifest.split == split)).to_numpy()
            return feats[mask], manifest.label.to_numpy()[mask]

        def data(role, split):
            part = rows(manifest, role, split)
            return ImageRows(part.path.tolist(), part.label.tolist(), prep, root)

        probe, _ = train_head(HeadConfig(**LINEAR_PROBE), HeadData(select("source", "train"), select("source", "val")), 10, seed=0)
        for amp in amp_modes:
            body, _, _ = create_backbone(BackboneConfig(name=backbone, image_size=64))
            head = copy.deepcopy(probe)
            cfg = FinetuneConfig(**LOOP_BASE, epochs=epochs, amp=amp)
            start = time.perf_counter()
            _, history = finetune(
                Classifier(body, head),
                data("source", "train"),
                data("source", "val"),
                cfg,
                device,
                seed=0,
                monitor={"target_val": data("target", "val")},
                progress=False,
            )
            took = time.perf_counter() - start
            label = "bf16 autocast" if amp and device.type == "cuda" else "fp32"
            print(f"\nprobe then fine-tune on {device.type}, {label}, LOOP_BASE finetune params, {epochs} epochs: {took:.1f} s")
            for epoch, r in enumerate(history):
                loss = f"  train loss {r['train_loss']:.3f}" if "train_loss" in r else "  (the probe)"
                print(f"  epoch {epoch}: source val {r['source_val_accuracy']:.3f}  target val {r['target_val_accuracy']:.3f}{loss}")


def pipeline_throughput(backbone: str, size: int, batch: int, device: torch.device, steps: int, workers: int, amp: bool) -> float:
    """Training images/s of xfer.finetune.finetune on the digits from disk (the loop's time, not its evaluation)."""
    from torch.utils.data import Subset

    from xfer.config import DataConfig
    from xfer.data.fetch import fetch_dataset
    from xfer.data.images import ImageRows
    from xfer.data.split import build_manifest, rows

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fetch_dataset(DataConfig(), root / "data/raw", root / "data/downloads", root=root, progress=False)
        manifest, _ = build_manifest(root / "data/raw/digits", DataConfig(), seed=0, root=root)
        body, prep, _ = create_backbone(BackboneConfig(name=backbone, image_size=size))
        part = rows(manifest, "source", "train")
        train = ImageRows(part.path.tolist(), part.label.tolist(), prep, root)
        stamps = {}
        cfg = FinetuneConfig(**LOOP_BASE, epochs=2, batch_size=batch, max_steps_per_epoch=steps, num_workers=workers, amp=amp, freeze_bn=True)
        # One validation row: what is timed between the epoch callbacks is the training loop.
        finetune(
            Classifier(body, torch.nn.Linear(body.num_features, 10)),
            train,
            Subset(train, [0]),
            cfg,
            device,
            seed=0,
            progress=False,
            on_epoch=lambda epoch, _: stamps.__setitem__(epoch, time.perf_counter()),
        )
        # Epoch 1 warms up (workers start, kernels are chosen); epoch 2 is measured.
        return steps * batch / (stamps[2] - stamps[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the real fine-tune check (0 skips it)")
    args = parser.parse_args()

    device = select_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    amp = device.type == "cuda"
    print(f"fine-tuning throughput, {args.backbone}, batch {args.batch}, on {name}\n")
    print(f"{'size':>6}{'fp32 img/s':>14}{'bf16 img/s':>14}{'bf16/fp32':>11}")
    ceilings = {}
    for size in args.sizes:
        fp32 = step_throughput(classifier(args.backbone), size, args.batch, device, bf16=False, steps=args.steps)
        ceilings[size] = fp32
        if device.type == "cuda":
            bf16 = step_throughput(classifier(args.backbone), size, args.batch, device, bf16=True, steps=args.steps)
            ceilings[size] = bf16
            print(f"{size:>6}{fp32:>14.0f}{bf16:>14.0f}{bf16 / fp32:>10.2f}x")
        else:
            print(f"{size:>6}{fp32:>14.1f}{'-':>14}{'-':>11}")
    size = min(args.sizes)  # the pipeline's size for the digits is the smallest measured
    rows = []
    for workers in args.workers:
        pipeline = pipeline_throughput(args.backbone, size, args.batch, device, args.steps, workers, amp)
        rows.append(
            {"workers": workers, "pipeline_img_s": round(pipeline, 1), "ceiling_img_s": round(ceilings[size], 1), "ratio": round(pipeline / ceilings[size], 3)}
        )
    table = (
        "\n".join(
            [
                f"# Fine-tuning throughput: {args.backbone} at {size} px, batch {args.batch}, on {name}{', bf16 autocast' if amp else ''}",
                "",
                "| loader workers | pipeline img/s | ceiling img/s (preloaded tensors) | pipeline / ceiling |",
                "|---:|---:|---:|---:|",
            ]
            + [f"| {r['workers']} | {r['pipeline_img_s']:.1f} | {r['ceiling_img_s']:.1f} | {r['ratio']:.2f} |" for r in rows]
        )
        + "\n"
    )
    print("\n" + table)
    results = Path(__file__).parent / "results"
    write_json(
        results / "finetune_throughput.json",
        {
            "device": name,
            "backbone": args.backbone,
            "size": size,
            "batch": args.batch,
            "ceilings": {str(k): round(v, 1) for k, v in ceilings.items()},
            "pipeline": rows,
        },
    )
    write_text(results / "finetune_throughput.md", table)
    if args.epochs:
        real_finetune(args.backbone, device, [False, True] if device.type == "cuda" else [False], args.epochs)


if __name__ == "__main__":
    main()
