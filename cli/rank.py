"""`xfer rank`: score candidate backbones before any training, and recommend one.

For each candidate (params.yaml `rank.backbones`; empty: every backbone whose
pretrained weights ship with xfer, at backbone.image_size, and the first of
them with random weights as a control) its features of every manifest row
come from the feature cache, computed there when missing, as the features
stage would (a backbone you then pick is a cache hit). Four scores
(xfer/transferability/): LogME, H-score and 5-NN accuracy on the labelled
source train rows, and the domain gap (minus the proxy A-distance) between
source and the unlabelled target rows. No target label is read. The
recommendation follows the rule printed with it.

Reads the manifest of the project at --root (run the split stage first);
writes metrics/rank.json and plots/rank/rank.png, each whole or not at all
(what the optional `rank` DVC stage writes: see the README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=".", help="project root holding params.yaml and data/ (default: .)")
    parser.add_argument("--seed", type=int, help="seed of the scores' subsampling and folds (default: params.yaml seed)")


def table(rows: list[dict], scores: list[str], recommended: str) -> str:
    head = ["candidate", *scores, "features"]
    body = [[row["candidate"], *(f"{row[s]:.4f}" for s in scores), "cached" if row["cache_hit"] else "computed"] for row in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    marks = [line + ("  <- recommended" if i >= 2 and body[i - 2][0] == recommended else "") for i, line in enumerate(lines)]
    return "\n".join(marks)


def run(args: argparse.Namespace) -> int:
    from xfer.backbones import BackboneError
    from xfer.config import ConfigError, load_params
    from xfer.data.split import SplitError
    from xfer.features import FeatureCacheError
    from xfer.layout import Layout
    from xfer.rank import check_params, rank_stage
    from xfer.transferability import SCORE_NAMES

    layout = Layout(Path(args.root))
    try:
        params = load_params(layout.params)
        check_params(params, layout.root)
        if not layout.manifest.is_file():
            raise FileNotFoundError(f"{layout.manifest} not found: run the split stage first (`xfer stage split`)")
        ranking, plot = rank_stage(
            manifest_path=layout.manifest,
            images_root=layout.root,
            cache_root=layout.feature_cache,
            metrics_path=layout.metrics("rank"),
            plot_dir=layout.stage_plots("rank"),
            params=params,
            seed=args.seed,
        )
    except (ConfigError, BackboneError, SplitError, FeatureCacheError, FileNotFoundError, ValueError) as err:
        print(f"xfer rank: {err}; nothing written", file=sys.stderr)
        return 2
    print(table(ranking.rows, list(SCORE_NAMES), ranking.recommended))
    print(f"\nrecommended: {ranking.recommended}\nrule: {ranking.rule}\nwrote {layout.metrics('rank')} and {plot}")
    return 0
