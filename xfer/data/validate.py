"""Every image decoded and hashed once, at fetch: the catalog and the validation report.

The catalog (`images.csv`: path, domain, class_name, sha256) is what the
split stage reads, so images are never decoded twice. The report counts
images per domain and class, and lists what was left out (corrupt images,
non-image files, empty class folders) and exact duplicates.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from xfer.data.formats import check_pixels

CATALOG = "images.csv"
CATALOG_COLUMNS = ["path", "domain", "class_name", "sha256"]
# Lists in the report stop here; the counts beside them are always complete.
MAX_LISTED = 50


class ValidationError(ValueError):
    """Too many unreadable images."""


def inspect_image(path: Path) -> tuple[str, str | None]:
    """(sha256 of the file, None) if it decodes fully, else (sha256, why not).

    An image with more pixels than data.max_image_pixels (set_max_image_pixels)
    is a decompression bomb: unreadable, like a corrupt one, and never decoded.
    """
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_pixels(img)
            img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return digest, f"{type(err).__name__}: {err}"
    return digest, None


def inspect_images(paths: list[Path], progress: bool = True) -> list[tuple[str, str | None]]:
    """inspect_image over many files; PIL decodes outside the GIL, so threads help."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(inspect_image, paths, chunksize=64), total=len(paths), desc="checking images", unit="img", disable=not progress))


def _listed(items: list) -> list:
    return items[:MAX_LISTED]


def duplicate_groups(catalog: pd.DataFrame) -> dict:
    """Files with equal content: within one domain, and across domains."""
    within, across = [], []
    for digest, group in catalog.groupby("sha256", sort=True):
        if len(group) < 2:
            continue
        entry = {"sha256": digest, "paths": group.path.tolist()}
        if group.class_name.nunique() > 1:
            entry["classes"] = sorted(group.class_name.unique())
        (within if group.domain.nunique() == 1 else across).append(entry)
    return {
        "within_domain": {"groups": len(within), "extra_files": sum(len(g["paths"]) - 1 for g in within), "examples": _listed(within)},
        "across_domains": {"groups": len(across), "examples": _listed(across)},
    }


def validation_report(
    catalog: pd.DataFrame,
    corrupt: dict[str, list[tuple[str, str]]],
    other_files: dict[str, list[str]],
    empty_folders: dict[str, list[str]],
    special_files: dict[str, list[tuple[str, str]]] | None = None,
) -> dict:
    """The report fetch writes beside the images (and logs to MLflow)."""
    domains = {}
    special_files = special_files or {}
    for domain in sorted(set(catalog.domain) | set(corrupt)):
        rows = catalog[catalog.domain == domain]
        bad = corrupt.get(domain, [])
        special = special_files.get(domain, [])
        seen = len(rows) + len(bad)
        domains[domain] = {
            "images": len(rows),
            "per_class": {str(k): int(v) for k, v in rows.groupby("class_name").size().items()},
            "corrupt": len(bad),
            "corrupt_fraction": round(len(bad) / seen, 6) if seen else 0.0,
            "corrupt_files": [{"path": p, "error": e} for p, e in _listed(bad)],
            "non_image_files": len(other_files.get(domain, [])),
            "non_image_examples": _listed(other_files.get(domain, [])),
            "empty_class_folders": empty_folders.get(domain, []),
            # FIFOs, sockets, devices and dangling links: skipped without being opened.
            "special_files": len(special),
            "special_examples": [{"path": p, "kind": k} for p, k in _listed(special)],
        }
    return {
        "images": len(catalog),
        "classes": sorted(catalog.class_name.unique().tolist()),
        "domains": domains,
        "duplicates": duplicate_groups(catalog),
    }


def check_corrupt_fraction(report: dict, limit: float) -> None:
    over = {d: v for d, v in report["domains"].items() if v["corrupt_fraction"] > limit}
    if over:
        detail = ", ".join(f"{d}: {v['corrupt']} of {v['corrupt'] + v['images']} ({v['corrupt_fraction']:.1%})" for d, v in over.items())
        examples = [f["path"] for v in over.values() for f in v["corrupt_files"]][:5]
        raise ValidationError(
            f"too many unreadable images ({detail}; data.max_corrupt_fraction is {limit:.1%}), e.g. {examples}. "
            f"Repair or remove them, or raise data.max_corrupt_fraction to leave them out"
        )


def read_catalog(dataset_dir: Path) -> pd.DataFrame:
    path = Path(dataset_dir) / CATALOG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the fetch stage first")
    return pd.read_csv(path, dtype={"class_name": str, "domain": str, "sha256": str, "path": str}, keep_default_na=False)
