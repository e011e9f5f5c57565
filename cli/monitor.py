"""`xfer monitor`: do new images still come from the target domain the registered model was adapted to?

The images (files, folders searched recursively, or a CSV whose `path`
column lists them) are embedded by the model itself (default
`models:/<registry.name>@champion`, from the store `xfer predict` reads) and
compared with the reference window saved in the model when evaluate
registered it: a kernel MMD test and a domain-classifier test on its
features, per-class KS tests on its predictions (xfer/drift/), and its
accuracy on them estimated without labels (ATC, calibrated on target val).
Thresholds: params.yaml's `monitor` section. Writes, each file whole, into
--out (default <root>/monitor): report.json, history.csv (one row per run),
projection.png (reference and new images on the reference's first two
principal components) and history.png (each test's p-value and the estimated
accuracy, run after run), and logs them to an MLflow run of kind `monitor`.
Bad input (a missing path, no images, an unreadable image, a model without a
reference window) is refused before anything is written, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.predict import InputError, load_or_say, resolve_inputs, say_skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGES", help="image files, folders of images, or a CSV with a `path` column")
    parser.add_argument("--model", help="MLflow model URI (default: models:/<registry.name>@champion)")
    parser.add_argument("--out", help="folder for the report, history and plots (default: <root>/monitor)")
    parser.add_argument("--root", default=".", help="project root holding params.yaml and mlflow.db (default: .)")
    parser.add_argument(
        "--tracking-uri", help="MLflow store holding the model (default: $XFER_TRACKING_URI if set, else the project's, sqlite:///<root>/mlflow.db)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")


def listed_images(inputs: list[str], skipped: list) -> list[Path]:
    """The image paths named by `inputs`: a CSV's `path` column (relative to the CSV's folder), else files and folders."""
    import pandas as pd

    from xfer.predictor import PredictorError, image_files

    paths: list[str | Path] = []
    for item in inputs:
        if item.lower().endswith(".csv"):
            if not Path(item).is_file():
                raise PredictorError(f"{item}: no such file")
            frame = pd.read_csv(item, dtype=str, keep_default_na=False)
            if "path" not in frame.columns:
                raise PredictorError(f"{item}: a CSV of images needs a `path` column; it has {list(frame.columns)}")
            paths += [Path(item).parent / p for p in frame["path"]]
        else:
            paths.append(item)
    return image_files(paths, skipped)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tasks.monitor import check_images
    from tasks.tracking import without_credentials
    from xfer.config import ConfigError, Params, load_params
    from xfer.data.images import ImageReadError
    from xfer.drift import DriftError
    from xfer.layout import Layout
    from xfer.monitor import MonitorError, summary_line
    from xfer.predictor import PredictorError

    layout = Layout(Path(args.root))
    try:
        params = load_params(layout.params) if layout.params.is_file() else Params()
        paths, skipped, uri, store = resolve_inputs(args, layout, listed_images)
    except (InputError, ConfigError, PredictorError) as err:
        print(f"xfer monitor: {err}", file=sys.stderr)
        return 2
    say_skipped("monitor", skipped)
    if (loaded := load_or_say("monitor", uri, store)) is None:
        return 2
    out = Path(args.out) if args.out else layout.monitor
    try:
        with tqdm(total=len(paths), desc="monitor", unit="img") as bar:
            checked = check_images(
                layout,
                params,
                loaded.unwrap_python_model(),
                uri,
                paths,
                out,
                without_credentials(args.tracking_uri) if args.tracking_uri else None,
                args.batch_size,
                on_batch=bar.update,
                model_key=loaded.metadata.model_uuid,
            )
    except (MonitorError, DriftError, ImageReadError, PredictorError) as err:
        print(f"xfer monitor: {err}{newer_version_hint(uri, err, store)}; nothing written", file=sys.stderr)
        return 2
    print(summary_line(checked.report))
    if checked.report["retrain_wanted"]:
        print("retraining wanted: the monitor flow (python -m flows.monitor) adds such images to the target pool and starts the retrain")
    print(f"report: {checked.written['report']}")
    return 0


def newer_version_hint(uri: str, err: Exception, store: str) -> str:
    """For a registered model without a reference window: the latest version of its name in `store`, which may have one.

    A model registered before reference windows existed stays @champion after
    evaluate runs again if the new version only ties it on target val.
    """
    if "no reference window" not in str(err) or not uri.startswith("models:/"):
        return ""
    from mlflow.tracking import MlflowClient

    name = uri.removeprefix("models:/").split("@")[0].split("/")[0]
    try:
        # The store named, not MLflow's process-wide URI, which whatever ran before may have set.
        versions = MlflowClient(tracking_uri=store, registry_uri=store).search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001  (a hint only: the error above stands without it)
        return ""
    latest = max((int(v.version) for v in versions), default=None)
    return f" (or, if a tie kept an older champion, name a newer version: --model models:/{name}/{latest})" if latest else ""
