"""Fusion of several backbones: each fusion backbone's head joins the fusion row and the served model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY_PARAMS, write_params
from test_registry import client_for, merged

MEMBER = {"name": "test_resnet", "pretrained": False, "image_size": 40}
MEMBER_NAME = "head_test_resnet_40px"


def independent_fusion(root, params) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Target test probabilities of head, fusion head and fine-tuned model, averaged here, not by evaluate."""
    from xfer import features as feats
    from xfer.data.images import ImageRows
    from xfer.data.split import read_manifest, rows
    from xfer.finetune import load_classifier, predict_logits
    from xfer.heads import load_head
    from xfer.layout import Layout
    from xfer.metrics import softmax

    layout = Layout(root)
    probs = []
    for head_dir, fs in (
        (layout.head_dir, feats.load_current(layout.features_current)),
        (layout.head_dir / "members" / MEMBER_NAME, feats.load_member(layout.features_members, MEMBER_NAME)),
    ):
        head, _ = load_head(head_dir)
        x, y = fs.select("target", "test")
        with torch.no_grad():
            probs.append(torch.softmax(head(torch.as_tensor(x), "target"), 1).numpy())
    classifier, spec = load_classifier(layout.finetune_dir)
    part = rows(read_manifest(layout.manifest), "target", "test")
    logits, labels = predict_logits(classifier, ImageRows(part.path.tolist(), part.label.tolist(), spec.prep(), root), 64, torch.device("cpu"))
    assert np.array_equal(labels, y)
    probs.append(softmax(logits))
    return np.mean(probs, 0), y, [str(root / p) for p in part.path]


@pytest.mark.slow
def test_a_fusion_backbone_joins_the_fusion_row_and_the_served_model(tmp_path, prefect_api):
    import mlflow

    from flows.pipeline import pipeline

    params = merged(TINY_PARAMS, {"fusion": {"backbones": [MEMBER]}})
    write_params(tmp_path, params)
    pipeline(root=str(tmp_path))
    ev = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert set(ev) == {"head", "finetune", "fusion", MEMBER_NAME}
    assert json.loads((tmp_path / "metrics/head.json").read_text())["fusion_members"][MEMBER_NAME]["best_epoch"] >= 1

    fused, y, paths = independent_fusion(tmp_path, params)
    assert ev["fusion"]["target_test"]["accuracy"] == pytest.approx((fused.argmax(1) == y).mean(), abs=1e-12)
    # The registered fusion carries all three parts, each with its own image size.
    client_for(tmp_path)
    served = mlflow.pyfunc.load_model("models:/xfer@champion").predict(pd.DataFrame({"image": paths}))
    names = [c for c in served.columns if c not in {"class", "probability", "ood_score", "out_of_distribution"}]
    np.testing.assert_allclose(served[names].to_numpy(), fused, atol=1e-5)

    # Dropping the fusion backbone drops its head and its row.
    write_params(tmp_path, TINY_PARAMS)
    pipeline(root=str(tmp_path))
    assert set(json.loads((tmp_path / "metrics/eval.json").read_text())) == {"head", "finetune", "fusion"}
    assert not (tmp_path / "models/head/members" / MEMBER_NAME).exists()


def test_fusion_backbones_are_checked_before_any_stage(tmp_path, capsys):
    from flows.stages import check_params

    write_params(tmp_path, merged(TINY_PARAMS, {"fusion": {"backbones": [{"name": "no_such_net", "pretrained": False}]}}))
    assert not check_params(str(tmp_path))
    assert "no_such_net" in capsys.readouterr().err
    write_params(tmp_path, merged(TINY_PARAMS, {"fusion": {"backbones": [TINY_PARAMS["backbone"]]}}))
    assert not check_params(str(tmp_path))
    assert "repeats the main backbone" in capsys.readouterr().err
