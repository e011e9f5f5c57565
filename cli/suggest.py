"""`xfer suggest-labels N`: the N unlabelled target images whose labels would help most, to a CSV a person fills in.

When no label-free choice can be trusted, a few target labels help most.
The images are diverse and uncertain: one per k-means cluster of the target
features (k = N), the one the current head is least sure of, most uncertain
first (xfer/suggest.py). The CSV has columns path (as in the manifest),
suggested_rank, predicted (the head's guess, a hint) and label, left empty:
write a class name on each line you label (delete the lines you don't). Then
set `data.split.target_labels: <the file>` in params.yaml, regenerate
dvc.yaml (`python -m xfer.contract --write`) and run the pipeline again: the
split reads the file as the labelled target budget.

Reads the manifest, the current features and the head of the project at
--root. The file is written whole or not at all; a file already holding
labels is kept unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "labels.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("n", type=int, metavar="N", help="how many images to suggest (e.g. 3 per class)")
    parser.add_argument("--root", default=".", help="project root holding data/ and models/ (default: .)")
    parser.add_argument("--out", help=f"CSV to write (default: {DEFAULT_OUT} in the root)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clustering (default: 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an --out file that already holds labels")


def filled_labels(path: Path) -> int | None:
    """How many labels `path` already holds (None: it is there but not a readable CSV with a label column)."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    if "label" not in df.columns:
        return None
    return int((df.label.str.strip() != "").sum())


def run(args: argparse.Namespace) -> int:
    from xfer.data.split import SplitError
    from xfer.features import FeatureCacheError
    from xfer.io import write_text
    from xfer.layout import Layout
    from xfer.suggest import SuggestError, suggestions

    layout = Layout(Path(args.root))
    out = Path(args.out) if args.out else layout.root / DEFAULT_OUT
    if args.n < 1:
        print(f"xfer suggest-labels: N {args.n}: ask for at least 1 image; nothing written", file=sys.stderr)
        return 2
    if out.exists() and not args.force:
        filled = filled_labels(out) if out.is_file() else None
        if filled is None or filled > 0:
            what = f"holds {filled} labels" if filled else "is there and not an unfilled suggestion file"
            print(f"xfer suggest-labels: {out} {what}: give another --out, or --force to overwrite it; nothing written", file=sys.stderr)
            return 2
    try:
        frame = suggestions(layout.manifest, layout.features_current, layout.head_dir, args.n, args.seed)
    except (SplitError, FeatureCacheError, FileNotFoundError, SuggestError) as err:
        print(f"xfer suggest-labels: {err}; nothing written", file=sys.stderr)
        return 2
    write_text(out, frame.to_csv(index=False))
    # data.split.target_labels is read relative to the project root.
    root = layout.root.resolve()
    param = out.resolve().relative_to(root) if out.resolve().is_relative_to(root) else out.resolve()
    print(
        f"{len(frame)} images to label -> {out}: write a class name in the label column of each "
        f"(the head's guess is in `predicted`), then set data.split.target_labels: {param} in params.yaml"
    )
    return 0
