"""Where each stage reads and writes, relative to the project root.

This is the file contract between stages (DESIGN.md); dvc.yaml names the
same paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def downloads(self) -> Path:
        """Verified archives, kept so a refetch never downloads twice; not a DVC output."""
        return self.root / "data" / "downloads"

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "splits" / "manifest.csv"

    @property
    def split_report(self) -> Path:
        return self.root / "data" / "splits" / "report.json"

    @property
    def feature_cache(self) -> Path:
        """Every feature entry ever computed, `<key>/`, content-addressed; not a DVC output (xfer.features)."""
        return self.root / "data" / "feature-cache"

    @property
    def features(self) -> Path:
        """The features stage's outputs: `current/` and `members/`, what later stages read."""
        return self.root / "data" / "features"

    @property
    def features_current(self) -> Path:
        """The main backbone's entry as published by the features stage: head, finetune and evaluate read it."""
        return self.features / "current"

    @property
    def features_members(self) -> Path:
        """The fusion backbones' entries, `<member name>/` each, and members.json: head and evaluate read it."""
        return self.features / "members"

    @property
    def monitor(self) -> Path:
        """`xfer monitor`'s and the monitor flow's reports, history, plots, trigger state and embedding cache; not a DVC output."""
        return self.root / "monitor"

    @property
    def translate_cache(self) -> Path:
        """Every translation ever trained, `<key>/`, content-addressed; not a DVC output (xfer.translate_stage)."""
        return self.root / "data" / "translate-cache"

    @property
    def translated(self) -> Path:
        """The translate stage's output: the current key's entry (target-styled source train images); finetune reads it."""
        return self.root / "data" / "translated"

    @property
    def head_dir(self) -> Path:
        return self.root / "models" / "head"

    @property
    def head_pick(self) -> Path:
        """The adaptation method (and knob) the head stage kept; finetune.method auto reads it."""
        return self.root / "models" / "head_pick.json"

    @property
    def finetune_dir(self) -> Path:
        return self.root / "models" / "finetune"

    @property
    def checkpoints(self) -> Path:
        """Resumable training state, per stage; removed when a run finishes. Not a DVC output."""
        return self.root / "checkpoints"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metrics(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage}.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def stage_plots(self, stage: str) -> Path:
        """plots/<stage>/: each stage owns its own folder of figures (one DVC output each)."""
        return self.plots / stage

    @property
    def roc_plots(self) -> Path:
        """plots/roc/: evaluate's ROC curves as CSVs, a folder of their own since `dvc plots show`
        draws every file of a folder with one template (plots/evaluate's is the confusion matrix)."""
        return self.plots / "roc"

    @property
    def run_lock(self) -> Path:
        """Held (flock) by the run of a stage or of the pipeline in progress: one run of a project at a time (xfer.locks)."""
        return self.root / ".xfer.lock"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"
