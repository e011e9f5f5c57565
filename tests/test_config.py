import subprocess
import sys

import pytest
import yaml
from helpers import REPO

from xfer.config import ConfigError, Params, flatten, load_params, parse_params


def test_repo_params_yaml_is_valid_and_names_every_knob():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    # Every option is written in params.yaml, none is hidden as a code default.
    assert set(flatten(raw)) == set(flatten(Params().model_dump(mode="json")))
    assert params.backbone.name == "tf_efficientnet_lite0"


def test_config_defaults_are_params_yaml(tmp_path):
    """One source of defaults: a params file holding only the required keys (there are
    none) gives exactly the repo's params.yaml, key for key, so the Python API, a trimmed
    params.yaml and `make run` all run the recipe the README describes."""
    (tmp_path / "params.yaml").write_text("# every key left to its default\n")
    trimmed = flatten(load_params(tmp_path / "params.yaml").model_dump(mode="json"))
    written = flatten(load_params(REPO / "params.yaml").model_dump(mode="json"))
    differing = {k: (trimmed[k], written[k]) for k in written if trimmed[k] != written[k]}
    assert not differing, f"config defaults (first) differ from params.yaml (second): {differing}"


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_params({"head": {"lrr": 0.1}}, "params.yaml")
    msg = str(err.value)
    assert "head.lrr" in msg and "unknown key" in msg
    assert "lr" in msg.split("allowed here:")[1] and "epochs" in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        parse_params({"head": {"epochs": "many"}})
    assert "head.epochs" in str(err.value) and "'many'" in str(err.value)


def test_out_of_range_value_says_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        parse_params({"finetune": {"lr": -1}})
    assert "finetune.lr" in str(err.value) and "greater than 0" in str(err.value)


def test_registry_metric_is_a_target_val_metric_or_a_validator_with_one_figure_per_model():
    assert parse_params({"registry": {"metric": "dev"}}).registry.metric == "dev"
    assert parse_params({"registry": {"metric": "macro_f1"}}).registry.metric == "macro_f1"
    with pytest.raises(ConfigError, match=r"registry.metric.*ensv ranks the candidates of one run"):
        parse_params({"registry": {"metric": "ensv"}})
    with pytest.raises(ConfigError, match=r"registry.metric.*unknown registry.metric 'last'.*accuracy.*reads target labels.*info_max.*reads none"):
        parse_params({"registry": {"metric": "last"}})


def test_split_fractions_must_leave_training_rows():
    with pytest.raises(ConfigError, match="source train"):
        parse_params({"data": {"split": {"source_val": 0.45, "source_test": 0.45}}})


def test_unknown_domain_lists_the_choices():
    with pytest.raises(ConfigError, match="printed"):
        parse_params({"data": {"target_domain": "sketch"}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("head: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_validate_command_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("seed: 3\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 3\nhead:\n  colour: red\n")
    ok = subprocess.run([sys.executable, "-m", "xfer.config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run([sys.executable, "-m", "xfer.config", str(bad)], capture_output=True, text=True)
    assert fail.returncode == 2 and "head.colour" in fail.stderr


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": "x"}) == {"a.b": 1, "a.c.d": None, "e": "x"}
