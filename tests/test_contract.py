"""The stage table (xfer/contract.py) is the one contract: dvc.yaml, the import closures and the cores agree with it."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, write_params

from xfer.contract import ALL_STAGES, CODE_RESOURCES, PROJECT_PACKAGES, STAGES, check_dvc_yaml, dvc_stage, dvc_stages, import_closure, param_file_deps


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_dvc_yaml_stages_are_the_ones_the_table_gives():
    fix = "regenerate with `python -m xfer.contract --write`"
    assert list(dvc_yaml()["stages"]) == list(STAGES), fix
    for name, expected in dvc_stages(REPO).items():
        assert dvc_yaml()["stages"][name] == expected, f"dvc.yaml stage {name!r} differs from xfer/contract.py; {fix}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_file_a_stage_imports_is_one_of_its_dvc_deps(stage):
    """The stage's import closure, computed from the source, against dvc.yaml as written."""
    listed = set(dvc_yaml()["stages"][stage]["deps"])
    closure = import_closure(REPO, STAGES[stage].entry_modules)
    missing = sorted(set(closure) - listed)
    assert not missing, f"stage {stage!r} imports {missing}, which its dvc.yaml deps do not list"
    # Data deps are the table's (and the files params.yaml names); code deps are exactly the closure (nothing stale listed).
    assert listed == set(closure) | set(STAGES[stage].deps) | set(param_file_deps(REPO, STAGES[stage]))


@pytest.mark.parametrize("stage", list(ALL_STAGES))
def test_static_closure_covers_what_a_stage_process_really_loads(stage):
    """Import the stage as its process does, in a fresh interpreter: every project file it
    loads must be in the computed closure (a check on the static analysis itself)."""
    modules = ALL_STAGES[stage].entry_modules
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True).stdout
    loaded = set()
    for path in json.loads(out.strip().splitlines()[-1]):
        if path and path.startswith(str(REPO) + "/") and path.split("/")[len(REPO.parts)] in PROJECT_PACKAGES:
            loaded.add(path[len(str(REPO)) + 1 :])
    assert loaded, "the stage loaded no project file: the check is not looking"
    assert loaded <= set(import_closure(REPO, modules)), sorted(loaded - set(import_closure(REPO, modules)))


def test_an_optional_stage_is_in_dvc_yaml_only_while_its_param_switches_it_on(tmp_path, tiny_params):
    """rank is off by default (the repo's dvc.yaml lacks it); rank.backbones set, the generated
    dvc.yaml gains it after the chain, its code deps its own import closure."""
    write_params(tmp_path, tiny_params)
    assert "rank" not in dvc_stages(tmp_path) and "rank" not in dvc_yaml()["stages"]
    tiny_params["rank"] = {"backbones": [tiny_params["backbone"]]}
    write_params(tmp_path, tiny_params)
    stages = dvc_stages(tmp_path)
    assert list(stages) == [*STAGES, "rank"]
    rank = ALL_STAGES["rank"]
    assert stages["rank"]["deps"] == [*import_closure(tmp_path, rank.entry_modules), *rank.deps]
    assert stages["rank"]["params"] == list(rank.params) and stages["rank"]["metrics"] == [{"metrics/rank.json": {"persist": True}}]
    closure = import_closure(REPO, rank.entry_modules)
    assert "xfer/transferability/logme.py" in closure and "tasks/finetune.py" not in closure


def test_a_stage_process_does_not_load_other_stages():
    """flows/stages.py names stages by string: the fetch process never loads fine-tuning or training code."""
    closure = import_closure(REPO, STAGES["fetch"].entry_modules)
    assert not {"tasks/finetune.py", "tasks/evaluate.py", "xfer/finetune.py", "xfer/heads.py", "xfer/backbones.py"} & set(closure)


def test_closure_follows_lazy_and_relative_imports(tmp_path):
    (tmp_path / "xfer" / "sub").mkdir(parents=True)
    (tmp_path / "xfer" / "__init__.py").write_text("")
    (tmp_path / "xfer" / "sub" / "__init__.py").write_text("")
    (tmp_path / "xfer" / "a.py").write_text("def f():\n    from xfer.sub import b\n")
    (tmp_path / "xfer" / "sub" / "b.py").write_text("from . import c\nimport numpy\n")
    (tmp_path / "xfer" / "sub" / "c.py").write_text("")
    (tmp_path / "xfer" / "unused.py").write_text("")
    assert import_closure(tmp_path, ("xfer.a",)) == ["xfer/__init__.py", "xfer/a.py", "xfer/sub/__init__.py", "xfer/sub/b.py", "xfer/sub/c.py"]


def test_every_non_python_file_of_the_packages_is_a_declared_code_resource():
    tracked = subprocess.run(["git", "ls-files", *PROJECT_PACKAGES], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    data_files = {p for p in tracked if not p.endswith(".py")}
    declared = {f for files in CODE_RESOURCES.values() for f in files}
    assert data_files == declared


@pytest.mark.parametrize("stage", list(ALL_STAGES))
def test_table_names_real_functions_and_params(stage, tiny_params):
    entry = ALL_STAGES[stage]
    for target, package in ((entry.task, "tasks"), (entry.core, "xfer"), *((c, None) for c in entry.checks)):
        module, _, name = target.partition(":")
        assert package is None or module.split(".")[0] == package, target
        assert callable(getattr(importlib.import_module(module), name)), target
    core_module = entry.core.partition(":")[0]
    core_files = import_closure(REPO, (core_module,))
    assert all(f.startswith("xfer/") for f in core_files), f"the core of {stage} imports outside xfer/: {core_files}"
    for check in entry.checks:
        assert list(inspect.signature(getattr(importlib.import_module(check.partition(":")[0]), check.partition(":")[2])).parameters)[:2] == ["params", "root"]
    from xfer.config import parse_params
    from xfer.contract import stage_params

    chosen = stage_params(parse_params(tiny_params), stage)
    assert chosen, stage  # every key the table names exists in params


def test_fast_tier_holds_only_core_unit_tests():
    """`make test-fast` runs the modules conftest marks core: none may reach a stage, a flow,
    Prefect or MLflow, nor use a fixture that runs the pipeline or starts a server."""
    from conftest import CORE_TEST_MODULES

    from xfer.contract import imported_modules

    for name in sorted(CORE_TEST_MODULES):
        path = REPO / "tests" / f"{name}.py"
        reached = {m for m in imported_modules(path, name) if m.split(".")[0] in ("tasks", "flows", "prefect", "mlflow")}
        assert not reached, f"{name} imports {sorted(reached)}"
        text = path.read_text()
        assert not any(f in text for f in ("prefect_api", "pipeline_project")), name


def test_fast_tier_imports_only_its_own_modules_and_collects_every_one_of_them():
    """`pytest -m core` does not import the other test modules (conftest's pytest_ignore_collect):
    Prefect and MLflow stay out of the inner loop, and every core module still gives its tests."""
    from conftest import CORE_TEST_MODULES

    code = (
        "import sys, pytest\n"
        "code = pytest.main(['-m', 'core', '--collect-only', '-q', '-p', 'no:cacheprovider', 'tests'])\n"
        "print('LOADED', *sorted(m for m in ('prefect', 'mlflow', 'tasks', 'flows') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    modules = {line.split("::")[0].removeprefix("tests/").removesuffix(".py") for line in lines if "::" in line}
    assert modules == CORE_TEST_MODULES
    assert lines[-1] == "LOADED", lines[-1]


def test_table_paths_are_the_layouts():
    """The contract's file names and xfer/layout.py's (what the tasks pass to the cores) are one set of paths."""
    from pathlib import Path

    from xfer.contract import FEATURES, MANIFEST, MEMBER_FEATURES
    from xfer.layout import Layout

    layout = Layout(Path("."))
    assert (layout.manifest.as_posix(), layout.features_current.as_posix(), layout.features_members.as_posix()) == (MANIFEST, FEATURES, MEMBER_FEATURES)
    assert {layout.metrics(s).as_posix() for s in ("head", "finetune", "eval")} == {m for st in STAGES.values() for m in st.metrics}


def test_a_label_file_params_yaml_names_is_a_dep_of_the_split_stage(tmp_path, tiny_params):
    """data.split.target_labels: the file joins the split's deps as written, so filling it in reruns the split."""
    write_params(tmp_path, tiny_params)
    assert dvc_stage(tmp_path, STAGES["split"])["deps"][-1] == "data/raw"
    tiny_params["data"]["split"]["target_labels"] = "labels/target.csv"
    write_params(tmp_path, tiny_params)
    assert dvc_stage(tmp_path, STAGES["split"])["deps"][-2:] == ["data/raw", "labels/target.csv"]
    assert "labels/target.csv" not in dvc_stage(tmp_path, STAGES["features"])["deps"]


def test_translate_switches_on_its_stage_before_finetune_and_its_images_only_where_read(tmp_path, tiny_params):
    """translate.enabled adds the translate stage just before finetune and changes no other stage's
    entry; finetune.source_images other than original adds data/translated to finetune's deps alone.
    A params.yaml that switches either on while dvc.yaml lacks it is refused, naming the fix."""
    write_params(tmp_path, tiny_params)
    off = dvc_stages(tmp_path)
    assert "translate" not in off and "translate" not in dvc_yaml()["stages"]
    tiny_params["translate"]["enabled"] = True
    write_params(tmp_path, tiny_params)
    on = dvc_stages(tmp_path)
    assert list(on) == ["fetch", "split", "features", "head", "translate", "finetune", "evaluate"]
    assert {k: v for k, v in on.items() if k != "translate"} == off
    assert on["translate"]["outs"] == [{"data/translated": {"persist": True}}, {"plots/translate": {"persist": True}}]
    closure = import_closure(REPO, ALL_STAGES["translate"].entry_modules)
    assert "xfer/translate.py" in closure and "xfer/finetune.py" not in closure and "tasks/finetune.py" not in closure

    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": off}))
    with pytest.raises(ValueError, match="translate.enabled switches the translate stage on, but .* lacks it: regenerate"):
        check_dvc_yaml(tmp_path, tiny_params, ("translate",))
    check_dvc_yaml(tmp_path, tiny_params, ("finetune",))  # finetune itself reads nothing new yet
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": on}))
    check_dvc_yaml(tmp_path, tiny_params, tuple(on))

    for value in ("translated", "both"):
        tiny_params["finetune"]["source_images"] = value
        with pytest.raises(ValueError, match="finetune.source_images makes the finetune stage read data/translated, but"):
            check_dvc_yaml(tmp_path, tiny_params, ("finetune",))
        write_params(tmp_path, tiny_params)
        reading = dvc_stages(tmp_path)
        assert reading["finetune"]["deps"] == [*on["finetune"]["deps"], "data/translated"]
        assert {k: v for k, v in reading.items() if k != "finetune"} == {k: v for k, v in on.items() if k != "finetune"}
        (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": reading}))
        check_dvc_yaml(tmp_path, tiny_params, tuple(reading))
        (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": on}))


def test_the_finetune_stage_reads_every_finetune_knob_but_cv():
    """finetune.cv is read by evaluate alone (so switching it reruns evaluate alone); every other key
    of the section is one of the finetune stage's params, so a new knob cannot be left out."""
    from xfer.config import FinetuneConfig
    from xfer.contract import FINETUNE_TRAINING_KEYS

    assert list(FINETUNE_TRAINING_KEYS) == [f"finetune.{k}" for k in FinetuneConfig.model_fields if k != "cv"]
    assert "finetune" in ALL_STAGES["evaluate"].params
    assert set(FINETUNE_TRAINING_KEYS) <= set(ALL_STAGES["finetune"].params) and not {"finetune", "finetune.cv"} & set(ALL_STAGES["finetune"].params)
