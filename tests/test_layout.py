"""Folders say what they hold: the README's layout names every Python file, and imports point one way."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

# The folders whose every Python file the README's layout names.
DOCUMENTED = ("cli", "servers", "flows", "tasks", "xfer", "benchmarks")
# Each layer and the project packages it must never import (dependency direction:
# cli -> flows -> tasks -> xfer, servers -> tasks; nothing points back up).
FORBIDDEN_IMPORTS = {
    "xfer": {"prefect", "mlflow", "tasks", "flows", "cli", "servers"},
    "tasks": {"flows", "cli", "servers"},
    "flows": {"cli", "servers"},
    "servers": {"cli", "flows"},
}


def tracked_python_files(folders: tuple[str, ...]) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", *folders], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [path for path in out.splitlines() if path.endswith(".py")]


def layout_block(readme: str) -> str:
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```text\n(.*?)```", section, re.S)
    assert block, "the README's Layout section has no ```text block"
    return block.group(1)


def layout_entries(block: str) -> list[str]:
    """The path each line names, from its first word and the folders it is indented under.

    A line is `<indent><name> <what it holds>`; a name ending in `/` is a folder,
    and the lines indented deeper below it are inside it.
    """
    folders: list[tuple[int, str]] = []  # (indent, path), innermost last
    entries = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = (folders[-1][1] if folders else "") + name
        if name.endswith("/"):
            folders.append((indent, path))
        entries.append(path)
    return entries


def test_readme_layout_names_every_python_file_once_and_nothing_else():
    entries = layout_entries(layout_block((REPO / "README.md").read_text()))
    named = [e for e in entries if e.endswith(".py") and e.startswith(tuple(f + "/" for f in DOCUMENTED))]
    tracked = tracked_python_files(DOCUMENTED)
    assert sorted(set(tracked) - set(named)) == [], "tracked Python files the README's layout does not name"
    assert sorted(set(named) - set(tracked)) == [], "the README's layout names Python files that do not exist"
    assert len(named) == len(set(named)), f"named twice: {sorted({e for e in named if named.count(e) > 1})}"
    # Every other entry (folders, yaml, docs) exists too.
    missing = [e for e in entries if not (REPO / e.rstrip("/")).exists()]
    assert missing == [], f"the README's layout names what does not exist: {missing}"


def test_layout_parser_places_files_in_their_folders():
    block = "top/\n  a.py   one\n  sub/   folder\n    b.py two\n  c.py   three\nd.py\n"
    assert layout_entries(block) == ["top/", "top/a.py", "top/sub/", "top/sub/b.py", "top/c.py", "d.py"]


def imported_packages(path: Path) -> set[str]:
    """Top-level names of everything `path` imports (absolute imports), at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_IMPORTS))
def test_imports_point_one_way(layer):
    wrong = {path: sorted(imported_packages(REPO / path) & FORBIDDEN_IMPORTS[layer]) for path in tracked_python_files((layer,))}
    wrong = {path: names for path, names in wrong.items() if names}
    assert wrong == {}, f"{layer}/ imports a layer above it (or prefect/mlflow in the core)"
