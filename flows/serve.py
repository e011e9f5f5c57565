"""Serve every deployment of prefect.yaml from one process, for one project.

    python -m flows.serve [--root .]

`make servers` runs this beside the Prefect and MLflow servers
(servers/supervisor.py), so the whole loop runs on one machine without a work
pool: the monitor deployment tests the project's incoming folder on its
schedule and starts the retrain deployment when a retrain is wanted; the
retrain promotes only a better model. Each deployment is served as
prefect.yaml declares it (name, flow, parameters, schedule), with `root` set
to this project: the file stays the one place where they are named.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import tasks  # noqa: F401  (offline defaults before prefect is imported)

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def declared_deployments(path: Path = PREFECT_YAML) -> list[dict]:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}).get("deployments", [])


def flow_of(entrypoint: str):
    """The flow object an entrypoint such as `flows/retrain.py:retrain` names."""
    file, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(file.removesuffix(".py").replace("/", ".")), name)


def deployments(root: Path, path: Path = PREFECT_YAML) -> list:
    """prefect.yaml's deployments as RunnerDeployments of this project."""
    from prefect.client.schemas.schedules import CronSchedule

    out = []
    for spec in declared_deployments(path):
        schedules = [CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC")) for s in spec.get("schedules", [])]
        out.append(
            flow_of(spec["entrypoint"]).to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                parameters={**spec.get("parameters", {}), "root": str(root)},
                schedules=schedules,
            )
        )
    return out


def add_serve_arguments(parser: argparse.ArgumentParser, default_name: str, cron_example: str) -> None:
    """--serve, --cron and --name: serving one flow from its own process (flows/retrain.py, flows/monitor.py)."""
    parser.add_argument("--serve", action="store_true", help="serve the flow as a deployment until interrupted")
    parser.add_argument("--cron", help=f"schedule for --serve, e.g. {cron_example}")
    parser.add_argument("--name", default=default_name, help=f"deployment name for --serve (default: {default_name})")


def check_serve_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--cron only with --serve, and a valid cron expression; parser.error otherwise."""
    if args.cron and not args.serve:
        parser.error("--cron needs --serve")
    if args.cron:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=args.cron)
        except ValueError:
            parser.error(f"--cron {args.cron!r} is not a valid cron expression (five fields: minute hour day-of-month month day-of-week)")


def main(argv: list[str] | None = None) -> int:
    from prefect import serve

    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project root (default: .)")
    args = parser.parse_args(argv)
    from tasks.prefect_server import start_temporary_server

    start_temporary_server()  # without PREFECT_API_URL: tied to this process, gone with it even after a SIGKILL
    served = deployments(Path(args.root).resolve())
    print("serving " + ", ".join(f"{d.flow_name}/{d.name}" for d in served), flush=True)
    serve(*served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
