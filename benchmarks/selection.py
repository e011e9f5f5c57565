"""Label-free model selection over many shifts: does the pick hold on data it was not tuned on?

    .venv/bin/python benchmarks/selection.py [--tasks digits ...] [--seeds 0 1 2 3 4] [--no-reference]
    .venv/bin/python benchmarks/selection.py --render   # rewrite selection.md from selection.json

For each task of benchmarks/shift_tasks.py (the digits default and five
other shifts, built offline) and each seed, every candidate of
`head.method: auto` (xfer/head_search.py, from params.yaml's head section) is
trained once on the cached features; each epoch's model is scored by every
validator and, for this report only, on target test. Then, per validator,
exactly what `head.method: auto` with `head.selection: <validator>` does
(xfer.heads.pick_epoch per candidate, xfer.head_search.judge across them) is
replayed on those epochs, and the accuracy of its pick (before the guard) and
of what it keeps (after it) is read off target test. Target labels choose
nothing here except the rows marked oracle.

Rows per task (means over seeds):
- source_only: the source-only candidate, epoch by source val;
- default: params.yaml's head section as it is;
- <validator>: head.method auto with that selection, after the guard
  (`pick` in the json is params.yaml's head.selection; `raw` is before the guard);
- oracle: the best candidate and epoch on target test (uses target labels);
- logistic regression and the reference adaptation recipe (shift_tasks.py),
  same features, for the issue's "at least matches" targets; beside each
  reference method, xfer's head with that method, the reference's step
  count and its last epoch.
Also each validator's Spearman correlation with target test accuracy over
the candidates (each at the epoch that validator keeps), and the temperature
sweep of soft_info_max with its leave-one-task-out choice
(benchmarks/soft_temperature.py).

Writes benchmarks/results/selection.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shift_tasks, soft_temperature  # noqa: E402
from xfer.config import VALIDATOR_NAMES, HeadConfig, Params, load_params  # noqa: E402
from xfer.head_search import Candidate, candidate_grid, judge  # noqa: E402
from xfer.head_stage import head_data  # noqa: E402
from xfer.heads import add_ensv, head_epochs, pick_epoch, predict_proba, selection_evidence, steps_per_epoch, train_head  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402
from xfer.validators import Outputs  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# The head knobs the tables name (the rest of the head section is in the json).
RECIPE_KEYS = ("kind", "hidden_dim", "feature_norm", "optimizer", "lr", "lr_schedule", "weight_decay", "batch_size", "epochs", "adapt_weight", "search_methods")


@dataclass
class CandidateRun:
    candidate: Candidate
    history: list[dict[str, float]]
    outputs: list[Outputs]
    test_accuracy: list[float]  # per epoch, on target test: read by this report only


def train_candidates(cfg: HeadConfig, fs, seed: int) -> tuple[list[CandidateRun], object]:
    """Every candidate of the grid, each epoch kept as (record, validator outputs, target test accuracy)."""
    data = head_data(fs)
    test_x, test_y = shift_tasks.target_test(fs)
    num_classes = int(fs.index.label.max()) + 1
    evidence = selection_evidence(data, num_classes, seed)
    runs = []
    for cand in candidate_grid(cfg):
        run = CandidateRun(cand, [], [], [])
        for epoch in head_epochs(cand.config, data, num_classes, seed, evidence):
            run.history.append(epoch.record)
            run.outputs.append(epoch.outputs)
            run.test_accuracy.append(float((predict_proba(epoch.head, test_x, "target").argmax(1) == test_y).mean()))
        add_ensv(run.history, run.outputs, evidence)
        runs.append(run)
    return runs, evidence


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0  # a constant ranks nothing
    return float(spearmanr(a, b).statistic)


def replay(runs: list[CandidateRun], evidence, selection: str) -> dict:
    """What head.method auto with `selection` keeps, on these trained candidates."""
    epochs = [pick_epoch(selection, r.history) for r in runs]
    outputs = [r.outputs[e - 1] for r, e in zip(runs, epochs)]
    judged = judge(outputs, [None] * len(runs), selection, evidence)
    accuracy = np.array([r.test_accuracy[e - 1] for r, e in zip(runs, epochs)])
    return {
        "raw": float(accuracy[judged.pick]),
        "kept": float(accuracy[judged.kept]),
        "raw_name": runs[judged.pick].candidate.name,
        "kept_name": runs[judged.kept].candidate.name,
        "fell_back": judged.kept != judged.pick,
        "spearman": spearman(judged.ranking, accuracy),
    }


REFERENCE_CACHE = shift_tasks.SELECTION / "reference.json"


def cached(fs, key: str, compute) -> float:
    """A reference row is a function of the features and the seed alone: computed once per features key."""
    store = json.loads(REFERENCE_CACHE.read_text()) if REFERENCE_CACHE.is_file() else {}
    full = f"{fs.meta['key']}/{key}"
    if full not in store:
        store[full] = compute()
        write_json(REFERENCE_CACHE, store)
    return store[full]


def head_overrides(params: Params, pairs: list[str]) -> Params:
    """params with `key=value` (YAML values) set in its head section, validated like params.yaml."""
    import yaml

    head = params.head.model_dump()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in head:
            raise SystemExit(f"--head {pair!r}: expected key=value with key one of {sorted(head)}")
        head[key] = yaml.safe_load(value)
    return params.model_copy(update={"head": HeadConfig(**head)})


def same_config(a: HeadConfig, b: HeadConfig) -> bool:
    return a.model_dump() == b.model_dump()


def evaluate_seed(params: Params, fs, seed: int, reference: bool) -> dict:
    base = params.head.model_copy(update={"method": "auto"})
    start = time.perf_counter()
    runs, evidence = train_candidates(base, fs, seed)
    trained = time.perf_counter() - start
    source_only = runs[0]
    row = {
        "source_only": source_only.test_accuracy[pick_epoch("source_val", source_only.history) - 1],
        "oracle": max(max(r.test_accuracy) for r in runs),
        "validators": {v: replay(runs, evidence, v) for v in VALIDATOR_NAMES},
        "soft_temperature": soft_temperature.sweep([[o.target for o in r.outputs] for r in runs], [r.test_accuracy for r in runs]),
        "search_seconds": trained,
    }
    default = next((r for r in runs if same_config(r.candidate.config, params.head.model_copy(update={"selection": base.selection}))), None)
    if params.head.method != "auto" and default is not None:
        row["default"] = default.test_accuracy[pick_epoch(params.head.selection, default.history) - 1]
    elif params.head.method == "auto":
        row["default"] = row["validators"][params.head.selection]["kept"]
    if reference:
        row["logistic_regression"] = cached(fs, "logistic_regression", lambda: shift_tasks.logistic_regression_accuracy(fs))
        for method in shift_tasks.REFERENCE_METHODS:
            row[f"reference_{method}"] = cached(fs, f"reference_{method}/{seed}", lambda m=method: shift_tasks.reference_recipe_accuracy(fs, m, seed))
        for method in shift_tasks.REFERENCE_METHODS:
            row[f"xfer_{method}"] = xfer_method_accuracy(params, fs, method, seed)
    return row


def xfer_method_config(head: dict, method: str, epochs: int | None = None) -> HeadConfig | None:
    """The head section `head` with `head.method: <method>`, validated like params.yaml; None where
    that section refuses the method (DANN and CDAN align hidden features, which a linear head lacks)."""
    return None if method_refusal(head, method, epochs) else HeadConfig(**(head | method_update(method, epochs)))


def method_update(method: str, epochs: int | None) -> dict:
    return {"method": method, "selection": "last"} | ({"epochs": epochs} if epochs else {})


def method_refusal(head: dict, method: str, epochs: int | None = None) -> str | None:
    """Why the head section `head` refuses `head.method: <method>` (its validation message), or None."""
    from pydantic import ValidationError

    try:
        HeadConfig(**(head | method_update(method, epochs)))
    except ValidationError as e:
        return "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
    return None


def xfer_method_accuracy(params: Params, fs, method: str, seed: int) -> float | None:
    """xfer's head as params.yaml has it with `head.method: <method>`, on the reference recipe's terms:
    as many epochs as make its step count (shift_tasks.REFERENCE_STEPS), the last epoch kept (the
    reference keeps its last iterate). What is compared is the training, not a budget or a selection rule.
    None where the head section cannot take the method."""
    data = head_data(fs)
    epochs = epochs_for_steps(len(data.source_train[1]), params.head.batch_size, shift_tasks.REFERENCE_STEPS)
    cfg = xfer_method_config(params.head.model_dump(), method, epochs)
    if cfg is None:
        return None
    head, _ = train_head(cfg, data, shift_tasks._num_classes(fs), seed)
    x, y = shift_tasks.target_test(fs)
    return float((predict_proba(head, x, "target").argmax(1) == y).mean())


# What the xfer_<method> rows are, recorded in the json's meta (see xfer_method_accuracy).
XFER_ROWS = "params head, method set, reference steps, last epoch"


def epochs_for_steps(rows: int, batch_size: int, steps: int) -> int:
    """The fewest epochs of a head that take at least `steps` steps."""
    return -(-steps // steps_per_epoch(rows, batch_size))


def paired_gap(task: dict, key: str, minus: str) -> tuple[float, float]:
    """Row `key` minus row `minus`, paired by seed: the mean over seeds and its standard error."""
    diffs = np.array([r[key] - r[minus] for r in task["per_seed"].values()])
    return float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")


def mean_over_seeds(rows: list[dict]) -> dict:
    """The mean of every number over seeds, the same shape as one row."""
    first = rows[0]
    out = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = mean_over_seeds([r[key] for r in rows])
        elif value is None:
            out[key] = None  # a row this head cannot have (see xfer_method_config)
        elif isinstance(value, bool):
            out[key] = float(np.mean([r[key] for r in rows]))  # the fraction of seeds
        elif isinstance(value, (int, float)):
            out[key] = float(np.mean([r[key] for r in rows]))
        else:
            out[key] = [r[key] for r in rows]
    return out


def run_task(name: str, params: Params, seeds: list[int], reference: bool) -> dict:
    fs = shift_tasks.task_features(name, params)
    per_seed = {}
    for seed in seeds:
        per_seed[str(seed)] = evaluate_seed(params, fs, seed, reference)
        r = per_seed[str(seed)]
        picks = " ".join(f"{v}={r['validators'][v]['kept']:.3f}" for v in VALIDATOR_NAMES)
        print(f"  {name} seed {seed}: source_only {r['source_only']:.3f} oracle {r['oracle']:.3f} | {picks} ({r['search_seconds']:.0f} s)", flush=True)
    for row in per_seed.values():
        row["pick"] = row["validators"][params.head.selection]["kept"] if params.head.selection in row["validators"] else None
    mean = mean_over_seeds(list(per_seed.values()))
    return mean | {"per_seed": per_seed, "description": shift_tasks.TASKS[name]}


def markdown(result: dict) -> str:
    meta, tasks = result["meta"], result["tasks"]
    order = list(shift_tasks.TASKS)  # the json's keys are sorted; the tables keep the tasks' own order
    names = sorted(tasks, key=lambda n: order.index(n) if n in order else len(order))
    lines = [
        f"Target test accuracy of a head on frozen {meta['backbone']} features, mean over seeds {', '.join(map(str, meta['seeds']))}, "
        f"{len(names)} two-domain tasks (benchmarks/shift_tasks.py). `head.method: auto` searches {meta['candidates']} candidates; "
        f"each validator column is what auto keeps with `head.selection: <validator>` (after the negative-transfer guard). "
        f"**oracle** is the best candidate and epoch on target test: it reads target labels, as does nothing else here but the scoring.",
        "",
        f"Head recipe (params.yaml's head section{', with --head ' + ' '.join(meta.get('head_overrides', [])) if meta.get('head_overrides') else ''}): "
        + ", ".join(f"{k} {meta['head'][k]}" for k in RECIPE_KEYS if k in meta["head"])
        + f". **default** is this head section as it is (method {meta['head']['method']}, selection {meta['head']['selection']}).",
        "",
        "| task | source-only | default | " + " | ".join(VALIDATOR_NAMES) + " | oracle |",
        "|---|---:|---:|" + "---:|" * (len(VALIDATOR_NAMES) + 1),
    ]
    # A validator added after these results were written has no figures in them: shown as `-`.
    written = [v for v in VALIDATOR_NAMES if all(v in tasks[n]["validators"] for n in names)]
    for name in names + ["mean"]:
        rows = [tasks[n] for n in names] if name == "mean" else [tasks[name]]
        avg = lambda f: float(np.mean([f(r) for r in rows]))  # noqa: E731
        cells = [avg(lambda r: r["source_only"]), avg(lambda r: r.get("default", np.nan))]
        cells += [avg(lambda r, v=v: r["validators"][v]["kept"]) if v in written else None for v in VALIDATOR_NAMES] + [avg(lambda r: r["oracle"])]
        label = "**mean**" if name == "mean" else name
        lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines += [
        "",
        "Negative transfer and the guard: per validator, the worst task's kept accuracy minus source-only's "
        "(the target is >= -0.01), the mean gap to the oracle, how often the guard fell back, and the "
        "Spearman correlation of the validator with target test accuracy over the candidates (mean over tasks and seeds).",
        "",
        "| validator | worst (kept - source-only) | worst before the guard | mean (oracle - kept) | guard fell back | Spearman |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in written:
        rows = [tasks[n] for n in names]
        worst = min(r["validators"][v]["kept"] - r["source_only"] for r in rows)
        worst_raw = min(r["validators"][v]["raw"] - r["source_only"] for r in rows)
        gap = np.mean([r["oracle"] - r["validators"][v]["kept"] for r in rows])
        fell = np.mean([r["validators"][v]["fell_back"] for r in rows])
        rho = np.mean([r["validators"][v]["spearman"] for r in rows])
        lines.append(f"| {v} | {worst:+.3f} | {worst_raw:+.3f} | {gap:.3f} | {fell:.0%} | {rho:+.2f} |")
    if missing := [v for v in VALIDATOR_NAMES if v not in written]:
        lines += ["", f"`-`: {', '.join(missing)} came after these results were written; run the benchmark again for them."]
    if all("soft_temperature" in tasks[n] for n in names):
        lines += ["", *soft_temperature.markdown({n: tasks[n]["soft_temperature"] for n in names})]
    if all("logistic_regression" in tasks[n] for n in names):
        methods = shift_tasks.REFERENCE_METHODS
        # Older results hold xfer rows of another definition (best knob on target test): not shown as these.
        current = meta.get("xfer_rows") == XFER_ROWS
        lines += [
            "",
            "Reference rows on the same features (seed means): xfer's source-only head against a scikit-learn logistic regression, "
            "and xfer's head per method (params.yaml's head section with that method, as many epochs as make the reference's "
            "1,500 steps, its last epoch) against the reference recipe "
            "(bottleneck + BatchNorm, SGD, 1,500 steps, last iterate; shift_tasks.py). Each difference column is paired by seed: "
            "mean ± standard error over the seeds (logistic regression has no seed; the head's seeds make its spread). "
            "A difference within two standard errors of zero is within seed noise.",
            "",
            "| task | source-only | logistic regression | source-only - logistic regression | "
            + " | ".join(f"xfer {m} | reference {m} | xfer - reference" for m in methods)
            + " |",
            "|---|---:|---:|---:|" + "---:|---:|---:|" * len(methods),
        ]
        for n in names:
            r = tasks[n]
            gap, se = paired_gap(r, "source_only", "logistic_regression")
            cells = [f"{r['source_only']:.3f}", f"{r['logistic_regression']:.3f}", f"{gap:+.3f} ± {se:.3f}"]
            for m in methods:
                if xfer_method_config(meta["head"], m) is None:
                    cells += ["n/a", f"{r[f'reference_{m}']:.3f}", "n/a"]
                elif current:
                    gap, se = paired_gap(r, f"xfer_{m}", f"reference_{m}")
                    cells += [f"{r[f'xfer_{m}']:.3f}", f"{r[f'reference_{m}']:.3f}", f"{gap:+.3f} ± {se:.3f}"]
                else:
                    cells += ["-", f"{r[f'reference_{m}']:.3f}", "-"]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        # The validation message's first clause says why (the rest is what to do instead).
        if refused := {m: why for m in methods if (why := method_refusal(meta["head"], m))}:
            lines += [
                "",
                f"n/a: this head section refuses head.method {' and '.join(refused)}: " + "; ".join(why.split(";")[0] for why in refused.values()) + ".",
            ]
        if not current:
            lines += ["", "`-`: these results were written before xfer's rows took the reference's terms; run the benchmark again for them."]
    lines += ["", f"Machine: {meta['machine']}; {meta['seconds']:.0f} s in all. Written by `benchmarks/selection.py`."]
    return "\n".join(lines) + "\n"


def rules_of(result: dict, params: Params) -> dict:
    """Recompute `pick` and `default` for params.yaml's head.method and head.selection from the stored
    per-validator figures: valid only while the candidates (the rest of the head section) are the ones trained."""
    # search_processes only says how many candidates train side by side: not what they are.
    free = ("method", "selection", "search_processes")
    trained = {k: v for k, v in result["meta"]["head"].items() if k not in free}
    now = {k: v for k, v in params.head.model_dump().items() if k not in free}
    if trained != now:
        changed = sorted(k for k in now.keys() | trained.keys() if now.get(k) != trained.get(k))
        raise SystemExit(f"--render: params.yaml's head section differs from the trained candidates' in {changed}: run the benchmark again")
    for task in result["tasks"].values():
        for row in [task, *task["per_seed"].values()]:
            row["pick"] = row["validators"][params.head.selection]["kept"] if params.head.selection in row["validators"] else None
            if params.head.method == "auto":
                row["default"] = row["pick"]
    result["meta"]["head"] = params.head.model_dump()
    return result


def machine() -> str:
    """The CPU and the kernels torch runs on it: training's last bits, and so these figures, depend on both."""
    import os

    import torch

    from benchmarks.default_run import cpu_name

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    kernels = torch.backends.cpu.get_cpu_capability() + (f", oneDNN held to {isa}" if isa else "")
    return f"{cpu_name()} ({kernels} kernels), {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(shift_tasks.TASKS), help=f"from {list(shift_tasks.TASKS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--no-reference", action="store_true", help="skip logistic regression and the reference recipe rows")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="selection", help="the results' file stem: <out>/<name>.md and .json")
    parser.add_argument("--head", nargs="+", default=[], metavar="KEY=VALUE", help="override params.yaml's head section (e.g. kind=linear)")
    parser.add_argument("--render", action="store_true", help="rewrite selection.md from selection.json and exit")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        result = rules_of(json.loads((out / f"{args.name}.json").read_text()), head_overrides(load_params(args.params), args.head))
        result["meta"]["head_overrides"] = args.head
        write_json(out / f"{args.name}.json", result)
        write_text(out / f"{args.name}.md", markdown(result))
        return 0
    unknown = [t for t in args.tasks if t not in shift_tasks.TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(shift_tasks.TASKS)}")
    params = head_overrides(load_params(args.params), args.head)
    start = time.perf_counter()
    tasks = {}
    for name in args.tasks:
        print(f"{name}: {shift_tasks.TASKS[name]}", flush=True)
        tasks[name] = run_task(name, params, args.seeds, not args.no_reference)
    meta = {
        "backbone": params.backbone.name,
        "seeds": args.seeds,
        "head": params.head.model_dump(),
        "candidates": len(candidate_grid(params.head.model_copy(update={"method": "auto"}))),
        "head_overrides": args.head,
        "xfer_rows": XFER_ROWS,
        "machine": machine(),
        "seconds": time.perf_counter() - start,
    }
    result = {"meta": meta, "tasks": tasks}
    write_json(out / f"{args.name}.json", result)
    table = markdown(result)
    write_text(out / f"{args.name}.md", table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
