"""Any unpacked dataset -> <domain>/<class>/<image>, with the same classes in every domain.

Archives nest their images differently (`office31/amazon/images/<class>/`,
`PACS/kfold/<domain>/<class>/`, `train/<class>/`); this module finds each
domain's folder of class folders, applies `data.classes` (rename, drop), and
refuses a dataset whose domains disagree on the classes, naming which domain
lacks which class and how to fix it.
"""

from __future__ import annotations

import difflib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from xfer.data.formats import IMAGE_SUFFIXES, regular_file_problem
from xfer.data.sources import name_problem, shown_name, slug

# Folders and files archivers leave behind; never data.
JUNK_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}


class LayoutError(ValueError):
    """The dataset's folders do not form domains of class folders, or the domains disagree."""


def visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.name not in JUNK_NAMES)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def strip_wrappers(folder: Path) -> Path:
    """Descend through folders that hold nothing but one folder (`amazon/images/`, `dataset-v2/`)."""
    while True:
        children = visible(folder)
        if len(children) == 1 and children[0].is_dir():
            folder = children[0]
        else:
            return folder


def find_domains(tree: Path, explicit: dict[str, str] | None) -> dict[str, Path]:
    """{domain: folder of class folders}, from `explicit` (paths inside `tree`) or the folder structure."""
    tree = Path(tree)
    if explicit:
        found = {}
        for domain, rel in explicit.items():
            folder = (tree / rel).resolve()
            if not folder.is_relative_to(tree.resolve()):
                raise LayoutError(f"domain {domain!r}: path {rel!r} points outside the dataset")
            if not folder.is_dir():
                listing = ", ".join(p.name for p in visible(tree)) or "nothing"
                raise LayoutError(f"domain {domain!r}: folder {rel!r} not found in the dataset (its top level holds: {listing})")
            found[domain] = folder
        return found
    root = strip_wrappers(tree)
    if not any(p.is_dir() for p in visible(root)):
        raise LayoutError(f"{root} holds no folders: expected <domain>/<class>/<image>")
    domains = {}
    for child in visible(root):
        if not child.is_dir():
            continue
        folder = strip_wrappers(child)
        if not any(p.is_dir() for p in visible(folder)):
            raise LayoutError(
                f"{child.relative_to(tree)} holds images but no class folders: expected "
                f"<domain>/<class>/<image> (a single-domain folder? then wrap it in a domain folder), "
                f"or map each domain to its folder with data.domains"
            )
        domains.setdefault(slug(child.name), folder)
    if len(domains) < 2:
        raise LayoutError(f"found {len(domains)} domain folder(s) in {root}: expected two or more <domain>/<class>/<image> folders")
    return domains


@dataclass
class DomainListing:
    """What one domain folder holds, before any check."""

    images: dict[str, list[Path]] = field(default_factory=dict)  # class folder -> image files
    empty_class_folders: list[str] = field(default_factory=list)
    other_files: list[Path] = field(default_factory=list)  # neither image nor folder
    # FIFOs, sockets, devices, dangling links: (path, what it is), never opened.
    special_files: list[tuple[Path, str]] = field(default_factory=list)


def check_name(path: Path, tree: Path, what: str, name: str | None = None) -> None:
    """LayoutError naming `path` if its name (or `name`, a part of it) cannot be a path part of the catalog."""
    name = path.name if name is None else name
    problem = name_problem(name)
    if problem is not None:
        where = shown_name(Path(path).relative_to(tree).as_posix())
        raise LayoutError(
            f"{what} {shown_name(name)} (at {where}) {problem}: rename it"
            + (" (e.g. `convmv -f latin1 -t utf8 -r --notest <folder>`)" if "UTF-8" in problem else "")
            + (", or leave it out with data.classes.drop" if what == "class folder" and "UTF-8" not in problem else "")
        )


def list_domain(folder: Path, tree: Path | None = None) -> DomainListing:
    listing = DomainListing()
    tree = Path(tree) if tree is not None else Path(folder)
    for child in visible(folder):
        if not child.is_dir():
            listing.other_files.append(child)
            continue
        check_name(child, tree, "class folder")
        images = []
        for dirpath, dirnames, filenames in os.walk(child):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in JUNK_NAMES)
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(".") or name in JUNK_NAMES:
                    continue
                # Never opened: a FIFO would block the read forever, a dangling link has nothing to read.
                if (problem := regular_file_problem(path)) is not None:
                    listing.special_files.append((path, problem))
                    continue
                if is_image(path):
                    for part in path.relative_to(child).parts:
                        check_name(path, tree, "image file" if part == name else "folder", part)
                    images.append(path)
                else:
                    listing.other_files.append(path)
        if images:
            listing.images[child.name] = images
        else:
            listing.empty_class_folders.append(child.name)
    return listing


def class_of(folder: str, rename: dict[str, str]) -> str:
    return rename.get(folder, folder)


def check_classes(listings: dict[str, DomainListing], rename: dict[str, str], drop: list[str]) -> list[str]:
    """The class names every domain shares, after rename and drop; LayoutError if they differ."""
    present: dict[str, set[str]] = {d: {class_of(c, rename) for c in lst.images} for d, lst in listings.items()}
    every_folder = {c for lst in listings.values() for c in [*lst.images, *lst.empty_class_folders]}
    every_class = {class_of(c, rename) for c in every_folder}
    for key, names, known in (("rename", list(rename), every_folder), ("drop", drop, every_class)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise LayoutError(f"data.classes.{key} names {unknown}, which no domain has; classes found: {sorted(every_class)}")
    bad = [c for c in rename.values() if not c or "/" in c or "\\" in c or c.startswith(".")]
    if bad:
        raise LayoutError(f"data.classes.rename: class names cannot contain '/' or start with '.': {bad}")
    union = set().union(*present.values()) - set(drop)
    if not union:
        raise LayoutError("no class with images is left (after data.classes.drop)")
    problems = []
    for name in sorted(union):
        lacking = sorted(d for d in listings if name not in present[d])
        if not lacking:
            continue
        empty = [d for d in lacking if any(class_of(c, rename) == name for c in listings[d].empty_class_folders)]
        where = "; ".join(f"{d} ({'empty folder' if d in empty else 'no folder'})" for d in lacking)
        hint = close_spelling(name, set().union(*present.values()) - {name})
        problems.append(f"  {name!r} is missing in {where}" + (f" - the same as {hint[0]!r}?" if hint else ""))
    if problems:
        raise LayoutError(
            "the domains do not share their classes:\n" + "\n".join(problems) + "\n"
            "drop such classes everywhere (data.classes.drop: [name, ...]) or merge spellings "
            "(data.classes.rename: {folder: class})"
        )
    return sorted(union)


def close_spelling(name: str, others: set[str]) -> list[str]:
    """Another class that is probably the same one spelt differently (case, separators, a typo)."""
    by_key = {other.lower().replace("-", "_").replace(" ", "_"): other for other in sorted(others)}
    key = name.lower().replace("-", "_").replace(" ", "_")
    return [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.8)]


@dataclass(frozen=True)
class PlannedImage:
    domain: str
    class_name: str
    source: Path
    path: str  # <domain>/<class>/<file>, relative to the normalised dataset folder


def plan_images(listings: dict[str, DomainListing], domains: dict[str, Path], classes: list[str], rename: dict[str, str]) -> list[PlannedImage]:
    """Where each kept image goes; nested files are flattened (`a/b.jpg` -> `a__b.jpg`)."""
    keep = set(classes)
    plan, taken = [], set()
    for domain, listing in listings.items():
        for folder, files in listing.images.items():
            name = class_of(folder, rename)
            if name not in keep:
                continue
            base = domains[domain] / folder
            for file in files:
                flat = "__".join(file.relative_to(base).parts)
                path = f"{domain}/{name}/{flat}"
                if path in taken:  # two folders merged by rename hold the same file name
                    path = f"{domain}/{name}/{slug(folder)}__{flat}"
                if path in taken:
                    raise LayoutError(f"two images would both be stored as {path}")
                taken.add(path)
                plan.append(PlannedImage(domain, name, file, path))
    return plan


def place(plan: list[PlannedImage], dest: Path, move: bool, progress: bool = True) -> None:
    """Move (files we unpacked ourselves) or copy (the user's own folder) into `dest`."""
    for image in tqdm(plan, desc="moving images" if move else "copying images", unit="img", disable=not progress):
        target = dest / image.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(image.source, target)
        else:
            shutil.copyfile(image.source, target)
