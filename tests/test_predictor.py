"""xfer/predictor.py: what a served model accepts, and bundles that reproduce their parts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from xfer.predictor import PredictorError, array_to_image, as_image_list, image_files


def test_arrays_become_the_same_image_whatever_their_dtype():
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    as_uint8 = np.asarray(array_to_image(pixels))
    as_float = np.asarray(array_to_image(pixels.astype(np.float32) / 255))
    np.testing.assert_array_equal(as_uint8, pixels)
    np.testing.assert_array_equal(as_float, pixels)
    grey = np.asarray(array_to_image(pixels[:, :, :1]))
    assert grey.shape == (4, 4) and (grey == pixels[:, :, 0]).all()


@pytest.mark.parametrize("bad, message", [(np.zeros((4, 4, 2)), "HxWxC"), (np.zeros(5), "HxWxC"), (np.full((4, 4), 2.0), "0..1")])
def test_unusable_arrays_are_refused_with_what_would_do(bad, message):
    with pytest.raises(PredictorError, match=message):
        array_to_image(bad)


def test_inputs_of_every_accepted_shape_become_a_list_of_images():
    batch = np.zeros((3, 8, 8, 3), np.uint8)
    assert len(as_image_list(batch)) == 3
    assert len(as_image_list(np.zeros((8, 8, 3), np.uint8))) == 1
    assert len(as_image_list(np.zeros((5, 8, 8), np.uint8))) == 5  # a batch of grey images
    assert as_image_list(pd.DataFrame({"image": ["a.png", "b.png"], "other": [1, 2]})) == ["a.png", "b.png"]
    assert as_image_list(pd.DataFrame({"x": ["a.png"]})) == ["a.png"]
    assert as_image_list("a.png") == ["a.png"]
    with pytest.raises(PredictorError, match="`image` column"):
        as_image_list(pd.DataFrame({"a": [1], "b": [2]}))
    with pytest.raises(PredictorError, match="cannot read images from a dict"):
        as_image_list({"image": "a.png"})


def test_folders_are_searched_recursively_for_images_only(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in image_files([tmp_path / "a"])] == ["1.png", "2.JPG"]
    with pytest.raises(PredictorError, match="no such file or folder"):
        image_files([tmp_path / "missing"])
    with pytest.raises(PredictorError, match="no images"):
        (tmp_path / "empty").mkdir()
        image_files([tmp_path / "empty"])


def test_bundle_of_the_fused_model_predicts_the_mean_of_its_parts(pipeline_project, tmp_path):
    """Fusion from the bundle = mean of the head-on-frozen-features and fine-tuned probabilities."""
    from xfer.backbones import create_backbone
    from xfer.config import load_params
    from xfer.data.images import to_tensor
    from xfer.finetune import load_classifier
    from xfer.heads import load_head
    from xfer.layout import Layout
    from xfer.predictor import FinetunePart, HeadPart, as_pil, load_bundle, write_bundle

    root, _ = pipeline_project
    layout = Layout(root)
    params = load_params(layout.params)
    frozen, prep, _ = create_backbone(params.backbone)
    head_part = HeadPart(layout.head_dir, frozen, params.backbone.name, prep)
    finetune_part = FinetunePart(layout.finetune_dir)
    parts = {"head": [head_part], "finetune": [finetune_part], "fusion": [head_part, finetune_part]}
    bundles = {kind: load_bundle(write_bundle(tmp_path / kind, kind, p)) for kind, p in parts.items()}
    manifest = pd.read_csv(layout.manifest)
    images = [str(root / p) for p in manifest.path[:6]]
    probs = {kind: b.predict_proba(images) for kind, b in bundles.items()}
    np.testing.assert_allclose(probs["fusion"], (probs["head"] + probs["finetune"]) / 2, atol=1e-6)
    # Each part is the model its stage saved, on the preprocessing the stage used.
    x = torch.stack([to_tensor(as_pil(i), prep) for i in images])
    classifier, _ = load_classifier(layout.finetune_dir)
    head, _ = load_head(layout.head_dir)
    with torch.no_grad():
        np.testing.assert_allclose(probs["finetune"], torch.softmax(classifier(x), 1).numpy(), atol=1e-6)
        np.testing.assert_allclose(probs["head"], torch.softmax(head(frozen.eval()(x), "target"), 1).numpy(), atol=1e-6)
    with pytest.raises(PredictorError, match="needs at least one part"):
        write_bundle(tmp_path / "empty", "fusion", [])
