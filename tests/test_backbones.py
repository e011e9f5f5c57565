import numpy as np
import pytest
import torch
from PIL import Image

from xfer.backbones import BackboneError, _remap_in_order, create_backbone, resolve_weights
from xfer.config import BackboneConfig
from xfer.data.images import to_tensor


def test_offline_lite0_weights_are_imagenet():
    """scikit-learn's sample photo of a daisy is ImageNet class 985 (daisy)."""
    from sklearn.datasets import load_sample_image

    model, prep, weights = create_backbone(BackboneConfig(name="tf_efficientnet_lite0", image_size=224), num_classes=1000)
    assert (prep.mean, prep.std) == ((0.5,) * 3, (0.5,) * 3)
    assert len(weights.digest) == 64
    x = to_tensor(Image.fromarray(load_sample_image("flower.jpg")), prep)[None]
    with torch.no_grad():
        logits = model.eval()(x)
    assert int(logits.argmax()) == 985
    # The untrained architecture does not find the daisy: the weights do.
    random_model, _, _ = create_backbone(BackboneConfig(name="tf_efficientnet_lite0", pretrained=False, image_size=224), num_classes=1000)
    with torch.no_grad():
        assert int(random_model.eval()(x).argmax()) != 985


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


def test_clear_errors_before_any_work(tmp_path):
    with pytest.raises(BackboneError, match="not a timm model"):
        create_backbone(BackboneConfig(name="efficientnet_b99"))
    with pytest.raises(BackboneError, match="no offline pretrained weights for 'test_resnet'.*tf_efficientnet_lite0"):
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
