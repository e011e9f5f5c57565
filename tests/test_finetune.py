import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_toys import loop_config, tiny_classifier, toy_data, train_variants

from xfer.checkpoints import CHECKPOINT_FILE
from xfer.config import ConfigError, HeadConfig, parse_params
from xfer.finetune import ClassifierSpec, finetune, load_classifier, lr_factor, predict_logits, save_classifier, select_device
from xfer.strategies import backbone_groups, param_groups


def test_finetune_starts_from_the_probe_and_learns():
    model, _ = tiny_classifier()
    probe_weight = model.head.classifier.weight.detach().clone()
    cfg = loop_config(epochs=3, batch_size=16, lr=3e-3, device="cpu")
    epochs = []
    trained, history = finetune(
        model,
        toy_data(128, 0),
        toy_data(64, 1),
        cfg,
        torch.device("cpu"),
        seed=0,
        monitor={"target_val": toy_data(32, 2)},
        on_epoch=lambda e, r: epochs.append(e),
        progress=False,
    )
    assert epochs == [0, 1, 2, 3] and "train_loss" not in history[0]
    assert history[0]["source_val_accuracy"] < 0.75 < max(r["source_val_accuracy"] for r in history)
    assert not torch.equal(trained.head.classifier.weight, probe_weight)
    logits, labels = predict_logits(trained, toy_data(64, 1), 32, torch.device("cpu"))
    assert (logits.argmax(1) == labels).mean() == max(r["source_val_accuracy"] for r in history)


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner, self.reads = inner, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]


def test_step_cap_limits_each_epoch():
    model, _ = tiny_classifier()
    train = CountingDataset(toy_data(64, 0))
    cfg = loop_config(epochs=2, batch_size=8, max_steps_per_epoch=1, lr=1e-2, device="cpu")
    _, history = finetune(model, train, toy_data(16, 1), cfg, torch.device("cpu"), seed=0, progress=False)
    assert len(history) == 3
    # One batch of 8 per epoch, not the 8 batches the split holds.
    assert train.reads == 2 * 8


def test_save_load_round_trip(tmp_path):
    model, prep = tiny_classifier(HeadConfig(kind="mlp", hidden_dim=4))
    spec = ClassifierSpec("test_efficientnet", HeadConfig(kind="mlp", hidden_dim=4).model_dump(), model.backbone.num_features, 2, ["a", "b"], prep.as_dict())
    save_classifier(tmp_path, model, spec)
    loaded, loaded_spec = load_classifier(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), loaded(x))
    assert loaded_spec.prep() == prep and loaded_spec.head == spec.head and loaded_spec.class_names == ["a", "b"]


def test_device_choice():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda")


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_pretrained_running_statistics(freeze_bn):
    model, _ = tiny_classifier()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def after_epoch(epoch, record):
        # Read the weights as trained, before the best epoch is restored.
        state = model.state_dict()
        seen[epoch] = (
            all(torch.equal(v, state[k]) for k, v in start.items() if k.endswith("running_mean")),
            torch.equal(state["backbone.conv_stem.weight"], start["backbone.conv_stem.weight"]),
        )

    cfg = loop_config(epochs=1, batch_size=16, max_steps_per_epoch=2, freeze_bn=freeze_bn, device="cpu")
    finetune(model, toy_data(64, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, on_epoch=after_epoch, progress=False)
    stats_unchanged, weights_unchanged = seen[1]
    assert stats_unchanged == freeze_bn
    assert not weights_unchanged


def snapshots(model):
    """on_epoch callback recording every parameter as trained (before the best epoch is restored)."""
    seen = {}

    def record(epoch, _):
        seen[epoch] = {k: v.detach().clone() for k, v in model.named_parameters()}

    return seen, record


def changed(before, after, names):
    return {n for n in names if not torch.equal(before[n], after[n])}


def test_partial_leaves_exactly_the_first_k_block_groups_unchanged():
    model, _ = tiny_classifier()
    groups = [[f"backbone.{n}" for n in g] for g in backbone_groups(model.backbone)]
    assert len(groups) >= 4
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    seen, record = snapshots(model)
    # freeze_bn off: the unfrozen groups' BatchNorms learn statistics, the frozen ones must not.
    cfg = loop_config(strategy="partial", frozen_blocks=2, epochs=2, batch_size=16, lr=1e-2, freeze_bn=False, device="cpu")
    finetune(model, toy_data(64, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, on_epoch=record, progress=False)
    frozen = [n for g in groups[:2] for n in g]
    trainable = [n for g in groups[2:] for n in g] + [n for n in start if n.startswith("head.")]
    assert changed(start, seen[2], frozen) == set()
    assert changed(start, seen[2], trainable) == set(trainable)
    after = model.backbone.state_dict()
    frozen_modules = {n.rsplit(".", 1)[0].removeprefix("backbone.") for n in frozen}
    for key, value in buffers.items():
        assert torch.equal(after[key], value) == (key.rsplit(".", 1)[0] in frozen_modules), key


def test_head_only_and_gradual_unfreeze_top_down():
    model, _ = tiny_classifier()
    groups = [[f"backbone.{n}" for n in g] for g in backbone_groups(model.backbone)]
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    seen, record = snapshots(model)
    cfg = loop_config(strategy="gradual", unfreeze_every=1, epochs=3, batch_size=16, lr=1e-2, device="cpu")
    finetune(model, toy_data(64, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, on_epoch=record, progress=False)
    backbone = [n for g in groups for n in g]
    assert changed(start, seen[1], backbone) == set()  # epoch 1: head only
    assert changed(start, seen[2], backbone) == set(groups[-1])  # epoch 2: + the top group
    assert changed(seen[2], seen[3], backbone) == set(groups[-1] + groups[-2])  # epoch 3: + the next one down
    assert changed(start, seen[1], [n for n in start if n.startswith("head.")])

    model, _ = tiny_classifier()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    seen, record = snapshots(model)
    finetune(
        model,
        toy_data(64, 0),
        toy_data(16, 1),
        cfg.model_copy(update={"strategy": "head_only", "epochs": 1}),
        torch.device("cpu"),
        seed=0,
        on_epoch=record,
        progress=False,
    )
    assert changed(start, seen[1], backbone) == set()


def test_strategy_params_are_checked():
    with pytest.raises(ConfigError, match="frozen_blocks >= 1"):
        parse_params({"finetune": {"strategy": "partial"}})
    with pytest.raises(ConfigError, match="only strategy 'partial' uses it"):
        parse_params({"finetune": {"frozen_blocks": 2}})
    model, _ = tiny_classifier()
    n = len(backbone_groups(model.backbone))
    cfg = loop_config(strategy="partial", frozen_blocks=n, epochs=1, device="cpu")
    with pytest.raises(ValueError, match=f"has {n} block groups; freeze at most {n - 1}"):
        finetune(model, toy_data(16, 0), toy_data(8, 1), cfg, torch.device("cpu"), seed=0, progress=False)


def test_layer_decay_and_the_schedule():
    model, _ = tiny_classifier()
    groups = param_groups(model, loop_config(lr=1.0, layer_decay=0.5, head_lr_scale=10))
    n = len(groups) - 1
    assert [g["lr"] for g in groups] == [0.5 ** (n - i) for i in range(n)] + [10.0]
    factor = lr_factor(loop_config(epochs=2, schedule="cosine", warmup_epochs=0.5), steps_per_epoch=10)
    assert [factor(s) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert factor(5 + 15 // 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert factor(19) < 0.02
    assert lr_factor(loop_config(epochs=2), 10)(13) == 1.0


def test_ema_weights_are_what_is_evaluated_and_kept():
    model, _ = tiny_classifier()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = loop_config(epochs=1, batch_size=16, max_steps_per_epoch=1, lr=5e-2, ema_decay=0.75, device="cpu")
    raw = {}
    trained, history = finetune(
        model,
        toy_data(64, 0),
        toy_data(64, 1),
        cfg,
        torch.device("cpu"),
        seed=0,
        progress=False,
        on_epoch=lambda e, r: raw.update({k: v.detach().clone() for k, v in model.state_dict().items()}),
    )
    # on_epoch sees the raw weights; one step later the average is 0.75 * start + 0.25 * raw.
    ema = {k: 0.75 * start[k] + 0.25 * v if v.dtype.is_floating_point else v for k, v in raw.items()}
    kept = ema if history[1]["source_val_accuracy"] >= history[0]["source_val_accuracy"] else start
    final = trained.state_dict()
    assert all(torch.allclose(final[k].float(), kept[k].float(), atol=1e-6) for k in kept)
    assert not torch.equal(raw["backbone.conv_stem.weight"], ema["backbone.conv_stem.weight"])


def test_weight_ema_averages_and_applies_temporarily():
    from xfer.finetune import WeightEMA

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.equal(ema.state["weight"], torch.full((1, 2), 2.0))
    with ema.applied(model):
        assert torch.equal(model.weight, torch.full((1, 2), 2.0))
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))


def test_early_stopping_stops_after_patience_epochs_without_progress():
    model, _ = tiny_classifier()
    cfg = loop_config(epochs=6, batch_size=16, lr=1e-9, patience=2, device="cpu")
    _, history = finetune(model, toy_data(32, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, progress=False)
    # A learning rate too small to move the val accuracy: epochs 1 and 2 bring nothing, then it stops.
    assert len(history) == 3


def run_child(out, ckpt, delay, sampler="uniform"):
    return subprocess.Popen([sys.executable, str(Path(__file__).parent / "finetune_child.py"), str(out), str(ckpt), str(delay), sampler])


@pytest.mark.parametrize("sampler", ["uniform", "class_balanced"])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, sampler):
    """SIGKILL in epoch 2, restart: epochs 2-4 run again from the epoch-1 checkpoint, same final weights
    (with weighted draws too: the sampler draws from the loader's generator, which the checkpoint keeps)."""
    # The uninterrupted run does not depend on the killed one: both start at once, a core each.
    straight_run = run_child(tmp_path / "straight", tmp_path / "ckpt_straight", 0, sampler)
    try:
        child = run_child(tmp_path / "killed", tmp_path / "ckpt_killed", 0.01, sampler)
        checkpoint = tmp_path / "ckpt_killed" / CHECKPOINT_FILE
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # into epoch 2 (about 1 s of slow batches)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        assert checkpoint.exists() and not (tmp_path / "killed" / "weights.pt").exists()
        assert (tmp_path / "killed" / "epochs.txt").read_text().split() == ["0", "1"]

        assert run_child(tmp_path / "killed", tmp_path / "ckpt_killed", 0, sampler).wait(timeout=300) == 0
        assert (tmp_path / "killed" / "epochs.txt").read_text().split() == ["0", "1", "2", "3", "4"]
        assert not checkpoint.exists()  # a finished run leaves no checkpoint to resume
        assert straight_run.wait(timeout=300) == 0
    finally:
        straight_run.kill()  # nothing left running after a failure (a no-op once it has exited)
    straight = torch.load(tmp_path / "straight" / "weights.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "weights.pt", weights_only=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path):
    model, _ = tiny_classifier()
    cfg = loop_config(epochs=1, batch_size=16, max_steps_per_epoch=1, device="cpu")
    from xfer.checkpoints import save_checkpoint

    save_checkpoint(tmp_path, {"key": "other run", "epoch": 1})
    _, history = finetune(
        model, toy_data(32, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, progress=False, checkpoint_dir=tmp_path, run_key="this run"
    )
    assert len(history) == 2 and not (tmp_path / CHECKPOINT_FILE).exists()


@pytest.mark.parametrize("method", ["dann", "self_training", "mcc"])
def test_adaptation_while_fine_tuning_trains_on_unlabelled_target_batches(method):
    model, _ = tiny_classifier()
    target, plain = CountingDataset(toy_data(48, 5)), CountingDataset(toy_data(48, 5))
    cfg = loop_config(epochs=2, batch_size=16, lr=3e-3, device="cpu", method=method, pseudo_threshold=0.5)
    seen = {}
    start_head = model.head.classifier.weight.detach().clone()

    def record(epoch, _):
        seen[epoch] = model.head.classifier.weight.detach().clone()

    finetune(model, toy_data(64, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, progress=False, target=target, target_plain=plain, on_epoch=record)
    # 4 source batches per epoch -> 4 target batches of 16 per epoch, drawn from the augmented set.
    assert target.reads == 2 * 4 * 16
    # Only self-training reads the plain target set: once per epoch, to label it.
    assert plain.reads == (2 * 48 if method == "self_training" else 0)
    assert not torch.equal(seen[1], start_head)


def test_adaptation_needs_target_images_and_a_trainable_backbone():
    model, _ = tiny_classifier()
    with pytest.raises(ValueError, match="needs unlabelled target images"):
        finetune(model, toy_data(16, 0), toy_data(8, 1), loop_config(epochs=1, method="mcc", device="cpu"), torch.device("cpu"), seed=0, progress=False)
    with pytest.raises(ConfigError, match="which strategy 'head_only' freezes"):
        parse_params({"finetune": {"strategy": "head_only", "method": "coral"}})


def test_loader_workers_and_channels_last_train_the_same_weights():
    """Decoding in worker processes changes nothing; channels_last training matches eager to float noise.
    (Compiled training: tests/test_finetune_compile.py, outside the core tier.)"""
    results = train_variants({"eager": {}, "workers": {"num_workers": 2}, "channels_last": {"channels_last": True}})
    eager = results["eager"]
    assert all(torch.equal(eager[k], results["workers"][k]) for k in eager)
    assert all(torch.allclose(eager[k].float(), results["channels_last"][k].float(), atol=1e-4) for k in eager)
    start, _ = tiny_classifier()
    assert not torch.equal(start.state_dict()["backbone.conv_stem.weight"], eager["backbone.conv_stem.weight"])


def test_selection_last_keeps_the_final_epoch_even_when_source_val_preferred_an_earlier_one():
    results = {}
    for selection in ("source_val", "last"):
        model, _ = tiny_classifier()
        seen, record = snapshots(model)
        cfg = loop_config(epochs=3, batch_size=16, lr=5e-2, device="cpu", selection=selection)
        trained, history = finetune(model, toy_data(64, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, progress=False, on_epoch=record)
        final = dict(trained.named_parameters())
        results[selection] = (history, seen, final)
    history, seen, final = results["last"]
    assert all(torch.equal(final[k], seen[3][k]) for k in final)
    history, seen, final = results["source_val"]
    best = max(range(len(history)), key=lambda e: (history[e]["source_val_accuracy"], e))  # ties: the later epoch
    assert best != 3  # this run's source val peaks early, so the two rules keep different epochs
    assert all(torch.equal(final[k], seen[best][k]) for k in final)


def test_selection_by_a_validator_keeps_the_epoch_it_scores_highest_and_records_every_score():
    model, _ = tiny_classifier()
    seen, record = snapshots(model)
    # A scripted judge: its epoch 2 scores highest, a tie at epoch 4 is not better than 2's peak.
    scripted = iter([0.1, 0.4, 0.9, 0.2, 0.5])
    sources = []

    def judge(model, source_val):
        sources.append(source_val)
        return {"validator_info_max": next(scripted), "validator_bnm": 0.0}

    cfg = loop_config(epochs=4, batch_size=16, lr=5e-2, device="cpu", selection="info_max")
    trained, history = finetune(model, toy_data(64, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, progress=False, on_epoch=record, judge=judge)
    assert [r["validator_info_max"] for r in history] == [0.1, 0.4, 0.9, 0.2, 0.5]
    final = dict(trained.named_parameters())
    assert all(torch.equal(final[k], seen[2][k]) for k in final)
    # The judge sees source val probabilities: 16 rows, each a distribution.
    assert all(p.shape == (16, 2) and np.allclose(p.sum(1), 1, atol=1e-5) for p in sources)
    with pytest.raises(ValueError, match="finetune.selection 'info_max' is a validator: it needs unlabelled target rows"):
        finetune(model, toy_data(64, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, progress=False)


def test_labelled_target_rows_are_repeated_in_each_epochs_training_set():
    from xfer.finetune_job import training_set

    source, target = toy_data(10, 0), toy_data(3, 1)
    train = training_set(source, target, repeats=4)
    assert len(train) == 10 + 3 * 4
    rows = [train[i][0] for i in range(len(train))]
    for j in range(3):
        assert sum(torch.equal(r, target[j][0]) for r in rows) == 4
    assert sum(torch.equal(r, source[0][0]) for r in rows) == 1
    # No labelled target budget: the source rows alone, whatever the repeats.
    assert training_set(source, toy_data(0, 1), repeats=4) is source
    with pytest.raises(ConfigError, match="labeled_target_repeats"):
        parse_params({"finetune": {"labeled_target_repeats": 0}}, "test")


class IndexRecordingDataset(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner, self.read = inner, []
        self.labels = [int(inner[i][1]) for i in range(len(inner))]  # as ImageRows lists them: the sampler reads no image for them

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.inner[i]


def test_row_weights_decide_which_rows_fine_tuning_draws():
    """finetune.importance_weighting reaches the loader: rows weighted 0 are never drawn, the rest by weight."""
    train = IndexRecordingDataset(toy_data(32, 0))
    weights = np.r_[np.full(8, 3.0), np.ones(8), np.zeros(16)]
    cfg = loop_config(epochs=20, batch_size=16, lr=1e-4, device="cpu")
    finetune(tiny_classifier()[0], train, toy_data(16, 1), cfg, torch.device("cpu"), seed=0, progress=False, row_weights=weights)
    counts = np.bincount(train.read, minlength=32)
    assert counts[16:].sum() == 0
    # 20 epochs of 32 draws: rows 0-7 drawn three times as often as rows 8-15.
    assert counts.sum() == 20 * 32 and 2.4 < counts[:8].sum() / counts[8:16].sum() < 3.7
    with pytest.raises(ValueError, match="31 row weights for 32 training rows"):
        finetune(tiny_classifier()[0], train, toy_data(16, 1), cfg, torch.device("cpu"), seed=0, progress=False, row_weights=weights[:31])


def test_fda_styles_source_train_images_after_unlabelled_target_images_only(tmp_path):
    import pandas as pd

    from xfer.config import FinetuneConfig
    from xfer.data.augment import build_augmentation
    from xfer.finetune_job import source_augmentation

    splits = [("source", "train"), ("source", "val"), ("target", "unlabeled"), ("target", "train"), ("target", "val"), ("target", "test")]
    manifest = pd.DataFrame([{"path": f"{role}/{split}/{i}.png", "role": role, "split": split, "label": i % 2} for role, split in splits for i in range(3)])
    cfg = FinetuneConfig(augment={"fda": 0.05})
    styled = source_augmentation(manifest, cfg, tmp_path)
    assert styled.style.paths == ["target/unlabeled/0.png", "target/unlabeled/1.png", "target/unlabeled/2.png"]
    assert styled.style.beta == 0.05 and styled.style.root == tmp_path
    # The other train images (labelled and unlabelled target) get the augmentation without the style.
    assert build_augmentation(cfg.augment).style is None
    assert source_augmentation(manifest, FinetuneConfig(), tmp_path).style is None
