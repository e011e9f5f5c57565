"""The evaluation report: a Prefect markdown artifact and the same page in MLflow.

One per evaluate run (so one per pipeline run): metrics per model and domain,
the registry's promotion decision, and links into the MLflow UI. The links
point at XFER_MLFLOW_UI; unset, at the team server XFER_TRACKING_URI names
when that is an http(s) URL, else at http://127.0.0.1:5000, where `make ui`
and `make servers` serve the project's store.
"""

from __future__ import annotations

import os

import mlflow
from prefect.artifacts import create_markdown_artifact

from tasks.registry import Promotion
from tasks.tracking import PARENT_TAG, StageRun, team_tracking_uri
from xfer.metrics import CROSS_VALIDATIONS, TABLE_METRICS, figure, mean_std, model_results, recipe_words, selection_lines
from xfer.redact import redact_url, split_userinfo

REPORT_KEY = "xfer-evaluation"
COLUMNS = TABLE_METRICS


def mlflow_ui() -> str:
    if (ui := os.environ.get("XFER_MLFLOW_UI")) is not None:
        # The links go into report.md and a Prefect artifact: never a login (the browser asks for it).
        return redact_url(split_userinfo(ui)[0]).rstrip("/")
    team = team_tracking_uri()
    if team and team.startswith(("http://", "https://")):
        return team.rstrip("/")
    return "http://127.0.0.1:5000"


def run_link(experiment_id: str, run_id: str) -> str:
    return f"{mlflow_ui()}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_link(name: str, version: str) -> str:
    return f"{mlflow_ui()}/#/models/{name}/versions/{version}"


def metrics_table(results: dict) -> list[str]:
    lines = ["| model | split | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for model, by_split in model_results(results).items():
        for split, figures in by_split.items():
            lines.append(f"| {model} | {split} | " + " | ".join(figure(figures.get(c)) for c in COLUMNS) + " |")
    return lines


def cross_validation_table(cv: dict, what: str = "the head") -> list[str]:
    """evaluate.cv_folds: a recipe (the head's; with finetune.cv, fine-tuning's) trained once per fold; mean ± std over the folds."""
    lines = [
        f"The recipe of {what} ({recipe_words(cv['recipe'])}) trained once per fold: {cv['folds']} stratified folds "
        f"of the {cv['rows']} labelled training rows; each fold's model scored on its held-out rows and on target test (never in a fold).",
        "",
        "| rows | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    lines += [f"| {where} | " + " | ".join(mean_std(cv[where][c]) for c in COLUMNS) + " |" for where in ("held_out", "target_test")]
    return lines


def validator_table(results: dict) -> list[str]:
    """Each model's label-free scores (eval.json <model>.target_val.validators); higher is better."""
    scores = {model: by_split.get("target_val", {}).get("validators") for model, by_split in model_results(results).items()}
    scores = {model: s for model, s in scores.items() if s}
    if not scores:
        return []
    names = list(next(iter(scores.values())))
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {model} | " + " | ".join(f"{s[n]:.4f}" for n in names) + " |" for model, s in scores.items()]
    return lines


def promotion_lines(promotion: Promotion | None) -> list[str]:
    if promotion is None:
        return ["Model registry: off (`registry.enabled: false`)."]
    champion = "none" if promotion.champion is None else f"{promotion.champion:.4f} (version {promotion.champion_version})"
    verdict = "**promoted to @champion**" if promotion.promoted else "**kept the champion**; the new version is @challenger"
    return [
        f"Registered `{promotion.model_name}` version {promotion.version} ([open]({model_version_link(promotion.model_name, promotion.version)})): {verdict}.",
        "",
        f"- {promotion.metric}: challenger {promotion.challenger:.4f}, champion {champion}",
        f"- decided by: {promotion.kind}",
        f"- rule: {promotion.reason}",
    ]


def markdown_report(
    results: dict, promotion: Promotion | None, experiment_id: str, run_id: str, pipeline_run_id: str | None, head_selection: dict | None = None
) -> str:
    lines = ["# xfer evaluation", "", *metrics_table(results), ""]
    for key, what in CROSS_VALIDATIONS.items():
        if key in results:
            lines += [f"## Cross-validation of {what}", "", *cross_validation_table(results[key], what), ""]
    if table := validator_table(results):
        lines += ["## Without target labels", "", "Each validator's score on the target val images (labels unread) and source val; higher is better.", ""]
        lines += [*table, ""]
    if head_selection:
        lines += ["## Model selection", "", *(f"- {line}" for line in selection_lines(head_selection)), ""]
    lines += ["## Model registry", "", *promotion_lines(promotion), "", "## MLflow", ""]
    lines.append(f"- evaluate run: [{run_id}]({run_link(experiment_id, run_id)})")
    if pipeline_run_id:
        lines.append(f"- pipeline run: [{pipeline_run_id}]({run_link(experiment_id, pipeline_run_id)})")
    return "\n".join(lines) + "\n"


def publish_report(results: dict, promotion: Promotion | None, run: StageRun, head_selection: dict | None = None) -> str:
    """Create the Prefect artifact and log the same markdown to the MLflow run; return it."""
    info = mlflow.get_run(run.run_id)
    markdown = markdown_report(results, promotion, info.info.experiment_id, run.run_id, info.data.tags.get(PARENT_TAG), head_selection)
    mlflow.log_text(markdown, "report.md")
    create_markdown_artifact(markdown=markdown, key=REPORT_KEY, description="metrics per domain, promotion decision, MLflow links")
    return markdown
