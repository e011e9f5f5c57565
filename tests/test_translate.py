"""The CycleGAN-style translator (xfer/translate.py): it learns a known style change, resumes exactly, writes images."""

import numpy as np
import pytest
import torch
from PIL import Image

from xfer.checkpoints import CHECKPOINT_FILE
from xfer.config import TranslateConfig
from xfer.translate import Generator, PatchDiscriminator, load_images, train_translator, translate, write_translated

TINY = TranslateConfig(image_size=16, channels=8, residual_blocks=1, epochs=10, batch_size=16, lr=2e-3)


def squares(n: int, seed: int, inverted: bool) -> torch.Tensor:
    """A light square on a dark background (or, inverted, a dark square on a light one), in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x = np.full((n, 3, 16, 16), -0.8, np.float32)
    for i in range(n):
        r, c, s = rng.integers(1, 8), rng.integers(1, 8), rng.integers(4, 8)
        x[i, :, r : r + s, c : c + s] = 0.8
    return torch.from_numpy(-x if inverted else x)


def test_networks_keep_the_image_size_and_score_patches():
    x = torch.zeros(2, 3, 32, 32)
    assert Generator(8, 2)(x).shape == x.shape
    assert PatchDiscriminator(8)(x).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        TranslateConfig(image_size=18)


def test_the_translator_learns_the_target_style_and_cycles_back():
    """Dark-background squares -> light-background squares: the translated images take the target's
    brightness (from -0.6 to above 0.3 mean) and the way back restores the source closely."""
    source, target = squares(64, 0, False), squares(64, 1, True)
    model = train_translator(TINY, source, target, seed=0)
    out = translate(model.source_to_target, source)
    assert source.mean() < -0.5 and target.mean() > 0.5
    assert out.mean() > 0.3
    assert (translate(model.target_to_source, out) - source).abs().mean() < 0.25
    cycle = [record["cycle_loss"] for record in model.history]
    assert len(cycle) == TINY.epochs and cycle[-1] < 0.5 * cycle[0]
    assert set(model.history[0]) == {"epoch", "generator_adversarial_loss", "cycle_loss", "identity_loss", "discriminator_loss"}


def test_the_adversarial_loss_alone_pulls_the_output_towards_the_target():
    """Without cycle and identity losses, only the critics can tell the generator what the target looks
    like: its output still moves to the target's brightness (an untrained generator's stays near 0)."""
    source, target = squares(64, 0, False), squares(64, 1, True)
    cfg = TINY.model_copy(update={"cycle_weight": 0.0, "identity_weight": 0.0})
    model = train_translator(cfg, source, target, seed=0)
    assert translate(model.source_to_target, source).mean() > 0.3


def test_a_run_stopped_after_an_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    source, target = squares(40, 2, False), squares(40, 3, True)
    cfg = TranslateConfig(image_size=16, channels=4, residual_blocks=1, epochs=3, batch_size=16)
    straight = train_translator(cfg, source, target, seed=0, checkpoint_dir=tmp_path / "a", run_key="k")
    epochs = []
    train_translator(cfg, source, target, seed=0, checkpoint_dir=tmp_path / "b", run_key="k", stop_after=1, on_epoch=lambda e, r: epochs.append(e))
    assert (tmp_path / "b" / CHECKPOINT_FILE).exists()
    resumed = train_translator(cfg, source, target, seed=0, checkpoint_dir=tmp_path / "b", run_key="k", on_epoch=lambda e, r: epochs.append(e))
    assert epochs == [1, 2, 3]
    for name in ("source_to_target", "target_to_source", "source_critic", "target_critic"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert straight.history == resumed.history
    # Another run's checkpoint is not resumed: it starts over.
    other = []
    train_translator(cfg, source, target, seed=0, checkpoint_dir=tmp_path / "b", run_key="other", on_epoch=lambda e, r: other.append(e))
    assert other == [1, 2, 3]


def test_translated_images_are_written_at_the_source_paths(tmp_path):
    for i, name in enumerate(["a/0/x.png", "a/1/y.jpg"]):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 12, 3), 40 * (i + 1), np.uint8)).save(tmp_path / "src" / name)
    loaded = load_images(tmp_path / "src", ["a/0/x.png", "a/1/y.jpg"], 16)
    assert loaded.shape == (2, 3, 16, 16) and loaded.min() >= -1 and loaded.max() <= 1
    generator = Generator(4, 1)
    written = write_translated(generator, tmp_path / "src", ["a/0/x.png", "a/1/y.jpg"], 16, tmp_path / "out")
    assert written == ["a/0/x.png", "a/1/y.png"]
    expected = ((translate(generator, loaded).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for rel, pixels in zip(written, expected):
        with Image.open(tmp_path / "out" / rel) as img:
            assert img.size == (16, 16) and np.array_equal(np.asarray(img), pixels)
    with pytest.raises(ValueError, match="needs source and target images"):
        train_translator(TINY, loaded, loaded[:0], seed=0)
