"""The translate stage's work (optional: on when translate.enabled): a target-styled copy of the source train images.

The translator (xfer/translate.py) trains on the source train images and the
unlabelled target images; its source -> target generator then writes a copy
of every source train image, labels unchanged, which fine-tuning reads with
`finetune.source_images: translated | both`.

Cached by content, like the features: an entry `data/translate-cache/<key>/`
(not a DVC output) where the key hashes the rows it learns from and writes
(path, label and content hash of each), the translate section (not
`enabled`, nor `device` but the kind of device it resolves to: GPU and CPU
kernels give other numbers), the seed and ENTRY_FORMAT. An entry holds

    images/<label>/<sha256>.png   one per source train row (named by content: the split keeps each content once)
    index.csv                     path (relative to the entry), label, source_path (the manifest's)
    generator.pt                  the source -> target generator's weights (a state dict)
    history.json                  each epoch's mean losses
    meta.json                     the key, the translate section, the seed, the device, the counts

and is swapped in whole, so an entry that exists is complete. The stage's
output `data/translated/` is the current entry's files, hard-linked (or
copied across filesystems) and swapped in whole, so dvc.lock hashes only what
fine-tuning reads; a key computed before is published without training.

Training saves its whole state to checkpoints/translate/ after every epoch:
a killed run resumes at its last finished epoch (the same key), and the
checkpoint goes only once the entry is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xfer.checkpoints import remove_checkpoint
from xfer.config import Params, TranslateConfig
from xfer.data.split import read_manifest, rows
from xfer.io import atomic_dir, link_or_copy, remove_leftovers, save_torch, sha256_json, write_json, write_text
from xfer.layout import Layout
from xfer.plots import save_figure, save_learning_curves, translation_grid_figure
from xfer.translate import LOSSES, load_images, to_uint8, train_translator, write_translated

log = logging.getLogger(__name__)

# Bumped when an entry's files change meaning: an older entry is then never taken for a new one.
ENTRY_FORMAT = 1
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
HISTORY_FILE = "history.json"
GENERATOR_FILE = "generator.pt"
GRID_FILE = "grid.png"
# Columns of index.csv.
INDEX_COLUMNS = ["path", "label", "source_path"]
# Images per domain in the grid figure.
GRID_IMAGES = 8


@dataclass
class TranslateResult:
    key: str
    cache_hit: bool
    summary: dict
    history: list[dict[str, float]]
    grid: Path
    curves: Path
    seconds: float


def stage_paths(layout: Layout) -> dict[str, Path]:
    """translate_stage's paths in a project: those xfer/contract.py names for the stage, and its cache and checkpoints."""
    return {
        "manifest_path": layout.manifest,
        "images_root": layout.root,
        "cache_root": layout.translate_cache,
        "out_dir": layout.translated,
        "plot_dir": layout.stage_plots("translate"),
        "metrics_path": layout.metrics("translate"),
        "checkpoints": layout.checkpoints / "translate",
    }


def translate_device(setting: str) -> torch.device:
    """What translate.device means on this machine (auto: the GPU when there is one)."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("translate.device: 'cuda' was asked for but no CUDA device is available here; use 'auto' or 'cpu'")
    return torch.device("cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu")


def check_params(params: Params, root: Path) -> None:
    """Before any work: translate.device names a device this machine has."""
    translate_device(params.translate.device)


def training_rows(manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(source train rows, unlabelled target rows); a ValueError naming the counts if either is empty."""
    source, target = rows(manifest, "source", "train"), rows(manifest, "target", "unlabeled")
    if len(source) == 0 or len(target) == 0:
        raise ValueError(
            f"the translate stage learns from source train and unlabelled target images; the manifest has {len(source)} and {len(target)}: "
            "set translate.enabled false, or give the split unlabelled target images (data.split)"
        )
    return source, target


def cache_key(source: pd.DataFrame, target: pd.DataFrame, cfg: TranslateConfig, seed: int, device: torch.device) -> str:
    return sha256_json(
        {
            "source": source[["path", "label", "sha256"]].astype(str).values.tolist(),
            "target": target[["path", "sha256"]].astype(str).values.tolist(),
            "translate": cfg.model_dump(mode="json", exclude={"enabled", "device"}),
            "seed": seed,
            "device": device.type,
            "format": ENTRY_FORMAT,
        }
    )


def image_name(row) -> str:
    """A translated image's path in an entry: by label and content (the split keeps each content once)."""
    return f"images/{int(row.label)}/{row.sha256}.png"


def write_entry(entry: Path, generator, images_root: Path, source: pd.DataFrame, meta: dict, history: list[dict], progress: bool) -> None:
    """Translate every source train row and write the whole entry, swapped in at once."""
    names = [image_name(row) for row in source.itertuples()]
    with atomic_dir(entry) as tmp:
        write_translated(generator, images_root, source.path.tolist(), meta["translate"]["image_size"], tmp, progress=progress, names=names)
        index = pd.DataFrame({"path": names, "label": source.label.to_numpy(), "source_path": source.path.to_numpy()})
        write_text(tmp / INDEX_FILE, index.to_csv(index=False))
        save_torch(tmp / GENERATOR_FILE, {k: v.cpu() for k, v in generator.state_dict().items()})
        write_json(tmp / HISTORY_FILE, history)
        write_json(tmp / META_FILE, meta)


def publish(entry: Path, dest: Path) -> None:
    """Make `dest` the entry's files (hard links where possible), swapped in whole."""
    with atomic_dir(dest) as tmp:
        for path in sorted(entry.rglob("*")):
            if path.is_file():
                target = tmp / path.relative_to(entry)
                target.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(path, target)


def published_file(folder: Path, name: str) -> Path:
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the translate stage (translate.enabled true, then dvc repro)")
    return path


def read_index(folder: Path) -> pd.DataFrame:
    path = published_file(folder, INDEX_FILE)
    return pd.read_csv(path, dtype={"path": str, "source_path": str, "label": np.int64}, keep_default_na=False)


def published_key(folder: Path) -> str:
    """The key of the translation published in `folder`: it names the images' content."""
    return json.loads(published_file(folder, META_FILE).read_text())["key"]


def translated_rows(layout: Layout, source_train: pd.DataFrame) -> pd.DataFrame:
    """The translated copies of `source_train` (the manifest's source train rows), in its order:
    path (relative to the project root, as the manifest's) and label. A ValueError when the
    published translation was made from other rows (rerun the translate stage)."""
    index = read_index(layout.translated)
    if index.source_path.tolist() != source_train.path.tolist() or index.label.tolist() != source_train.label.tolist():
        raise ValueError(
            f"{layout.translated} translates other source train rows than {layout.manifest} lists: rerun the translate stage (dvc repro translate)"
        )
    prefix = layout.translated.relative_to(layout.root).as_posix()
    return pd.DataFrame({"path": [f"{prefix}/{p}" for p in index.path], "label": index.label.to_numpy()})


def save_grid(path: Path, images_root: Path, entry: Path, source: pd.DataFrame, target: pd.DataFrame, size: int, seed: int) -> Path:
    """The grid figure at `path`: seeded source train images, their translations (as written), target images."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.permutation(len(source))[:GRID_IMAGES])
    others = np.sort(rng.permutation(len(target))[: len(picked)])
    translated = [image_name(row) for row in source.iloc[picked].itertuples()]
    figure = translation_grid_figure(
        to_uint8(load_images(images_root, source.path.iloc[picked].tolist(), size)),
        to_uint8(load_images(entry, translated, size)),
        to_uint8(load_images(images_root, target.path.iloc[others].tolist(), size)),
        "translate: source train images, their translations, unlabelled target images",
    )
    return save_figure(path, figure)


def translate_stage(
    *,
    manifest_path: Path,
    images_root: Path,
    cache_root: Path,
    out_dir: Path,
    plot_dir: Path,
    metrics_path: Path,
    checkpoints: Path,
    params: Params,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TranslateResult:
    """The translate stage's work: train (or take from cache_root) the translator, publish out_dir,
    write plot_dir's figures and metrics_path. Training checkpoints to `checkpoints` after every epoch.

    `on_epoch` gets every epoch's losses once: the new ones as they finish, then
    (resumed or cached) the earlier ones from the history.
    """
    cfg = params.translate
    device = translate_device(cfg.device)
    source, target = training_rows(read_manifest(manifest_path))
    key = cache_key(source, target, cfg, params.seed, device)
    entry = Path(cache_root) / key
    started = time.perf_counter()
    seen: list[int] = []
    cache_hit = (entry / META_FILE).is_file()
    if not cache_hit:
        # What a run killed while writing this entry left beside it (the project lock: no other writer).
        for leftover in remove_leftovers([entry]):
            log.warning("translate %s: removed %s, left by a write that was killed", key, leftover)
        size = cfg.image_size
        source_images = load_images(images_root, source.path.tolist(), size, progress=progress)
        target_images = load_images(images_root, target.path.tolist(), size, progress=progress)

        def epoch_done(epoch: int, record: dict[str, float]) -> None:
            seen.append(epoch)
            if on_epoch is not None:
                on_epoch(epoch, record)

        model = train_translator(cfg, source_images, target_images, params.seed, checkpoints, key, on_epoch=epoch_done, progress=progress, device=device)
        meta = {
            "key": key,
            "translate": cfg.model_dump(mode="json", exclude={"enabled"}),
            "seed": params.seed,
            "device": device.type,
            "source_images": len(source),
            "target_images": len(target),
            "format": ENTRY_FORMAT,
        }
        write_entry(entry, model.source_to_target, images_root, source, meta, model.history, progress)
        remove_checkpoint(checkpoints)
    history = json.loads((entry / HISTORY_FILE).read_text())
    if on_epoch is not None:
        for record in history:
            if record["epoch"] not in seen:
                on_epoch(record["epoch"], record)
    publish(entry, out_dir)
    grid = save_grid(plot_dir / GRID_FILE, images_root, entry, source, target, cfg.image_size, params.seed)
    losses = [{k: v for k, v in record.items() if k != "epoch"} for record in history]
    _, curves = save_learning_curves(plot_dir, losses, first_epoch=1, title="translate: mean losses per epoch")
    summary = {
        "key": key,
        "cache_hit": cache_hit,
        # Epochs this run did not train: a resumed run's finished ones, or all of a cached entry's.
        "epochs_reused": len(history) - len(seen),
        "epochs": len(history),
        "source_images": len(source),
        "target_images": len(target),
        "device": device.type,
        "final": {name: history[-1][name] for name in LOSSES},
    }
    write_json(metrics_path, summary)
    return TranslateResult(key, cache_hit, summary, history, grid, curves, time.perf_counter() - started)
