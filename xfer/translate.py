"""Pixel-level adaptation: a CycleGAN-style translator from source images to target-styled ones.

Two small generators (source -> target, target -> source: a convolutional
encoder, residual blocks, a decoder) and two PatchGAN discriminators (one
real/fake score per image patch) are trained on source images and unlabelled
target images (Zhu et al., 2017): least-squares adversarial losses, a cycle
loss (source -> target -> source gives the source back, and the other way),
and an identity loss (a target image through the source -> target generator
stays as it is), which keeps colours and layout where the adversarial loss
does not care. The source -> target generator then writes a target-styled
copy of every source training image, labels unchanged.

`train_translator` runs epoch by epoch from a seeded generator and, with a
checkpoint folder, saves the whole training state after each epoch
(xfer/checkpoints.py): a killed run resumes to the same weights. There is no
history buffer of generated images for the discriminators (the original's
image pool): each step scores the current generator's images.

The `translate` stage (xfer/translate_stage.py, params.yaml `translate`)
calls these functions; fine-tuning reads what it writes
(`finetune.source_images`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from xfer.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from xfer.config import TranslateConfig
from xfer.heads import check_loss
from xfer.io import save_with

# Each epoch's mean of each, in the history; named *_loss, as every learning curve's losses are.
LOSSES = ("generator_adversarial_loss", "cycle_loss", "identity_loss", "discriminator_loss")


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """Image (3 channels, values in [-1, 1]) -> image of the other domain, same size."""

    def __init__(self, channels: int, residual_blocks: int):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 7, padding=3, padding_mode="reflect"),
            nn.InstanceNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.InstanceNorm2d(2 * c),
            nn.ReLU(inplace=True),
            *[ResidualBlock(2 * c) for _ in range(residual_blocks)],
            nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, 3, 7, padding=3, padding_mode="reflect"),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """Image -> a map of real/fake scores, one per overlapping patch."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),
            nn.InstanceNorm2d(2 * c),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * c, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Translator:
    source_to_target: Generator
    target_to_source: Generator
    source_critic: PatchDiscriminator
    target_critic: PatchDiscriminator
    history: list[dict[str, float]] = field(default_factory=list)


def build_translator(cfg: TranslateConfig) -> Translator:
    return Translator(
        Generator(cfg.channels, cfg.residual_blocks),
        Generator(cfg.channels, cfg.residual_blocks),
        PatchDiscriminator(cfg.channels),
        PatchDiscriminator(cfg.channels),
    )


def load_images(root: str | Path, paths: Sequence[str], size: int, progress: bool = False) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: each image read as RGB and resized (bilinear)."""
    out = torch.empty((len(paths), 3, size, size))
    for i, path in enumerate(tqdm(paths, desc="translate: reading images", unit="img", disable=not progress)):
        with Image.open(Path(root) / path) as img:
            pixels = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        out[i] = torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, 3, h, w) in [-1, 1] -> (n, h, w, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _adversarial(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: real patches scored towards 1, fake towards 0."""
    return F.mse_loss(scores, torch.full_like(scores, 1.0 if real else 0.0))


def train_translator(
    cfg: TranslateConfig,
    source: torch.Tensor,
    target: torch.Tensor,
    seed: int,
    checkpoint_dir: Path | None = None,
    run_key: str = "",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
    stop_after: int | None = None,
    device: torch.device | str = "cpu",
) -> Translator:
    """Train for cfg.epochs (an epoch: ceil(len(source) / batch_size) steps, each a source batch in a
        seeded order and a random target batch); `stop_after` ends after that many epochs (as a kill would,
        the checkpoint kept). Each epoch's mean losses go to the history and `on_epoch`. The images stay
    in host memory; each batch goes to `device`, where the networks train."""
    if len(source) == 0 or len(target) == 0:
        raise ValueError(f"the translator needs source and target images; got {len(source)} source and {len(target)} target")
    torch.manual_seed(seed)
    model = build_translator(cfg)
    for module in (model.source_to_target, model.target_to_source, model.source_critic, model.target_critic):
        module.to(device).train()
    generators = list(model.source_to_target.parameters()) + list(model.target_to_source.parameters())
    critics = list(model.source_critic.parameters()) + list(model.target_critic.parameters())
    g_opt = torch.optim.Adam(generators, lr=cfg.lr, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(critics, lr=cfg.lr, betas=(0.5, 0.999))
    draws = torch.Generator().manual_seed(seed)
    modules = {
        "source_to_target": model.source_to_target,
        "target_to_source": model.target_to_source,
        "source_critic": model.source_critic,
        "target_critic": model.target_critic,
    }
    first_epoch = 1
    resumed = load_checkpoint(checkpoint_dir, run_key) if checkpoint_dir is not None else None
    if resumed is not None:
        for name, module in modules.items():
            module.load_state_dict(resumed[name])
        g_opt.load_state_dict(resumed["g_opt"])
        d_opt.load_state_dict(resumed["d_opt"])
        set_rng_state(resumed["rng"], draws)
        model.history = resumed["history"]
        first_epoch = resumed["epoch"] + 1
    steps = -(-len(source) // cfg.batch_size)
    for epoch in range(first_epoch, cfg.epochs + 1):
        if stop_after is not None and epoch > stop_after:
            break
        sums = dict.fromkeys(LOSSES, 0.0)
        order = torch.randperm(len(source), generator=draws)
        for step in tqdm(range(steps), desc=f"translate epoch {epoch}/{cfg.epochs}", unit="step", disable=not progress):
            real_s = source[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]].to(device)
            real_t = target[torch.randint(len(target), (len(real_s),), generator=draws)].to(device)
            # Generators: fool both critics, cycle back, leave the other domain's images alone.
            fake_t, fake_s = model.source_to_target(real_s), model.target_to_source(real_t)
            adversarial = _adversarial(model.target_critic(fake_t), True) + _adversarial(model.source_critic(fake_s), True)
            cycle = F.l1_loss(model.target_to_source(fake_t), real_s) + F.l1_loss(model.source_to_target(fake_s), real_t)
            identity = F.l1_loss(model.source_to_target(real_t), real_t) + F.l1_loss(model.target_to_source(real_s), real_s)
            g_loss = adversarial + cfg.cycle_weight * cycle + cfg.identity_weight * identity
            check_loss(g_loss.item(), f"translator training, epoch {epoch}, step {step + 1}", f"lower the translator's lr (now {cfg.lr})")
            g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            g_opt.step()
            # Critics: real images towards 1, the generators' (detached) towards 0.
            d_loss = 0.5 * (
                _adversarial(model.target_critic(real_t), True)
                + _adversarial(model.target_critic(fake_t.detach()), False)
                + _adversarial(model.source_critic(real_s), True)
                + _adversarial(model.source_critic(fake_s.detach()), False)
            )
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            for name, value in zip(LOSSES, (adversarial, cycle, identity, d_loss)):
                sums[name] += value.item() / steps
        record = {"epoch": epoch, **sums}
        model.history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
        if checkpoint_dir is not None:
            state = {name: {k: v.cpu() for k, v in module.state_dict().items()} for name, module in modules.items()}
            state |= {
                "key": run_key,
                "epoch": epoch,
                "g_opt": g_opt.state_dict(),
                "d_opt": d_opt.state_dict(),
                "rng": rng_state(draws),
                "history": model.history,
            }
            save_checkpoint(checkpoint_dir, state)
    return model


@torch.no_grad()
def translate(generator: Generator, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The generator's images (on the host) for `images` (on the host), in batches on the generator's device."""
    generator.eval()
    device = next(generator.parameters()).device
    return torch.cat([generator(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]) if len(images) else images


def write_translated(
    generator: Generator,
    root: str | Path,
    paths: Sequence[str],
    size: int,
    out_dir: Path,
    progress: bool = False,
    names: Sequence[str] | None = None,
) -> list[str]:
    """Each source image translated and written as a PNG under out_dir, atomically: at `names`
    (relative to out_dir), or by default at its own relative path with suffix .png; returns the
    written paths relative to out_dir."""
    names = [str(Path(path).with_suffix(".png")) for path in paths] if names is None else list(names)
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} images")
    written = []
    for start in tqdm(range(0, len(paths), 64), desc="translate: writing images", unit="batch", disable=not progress):
        chunk = list(paths[start : start + 64])
        pixels = to_uint8(translate(generator, load_images(root, chunk, size)))
        for rel, image in zip(names[start : start + 64], pixels):
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            save_with(dest, lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG"))
            written.append(rel)
    return written
