"""The `xfer` command: validate params, run stages or the pipeline, summarise, predict.

    xfer validate [params.yaml]           check params.yaml, touch nothing
    xfer stage <name> [--root .]          run one stage as a Prefect flow
    xfer pipeline [--root .]              run the whole chain as one Prefect flow
    xfer summary [metrics/eval.json]      the evaluation as a small table
    xfer predict <images or folders>...   predictions of a registered model (default @champion)

`xfer <command> --help` describes each command; `xfer --version` prints the
installed version.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cli import predict
# The stage table imports nothing but the standard library: `--help` stays quick.
from xfer.contract import STAGE_NAMES

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

    from xfer.metrics import format_results

    path = Path(args.eval_json)
    if not path.is_file():
        print(f"xfer summary: {path} not found (run `make run` first)", file=sys.stderr)
        return 2
    print(format_results(json.loads(path.read_text())))
    return 0


def add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=".", help="project root holding params.yaml and data/ (default: .)")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0], epilog="`xfer <command> --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {installed_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    validate = commands.add_parser("validate", help="check params.yaml, touch nothing", description="Validate a params file: print each invalid key (its path and what is allowed) and exit 2, or say it is valid.")
    validate.add_argument("params", nargs="?", default="params.yaml", metavar="PARAMS", help="the params file (default: params.yaml)")
    validate.set_defaults(run=run_validate)

    stage = commands.add_parser("stage", help="run one stage as a Prefect flow", description="Run one DVC stage as a Prefect flow, after validating params.yaml.")
    stage.add_argument("stage", choices=STAGE_NAMES, metavar="STAGE", help=f"one of {', '.join(STAGE_NAMES)}")
    add_root(stage)
    stage.set_defaults(run=run_stage)

    pipeline = commands.add_parser("pipeline", help="run the whole chain as one Prefect flow", description="Run every stage, in order, as one Prefect flow in this process.")
    add_root(pipeline)
    pipeline.set_defaults(run=run_pipeline)

    summary = commands.add_parser("summary", help="the evaluation as a small table", description="Print the evaluation (accuracy, macro precision, recall, F1 per model and split) as a table.")
    summary.add_argument("eval_json", nargs="?", default="metrics/eval.json", metavar="EVAL_JSON", help="the evaluate stage's metrics (default: metrics/eval.json)")
    summary.set_defaults(run=run_summary)

    predict_parser = commands.add_parser("predict", help="predictions of a registered model (default @champion)", description=predict.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_arguments(predict_parser)
    predict_parser.set_defaults(run=predict.run)
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
