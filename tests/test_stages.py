"""Stage entry points refuse bad params before any work or any output."""

import pytest
from helpers import write_params

from flows.stages import main


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        ({"name": "efficientnet_b99"}, "not a timm model"),
        ({"name": "test_resnet", "pretrained": True}, "pretrained weights for 'test_resnet' are not in the hub cache"),
        ({"name": "test_resnet", "weights": "missing.pt"}, "file not found"),
    ],
)
def test_bad_backbone_stops_the_check_and_its_stages(tmp_path, tiny_params, capsys, monkeypatch, backbone, message):
    """`--check` (make run's first step, and the pipeline flow's) applies every stage's checks;
    a stage process applies its own: features and finetune stop, fetch (which never reads
    the backbone, nor loads its code) does not look."""
    # Offline, with an empty hub cache outside the project: no test reaches for the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path.parent / f"{tmp_path.name}-hub"))
    tiny_params["backbone"].update(backbone)
    write_params(tmp_path, tiny_params)
    assert main(["--check", "--root", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    for stage in ("features", "finetune", "evaluate"):
        assert main([stage, "--root", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_check_passes_good_params_and_needs_a_stage_or_check(tmp_path, tiny_params, capsys):
    write_params(tmp_path, tiny_params)
    assert main(["--check", "--root", str(tmp_path)]) == 0
    assert "valid for every stage" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_unknown_key_stops_the_first_stage(tmp_path, tiny_params, capsys):
    tiny_params["head"]["colour"] = "red"
    write_params(tmp_path, tiny_params)
    assert main(["fetch", "--root", str(tmp_path)]) == 2
    assert "head.colour" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
