"""`head.method: auto`: train a small grid of candidate heads on cached features, keep the one a validator ranks first.

No target label takes part: each candidate is trained (its epoch kept by
`head.selection`), every label-free validator scores every candidate
(the panel), the configured validator picks, and a guard falls back to
source-only unless the validators agree that the adapted pick is better.
The oracle `selection: target_val` is allowed and said to be one.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from xfer.config import VALIDATOR_NAMES, HeadConfig
from xfer.features import worker_context
from xfer.heads import HeadData, HeadNet, _tensor, best_epoch, build_head, outputs_of, selection_evidence, train_head, with_importance_weights
from xfer.validators import Evidence, Outputs, panel

# Each adaptation method with a small grid of its key knob; head.search_methods says which are
# searched (the feature-aligning ones only with a hidden layer: kind mlp or bottleneck).
GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "self_training": ("pseudo_threshold", (0.5, 0.7, 0.9)),
    "mcc": ("mcc_temperature", (1.5, 2.5, 4.0)),
    "coral": ("adapt_weight", (0.3, 1.0, 3.0)),
    "mmd": ("adapt_weight", (0.3, 1.0, 3.0)),
    "dann": ("adapt_weight", (0.3, 1.0, 3.0)),
    "cdan": ("adapt_weight", (0.3, 1.0, 3.0)),
}
BASELINE = "source_only"
# The validators that vote in the guard: label-free ones that look at the target, one vote per criterion.
# source_val is left out: it cannot see the shift, so it always sides with source-only;
# soft_info_max too: it is info_max's criterion read at another temperature, and two votes for one
# criterion would outweigh the others.
GUARD_VALIDATORS = tuple(n for n in VALIDATOR_NAMES if n not in ("source_val", "soft_info_max"))


CandidateCallback = Callable[[int, int, str, dict], None]


@dataclass(frozen=True)
class Candidate:
    name: str  # e.g. "self_training(pseudo_threshold=0.7)"
    config: HeadConfig


def candidate_grid(cfg: HeadConfig) -> list[Candidate]:
    """source_only first, then each of head.search_methods (in GRID's order) with its knob's grid."""
    out = [Candidate(BASELINE, cfg.model_copy(update={"method": BASELINE}))]
    for method, (knob, values) in GRID.items():
        if method not in cfg.search_methods:
            continue
        out += [Candidate(f"{method}({knob}={v:g})", cfg.model_copy(update={"method": method, knob: v})) for v in values]
    return out


def guard_verdict(scores: dict[str, np.ndarray], pick: int, baseline: int) -> dict:
    """Does a majority of the guard validators score the pick strictly above source-only?

    A tie is not a vote for adapting: adapting must earn its place.
    """
    votes = {name: bool(scores[name][pick] > scores[name][baseline]) for name in GUARD_VALIDATORS if name in scores}
    agree = sum(votes.values())
    return {"votes": votes, "for_adapted": agree, "needed": len(votes) // 2 + 1, "adapted_trusted": agree > len(votes) // 2}


def decide(scores: dict[str, np.ndarray], ranking: np.ndarray, baseline: int = 0) -> tuple[int, int, dict]:
    """(pick, kept, guard verdict): the pick is the ranking's first (ties to the earlier
    candidate: source_only first, then the smaller knob); kept is the pick, or the
    baseline when the guard does not trust the adapted pick."""
    pick = int(np.argmax(ranking))
    if pick == baseline:
        return pick, pick, {"votes": {}, "for_adapted": 0, "needed": 0, "adapted_trusted": True}
    verdict = guard_verdict(scores, pick, baseline)
    return pick, pick if verdict["adapted_trusted"] else baseline, verdict


@dataclass(frozen=True)
class Judgement:
    scores: dict[str, np.ndarray]  # the panel: every validator's score per candidate
    ranking: np.ndarray  # what the selection rule ranks by
    pick: int
    kept: int
    verdict: dict  # the guard's


def judge(outputs: list[Outputs], target_val_accuracy: list[float | None], selection: str, evidence: Evidence) -> Judgement:
    """Score trained candidates (source_only first) with every validator; pick by `selection`; guard the pick.

    `target_val_accuracy` is read only by the oracle rule `selection: target_val`.
    """
    scores = panel(outputs, evidence)
    if selection == "target_val":
        ranking = np.array(target_val_accuracy, dtype=float)
    else:
        ranking = scores[selection]
    pick, kept, verdict = decide(scores, ranking)
    return Judgement(scores, ranking, pick, kept, verdict)


@dataclass
class SearchResult:
    model: HeadNet
    history: list[dict[str, float]]
    candidate: Candidate  # the one kept
    summary: dict  # metrics/head.json's "search"


def train_candidate(cfg: HeadConfig, data: HeadData, num_classes: int, seed: int, evidence: Evidence) -> tuple[dict, list[dict[str, float]]]:
    """One candidate, on one thread (in a worker process or this one): its kept head's weights and its epochs.

    One thread whatever the process count, so a candidate trains to the same
    weights in a pool or alone; these heads are too small to gain from more.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, history = train_head(cfg, data, num_classes, seed, evidence=evidence)
    finally:
        torch.set_num_threads(previous)
    return model.state_dict(), history


def search_processes(requested: int | None, candidates: int) -> int:
    """head.search_processes, or one per CPU core; never more than there are candidates."""
    return max(1, min(requested or os.cpu_count() or 1, candidates))


def train_candidates(cfg: HeadConfig, candidates: list[Candidate], data: HeadData, num_classes: int, seed: int, evidence: Evidence, on_done) -> list:
    """(weights, history) of every candidate, in grid order; `on_done(i, weights, history)` as each finishes."""
    processes = search_processes(cfg.search_processes, len(candidates))
    results: list = [None] * len(candidates)
    if processes == 1:
        for i, cand in enumerate(candidates):
            results[i] = train_candidate(cand.config, data, num_classes, seed, evidence)
            on_done(i, *results[i])
        return results
    # A fork server, not fork: the caller is a multi-threaded Prefect flow run (xfer.features.worker_context).
    with ProcessPoolExecutor(processes, mp_context=worker_context()) as pool:
        futures = {pool.submit(train_candidate, cand.config, data, num_classes, seed, evidence): i for i, cand in enumerate(candidates)}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            on_done(i, *results[i])
    return results


def search_heads(cfg: HeadConfig, data: HeadData, num_classes: int, seed: int, on_candidate: CandidateCallback | None = None) -> SearchResult:
    """Train every candidate, score them with every validator, keep the pick (or source-only when the guard says so).

    Candidates train in `head.search_processes` worker processes (one per core by
    default). `on_candidate(done, total, name, record)` is called as each finishes
    (its kept-epoch record): the search takes a minute or so, and says how far it is.
    """
    if cfg.selection == "last":
        raise ValueError("head.method auto ranks candidates with head.selection; 'last' ranks nothing: choose a validator (e.g. info_max)")
    if data.target_train is None:
        raise ValueError("head.method auto needs the unlabelled target train features")
    data = with_importance_weights(cfg, data, seed)  # once, here, not in every worker
    evidence = selection_evidence(data, num_classes, seed)
    # Computed here once, then shipped to every worker with the evidence.
    evidence.importance_weights, evidence.target_clusters  # noqa: B018
    x_source_val, x_target = _tensor(data.source_val[0]), _tensor(data.target_train)
    candidates = candidate_grid(cfg)
    records: list = [None] * len(candidates)
    finished = 0

    def on_done(i: int, weights: dict, history: list[dict[str, float]]) -> None:
        nonlocal finished
        finished += 1
        kept = best_epoch(candidates[i].config, history)
        records[i] = {"best_epoch": kept, **{k: v for k, v in history[kept - 1].items() if k.endswith("_accuracy")}}
        if on_candidate:
            on_candidate(finished, len(candidates), candidates[i].name, records[i])

    trained = []
    for cand, (weights, history) in zip(candidates, train_candidates(cfg, candidates, data, num_classes, seed, evidence, on_done)):
        model = build_head(cand.config, data.source_train[0].shape[1], num_classes)
        model.load_state_dict(weights)
        trained.append((model.eval(), history))
    outputs = [outputs_of(model, x_source_val, x_target) for model, _ in trained]
    verdict_of = judge(outputs, [r.get("target_val_accuracy") for r in records], cfg.selection, evidence)
    scores, ranking, pick, kept, verdict = verdict_of.scores, verdict_of.ranking, verdict_of.pick, verdict_of.kept, verdict_of.verdict
    table = [
        {"name": c.name, "method": c.config.method, **rec, "validators": {n: float(scores[n][i]) for n in scores}}
        for i, (c, rec) in enumerate(zip(candidates, records))
    ]
    summary = {
        "selection": cfg.selection,
        "uses_target_labels": cfg.selection == "target_val",
        "candidates": table,
        "pick": candidates[pick].name,
        "kept": candidates[kept].name,
        "guard": verdict | {"fell_back": kept != pick},
        "why": why(candidates, pick, kept, cfg.selection, verdict),
        "warning": warning(ranking, kept != pick, cfg.selection),
    }
    model, history = trained[kept]
    return SearchResult(model, history, candidates[kept], summary)


def why(candidates: list[Candidate], pick: int, kept: int, selection: str, verdict: dict) -> str:
    picked = f"{selection} ranks {candidates[pick].name} first of {len(candidates)} candidates"
    if pick == kept == 0:
        return f"{picked}: no adaptation"
    if kept == pick:
        return f"{picked}; {verdict['for_adapted']} of {len(verdict['votes'])} validators score it above source_only: kept"
    return (
        f"{picked}, but only {verdict['for_adapted']} of {len(verdict['votes'])} validators score it above source_only "
        f"(needed {verdict['needed']}): fell back to source_only"
    )


# What a person can do when nothing label-free can be trusted: label the few images that help most.
ASK_FOR_LABELS = "label the images `xfer suggest-labels N` lists and set data.split.target_labels to that file"


def warning(ranking: np.ndarray, fell_back: bool, selection: str) -> str | None:
    """A plain sentence when nothing label-free backs adapting on this data; None when the pick is backed."""
    if fell_back:
        return f"the validators disagree on whether adapting helps on this data: source-only was kept; {ASK_FOR_LABELS}"
    if len(ranking) > 1 and (ranking[1:] < ranking[0]).all():
        return (
            f"{selection} ranks every adapted candidate below source-only: adapting does not look helpful on this data; source-only was kept; {ASK_FOR_LABELS}"
        )
    return None
