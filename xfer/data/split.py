"""ImageFolder domains -> one manifest with a stratified, seeded split.

The manifest is the contract every later stage reads. Columns:
path, label, class_name, domain, role (source/target), split, sha256.
Source rows are split train/val/test. Target rows are split
train/unlabeled/val/test: `train` is the labelled target budget
(semi-supervised; empty by default), `unlabeled` rows may be used for
adaptation without their labels, and target `test` is never used for
training or selection, not even as a content duplicate.

The labelled target budget is either drawn per class (`target_labeled`,
`target_shots`) or read from a CSV a person filled in (`target_labels`: path,
label; `xfer suggest-labels` writes one). Those rows must come from the
unlabeled pool: target val and test are drawn exactly as without the file, so
figures with and without it are measured on the same images, and a listed
row of val or test is refused (moving it out would change the evaluation set).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from xfer.config import DataConfig, SplitConfig
from xfer.data.formats import IMAGE_SUFFIXES
from xfer.data.validate import inspect_images, read_catalog
from xfer.io import sha256_file

MANIFEST_COLUMNS = ["path", "label", "class_name", "domain", "role", "split", "sha256"]
SOURCE_SPLITS = ("train", "val", "test")
TARGET_SPLITS = ("train", "unlabeled", "val", "test")


class SplitError(ValueError):
    """The raw data cannot be split as asked."""


# Where a content duplicate may stay: the first group listed keeps it, later ones drop it.
# Target test comes last, so no test image is ever also seen in training or selection.
SPLIT_PRECEDENCE = [
    ("source", "train"),
    ("target", "train"),
    ("target", "unlabeled"),
    ("source", "val"),
    ("target", "val"),
    ("source", "test"),
    ("target", "test"),
]


def _domain_rng(seed: int, role: str, position: int) -> np.random.Generator:
    """One generator per domain, so equal-sized domains don't get mirrored splits."""
    salt = {"source": 0, "target": 1}[role]
    if position == 0:
        return np.random.default_rng(seed * 2 + salt)
    return np.random.default_rng([seed, salt, position])


def _count(n: int, fraction: float) -> int:
    return max(1, round(n * fraction)) if fraction > 0 else 0


def assign_splits(labels: np.ndarray, role: str, cfg: SplitConfig, rng: np.random.Generator, domain: str, class_names: list[str]) -> np.ndarray:
    """Per class: shuffle, then test, then val, then (target) the labelled budget; the rest trains."""
    out = np.empty(len(labels), dtype=object)
    val_frac, test_frac = (cfg.source_val, cfg.source_test) if role == "source" else (cfg.target_val, cfg.target_test)
    rest_name = "train" if role == "source" else "unlabeled"
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n = len(idx)
        n_test, n_val = _count(n, test_frac), _count(n, val_frac)
        n_labeled = 0
        if role == "target":
            n_labeled = cfg.target_shots if cfg.target_shots is not None else _count(n, cfg.target_labeled)
        left = n - n_test - n_val - n_labeled
        if role == "source" and left < 1 or left < 0:
            need = n_test + n_val + n_labeled + (role == "source")
            raise SplitError(
                f"class {class_names[label]!r} of {role} domain {domain!r} has {n} images, too few for "
                f"{n_test} test + {n_val} val" + (f" + {n_labeled} labelled" if n_labeled else "") + f" (+ train): needs {need}"
            )
        out[idx[:n_test]] = "test"
        out[idx[n_test : n_test + n_val]] = "val"
        out[idx[n_test + n_val : n_test + n_val + n_labeled]] = "train"
        out[idx[n_test + n_val + n_labeled :]] = rest_name
    return out


# What a filled label file must hold; other columns (suggested_rank, predicted) are ignored.
TARGET_LABEL_COLUMNS = ("path", "label")


def labels_path(value: str, root: Path) -> Path:
    """data.split.target_labels, relative to the project root unless absolute."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


def _listed(values, limit: int = 5) -> str:
    values = list(values)
    return ", ".join(map(repr, values[:limit])) + (f" and {len(values) - limit} more" if len(values) > limit else "")


def read_target_labels(path: Path) -> pd.DataFrame:
    """The filled label file: one row per image, columns path and label (a class name), neither empty nor repeated."""
    where = f"data.split.target_labels: {path}"
    if not path.is_file():
        raise SplitError(f"{where} not found (write one with `xfer suggest-labels N` and fill in its label column)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)  # pandas drops a spreadsheet's byte-order mark
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SplitError(f"{where} is not a readable CSV: {err}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in TARGET_LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise SplitError(f"{where} lacks column(s) {missing}; it needs {list(TARGET_LABEL_COLUMNS)} (has {list(df.columns)})")
    df = df[list(TARGET_LABEL_COLUMNS)].apply(lambda col: col.str.strip())
    if df.empty:
        raise SplitError(f"{where} has no rows")
    for column in TARGET_LABEL_COLUMNS:
        empty = df.index[df[column] == ""]
        if len(empty):
            lines = [i + 2 for i in empty]  # line 1 is the header
            raise SplitError(f"{where}: empty {column} on line(s) {_listed(lines)}: give every listed image a class name, or remove its line")
    repeated = df.path[df.path.duplicated()].unique()
    if len(repeated):
        raise SplitError(f"{where}: path(s) listed more than once: {_listed(repeated)}")
    return df.reset_index(drop=True)


def check_target_labels(labels: pd.DataFrame, target: pd.DataFrame, others: pd.DataFrame, names: list[str], path: Path) -> None:
    """Every listed path is an image of the target domain, every label a class of the dataset."""
    where = f"data.split.target_labels: {path}"
    unknown = labels.path[~labels.path.isin(target.path)]
    if len(unknown):
        elsewhere = unknown[unknown.isin(others.path)]
        hint = f" ({_listed(elsewhere)} {'is' if len(elsewhere) == 1 else 'are'} of a source domain)" if len(elsewhere) else ""
        example = target.path.iloc[0] if len(target) else "?"
        raise SplitError(
            f"{where}: {len(unknown)} path(s) not a target image of the dataset: {_listed(unknown)}{hint}; paths are as in the manifest, e.g. {example!r}"
        )
    bad = labels.label[~labels.label.isin(names)].unique()
    if len(bad):
        raise SplitError(f"{where}: unknown class name(s) {_listed(bad)}; the classes are {names}")


def apply_target_labels(target: pd.DataFrame, labels: pd.DataFrame, label_of: dict[str, int], path: Path) -> pd.DataFrame:
    """The listed rows of the unlabeled pool become the labelled target budget (split train), with the given labels."""
    split_of = dict(zip(target.path, target.split))
    held_out = [(p, split_of[p]) for p in labels.path if split_of[p] != "unlabeled"]
    if held_out:
        where = ", ".join(f"{p!r} (target {s})" for p, s in held_out[:5]) + (f" and {len(held_out) - 5} more" if len(held_out) > 5 else "")
        raise SplitError(
            f"data.split.target_labels: {path}: {len(held_out)} listed image(s) are held out for evaluation: {where}; "
            "labelled rows must come from the unlabeled pool (`xfer suggest-labels` only suggests those): remove them"
        )
    given = dict(zip(labels.path, labels.label))
    listed = target.path.isin(given).to_numpy()
    target = target.copy()
    target.loc[listed, "class_name"] = target.path[listed].map(given)
    target.loc[listed, "label"] = target.class_name[listed].map(label_of).astype(int)
    target.loc[listed, "split"] = "train"
    return target


def check_params(params, root: Path) -> None:
    """Before any stage: the label file data.split.target_labels names is readable and whole, the
    folder data.split.target_pool names exists inside the project, and, where the project has a
    dvc.yaml, each is one of the split stage's deps (else DVC would not rerun the split when it
    changes). The label file's paths and classes are checked by the split itself, against the
    fetched dataset."""
    labels, pool = params.data.split.target_labels, params.data.split.target_pool
    if labels is not None:
        read_target_labels(labels_path(labels, root))
    if pool is not None:
        check_pool(pool, Path(root))
    dvc_file = Path(root) / "dvc.yaml"
    if dvc_file.is_file():
        import yaml

        deps = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}).get("split", {}).get("deps", [])
        for key, value in (("target_labels", labels), ("target_pool", pool)):
            if value is not None and value not in deps:
                raise SplitError(
                    f"data.split.{key}: {value} is not a dep of the split stage in {dvc_file}, so DVC would not rerun the split "
                    "when it changes: regenerate dvc.yaml with `python -m xfer.contract --write`"
                )


# ---- the target pool: more unlabelled target images, from the monitor or a person ----


def check_pool(value: str, root: Path) -> Path:
    """data.split.target_pool: a folder inside the project, outside fetch's data/raw; its absolute path."""
    where = f"data.split.target_pool: {value}"
    path = Path(value)
    if path.is_absolute() or ".." in path.parts:
        raise SplitError(f"{where}: give a folder relative to the project root, inside it (e.g. data/pool): DVC tracks it there")
    if path.parts[:2] == ("data", "raw"):
        raise SplitError(f"{where}: data/raw is the fetch stage's output, rewritten by every fetch; use another folder, e.g. data/pool")
    folder = Path(root) / path
    if not folder.is_dir():
        raise SplitError(
            f"{where}: no such folder under {Path(root).resolve()}; create it and let DVC track it "
            f"(`mkdir -p {value} && dvc add {value}`), or set target_pool to null"
        )
    return folder


def pool_images(folder: Path) -> list[Path]:
    """The images under the pool folder, sorted; a hidden file or folder (an unfinished write) is not one."""
    found = (p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def pool_rows(value: str, root: Path, domain: str, known_sha256: set[str]) -> tuple[pd.DataFrame, dict]:
    """The pool's images as target unlabeled rows (label -1: nobody knows it), and what was read.

    An image whose content the dataset already holds is left out, so the pool never
    moves a row of the split (a copy of a target test image must stay in test)."""
    folder = check_pool(value, root)
    images = pool_images(folder)
    inspected = inspect_images(images, progress=False)
    broken = [f"{p} ({why})" for p, (_, why) in zip(images, inspected) if why is not None]
    if broken:
        raise SplitError(f"data.split.target_pool: {len(broken)} image(s) cannot be read: {_listed(broken)}; remove or replace them")
    prefix = Path(value).as_posix().rstrip("/")
    df = pd.DataFrame(
        {
            "path": [f"{prefix}/{p.relative_to(folder).as_posix()}" for p in images],
            "label": -1,
            "class_name": "",
            "domain": domain,
            "role": "target",
            "split": "unlabeled",
            "sha256": [digest for digest, _ in inspected],
        },
        columns=MANIFEST_COLUMNS,
    )
    copies = df.sha256.isin(known_sha256) | df.sha256.duplicated()
    report = {"folder": value, "images": len(df), "left_out_as_copies": int(copies.sum())}
    return df[~copies], report


def drop_duplicates(manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Keep each image content once: within a domain the first path, across splits by SPLIT_PRECEDENCE."""
    # Vectorised (no per-row Python): DomainNet-sized manifests have 600k rows.
    rank = {f"{role}/{split}": i for i, (role, split) in enumerate(SPLIT_PRECEDENCE)}
    order = (manifest.role + "/" + manifest.split).map(rank)
    ranked = manifest.assign(_rank=order).sort_values(["_rank", "path"], kind="stable")
    keep = ~ranked.duplicated("sha256", keep="first")
    dropped = ranked[~keep]
    report = {
        "dropped": int(len(dropped)),
        "dropped_by_split": {f"{r}/{s}": int(n) for (r, s), n in dropped.groupby(["role", "split"]).size().items()},
        "examples": dropped.path.head(20).tolist(),
    }
    return manifest[manifest.index.isin(ranked.index[keep])], report


def build_manifest(dataset_dir: Path, cfg: DataConfig, seed: int, root: Path = Path(".")) -> tuple[pd.DataFrame, dict]:
    """The manifest for the configured source domain(s) and target domain, and its split report.

    Reads the fetch stage's catalog (images.csv): images were decoded and hashed there.
    """
    dataset_dir = Path(dataset_dir)
    catalog = read_catalog(dataset_dir)
    known = sorted(catalog.domain.unique())
    missing = [d for d in cfg.domain_names if d not in known]
    if missing:
        raise SplitError(f"domain(s) {missing} not in {dataset_dir.name!r}; its domains are {known} (data.source_domain / data.target_domain)")
    names = sorted(catalog.class_name.unique())
    label_of = {name: i for i, name in enumerate(names)}
    prefix = dataset_dir.relative_to(root).as_posix() if dataset_dir.is_relative_to(root) else dataset_dir.as_posix()
    labels_file = None if cfg.split.target_labels is None else labels_path(cfg.split.target_labels, root)
    labels = None if labels_file is None else read_target_labels(labels_file)

    parts = []
    roles = [(d, "source", i) for i, d in enumerate(cfg.source_domains)] + [(cfg.target_domain, "target", 0)]
    for domain, role, position in roles:
        df = catalog[catalog.domain == domain].sort_values("path", ignore_index=True)
        lacking = sorted(set(names) - set(df.class_name))
        if lacking:
            raise SplitError(f"{role} domain {domain!r} has no images of classes {lacking}: refetch with data.classes.drop")
        df = df.assign(label=df.class_name.map(label_of).astype(int), role=role, path=prefix + "/" + df.path)
        df["split"] = assign_splits(df.label.to_numpy(), role, cfg.split, _domain_rng(seed, role, position), domain, names)
        parts.append(df)
    pool = None
    if cfg.split.target_pool is not None:
        known = set(catalog.sha256)
        rows_, pool = pool_rows(cfg.split.target_pool, root, cfg.target_domain, known)
        parts[-1] = pd.concat([parts[-1], rows_], ignore_index=True)
    given = None
    if labels is not None:
        target = parts[-1]
        check_target_labels(labels, target, pd.concat(parts[:-1]), names, labels_file)
        parts[-1] = apply_target_labels(target, labels, label_of, labels_file)
        folder_class = dict(zip(target.path, target.class_name))
        given = {
            "file": cfg.split.target_labels,
            "sha256": sha256_file(labels_file),
            "rows": len(labels),
            # The class folder an image sits in may be a placeholder: counted, not enforced.
            "differ_from_folder": int(sum(folder_class[p] != c for p, c in zip(labels.path, labels.label))),
        }
    manifest = pd.concat(parts, ignore_index=True)
    manifest, duplicates = drop_duplicates(manifest)
    manifest = manifest[MANIFEST_COLUMNS].reset_index(drop=True)
    if labels is not None:
        kept = rows(manifest, "target", "train").path
        lost = labels.path[~labels.path.isin(kept)]
        if len(lost):
            raise SplitError(
                f"data.split.target_labels: {labels_file}: {_listed(lost)} copy the content of another image the split keeps "
                "(in source train, or another listed row; it keeps one copy of each image): remove them"
            )
    report = split_report(manifest, duplicates, cfg, given)
    if pool is not None:  # only when set: without a pool the report stays byte for byte as before
        report["target_pool"] = pool
    return manifest, report


def split_report(manifest: pd.DataFrame, duplicates: dict, cfg: DataConfig, target_labels: dict | None = None) -> dict:
    """`target_labels`: the label file read (its path, sha256, rows), so the report changes with its content."""
    counts = manifest.groupby(["domain", "role", "split", "class_name"]).size()
    per_split: dict = {}
    for (domain, role, split, name), n in counts.items():
        per_split.setdefault(f"{role}/{split}", {}).setdefault(domain, {})[name] = int(n)
    return {
        "source_domains": list(cfg.source_domains),
        "target_domain": cfg.target_domain,
        # The label file's entry only when one is read: without it the report stays byte for byte as before.
        "target_labeled": {"fraction": cfg.split.target_labeled, "shots": cfg.split.target_shots}
        | ({} if target_labels is None else {"labels_file": target_labels}),
        "rows": {k: sum(sum(c.values()) for c in v.values()) for k, v in per_split.items()},
        "per_class": per_split,
        "duplicates_removed": duplicates,
    }


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"manifest not found: {path} (run the split stage first)")
    # Text as written: pandas would read classes named NA, None or null as missing.
    text = {c: str for c in MANIFEST_COLUMNS if c != "label"}
    df = pd.read_csv(path, dtype=text, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise SplitError(f"manifest {path} lacks columns {missing}")
    return df


def class_names(manifest: pd.DataFrame) -> list[str]:
    labelled = manifest[manifest.label.astype(int) >= 0]  # a pool image's label is -1: unknown
    pairs = labelled[["label", "class_name"]].drop_duplicates().sort_values("label")
    return pairs.class_name.tolist()


def rows(manifest: pd.DataFrame, role: str, split: str) -> pd.DataFrame:
    return manifest[(manifest.role == role) & (manifest.split == split)]
