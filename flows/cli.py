"""The `xfer` command.

    xfer validate [params.yaml]   check params.yaml, touch nothing
    xfer stage <name> [--root .]  run one stage as a Prefect flow
    xfer pipeline [--root .]      run the whole chain as one Prefect flow
    xfer summary [metrics/eval.json]  the evaluation as a small table
    xfer cache list [--root .] [--verify]  the feature cache's entries and what uses them
    xfer cache gc [--root .] [--dry-run]   remove the entries no features output holds
    xfer predict <images or folders> [--model URI] [--out predictions.csv]
                                  predictions of a registered model (default @champion)
"""

from __future__ import annotations

import sys


def summary(args: list[str]) -> int:
    import json
    from pathlib import Path

    from xfer.metrics import format_results

    path = Path(args[0] if args else "metrics/eval.json")
    if not path.is_file():
        print(f"xfer: {path} not found (run `make run` first)", file=sys.stderr)
        return 2
    print(format_results(json.loads(path.read_text())))
    return 0


def cache(args: list[str]) -> int:
    """`xfer cache list` / `xfer cache gc`: the feature cache, entry by entry, and reclaiming unused ones."""
    import argparse
    from pathlib import Path

    from xfer import feature_cache as fc
    from xfer.features import FeatureCacheError
    from xfer.layout import Layout

    parser = argparse.ArgumentParser(prog="xfer cache", description="The feature cache (data/feature-cache/): every backbone's features ever computed.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="{list,gc}")
    listing = actions.add_parser("list", help="each entry: key, backbone, image size, rows, size, created, which output uses it")
    listing.add_argument("--root", default=".", help="the project root (default: .)")
    listing.add_argument("--verify", action="store_true", help="also check every entry's files against their sha256 (reads them all)")
    collect = actions.add_parser("gc", help="remove the entries neither data/features/current nor data/features/members holds")
    collect.add_argument("--root", default=".", help="the project root (default: .)")
    collect.add_argument("--dry-run", action="store_true", help="only list what would be removed and the bytes it would free")
    ns = parser.parse_args(args)
    layout = Layout(Path(ns.root))
    where = layout.feature_cache
    try:
        if ns.action == "list":
            entries = fc.list_entries(where, layout.features_current, layout.features_members, verify=ns.verify)
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
                        what += f" [{'DAMAGED: ' if ns.verify else ''}{e.problem}]"
                    print(f"{e.key:<16}  {e.backbone[:24]:<24} {px:>4} {rows:>8}  {e.dtype:<7}  {fc.human_bytes(e.bytes):>9}  {e.created:%Y-%m-%d %H:%M}  {what}")
            used = {k for e in entries for k in [e.key] if e.used_by}
            for key, users in fc.references(layout.features_current, layout.features_members).items():
                if key not in used:
                    print(f"note: {', '.join(users)} holds key {key}, which is not in the cache (restored by `dvc pull`, or removed)")
            old = fc.old_layout(layout.features)
            if old:
                print(f"note: {layout.features} also holds {len(old)} files or folders of the old cache layout that nothing reads; `xfer cache gc` removes them")
            return 1 if ns.verify and any(e.problem for e in entries) else 0
        result = fc.gc(where, layout.features_current, layout.features_members, layout.features, dry_run=ns.dry_run)
        verb = "would remove" if ns.dry_run else "removed"
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
        print(f"{verb} {len(result.removed) + len(result.old_layout) + len(result.leftovers)} items; {'would free' if ns.dry_run else 'freed'} {fc.human_bytes(result.reclaimed)}")
        return 0
    except FeatureCacheError as err:
        print(f"xfer cache {ns.action}: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "validate":
        from xfer.config import main as validate

        return validate(rest)
    if command == "stage":
        from flows.stages import main as stage

        return stage(rest)
    if command == "pipeline":
        from flows.pipeline import main as pipeline

        return pipeline(rest)
    if command == "summary":
        return summary(rest)
    if command == "cache":
        return cache(rest)
    if command == "predict":
        from flows.predict import main as predict

        return predict(rest)
    print(f"xfer: unknown command {command!r}; expected validate, stage, pipeline, summary, predict or cache", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
