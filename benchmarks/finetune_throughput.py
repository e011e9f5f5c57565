"""Fine-tuning throughput: images per second for one training step, fp32 vs bf16.

    python benchmarks/finetune_throughput.py [--device auto] [--sizes 64 224] [--batch 64]

Measures xfer's Classifier (backbone + linear head) on the device the
finetune stage would pick, with data already on the device so the figure is
the model's, not the loader's. On CUDA it times fp32 and bf16 autocast side
by side in one run and prints their ratio; on a CPU only fp32 (the stage
never autocasts there). Then the pipeline's own path on the real digits
(linear probe on frozen features, then `xfer.finetune.finetune` with the
default params, fp32 and bf16 on CUDA) checks that training works there.
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
from xfer.finetune import Classifier, finetune, select_device  # noqa: E402


def step_throughput(model: Classifier, size: int, batch: int, device: torch.device, bf16: bool, steps: int) -> float:
    model.train().to(device)
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
    from xfer.config import HeadConfig
    from xfer.config import DataConfig
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

        probe, _ = train_head(HeadConfig(), HeadData(select("source", "train"), select("source", "val")), 10, seed=0)
        for amp in amp_modes:
            body, _, _ = create_backbone(BackboneConfig(name=backbone, image_size=64))
            head = copy.deepcopy(probe)
            cfg = FinetuneConfig(epochs=epochs, amp=amp)
            start = time.perf_counter()
            _, history = finetune(Classifier(body, head), data("source", "train"), data("source", "val"), cfg, device, seed=0, monitor={"target_val": data("target", "val")}, progress=False)
            took = time.perf_counter() - start
            label = "bf16 autocast" if amp and device.type == "cuda" else "fp32"
            print(f"\nprobe then fine-tune on {device.type}, {label}, default finetune params, {epochs} epochs: {took:.1f} s")
            for epoch, r in enumerate(history):
                loss = f"  train loss {r['train_loss']:.3f}" if "train_loss" in r else "  (the probe)"
                print(f"  epoch {epoch}: source val {r['val_accuracy']:.3f}  target val {r['target_val_accuracy']:.3f}{loss}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the real fine-tune check (0 skips it)")
    args = parser.parse_args()

    device = select_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"fine-tuning throughput, {args.backbone}, batch {args.batch}, on {name}\n")
    print(f"{'size':>6}{'fp32 img/s':>14}{'bf16 img/s':>14}{'bf16/fp32':>11}")
    for size in args.sizes:
        fp32 = step_throughput(classifier(args.backbone), size, args.batch, device, bf16=False, steps=args.steps)
        if device.type == "cuda":
            bf16 = step_throughput(classifier(args.backbone), size, args.batch, device, bf16=True, steps=args.steps)
            print(f"{size:>6}{fp32:>14.0f}{bf16:>14.0f}{bf16 / fp32:>10.2f}x")
        else:
            print(f"{size:>6}{fp32:>14.1f}{'-':>14}{'-':>11}")
    if args.epochs:
        real_finetune(args.backbone, device, [False, True] if device.type == "cuda" else [False], args.epochs)


if __name__ == "__main__":
    main()
