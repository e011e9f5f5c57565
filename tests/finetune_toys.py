"""A tiny classifier and images it can learn, for fine-tuning tests (importable by child processes)."""

from __future__ import annotations

import time

import torch
from torch.utils.data import Dataset, TensorDataset

from xfer.backbones import create_backbone
from xfer.config import LINEAR_PROBE, BackboneConfig, FinetuneConfig, HeadConfig
from xfer.finetune import Classifier, finetune
from xfer.heads import build_head

# The plain supervised loop these tests were written against: no adaptation, a constant
# learning rate, the best source-val epoch kept. The pipeline's defaults are a recipe
# (self-training, cosine, last epoch) that the loop's own tests must not depend on.
PLAIN_LOOP = {"method": "source_only", "adapt_weight": 1.0, "schedule": "constant", "warmup_epochs": 0.0, "selection": "source_val"}


def loop_config(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{**PLAIN_LOOP, **overrides})


def toy_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.3
    x[y == 1, :, :16] += 1.5  # class 1: bright top half
    return TensorDataset(x, y)


def tiny_classifier(head_cfg: HeadConfig = HeadConfig(**LINEAR_PROBE)):
    torch.manual_seed(0)
    backbone, prep, _ = create_backbone(BackboneConfig(name="test_efficientnet", pretrained=False, image_size=32))
    return Classifier(backbone, build_head(head_cfg, backbone.num_features, 2)), prep


class NoisyData(Dataset):
    """Adds noise drawn from torch's global generator (like a random augmentation), optionally slowly."""

    def __init__(self, inner: Dataset, delay_s: float = 0.0):
        self.inner, self.delay_s = inner, delay_s

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def labels(self) -> list[int]:
        """What a sampler weighs rows by, read without drawing noise (as ImageRows lists its labels)."""
        return [int(y) for _, y in self.inner]

    def __getitem__(self, i):
        if self.delay_s:
            time.sleep(self.delay_s)
        x, y = self.inner[i]
        return x + 0.1 * torch.randn_like(x), y


def train_variants(variants: dict) -> dict:
    """Each variant's weights after one short epoch (3 steps), from the same start and seed."""
    cfg = loop_config(epochs=1, batch_size=16, max_steps_per_epoch=3, lr=1e-2, device="cpu")
    results = {}
    for name, update in variants.items():
        model, _ = tiny_classifier()
        seen = {}
        finetune(
            model,
            toy_data(64, 0),
            toy_data(16, 1),
            cfg.model_copy(update=update),
            torch.device("cpu"),
            seed=0,
            progress=False,
            on_epoch=lambda e, r: seen.update({k: v.detach().clone() for k, v in model.state_dict().items()}),
        )
        results[name] = seen
    return results
