import pytest
import torch
from torch.utils.data import TensorDataset

from xfer.backbones import create_backbone
from xfer.config import BackboneConfig, FinetuneConfig, HeadConfig
from xfer.finetune import Classifier, ClassifierSpec, finetune, load_classifier, predict_logits, save_classifier, select_device
from xfer.heads import build_head


def toy_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.3
    x[y == 1, :, :16] += 1.5  # class 1: bright top half
    return TensorDataset(x, y)


def tiny_classifier(head_cfg=HeadConfig()):
    torch.manual_seed(0)
    backbone, prep, _ = create_backbone(BackboneConfig(name="test_efficientnet", pretrained=False, image_size=32))
    return Classifier(backbone, build_head(head_cfg, backbone.num_features, 2)), prep


def test_finetune_starts_from_the_probe_and_learns():
    model, _ = tiny_classifier()
    probe_weight = model.head.classifier.weight.detach().clone()
    cfg = FinetuneConfig(epochs=3, batch_size=16, lr=3e-3, device="cpu")
    epochs = []
    trained, history = finetune(model, toy_data(128, 0), toy_data(64, 1), cfg, torch.device("cpu"), seed=0, monitor={"target_val": toy_data(32, 2)}, on_epoch=lambda e, r: epochs.append(e), progress=False)
    assert epochs == [0, 1, 2, 3] and "train_loss" not in history[0]
    assert history[0]["val_accuracy"] < 0.75 < max(r["val_accuracy"] for r in history)
    assert not torch.equal(trained.head.classifier.weight, probe_weight)
    logits, labels = predict_logits(trained, toy_data(64, 1), 32, torch.device("cpu"))
    assert (logits.argmax(1) == labels).mean() == max(r["val_accuracy"] for r in history)


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
    cfg = FinetuneConfig(epochs=2, batch_size=8, max_steps_per_epoch=1, lr=1e-2, device="cpu")
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

    cfg = FinetuneConfig(epochs=1, batch_size=16, max_steps_per_epoch=2, freeze_bn=freeze_bn, device="cpu")
    finetune(model, toy_data(64, 0), toy_data(16, 1), cfg, torch.device("cpu"), seed=0, on_epoch=after_epoch, progress=False)
    stats_unchanged, weights_unchanged = seen[1]
    assert stats_unchanged == freeze_bn
    assert not weights_unchanged
