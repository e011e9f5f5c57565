"""Typed model of params.yaml.

Every stage loads the whole file through `load_params` before it touches
anything, so a typo anywhere stops every stage with the key path, the bad
value and what would be allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xfer.redact import redact, redact_url, url_secrets


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid."""


class _Strict(BaseModel):
    # allow_inf_nan: .inf or .nan is never a setting (a limit of .inf overflows where it is used).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_names(kind: str, names) -> None:
    """Domain and class names become folders under data/raw/: one plain path part each."""
    from xfer.data.sources import name_problem

    for name in names:
        if (problem := name_problem(name)) is not None:
            raise ValueError(f"{kind} {name!r} {problem}; give a plain folder name such as 'photos' or 'cafe au lait'")


class DigitsConfig(_Strict):
    """The builtin print -> handwriting digits dataset."""

    source_per_class: int = Field(220, ge=10, le=5000)
    target_per_class: int | None = Field(None, ge=5)
    # Seeds the rendering and the target draw. Not the global seed, so that changing
    # that one (splits, training) never regenerates, or for a real dataset refetches, data.
    seed: int = Field(0, ge=0, le=2**31 - 1)


class SplitConfig(_Strict):
    """Fractions are per class and per domain; what is left is train (target: unlabeled)."""

    source_val: float = Field(0.15, gt=0, lt=0.5)
    source_test: float = Field(0.15, gt=0, lt=0.5)
    target_val: float = Field(0.15, gt=0, lt=0.5)
    target_test: float = Field(0.3, gt=0, lt=0.6)
    # Labelled target train rows (semi-supervised adaptation): a fraction of each
    # class, or k images per class (`target_shots`). At most one of the two.
    target_labeled: float = Field(0.0, ge=0, lt=0.9)
    target_shots: int | None = Field(None, ge=1, le=100000)
    # Or the labelled target rows a person chose and labelled: a CSV with columns
    # path (as in the manifest) and label (a class name), such as a filled
    # `xfer suggest-labels` file; relative to the project root. Its rows must come
    # from the unlabeled pool. Not with target_labeled / target_shots.
    target_labels: str | None = Field(None, min_length=1)
    # A folder of more unlabelled target images (relative to the project root, DVC-tracked with
    # `dvc add`): every image under it joins the target unlabeled split, never val or test.
    # The monitor flow (flows/monitor.py) adds drifted images here before it triggers a retrain.
    target_pool: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> "SplitConfig":
        if self.source_val + self.source_test >= 0.9:
            raise ValueError("source_val + source_test must leave at least 10% for source train")
        if self.target_val + self.target_test + self.target_labeled >= 0.9:
            raise ValueError("target_val + target_test + target_labeled must leave at least 10% of the target unlabeled")
        if self.target_labeled > 0 and self.target_shots is not None:
            raise ValueError(
                f"give the labelled target budget once: target_labeled (a fraction, got {self.target_labeled}) "
                f"or target_shots (per class, got {self.target_shots}), and set the other to 0 / null"
            )
        if self.target_labels is not None and (self.target_labeled > 0 or self.target_shots is not None):
            raise ValueError(
                f"target_labels ({self.target_labels!r}) names the labelled target rows itself: set target_labeled to 0 "
                f"(got {self.target_labeled}) and target_shots to null (got {self.target_shots}), or target_labels to null"
            )
        return self


class ClassesConfig(_Strict):
    """How class folders become classes, across every domain of the dataset."""

    # {folder name: class name}: merge spellings that differ between domains.
    rename: dict[str, str] = {}
    # Classes left out everywhere (after renaming), e.g. ones some domains lack.
    drop: list[str] = []

    @field_validator("rename")
    @classmethod
    def _plain_names(cls, rename: dict[str, str]) -> dict[str, str]:
        _check_names("class name", rename.values())
        return rename


class DataConfig(_Strict):
    # digits (builtin) | a registry name (xfer/data/registry.yaml, e.g. office31) |
    # a local folder or archive (./path, /path) | an http(s) URL to an archive.
    dataset: str = Field("digits", min_length=1)
    # sha256 of the archive; required for a URL, checked for a local archive.
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    # Folder under data/raw/; null = the registry name, or the folder's / archive's name.
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # {domain: folder inside the dataset holding one folder per class}; null = the
    # registry's layout, or found: <domain>/[wrapper folders/]<class>/<image>.
    domains: dict[str, str] | None = None
    classes: ClassesConfig = ClassesConfig()

    @field_validator("domains")
    @classmethod
    def _plain_domain_names(cls, domains: dict[str, str] | None) -> dict[str, str] | None:
        _check_names("domain", domains or {})
        return domains

    # Refuse archives that would unpack to more than this (at most a petabyte).
    max_unpacked_gb: float = Field(100.0, gt=0, le=1e6)
    # Images with more pixels are decompression bombs: counted as unreadable at fetch,
    # refused by `xfer predict` (PIL.Image.MAX_IMAGE_PIXELS).
    max_image_pixels: int = Field(100_000_000, ge=1, le=10**12)
    # Unreadable images are left out and counted; more than this share of a domain stops the fetch.
    max_corrupt_fraction: float = Field(0.01, ge=0, le=1)
    # One domain, or a list of domains that together form the labelled source.
    source_domain: str | list[str] = "printed"
    target_domain: str = "handwritten"
    digits: DigitsConfig = DigitsConfig()
    split: SplitConfig = SplitConfig()

    @field_validator("dataset")
    @classmethod
    def _no_secrets_in_url(cls, value: str) -> str:
        # params.yaml is recorded in dvc.lock (committed to git), MLflow params and dataset.json.
        if url_secrets(value):
            raise ValueError(
                f"{redact_url(value)!r} carries credentials (the *** parts), and params.yaml is copied into dvc.lock, "
                "MLflow and data/raw/<name>/dataset.json. Give the URL without them and supply them at download time: "
                "a user name and password in ~/.netrc (`machine <host> login <user> password <secret>`), or secret "
                "query parameters in the environment variable XFER_DOWNLOAD_QUERY (e.g. 'token=...&sig=...'), "
                "which fetch appends to this URL for the request only"
            )
        return value

    @property
    def source_domains(self) -> tuple[str, ...]:
        return (self.source_domain,) if isinstance(self.source_domain, str) else tuple(self.source_domain)

    @property
    def domain_names(self) -> tuple[str, ...]:
        return (*self.source_domains, self.target_domain)

    @model_validator(mode="after")
    def _source_is_valid(self) -> "DataConfig":
        from xfer.data.sources import SourceError, resolve_source

        if not self.source_domains or len(set(self.source_domains)) != len(self.source_domains):
            raise ValueError(f"source_domain must name one domain or a list of distinct domains, got {self.source_domain!r}")
        if self.target_domain in self.source_domains:
            raise ValueError(f"target_domain {self.target_domain!r} is also a source domain; they must differ")
        try:
            source = resolve_source(self)
        except SourceError as err:
            raise ValueError(str(err)) from None
        if source.domains is not None:
            for key, names in (("source_domain", self.source_domains), ("target_domain", (self.target_domain,))):
                unknown = [n for n in names if n not in source.domains]
                if unknown:
                    raise ValueError(f"{key} {unknown} not a domain of {source.name!r}; choose from {list(source.domains)}")
        return self


class BackboneConfig(_Strict):
    name: str = Field("tf_efficientnet_lite0", min_length=1)
    # True: ImageNet weights (lite0's ship with xfer; any other timm model's from the
    # Hugging Face hub cache, downloaded once); False: seeded random init.
    pretrained: bool = True
    # A local weight file (state_dict .pt/.pth, or .safetensors); overrides `pretrained`.
    weights: str | None = None
    image_size: int = Field(64, ge=16, le=1024)


def member_name(backbone: BackboneConfig) -> str:
    """How a fusion backbone's head is named in eval.json, MLflow and models/head/members/."""
    return f"head_{backbone.name}_{backbone.image_size}px"


FUSION_MODES = ("probabilities", "features")


class FusionConfig(_Strict):
    """More frozen backbones, fused with the main one.

    probabilities: each gets cached features and a head like `head`, its own
    row, and a share of the fusion row (the mean of every model's class
    probabilities). features: one head like `head` on the main backbone's
    features and every member's side by side, the `feature_fusion` row.
    """

    backbones: list[BackboneConfig] = []
    mode: Literal["probabilities", "features"] = "probabilities"

    @model_validator(mode="after")
    def _distinct_members(self) -> "FusionConfig":
        names = [member_name(b) for b in self.backbones]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"fusion.backbones repeats {repeated}: each (name, image_size) may appear once")
        return self

    @model_validator(mode="after")
    def _features_need_a_member(self) -> "FusionConfig":
        if self.mode == "features" and not self.backbones:
            raise ValueError(
                "fusion.mode: features concatenates the backbone's features with fusion.backbones', but fusion.backbones is empty; add one, or mode: probabilities"
            )
        return self

    @property
    def probability_members(self) -> list[BackboneConfig]:
        """The members that get a head of their own (probability fusion); none in features mode."""
        return self.backbones if self.mode == "probabilities" else []


class RankConfig(_Strict):
    """Candidate backbones `xfer rank` scores before any training (xfer/rank.py)."""

    # Empty: every backbone whose pretrained weights ship with xfer, at backbone.image_size,
    # and the first of them with random weights as a control.
    backbones: list[BackboneConfig] = []


RUNNER_KINDS = ("threads", "dask", "ray")
# What a cluster address looks like for each runner that accepts one.
RUNNER_ADDRESS_SCHEMES = {"dask": ("tcp://", "tls://", "inproc://"), "ray": ("ray://", "auto")}


class RunnerConfig(_Strict):
    """The Prefect task runner the features stage maps its shards over."""

    kind: Literal["threads", "dask", "ray"] = "threads"
    # Shards computed side by side: threads in this process, or the worker
    # processes of the local Dask / Ray cluster started when no address is
    # given; null = one per CPU core. Each shard computes on one core.
    workers: int | None = Field(None, ge=1, le=256)
    # A running cluster instead of a local one: tcp://host:8786 (a Dask scheduler)
    # or ray://host:10001 (a Ray head; `auto` = the one on this machine).
    address: str | None = None
    # A shard whose task fails is run again alone, this many times; a shard on a
    # lost Dask worker is also rescheduled by Dask itself.
    retries: int = Field(2, ge=0, le=20)

    @model_validator(mode="after")
    def _address_fits_kind(self) -> "RunnerConfig":
        if self.address is None:
            return self
        schemes = RUNNER_ADDRESS_SCHEMES.get(self.kind)
        if schemes is None:
            raise ValueError(f"address {self.address!r} needs kind dask or ray; the {self.kind} runner runs in this process")
        if not self.address.startswith(schemes):
            raise ValueError(f"address {self.address!r} is not a {self.kind} address: it should start with {' or '.join(schemes)}")
        return self


class FeaturesConfig(_Strict):
    batch_size: int = Field(128, ge=1, le=4096)
    # float16 halves the cache on disk; either loads memory-mapped.
    dtype: Literal["float32", "float16"] = "float32"
    # DataLoader worker processes decoding images; 0 decodes in the main process.
    # Threads runner only: on Dask or Ray each worker decodes its own shard.
    num_workers: int = Field(0, ge=0, le=64)
    # Manifest rows per shard: the unit a runner schedules, writes and retries.
    shard_rows: int = Field(1024, ge=1, le=10_000_000)
    runner: RunnerConfig = RunnerConfig()
    # Where the frozen backbone runs: auto = CUDA when present, else the CPU.
    # Each device (and `half`) is a cache key of its own; the CPU keeps the key it always had.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # float16 autocast on CUDA (tensor cores); under `auto` on a machine without CUDA it is not used.
    half: bool = False

    @model_validator(mode="after")
    def _half_needs_cuda(self) -> "FeaturesConfig":
        if self.half and self.device == "cpu":
            raise ValueError("features.half: true runs float16 on CUDA only, but features.device is 'cpu'; use device auto or cuda, or half: false")
        return self

    @model_validator(mode="after")
    def _shards_hold_whole_batches(self) -> "FeaturesConfig":
        # Whole batches make every shard's batches the single pass's batches, so
        # sharded features are those of one pass, byte for byte, on any backend.
        if self.shard_rows % self.batch_size:
            raise ValueError(
                f"shard_rows {self.shard_rows} is not a multiple of batch_size {self.batch_size}; "
                f"use e.g. {max(1, round(self.shard_rows / self.batch_size)) * self.batch_size}"
            )
        return self


ADAPTATION_METHODS = ("source_only", "coral", "mmd", "dann", "cdan", "mcc", "self_training")
# Methods that move the features themselves: they need a trainable layer below the classifier.
FEATURE_ALIGNING_METHODS = ("coral", "mmd", "dann", "cdan")
AdaptationMethod = Literal["source_only", "coral", "mmd", "dann", "cdan", "mcc", "self_training"]
# Label-free validators (xfer/validators/, one file each; a test checks the two lists agree).
VALIDATOR_NAMES = ("source_val", "entropy", "info_max", "soft_info_max", "bnm", "snd", "dev", "class_ami", "ensv")
# What registry.metric may name: a classification metric on target val (reads its labels), or
# a validator with one figure per model (ensv has none: it scores candidates against their mean).
PROMOTION_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
PROMOTION_VALIDATORS = tuple(name for name in VALIDATOR_NAMES if name != "ensv")
# Which epoch (or search candidate) is kept: a validator, the `last` epoch, or the oracle
# `target_val` (reads target labels, reported as such).
Sampler = Literal["uniform", "class_balanced", "sqrt"]
Selection = Literal["source_val", "entropy", "info_max", "soft_info_max", "bnm", "snd", "dev", "class_ami", "ensv", "last", "target_val"]


# A plain linear head on source features (AdamW at a constant lr, 60 epochs, the epoch by
# source val, no label smoothing): fine-tuning's linear probe, whatever recipe the head section names.
LINEAR_PROBE = {
    "kind": "linear",
    "method": "source_only",
    "label_smoothing": 0.0,
    "source_only_label_smoothing": None,
    "adapt_weight": 1.0,
    "feature_norm": "none",
    "epochs": 60,
    "batch_size": 256,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "optimizer": "adamw",
    "lr_schedule": "constant",
    "selection": "source_val",
}


# Importance weights are clipped here (after normalising to mean 1): a conventional cap, not tuned on
# any task, so a handful of target-like rows cannot carry the whole loss.
IMPORTANCE_MAX_WEIGHT = Field(10.0, ge=1.0, le=1e6)


class HeadConfig(_Strict):
    # The hidden layer: none (linear), Linear-ReLU-Dropout (mlp), or Linear-BatchNorm-ReLU-Dropout (bottleneck).
    kind: Literal["linear", "mlp", "bottleneck"] = "bottleneck"
    hidden_dim: int = Field(256, ge=1, le=8192)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Domain adaptation on cached features; target labels are never seen. auto: a small
    # grid of methods (xfer/head_search.py), the one head.selection ranks first kept.
    method: AdaptationMethod | Literal["auto"] = "auto"
    # Weight of the adaptation loss against the source classification loss.
    adapt_weight: float = Field(1.0, ge=0, le=100)
    # self_training: where pseudo-labels come from: the nearest target class centroid
    # (refreshed each epoch) or the model's own argmax.
    pseudo_labels: Literal["centroid", "confidence"] = "centroid"
    # self_training: a target row trains only when the model gives its pseudo-label this probability.
    pseudo_threshold: float = Field(0.9, gt=0, lt=1)
    # mcc: temperature that softens predictions before the class-confusion matrix.
    mcc_temperature: float = Field(2.5, gt=0, le=100)
    # Standardise each domain's features with its own mean and std (feature-level AdaBN).
    domain_norm: bool = False
    # joint: standardise every input with the mean and std of source train and target train rows together.
    feature_norm: Literal["none", "joint"] = "joint"
    epochs: int = Field(26, ge=1, le=10000)
    batch_size: int = Field(32, ge=1, le=65536)
    lr: float = Field(1e-2, gt=0, le=10)
    weight_decay: float = Field(1e-3, ge=0, le=1)
    # adamw, or sgd (momentum 0.9, no Nesterov).
    optimizer: Literal["adamw", "sgd"] = "sgd"
    # Per step: constant, or inverse_decay: lr * (1 + 10 p) ** -0.75, p = step / total steps.
    lr_schedule: Literal["constant", "inverse_decay"] = "inverse_decay"
    # method auto: the adaptation methods searched beside source_only, each with its knob's grid
    # (xfer/head_search.py); the feature-aligning ones need a hidden layer (kind mlp or bottleneck).
    search_methods: list[AdaptationMethod] = ["self_training", "mcc"]
    # method auto: worker processes training candidates side by side; null = one per CPU core.
    # Each trains on one thread, so the pick and its weights do not depend on this number.
    search_processes: int | None = Field(None, ge=1, le=256)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # The source-only head's own label smoothing (head.method source_only, and auto's source_only
    # candidate); null = label_smoothing. Source-only fits the source loss alone and overfits it
    # (benchmarks/source_only.py); an adapted head's target term already regularises it, and
    # smoothing it too costs it (benchmarks/results/selection_label_smoothing.md).
    source_only_label_smoothing: float | None = Field(0.1, ge=0, lt=1)
    # Weight the loss by inverse class frequency, for imbalanced source data.
    class_balanced: bool = False
    # Which source rows an epoch draws (xfer/samplers/): each once (uniform), or by class, with replacement.
    sampler: Sampler = "uniform"
    # Weight each source row's loss by its density ratio p_target(x) / p_source(x) (xfer/importance.py).
    importance_weighting: bool = False
    importance_max_weight: float = IMPORTANCE_MAX_WEIGHT
    # Model selection: a validator (label-free), last, or target_val (uses target labels: an oracle, reported as such).
    selection: Selection = "soft_info_max"
    # Stop after this many epochs without a better selection score; null = run every epoch.
    patience: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _aligning_needs_hidden_layer(self) -> "HeadConfig":
        if self.method in FEATURE_ALIGNING_METHODS and self.kind == "linear":
            raise ValueError(
                f"method {self.method!r} aligns the head's hidden features, which a linear head lacks; "
                f"set head.kind: mlp or bottleneck, or choose a method that works on a linear head: source_only, mcc, self_training"
            )
        if self.method == "auto" and self.kind == "linear" and (aligning := [m for m in self.search_methods if m in FEATURE_ALIGNING_METHODS]):
            raise ValueError(f"head.search_methods {aligning} align the head's hidden features, which a linear head lacks; set head.kind: mlp or bottleneck")
        if self.method == "auto" and self.selection == "last":
            raise ValueError("head.method auto ranks candidates with head.selection; 'last' ranks nothing: choose a validator (e.g. info_max)")
        if "source_only" in self.search_methods:
            raise ValueError("head.search_methods lists the adaptation methods; source_only is always a candidate, leave it out")
        if self.domain_norm and self.feature_norm == "joint":
            raise ValueError(
                "head.domain_norm standardises each domain with its own statistics and head.feature_norm 'joint' both domains with shared ones; "
                "choose one: set domain_norm: false or feature_norm: none"
            )
        if self.selection == "ensv" and self.patience is not None:
            raise ValueError("head.selection 'ensv' scores an epoch against every epoch, so it cannot stop early; set head.patience: null")
        return self

    @property
    def uses_target_labels(self) -> bool:
        return self.selection == "target_val"

    @property
    def effective_label_smoothing(self) -> float:
        """The label smoothing this head trains with: source-only may have its own."""
        if self.method == "source_only" and self.source_only_label_smoothing is not None:
            return self.source_only_label_smoothing
        return self.label_smoothing


class AugmentConfig(_Strict):
    """Random augmentations of fine-tuning train images (never val or test); all off = none."""

    # Random resized crop keeping at least this fraction of the area; null = off.
    crop_scale: float | None = Field(0.7, gt=0, le=1)
    flip: bool = False  # horizontal, with probability 0.5 (off for digits and text)
    rotation_deg: float = Field(10.0, ge=0, le=180)  # uniform in [-deg, deg]
    color_jitter: float = Field(0.0, ge=0, le=1)  # brightness, contrast and saturation strength
    # Fourier domain adaptation (xfer/data/augment.py): each source train image takes the low-frequency
    # amplitude of a random unlabelled target image, the window a beta fraction of the image's side; null = off.
    fda: float | None = Field(None, gt=0, le=0.5)


class FinetuneConfig(_Strict):
    # Which backbone weights train (xfer/strategies.py): head_only | partial (the first
    # `frozen_blocks` block groups frozen) | full (fresh classifier) | lp_ft (classifier from
    # the linear probe, then everything) | gradual (block groups unfrozen top-down).
    strategy: Literal["head_only", "partial", "full", "lp_ft", "gradual"] = "lp_ft"
    frozen_blocks: int = Field(0, ge=0, le=1000)
    # gradual: epochs between unfreezing one more block group (epoch 1 trains the head only).
    unfreeze_every: int = Field(1, ge=1, le=1000)
    # Layer-wise learning-rate decay: block group i of n trains at lr * layer_decay ** (n - i).
    layer_decay: float = Field(1.0, gt=0, le=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    # Linear warmup from 0, in epochs (may be fractional).
    warmup_epochs: float = Field(0.5, ge=0, le=1000)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Which source images an epoch draws (xfer/samplers/); not uniform: one process only (devices 1).
    sampler: Sampler = "uniform"
    # Draw each source image in proportion to its density ratio on the cached features (xfer/importance.py),
    # times the sampler's own chance; one process only, like a sampler.
    importance_weighting: bool = False
    importance_max_weight: float = IMPORTANCE_MAX_WEIGHT
    # Exponential moving average of the weights (evaluated and kept instead of the raw ones); null = off.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Stop after this many epochs without a better selection score; null = run every epoch.
    patience: int | None = Field(None, ge=1)
    # Which epoch is kept (epoch 0 = the start): the last, the best by a validator (label-free;
    # not ensv, which would hold every epoch's weights), by source val, or the oracle target_val.
    selection: Literal["source_val", "entropy", "info_max", "soft_info_max", "bnm", "snd", "dev", "class_ami", "last", "target_val"] = "last"
    # Each epoch, every validator scores the model on at most this many unlabelled target rows
    # (a seeded sample, the same each epoch): a prediction pass over them per epoch.
    validator_rows: int = Field(512, ge=10, le=1_000_000)
    # torch.use_deterministic_algorithms: bit-exact reruns and resumes, at some speed.
    deterministic: bool = False
    augment: AugmentConfig = AugmentConfig()
    # Which source train images fine-tuning sees: as fetched, the translate stage's target-styled
    # copies (translate.enabled), or both (every source row twice, once each way).
    source_images: Literal["original", "translated", "both"] = "original"
    # Cross-validate this recipe in the evaluate stage: evaluate.cv_folds full fine-tuning runs
    # (xfer/finetune_cv.py). Only evaluate reads it: switching it reruns evaluate alone.
    cv: bool = False
    # Adaptation while fine-tuning: the losses of xfer/adapt/ on the backbone's pooled
    # features, with labelled source batches and unlabelled target batches together.
    # auto: the head stage's kept method and knob (models/head_pick.json).
    method: AdaptationMethod | Literal["auto"] = "auto"
    adapt_weight: float = Field(3.0, ge=0, le=100)
    pseudo_labels: Literal["centroid", "confidence"] = "centroid"  # self_training
    pseudo_threshold: float = Field(0.9, gt=0, lt=1)  # self_training
    mcc_temperature: float = Field(2.5, gt=0, le=100)  # mcc
    epochs: int = Field(8, ge=0, le=1000)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(3e-4, gt=0, le=10)
    # The head's learning rate relative to the backbone's.
    head_lr_scale: float = Field(1.0, gt=0, le=100)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    # Normalise with the pretrained running statistics instead of each batch's.
    freeze_bn: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Processes training data-parallel (torchrun): one per GPU, or CPU processes (gloo).
    devices: int = Field(1, ge=1, le=64)
    # Mixed precision on CUDA: bf16 autocast where the GPU has it, else fp16 with a gradient scaler.
    amp: bool = True
    # DataLoader processes decoding (and augmenting) training images; 0 = in the training process.
    num_workers: int = Field(0, ge=0, le=64)
    # channels_last memory format: faster convolutions on tensor-core GPUs.
    channels_last: bool = False
    # torch.compile the network for training steps (first steps slower while it compiles).
    compile: bool = False
    # Each labelled target row (the split's target budget) is seen this many times per
    # epoch: a few labels per class would otherwise be a few percent of the batches.
    labeled_target_repeats: int = Field(1, ge=1, le=1000)
    # Cap on optimiser steps per epoch; null means the whole source train split.
    max_steps_per_epoch: int | None = Field(None, ge=1)
    # The linear probe that starts the classifier (LP-FT), trained on cached source features.
    probe_epochs: int = Field(60, ge=1, le=10000)
    probe_lr: float = Field(3e-3, gt=0, le=10)

    @model_validator(mode="after")
    def _strategy_knobs(self) -> "FinetuneConfig":
        if self.strategy == "partial" and self.frozen_blocks < 1:
            raise ValueError("strategy 'partial' freezes the first frozen_blocks block groups: set frozen_blocks >= 1")
        if self.method in FEATURE_ALIGNING_METHODS and self.strategy == "head_only":
            raise ValueError(f"method {self.method!r} aligns backbone features, which strategy 'head_only' freezes; choose another strategy or method")
        if self.strategy != "partial" and self.frozen_blocks:
            raise ValueError(f"frozen_blocks is {self.frozen_blocks} but only strategy 'partial' uses it (strategy is {self.strategy!r})")
        if self.sampler != "uniform" and self.devices > 1:
            # Data-parallel ranks shard a permutation (DistributedSampler); weighted draws are not sharded.
            raise ValueError(f"sampler {self.sampler!r} runs in one process: set devices 1, or sampler 'uniform' with devices {self.devices}")
        if self.cv and self.source_images != "original":
            # A fold's source train rows include source val rows, which have no translation.
            raise ValueError(f"cv cross-validates with the source images as fetched: set source_images 'original' (now {self.source_images!r}), or cv false")
        if self.importance_weighting and self.source_images != "original":
            # The weights come from the features of the images as fetched, not of their translations.
            raise ValueError(f"importance_weighting weighs the original source images: set source_images 'original' (now {self.source_images!r})")
        if self.importance_weighting and self.devices > 1:
            raise ValueError(
                f"importance_weighting draws weighted rows in one process: set devices 1, or importance_weighting false with devices {self.devices}"
            )
        return self


class TranslateConfig(_Strict):
    """The translate stage (xfer/translate.py): a CycleGAN-style source -> target image translator."""

    enabled: bool = False
    image_size: int = Field(32, ge=8, le=512)  # images are translated at this square size
    channels: int = Field(32, ge=1, le=512)  # the generators' first layer width (doubled once by the downsampling)
    residual_blocks: int = Field(3, ge=0, le=32)
    epochs: int = Field(10, ge=1, le=10000)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(2e-4, gt=0, le=1)
    cycle_weight: float = Field(10.0, ge=0, le=1000)
    identity_weight: float = Field(5.0, ge=0, le=1000)  # half the cycle weight, as in the CycleGAN paper
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("image_size")
    @classmethod
    def _halves_twice(cls, size: int) -> int:
        if size % 4:
            raise ValueError(f"{size} px: use a multiple of 4 (the generator halves the image twice and doubles it back)")
        return size


# evaluate.cv_folds: fold i's head reads its epoch on fold i + 1, so a fold is held out, one chooses
# the epoch and at least one trains (xfer/cross_validation.py).
MIN_CV_FOLDS = 3


class EvaluateConfig(_Strict):
    batch_size: int = Field(256, ge=1, le=4096)
    # Stratified k-fold cross-validation of the head on cached features (xfer/cross_validation.py); 0 = off.
    cv_folds: int = Field(0, ge=0)

    @field_validator("cv_folds")
    @classmethod
    def _folds(cls, k: int) -> int:
        if 0 < k < MIN_CV_FOLDS:
            raise ValueError(f"{k} folds: use 0 (off) or at least {MIN_CV_FOLDS} (a fold held out, one to choose the epoch on, the rest to train)")
        return k


class MlflowConfig(_Strict):
    experiment: str = Field("xfer", min_length=1)


class RegistryConfig(_Strict):
    """What evaluate registers in the MLflow model registry, and when it becomes @champion."""

    enabled: bool = True
    # Registered model name: `models:/<name>@champion`.
    name: str = Field("xfer", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # The evaluated model that is registered: the head on frozen features, the
    # fine-tuned network, or their fusion (mean of the two's probabilities).
    model: Literal["head", "finetune", "fusion"] = "fusion"
    # Promotion compares this figure of the registered model; higher wins, ties keep the champion.
    # A classification metric on target val reads its labels; a validator reads no target label
    # (the target val images, their labels unread, and source val). Either kind is named in the
    # evaluate run and its report.
    metric: str = "accuracy"

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric == "ensv":
            raise ValueError(
                "ensv ranks the candidates of one run against their own mean and gives no figure a later run can be compared with; "
                f"name another validator ({', '.join(PROMOTION_VALIDATORS)})"
            )
        if metric not in PROMOTION_METRICS + PROMOTION_VALIDATORS:
            raise ValueError(
                f"unknown registry.metric {metric!r}: a target val metric ({', '.join(PROMOTION_METRICS)}, reads target labels) "
                f"or a validator ({', '.join(PROMOTION_VALIDATORS)}, reads none)"
            )
        return metric


class MonitorConfig(_Strict):
    """Drift in a served model's new images (`xfer monitor`, xfer/monitor.py)."""

    # Significance of the drift verdict; each of the three tests (xfer/drift/) is held to alpha / 3.
    alpha: float = Field(0.05, gt=0, lt=1)
    # Retraining is wanted when drift is significant and the estimated accuracy is below target val's
    # by more than this; null: when drift is significant, whatever the estimate.
    max_drop: float | None = Field(0.1, ge=0, le=1)
    # Target val images evaluate keeps as the registered model's reference window (seeded sample; their labels unread).
    reference_rows: int = Field(500, ge=5, le=100_000)
    # The per-image out-of-distribution flag (xfer predict, the served model; xfer/drift/ood.py): the
    # quantile of the reference window's own scores above which an image is flagged (about 1 - this of
    # new in-domain images are). Calibrated when evaluate registers the model.
    ood_quantile: float = Field(0.95, ge=0.5, lt=1)
    # The monitor flow: new images in the incoming folder it waits for before it tests them.
    min_images: int = Field(30, ge=5, le=1_000_000)
    # At most one triggered retrain per this many hours (the images of a wanted retrain
    # inside it are reported, not added to data.split.target_pool).
    cooldown_hours: float = Field(24.0, ge=0, le=24 * 365)
    # The deployment a wanted retrain runs: "<flow name>/<deployment name>" (prefect.yaml's).
    retrain_deployment: str = Field("xfer-retrain/weekly", pattern=r"^[^/\s]+/[^/\s]+$")


class Params(_Strict):
    seed: int = Field(0, ge=0, le=2**31 - 1)
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    features: FeaturesConfig = FeaturesConfig()
    head: HeadConfig = HeadConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    registry: RegistryConfig = RegistryConfig()
    fusion: FusionConfig = FusionConfig()
    rank: RankConfig = RankConfig()
    translate: TranslateConfig = TranslateConfig()
    monitor: MonitorConfig = MonitorConfig()

    @model_validator(mode="after")
    def _finetune_cv_has_folds(self) -> "Params":
        if self.finetune.cv and not self.evaluate.cv_folds:
            raise ValueError(f"finetune.cv runs one fine-tuning per fold of evaluate.cv_folds, which is 0 (off): set evaluate.cv_folds >= {MIN_CV_FOLDS}")
        return self

    @model_validator(mode="after")
    def _translated_images_exist(self) -> "Params":
        if self.finetune.source_images != "original" and not self.translate.enabled:
            raise ValueError(
                f"finetune.source_images {self.finetune.source_images!r} reads the translate stage's images: "
                "set translate.enabled true (then regenerate dvc.yaml: python -m xfer.contract --write), or source_images 'original'"
            )
        return self

    @model_validator(mode="after")
    def _fusion_differs_from_backbone(self) -> "Params":
        if any(member_name(b) == member_name(self.backbone) for b in self.fusion.backbones):
            raise ValueError(
                f"fusion.backbones repeats the main backbone ({self.backbone.name} at {self.backbone.image_size} px), which is already in the fusion"
            )
        return self


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: {err.error_count()} invalid value(s):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            lines.append(f"  {path}: unknown key; allowed here: {', '.join(allowed)}")
            continue
        got = e.get("input")
        # A check across sections (loc is the root) names its values itself: not the whole file.
        # Any URL in the value is shown redacted: an error message must not print a token.
        lines.append(redact(f"  {path}: {e['msg']}" + (f" (got {got!r})" if e["loc"] else "")))
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def parse_params(raw: Any, source: str = "params") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(redact(f"{path}: not valid YAML: {err}")) from None
    return parse_params(raw, str(path))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the shape MLflow params want."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m xfer.config [params.yaml]`: validate, print the problem, exit 2 if invalid."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "params.yaml"
    try:
        load_params(path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path}: valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
