"""head.method auto: the candidate grid, the pick by a validator, and the negative-transfer guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_heads import blobs, head_config
from xfer.head_search import GUARD_VALIDATORS, candidate_grid, decide, guard_verdict, search_heads
from xfer.heads import HeadData, outputs_of, selection_evidence
from xfer.validators import panel


def shifted_task() -> HeadData:
    return HeadData(blobs(200, 0), blobs(60, 1), target_train=blobs(150, 4, shift=1.5)[0], target_val=blobs(60, 2, shift=1.5))


def test_the_grid_is_source_only_then_each_searched_method_with_its_knobs_grid():
    linear = [c.name for c in candidate_grid(head_config(method="auto", search_methods=["self_training", "mcc"]))]
    assert linear == ["source_only"] + [f"self_training(pseudo_threshold={v})" for v in (0.5, 0.7, 0.9)] + [f"mcc(mcc_temperature={v})" for v in (1.5, 2.5, 4)]
    mlp = [c.name for c in candidate_grid(head_config(method="auto", kind="mlp", search_methods=["mcc", "dann", "cdan"]))]
    assert mlp[0] == "source_only" and "dann(adapt_weight=1)" in mlp and len(mlp) == 1 + 9 and not any(n.startswith("self_training") for n in mlp)
    with pytest.raises(ValueError, match=r"search_methods \['dann'\] align.*kind: mlp or bottleneck"):
        head_config(method="auto", search_methods=["mcc", "dann"])
    with pytest.raises(ValueError, match="source_only is always a candidate"):
        head_config(method="auto", search_methods=["source_only", "mcc"])


def test_the_guard_needs_a_majority_of_target_aware_validators():
    names = list(GUARD_VALIDATORS)
    assert "source_val" not in names  # blind to the shift: it would always vote for source-only
    assert "info_max" in names and "soft_info_max" not in names  # one criterion, one vote
    for wins, trusted in ((len(names) // 2, False), (len(names) // 2 + 1, True)):
        scores = {n: np.array([0.0, 1.0 if i < wins else -1.0]) for i, n in enumerate(names)}
        verdict = guard_verdict(scores, pick=1, baseline=0)
        assert verdict["for_adapted"] == wins and verdict["adapted_trusted"] is trusted
    one_short = {n: np.array([0.0, 1.0 if i < len(names) // 2 else -1.0]) for i, n in enumerate(names)}
    assert not guard_verdict(one_short | {"soft_info_max": np.array([0.0, 1.0])}, pick=1, baseline=0)["adapted_trusted"]
    tie = guard_verdict({n: np.zeros(2) for n in names}, pick=1, baseline=0)
    assert tie["for_adapted"] == 0 and not tie["adapted_trusted"]


def test_search_keeps_the_candidate_the_validator_ranks_first_and_reports_the_panel():
    data = shifted_task()
    cfg = head_config(method="auto", epochs=5, lr=0.05, selection="info_max")
    heard = []
    result = search_heads(cfg, data, 3, seed=0, on_candidate=lambda i, n, name, rec: heard.append((i, n, name)))
    table = result.summary["candidates"]
    assert [row["name"] for row in table] == [c.name for c in candidate_grid(cfg)]
    # Progress as each candidate finishes (in any order: they train side by side).
    assert [(i, n) for i, n, _ in heard] == [(i + 1, len(table)) for i in range(len(table))]
    assert sorted(name for _, _, name in heard) == sorted(row["name"] for row in table)
    ranking = [row["validators"]["info_max"] for row in table]
    assert result.summary["pick"] == table[int(np.argmax(ranking))]["name"]
    assert not result.summary["uses_target_labels"]
    # The returned model is the kept candidate's: the panel recomputed on it matches its row.
    kept = next(row for row in table if row["name"] == result.summary["kept"])
    out = outputs_of(result.model, torch.as_tensor(data.source_val[0]), torch.as_tensor(data.target_train))
    assert panel([out], selection_evidence(data, 3, 0), ["info_max"])["info_max"][0] == pytest.approx(kept["validators"]["info_max"], abs=1e-5)
    guard = result.summary["guard"]
    assert guard["fell_back"] == (result.summary["kept"] != result.summary["pick"])
    assert result.summary["kept"] == ("source_only" if guard["fell_back"] else result.summary["pick"])


def test_the_pick_and_its_weights_do_not_depend_on_how_many_processes_train_the_candidates():
    data = shifted_task()
    results = [search_heads(head_config(method="auto", epochs=3, lr=0.05, search_processes=n), data, 3, seed=0) for n in (1, 2)]
    alone, pooled = (r.summary for r in results)
    assert alone["candidates"] == pooled["candidates"] and alone["kept"] == pooled["kept"]
    weights = [r.model.state_dict() for r in results]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_oracle_rule_says_it_read_target_labels_and_last_ranks_nothing():
    data = shifted_task()
    oracle = search_heads(head_config(method="auto", epochs=3, lr=0.05, selection="target_val"), data, 3, seed=0)
    table = oracle.summary["candidates"]
    assert oracle.summary["uses_target_labels"] and oracle.summary["pick"] == max(table, key=lambda r: r["target_val_accuracy"])["name"]
    with pytest.raises(ValueError, match="'last' ranks nothing"):
        search_heads(head_config(method="auto", selection="last"), data, 3, seed=0)


def test_a_pick_the_other_validators_do_not_back_falls_back_to_source_only():
    # Candidate 1 tops the ranking (say, entropy), but every guard validator but one prefers source-only (0).
    scores = {n: np.array([1.0, 0.0, 0.5]) for n in GUARD_VALIDATORS} | {"entropy": np.array([0.0, 1.0, 0.5])}
    pick, kept, verdict = decide(scores, scores["entropy"])
    assert (pick, kept) == (1, 0) and verdict["for_adapted"] == 1 and not verdict["adapted_trusted"]
    backed = {n: np.array([0.0, 1.0, 0.5]) for n in GUARD_VALIDATORS}
    assert decide(backed, backed["entropy"])[:2] == (1, 1)
    assert decide(scores, np.array([2.0, 1.0, 2.0]))[:2] == (0, 0)  # a tie with source-only goes to source-only


def test_finetune_auto_takes_the_heads_kept_method_and_knob(tmp_path):
    import json

    from xfer.config import FinetuneConfig
    from xfer.finetune_job import resolve_method

    pick = tmp_path / "head_pick.json"
    with pytest.raises(FileNotFoundError, match="run the head stage first"):
        resolve_method(FinetuneConfig(method="auto"), pick)
    pick.write_text(json.dumps({"method": "mcc", "mcc_temperature": 4.0}))
    resolved = resolve_method(FinetuneConfig(method="auto", epochs=3), pick)
    assert (resolved.method, resolved.mcc_temperature, resolved.epochs) == ("mcc", 4.0, 3)
    assert resolve_method(FinetuneConfig(method="coral"), pick).method == "coral"  # only auto reads the pick
    pick.write_text(json.dumps({"method": "coral", "adapt_weight": 1.0}))
    with pytest.raises(ValueError, match="head's pick.*coral.*head_only"):
        resolve_method(FinetuneConfig(method="auto", strategy="head_only"), pick)


def test_the_run_says_plainly_when_nothing_backs_adapting():
    from xfer.head_search import warning

    assert "disagree" in warning(np.array([0.0, 1.0]), fell_back=True, selection="bnm")
    assert "xfer suggest-labels N" in warning(np.array([0.0, 1.0]), fell_back=True, selection="bnm")
    assert "ranks every adapted candidate below source-only" in warning(np.array([1.0, 0.5, 0.9]), fell_back=False, selection="bnm")
    assert warning(np.array([1.0, 0.5, 1.2]), fell_back=False, selection="bnm") is None


def test_auto_with_a_rule_that_ranks_nothing_is_refused_before_any_work():
    from xfer.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="head.method auto ranks candidates.*'last' ranks nothing"):
        parse_params({"head": {"method": "auto", "selection": "last"}})
