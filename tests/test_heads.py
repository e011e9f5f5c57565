import numpy as np
import torch

from xfer.config import HeadConfig
from xfer.heads import build_head, load_head, save_head, train_head


def blobs(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = np.eye(3, 16) * 4
    x = centers[y] + rng.normal(size=(n, 16)) + shift
    return x.astype(np.float32), y.astype(np.int64)


def test_linear_head_learns_separable_classes_and_reports_every_epoch():
    seen = []
    head, history = train_head(HeadConfig(epochs=15, lr=0.05), blobs(300, 0), blobs(90, 1), 3, seed=0, monitor={"target_val": blobs(90, 2, shift=0.5)}, on_epoch=lambda e, r: seen.append(e))
    assert seen == list(range(1, 16)) and len(history) == 15
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    x, y = blobs(200, 3)
    with torch.no_grad():
        acc = (head(torch.as_tensor(x)).argmax(1).numpy() == y).mean()
    assert acc > 0.95 and "target_val_accuracy" in history[0]


def test_best_epoch_by_validation_is_kept():
    cfg = HeadConfig(epochs=6, lr=0.05)
    head, history = train_head(cfg, blobs(200, 0), blobs(60, 1), 3, seed=0)
    x, y = blobs(60, 1)
    with torch.no_grad():
        kept = (head(torch.as_tensor(x)).argmax(1).numpy() == y).mean()
    assert np.isclose(kept, max(r["val_accuracy"] for r in history))


def test_mlp_head_shape_and_save_load(tmp_path):
    cfg = HeadConfig(kind="mlp", hidden_dim=8, epochs=2)
    head, _ = train_head(cfg, blobs(60, 0), blobs(30, 1), 3, seed=0)
    assert isinstance(build_head(cfg, 16, 3), torch.nn.Sequential)
    save_head(tmp_path, head, cfg, 16, ["a", "b", "c"], "key")
    loaded, spec = load_head(tmp_path)
    x = torch.as_tensor(blobs(5, 2)[0])
    with torch.no_grad():
        assert torch.equal(head(x), loaded(x))
    assert spec["class_names"] == ["a", "b", "c"] and spec["features_key"] == "key"
