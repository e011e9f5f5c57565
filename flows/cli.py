"""The `xfer` command.

    xfer validate [params.yaml]   check params.yaml, touch nothing
    xfer stage <name> [--root .]  run one stage as a Prefect flow
    xfer pipeline [--root .]      run the whole chain as one Prefect flow
    xfer summary [metrics/eval.json]  the evaluation as a small table
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
    if command == "predict":
        from flows.predict import main as predict

        return predict(rest)
    print(f"xfer: unknown command {command!r}; expected validate, stage, pipeline, summary or predict", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
