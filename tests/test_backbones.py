import numpy as np
import pytest
import torch
from PIL import Image

from xfer.backbones import BackboneError, _remap_in_order, create_backbone, resolve_weights
from xfer.config import BackboneConfig
from xfer.data.images import to_tensor

# scikit-learn's two sample photos: a daisy (ImageNet class 985; a bee sits on it, and
# lite2 answers honeycomb, 599) and the Summer Palace in Beijing (698, palace).
KNOWN = [
    ("tf_efficientnet_lite0", 224, "flower.jpg", 985),
    ("tf_efficientnet_lite1", 240, "flower.jpg", 985),
    ("tf_efficientnet_lite2", 260, "china.jpg", 698),
]


@pytest.mark.parametrize("name, size, photo, imagenet_class", KNOWN)
def test_offline_weights_are_imagenet(name, size, photo, imagenet_class):
    """Each backbone whose weights ship in a pinned package names a photo's ImageNet class, at its own input size."""
    from sklearn.datasets import load_sample_image

    model, prep, weights = create_backbone(BackboneConfig(name=name, image_size=size), num_classes=1000)
    assert (prep.mean, prep.std) == ((0.5,) * 3, (0.5,) * 3)
    assert len(weights.digest) == 64 and not weights.hub
    x = to_tensor(Image.fromarray(load_sample_image(photo)), prep)[None]
    with torch.no_grad():
        logits = model.eval()(x)
    assert int(logits.argmax()) == imagenet_class
    # The untrained architecture does not find it: the weights do.
    random_model, _, _ = create_backbone(BackboneConfig(name=name, pretrained=False, image_size=size), num_classes=1000)
    with torch.no_grad():
        assert int(random_model.eval()(x).argmax()) != imagenet_class


def test_features_mode_has_no_classifier():
    model, prep, weights = create_backbone(BackboneConfig(name="test_efficientnet", pretrained=False, image_size=32))
    out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, model.num_features) and weights.digest.startswith("random-init:")
    assert prep.image_size == 32


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    trained, _, _ = create_backbone(BackboneConfig(name="test_efficientnet", pretrained=False, image_size=32))
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    loaded, _, source = create_backbone(BackboneConfig(name="test_efficientnet", weights=str(path), image_size=32))
    assert source.path == path
    for (k, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_weights_of_another_model_are_refused(tmp_path):
    other, _, _ = create_backbone(BackboneConfig(name="test_resnet", pretrained=False))
    path = tmp_path / "resnet.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(BackboneError, match="do not fit"):
        create_backbone(BackboneConfig(name="test_efficientnet", weights=str(path)))


def test_clear_errors_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(BackboneError, match="not a timm model"):
        create_backbone(BackboneConfig(name="efficientnet_b99"))
    # Weights neither shipped nor in the (empty) hub cache, offline: the error says where to put them.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="pretrained weights for 'test_resnet' are not in the hub cache .*backbone.weights"):
        resolve_weights(BackboneConfig(name="test_resnet", pretrained=True))
    with pytest.raises(BackboneError, match="file not found"):
        resolve_weights(BackboneConfig(name="test_resnet", weights=str(tmp_path / "missing.pt")))


def test_remap_checks_count_and_shapes():
    target = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    out = _remap_in_order({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)
    assert list(out) == ["a", "b"] and torch.equal(out["b"], torch.ones(4))
    with pytest.raises(BackboneError, match="shape"):
        _remap_in_order({"x": torch.ones(3, 2), "y": torch.ones(4)}, target)
    with pytest.raises(BackboneError, match="1 tensors"):
        _remap_in_order({"x": torch.ones(2, 3)}, target)


def test_to_tensor_normalises_grayscale_to_three_channels():
    from xfer.backbones import Preprocessing

    img = Image.fromarray(np.full((8, 8), 255, dtype=np.uint8), mode="L")
    x = to_tensor(img, Preprocessing(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.full_like(x, 2.0))


def test_random_init_is_reproducible_and_named_by_its_weights():
    cfg = BackboneConfig(name="test_efficientnet", pretrained=False)
    torch.manual_seed(123)  # the caller's RNG state must not matter
    a, _, wa = create_backbone(cfg)
    b, _, wb = create_backbone(cfg)
    assert wa.digest == wb.digest
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    _, _, other = create_backbone(BackboneConfig(name="test_resnet", pretrained=False))
    assert other.digest != wa.digest
