"""The `xfer` command: validate params, run stages or the pipeline, summarise, predict.

    xfer validate [params.yaml]           check params.yaml, touch nothing
    xfer stage <name> [--root .]          run one stage as a Prefect flow
    xfer pipeline [--root .]              run the whole chain as one Prefect flow
    xfer summary [metrics/eval.json]      the evaluation as a small table
    xfer predict <images or folders>...   predictions of a registered model (default @champion)
    xfer monitor <images, folders or CSV>  drift of new images from the model's target domain
    xfer suggest-labels N [--root .]      the N unlabelled target images worth labelling, to a CSV
    xfer rank [--root .]                  score candidate backbones before training; recommend one
    xfer cache list|gc [--root .]         the feature cache's entries; remove those no output holds

`xfer <command> --help` describes each command; `xfer --version` prints the
installed version.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cli import monitor, predict, rank, suggest

# The stage table imports nothing but the standard library: `--help` stays quick.
from xfer.contract import ALL_STAGE_NAMES

PROG = "xfer"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the usage too) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def installed_version() -> str:
    try:
        return version("xfer")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def run_validate(args: argparse.Namespace) -> int:
    from xfer.config import main as validate

    return validate([args.params])


def run_stage(args: argparse.Namespace) -> int:
    from flows.stages import main as stage

    return stage([args.stage, "--root", args.root])


def run_pipeline(args: argparse.Namespace) -> int:
    from flows.pipeline import main as pipeline

    return pipeline(["--root", args.root])


def run_summary(args: argparse.Namespace) -> int:
    import json

    from xfer.metrics import format_results, selection_lines

    path = Path(args.eval_json)
    if not path.is_file():
        print(f"xfer summary: {path} not found (run `make run` first)", file=sys.stderr)
        return 2
    print(format_results(json.loads(path.read_text())))
    # How the head was chosen (and any warning), from the head stage's metrics beside eval.json.
    head = path.parent / "head.json"
    if head.is_file():
        print("\n".join(["", *selection_lines(json.loads(head.read_text()))]))
    return 0


def run_cache(args: argparse.Namespace) -> int:
    """`xfer cache list` / `xfer cache gc`: the feature cache, entry by entry, and reclaiming unused ones."""
    from xfer import feature_cache as fc
    from xfer.features import FeatureCacheError
    from xfer.layout import Layout

    layout = Layout(Path(args.root))
    where = layout.feature_cache
    try:
        if args.action == "list":
            entries = fc.list_entries(where, layout.features_current, layout.features_members, verify=args.verify)
            if not entries:
                print(f"{where}: no entries (the features stage fills it)")
            else:
                count = sum(e.kind == "entry" for e in entries)
                print(f"{where}: {count} {'entry' if count == 1 else 'entries'}, {fc.human_bytes(sum(e.bytes for e in entries))}")
                print(f"{'key':<16}  {'backbone':<24} {'px':>4} {'rows':>8}  {'dtype':<7}  {'size':>9}  {'created':<16}  used by")
                for e in entries:
                    px = "" if e.image_size is None else e.image_size
                    rows = "" if e.rows is None else e.rows
                    what = ", ".join(e.used_by) or ("-" if e.kind == "entry" else "shards of an unfinished computation")
                    if e.problem:
                        what += f" [{'DAMAGED: ' if args.verify else ''}{e.problem}]"
                    print(
                        f"{e.key:<16}  {e.backbone[:24]:<24} {px:>4} {rows:>8}  {e.dtype:<7}  {fc.human_bytes(e.bytes):>9}  {e.created:%Y-%m-%d %H:%M}  {what}"
                    )
            used = {k for e in entries for k in [e.key] if e.used_by}
            for key, users in fc.references(layout.features_current, layout.features_members).items():
                if key not in used:
                    print(f"note: {', '.join(users)} holds key {key}, which is not in the cache (restored by `dvc pull`, or removed)")
            old = fc.old_layout(layout.features)
            if old:
                print(
                    f"note: {layout.features} also holds {len(old)} files or folders of the old cache layout that nothing reads; `xfer cache gc` removes them"
                )
            return 1 if args.verify and any(e.problem for e in entries) else 0
        result = fc.gc(where, layout.features_current, layout.features_members, layout.features, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for e in result.removed:
            label = f"{e.backbone} {e.image_size}px" if e.kind == "entry" else "shards"
            print(f"{verb} {e.key} ({label}, {fc.human_bytes(e.bytes)})")
        for path in result.old_layout:
            print(f"{verb} {path} (old cache layout)")
        for path in result.leftovers:
            print(f"{verb} {path} (left by an interrupted write)")
        for e in result.busy:
            print(f"kept {e.key}: another process holds its lock (computing it right now)")
        kept = ", ".join(f"{e.key} ({'; '.join(e.used_by)})" for e in result.kept) or "none"
        print(f"in use, kept: {kept}")
        print(
            f"{verb} {len(result.removed) + len(result.old_layout) + len(result.leftovers)} items; {'would free' if args.dry_run else 'freed'} {fc.human_bytes(result.reclaimed)}"
        )
        return 0
    except FeatureCacheError as err:
        print(f"xfer cache {args.action}: {err}", file=sys.stderr)
        return 2


def add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=".", help="project root holding params.yaml and data/ (default: .)")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0], epilog="`xfer <command> --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {installed_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    validate = commands.add_parser(
        "validate",
        help="check params.yaml, touch nothing",
        description="Validate a params file: print each invalid key (its path and what is allowed) and exit 2, or say it is valid.",
    )
    validate.add_argument("params", nargs="?", default="params.yaml", metavar="PARAMS", help="the params file (default: params.yaml)")
    validate.set_defaults(run=run_validate)

    stage = commands.add_parser(
        "stage", help="run one stage as a Prefect flow", description="Run one DVC stage as a Prefect flow, after validating params.yaml."
    )
    stage.add_argument("stage", choices=ALL_STAGE_NAMES, metavar="STAGE", help=f"one of {', '.join(ALL_STAGE_NAMES)}")
    add_root(stage)
    stage.set_defaults(run=run_stage)

    pipeline = commands.add_parser(
        "pipeline", help="run the whole chain as one Prefect flow", description="Run every stage, in order, as one Prefect flow in this process."
    )
    add_root(pipeline)
    pipeline.set_defaults(run=run_pipeline)

    summary = commands.add_parser(
        "summary",
        help="the evaluation as a small table",
        description="Print the evaluation (accuracy, macro precision, recall, F1 per model and split) as a table.",
    )
    summary.add_argument(
        "eval_json", nargs="?", default="metrics/eval.json", metavar="EVAL_JSON", help="the evaluate stage's metrics (default: metrics/eval.json)"
    )
    summary.set_defaults(run=run_summary)

    predict_parser = commands.add_parser(
        "predict",
        help="predictions of a registered model (default @champion)",
        description=predict.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_arguments(predict_parser)
    predict_parser.set_defaults(run=predict.run)

    monitor_parser = commands.add_parser(
        "monitor",
        help="drift: do new images still come from the registered model's target domain?",
        description=monitor.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    monitor.add_arguments(monitor_parser)
    monitor_parser.set_defaults(run=monitor.run)

    suggest_parser = commands.add_parser(
        "suggest-labels",
        help="the N unlabelled target images whose labels would help most, to a CSV to fill in",
        description=suggest.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    suggest.add_arguments(suggest_parser)
    suggest_parser.set_defaults(run=suggest.run)

    rank_parser = commands.add_parser(
        "rank",
        help="score candidate backbones before any training (LogME, H-score, k-NN, domain gap) and recommend one",
        description=rank.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rank.add_arguments(rank_parser)
    rank_parser.set_defaults(run=rank.run)

    cache = commands.add_parser(
        "cache",
        help="the feature cache: list its entries, or reclaim unused ones",
        description="The feature cache (data/feature-cache/): every backbone's features ever computed.",
    )
    actions = cache.add_subparsers(dest="action", required=True, metavar="{list,gc}", parser_class=Parser)
    listing = actions.add_parser("list", help="each entry: key, backbone, image size, rows, size, created, which output uses it")
    add_root(listing)
    listing.add_argument("--verify", action="store_true", help="also check every entry's files against their sha256 (reads them all)")
    collect = actions.add_parser("gc", help="remove the entries neither data/features/current nor data/features/members holds")
    add_root(collect)
    collect.add_argument("--dry-run", action="store_true", help="only list what would be removed and the bytes it would free")
    cache.set_defaults(run=run_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
