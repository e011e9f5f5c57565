"""The stage contract: one table naming, for every stage, what it reads and writes.

For each stage: the params it reads (whole sections or dotted keys), the data
files and folders it reads, the files it writes, the module of its Prefect
task, its core function, and the checks its params get before any work.
Everything else is derived from this table or checked against it:

- dvc.yaml's `deps`, `params`, `outs` and `metrics` (tests/test_contract.py
  compares them; `python -m xfer.contract --write` rewrites dvc.yaml from it);
  the code deps are the stage's import closure, computed from the source by
  `import_closure`, so a stage reruns when any file its process loads changes;
- the params each stage logs to MLflow (tasks/tracking.py `stage_run`) and the
  fine-tuning run key (xfer/finetune_job.py), via `Stage.params`;
- the checks `flows/stages.py` runs before a stage (its own) and before the
  whole pipeline (every stage's).

Modules are named by string and imported only when a stage runs, so a stage
process loads its own stage and nothing else.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

# The packages whose files are code deps; everything else is a library.
PROJECT_PACKAGES = ("xfer", "tasks", "flows")
# The module every stage process starts in (`python -m flows.stages <stage>`).
ENTRY_MODULE = "flows.stages"
# Files a module reads at run time as part of its code: they join the closure with it.
CODE_RESOURCES = {"xfer/data/sources.py": ("xfer/data/registry.yaml",)}


@dataclass(frozen=True)
class SwitchedDep:
    """Data a stage reads only while a param says so: dvc.yaml lists `path` among the stage's deps
    while params.yaml sets `key` to something other than `off` (then `python -m xfer.contract --write`)."""

    path: str
    key: str
    off: object


@dataclass(frozen=True)
class Stage:
    name: str
    # Param sections (`head`) or dotted keys (`data.split`) the stage reads:
    # dvc.yaml `params`, what MLflow logs for the stage, and the run key.
    params: tuple[str, ...]
    # Data it reads (files or folders, relative to the project root).
    deps: tuple[str, ...]
    # What it writes: DVC `outs` (persist: true) and `metrics` files.
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    # "module:function" of the Prefect task (tasks/<stage>.py) and of the core work (xfer/).
    task: str
    core: str
    # "module:function"s taking (params, root) that raise a ValueError naming the bad value.
    checks: tuple[str, ...] = ()
    # Dotted params whose value, when set, is a file the stage reads (relative to the root):
    # dvc.yaml lists it among the deps as params.yaml gives it, so editing the file reruns
    # the stage; the stage's checks refuse a value dvc.yaml does not list.
    param_deps: tuple[str, ...] = ()
    # A dotted param that switches an optional stage on: dvc.yaml lists the stage only
    # while params.yaml sets it non-empty (then `python -m xfer.contract --write`).
    enabled_by: str | None = None
    # An optional stage's place in the order (dvc.yaml's, the pipeline flow's): before this stage
    # of the chain, whose input it makes; None: after the whole chain.
    runs_before: str | None = None
    switched_deps: tuple[SwitchedDep, ...] = ()

    @property
    def task_module(self) -> str:
        return self.task.partition(":")[0]

    @property
    def entry_modules(self) -> tuple[str, ...]:
        """The modules a stage process imports by name: the entry, the task and the checks."""
        return (ENTRY_MODULE, self.task_module, *(c.partition(":")[0] for c in self.checks))


MANIFEST = "data/splits/manifest.csv"
# The features stage's outputs, split by who reads them; the cache itself
# (data/feature-cache/, every key ever computed) is not an output.
FEATURES = "data/features/current"
MEMBER_FEATURES = "data/features/members"
# The head stage's kept method and knob: what finetune.method auto takes.
HEAD_PICK = "models/head_pick.json"
# The translate stage's output: target-styled copies of the source train images.
TRANSLATED = "data/translated"
# The folder of more unlabelled target images, when set: every stage that reads target
# unlabeled images lists it among its deps.
TARGET_POOL = "data.split.target_pool"

# The finetune section but `cv` (xfer/config.py FinetuneConfig's fields, in their order).
FINETUNE_TRAINING_KEYS = (
    "finetune.strategy", "finetune.frozen_blocks", "finetune.unfreeze_every", "finetune.layer_decay", "finetune.schedule",
    "finetune.warmup_epochs", "finetune.label_smoothing", "finetune.sampler", "finetune.importance_weighting",
    "finetune.importance_max_weight", "finetune.ema_decay", "finetune.patience", "finetune.selection", "finetune.validator_rows",
    "finetune.deterministic", "finetune.augment", "finetune.source_images", "finetune.method", "finetune.adapt_weight",
    "finetune.pseudo_labels", "finetune.pseudo_threshold", "finetune.mcc_temperature", "finetune.epochs", "finetune.batch_size",
    "finetune.lr", "finetune.head_lr_scale", "finetune.weight_decay", "finetune.freeze_bn", "finetune.device", "finetune.devices",
    "finetune.amp", "finetune.num_workers", "finetune.channels_last", "finetune.compile", "finetune.labeled_target_repeats",
    "finetune.max_steps_per_epoch", "finetune.probe_epochs", "finetune.probe_lr",
)  # fmt: skip

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "fetch",
            # Not the global seed nor the split: changing those never refetches.
            params=(
                "data.dataset",
                "data.sha256",
                "data.name",
                "data.domains",
                "data.classes",
                "data.max_unpacked_gb",
                "data.max_image_pixels",
                "data.max_corrupt_fraction",
                "data.digits",
            ),
            deps=(),
            outs=("data/raw",),
            metrics=(),
            task="tasks.fetch:fetch",
            core="xfer.data.fetch:fetch_dataset",
            checks=("xfer.data.sources:check_params",),
        ),
        Stage(
            "split",
            params=("seed", "data.dataset", "data.name", "data.source_domain", "data.target_domain", "data.split"),
            deps=("data/raw",),
            outs=(MANIFEST, "data/splits/report.json"),
            metrics=(),
            task="tasks.split:split",
            core="xfer.data.split:build_manifest",
            checks=("xfer.data.split:check_params",),
            # A filled `xfer suggest-labels` CSV: the labelled target rows; and the folder of
            # more unlabelled target images (the monitor's drifted images among them).
            param_deps=("data.split.target_labels", TARGET_POOL),
        ),
        Stage(
            "features",
            # Not features.num_workers, shard_rows or runner: how images are decoded and
            # where shards run changes no number (every runner gives the same bytes).
            params=("backbone", "features.batch_size", "features.dtype", "features.device", "features.half", "fusion.backbones"),
            deps=(MANIFEST, "data/raw"),
            outs=(FEATURES, MEMBER_FEATURES),
            metrics=(),
            task="tasks.features:features",
            core="xfer.features:extract",
            checks=("xfer.backbones:check_params", "xfer.features:check_params", "tasks.runners:check_params"),
            param_deps=(TARGET_POOL,),
        ),
        Stage(
            "head",
            # finetune.method: whether the head's pick is written for finetune to take (auto).
            params=("seed", "head", "fusion", "finetune.method"),
            deps=(FEATURES, MEMBER_FEATURES, MANIFEST),
            outs=("models/head", HEAD_PICK, "plots/head"),
            metrics=("metrics/head.json",),
            task="tasks.head:head",
            core="xfer.head_stage:train_heads",
        ),
        Stage(
            "finetune",
            # Not finetune.cv: only evaluate reads it (switching it reruns evaluate alone).
            params=("seed", "backbone", *FINETUNE_TRAINING_KEYS),
            # Not the fusion members: adding or removing one never reruns fine-tuning.
            # The head's pick (finetune.method auto) is one small file, unchanged unless the pick is.
            deps=(FEATURES, HEAD_PICK, MANIFEST, "data/raw"),
            outs=("models/finetune", "plots/finetune"),
            metrics=("metrics/finetune.json",),
            task="tasks.finetune:finetune",
            core="xfer.finetune_job:run",
            checks=("xfer.backbones:check_params",),
            param_deps=(TARGET_POOL,),
            # The translated source images, only while fine-tuning reads them: with the
            # default (original) dvc.yaml is what it was before the translate stage existed.
            switched_deps=(SwitchedDep(TRANSLATED, "finetune.source_images", "original"),),
        ),
        Stage(
            "evaluate",
            # The frozen backbone travels in the registered model with the head. The seed deals
            # the cross-validation folds; with finetune.cv the fine-tuning recipe runs once per fold.
            # The registered model carries its reference window for `xfer monitor` (xfer/monitor.py).
            params=("seed", "evaluate", "backbone", "registry", "fusion", "finetune", "monitor.reference_rows", "monitor.ood_quantile"),
            # The fine-tuned network predicts from the images themselves. The head's pick: what
            # finetune.method auto is in the cross-validated recipe.
            deps=(FEATURES, MEMBER_FEATURES, "models/head", "models/finetune", HEAD_PICK, MANIFEST, "data/raw"),
            outs=("plots/evaluate", "plots/roc"),
            metrics=("metrics/eval.json",),
            task="tasks.evaluate:evaluate",
            core="xfer.evaluate:evaluate_models",
            checks=("xfer.backbones:check_params",),
            param_deps=(TARGET_POOL,),
        ),
    )
}
STAGE_NAMES = tuple(STAGES)

# Stages outside the chain: nothing downstream reads them, and each is off by default.
OPTIONAL_STAGES: dict[str, Stage] = {
    "rank": Stage(
        "rank",
        # Not backbone: the candidates are rank.backbones, each written like it.
        params=("seed", "rank", "features.batch_size", "features.dtype", "features.device", "features.half"),
        deps=(MANIFEST, "data/raw"),
        outs=("plots/rank",),
        metrics=("metrics/rank.json",),
        task="tasks.rank:rank",
        core="xfer.rank:rank_stage",
        checks=("xfer.rank:check_params",),
        param_deps=(TARGET_POOL,),
        enabled_by="rank.backbones",
    ),
    "translate": Stage(
        "translate",
        params=("seed", "translate"),
        deps=(MANIFEST, "data/raw"),
        outs=(TRANSLATED, "plots/translate"),
        metrics=("metrics/translate.json",),
        task="tasks.translate:translate",
        core="xfer.translate_stage:translate_stage",
        checks=("xfer.translate_stage:check_params",),
        param_deps=(TARGET_POOL,),
        enabled_by="translate.enabled",
        runs_before="finetune",
    ),
}
ALL_STAGES: dict[str, Stage] = {**STAGES, **OPTIONAL_STAGES}
ALL_STAGE_NAMES = tuple(ALL_STAGES)


def select(data: dict, keys: tuple[str, ...]) -> dict:
    """The parts of nested `data` that dotted `keys` name, nested as in `data`."""
    out: dict = {}
    for key in keys:
        *parents, leaf = key.split(".")
        src, dst = data, out
        for part in parents:
            src = src[part]
            dst = dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    return out


def stage_params(params, stage: str) -> dict:
    """The params `stage` reads, as nested plain data (what MLflow logs and run keys hash)."""
    return select(params.model_dump(mode="json"), ALL_STAGES[stage].params)


def dotted(data: dict, key: str):
    """The value at dotted `key` in nested `data`, or None where any part is missing."""
    value = data
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def enabled_stages(data: dict) -> tuple[str, ...]:
    """The chain with each optional stage that params `data` (plain, as in params.yaml) switch on,
    in run order: one with `runs_before` just before that stage, the others after the chain."""
    order = list(STAGE_NAMES)
    for name, stage in OPTIONAL_STAGES.items():
        if dotted(data, stage.enabled_by):
            order.insert(order.index(stage.runs_before) if stage.runs_before else len(order), name)
    return tuple(order)


def switched_deps(data: dict, stage: Stage) -> list[str]:
    """The switched deps of `stage` that params `data` switch on."""
    return [d.path for d in stage.switched_deps if dotted(data, d.key) not in (None, d.off)]


def check_dvc_yaml(root: Path, data: dict, stages: tuple[str, ...]) -> None:
    """Where root has a dvc.yaml: each of `stages` that params `data` switch on is a stage of it, with
    the deps they switch on; else a ValueError naming what is missing (DVC would not run the stage,
    or not rerun it when that data changes) and how to regenerate it."""
    import yaml

    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        return
    listed = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    hint = "regenerate dvc.yaml with `python -m xfer.contract --write`"
    for name in stages:
        if name not in listed and name in enabled_stages(data):
            raise ValueError(f"{ALL_STAGES[name].enabled_by} switches the {name} stage on, but {path} lacks it: {hint}")
        for dep in switched_deps(data, ALL_STAGES[name]):
            if dep not in listed.get(name, {}).get("deps", []):
                keys = ", ".join(d.key for d in ALL_STAGES[name].switched_deps if d.path == dep)
                raise ValueError(f"{keys} makes the {name} stage read {dep}, but {path} does not list it among its deps: {hint}")


# ---- import closure ----------------------------------------------------------


def module_file(root: Path, module: str) -> Path | None:
    """The project file that defines `module`, or None for a library module."""
    parts = module.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module an `import` anywhere in `path` names (also inside functions: a lazy
    import still runs when its function does), with `from a import b` giving a and a.b."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_closure(root: Path, modules: tuple[str, ...]) -> list[str]:
    """The project files (relative, sorted) that importing `modules` can load:
    each module's file, its packages' __init__.py and its CODE_RESOURCES, transitively."""
    seen: set[str] = set()
    files: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_file(root, module)
        if path is None:
            continue
        rel = path.relative_to(root).as_posix()
        files.add(rel)
        files.update(CODE_RESOURCES.get(rel, ()))
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported_modules(path, module))
    return sorted(files)


def code_deps(root: Path, stage: Stage) -> list[str]:
    return import_closure(root, stage.entry_modules)


def param_file_deps(root: Path, stage: Stage) -> list[str]:
    """The files `stage.param_deps` name in root/params.yaml (those set, as written there)."""
    import yaml

    path = root / "params.yaml"
    if not stage.param_deps or not path.is_file():
        return []
    data = yaml.safe_load(path.read_text()) or {}
    return [str(value) for key in stage.param_deps if (value := dotted(data, key)) is not None]


def root_params(root: Path) -> dict:
    """root/params.yaml as plain data ({} when missing)."""
    import yaml

    path = root / "params.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


# ---- dvc.yaml ------------------------------------------------------------------


def dvc_stage(root: Path, stage: Stage) -> dict:
    """The dvc.yaml entry the table gives for `stage`."""
    entry: dict = {
        "cmd": f"python -m {ENTRY_MODULE} {stage.name}",
        "deps": [*code_deps(root, stage), *stage.deps, *switched_deps(root_params(root), stage), *param_file_deps(root, stage)],
        "params": list(stage.params),
        "outs": [{out: {"persist": True}} for out in stage.outs],
    }
    if stage.metrics:
        entry["metrics"] = [{m: {"persist": True}} for m in stage.metrics]
    return entry


def dvc_stages(root: Path) -> dict:
    """Every stage of the chain, and the optional ones root/params.yaml switches on."""
    return {name: dvc_stage(root, ALL_STAGES[name]) for name in enabled_stages(root_params(root))}


DVC_HEADER = """\
# Generated from the stage table in xfer/contract.py by `python -m xfer.contract --write`
# (everything above `plots:`); tests/test_contract.py fails when the two differ.
# Each stage's code deps are the files its process can import (its import closure),
# so a change reruns exactly the stages it can affect.
# Outputs are `persist: true` so that a stage that fails (bad params, a crash)
# leaves the previous results in place; every write is atomic.
# The plots/<stage> folders are plain `outs`: what `dvc plots show` draws from
# them is defined once, in the top-level `plots:` at the end (hand-written).
"""


def dvc_yaml_text(root: Path, current: str) -> str:
    """dvc.yaml with its stages block generated and its hand-written `plots:` part kept."""
    import re

    import yaml

    plots = re.search(r"^(?:#[^\n]*\n)*plots:.*", current, re.M | re.S)
    stages = yaml.safe_dump({"stages": dvc_stages(root)}, sort_keys=False, width=120)
    return DVC_HEADER + stages + ("\n" + plots.group(0) if plots else "")


def main(argv: list[str] | None = None) -> int:
    """`python -m xfer.contract [--write]`: print (or write into dvc.yaml) what the table gives."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[1]
    path = root / "dvc.yaml"
    text = dvc_yaml_text(root, path.read_text() if path.is_file() else "")
    if args == ["--write"]:
        path.write_text(text)
        print(f"wrote {path}")
    elif not args:
        print(text, end="")
    else:
        print("usage: python -m xfer.contract [--write]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
