"""`xfer predict`: class predictions for image files and folders, from a registered model.

The model is any MLflow model URI; by default `models:/<registry.name>@champion`.
It is read from the MLflow store the stages write: --tracking-uri if given,
else XFER_TRACKING_URI (a team server, say), else the project's at --root.
Folders are searched recursively. The CSV has one row per image: path,
predicted class, its probability, one probability column per class, and, for
a model registered with a reference window, `ood_score` and
`out_of_distribution` (xfer/drift/ood.py: how far the image is from the
target domain, and whether further than the threshold calibrated on target
val). It is written whole or not at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# torch, pandas and mlflow are imported where they are used: `xfer --help`
# builds this command's parser and must answer in a moment.
if TYPE_CHECKING:
    import pandas as pd

    from xfer.layout import Layout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders of images")
    parser.add_argument("--model", help="MLflow model URI (default: models:/<registry.name>@champion)")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    parser.add_argument("--root", default=".", help="project root holding params.yaml and mlflow.db (default: .)")
    parser.add_argument(
        "--tracking-uri", help="MLflow store holding the model (default: $XFER_TRACKING_URI if set, else the project's, sqlite:///<root>/mlflow.db)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")


def max_image_pixels(layout: Layout) -> int:
    """data.max_image_pixels of the project's params.yaml, or its default where there is none."""
    from xfer.config import DataConfig, load_params

    if layout.params.is_file():
        return load_params(layout.params).data.max_image_pixels
    return DataConfig.model_fields["max_image_pixels"].default


def predict_files(model, paths: list[Path], batch_size: int, progress: bool = True) -> pd.DataFrame:
    """The model's prediction frame for `paths`, batch by batch, with a progress bar."""
    import pandas as pd
    from tqdm import tqdm

    frames = []
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = [str(p) for p in paths[start : start + batch_size]]
            frames.append(model.predict(pd.DataFrame({"image": batch})))
            bar.update(len(batch))
    frame = pd.concat(frames, ignore_index=True)
    frame.insert(0, "path", [str(p) for p in paths])
    return frame


class InputError(ValueError):
    """Bad arguments, images or store, found before any model is loaded."""


def resolve_inputs(args: argparse.Namespace, layout: Layout, list_images) -> tuple[list[Path], list, str, str]:
    """(the images `list_images(args.inputs, skipped)` finds, the special files it skipped, the model URI, the store).

    Shared by `xfer predict` and `xfer monitor`; InputError names the problem.
    """
    from tasks.tracking import TrackingURIError, default_model_uri, tracking_uri, without_credentials
    from xfer.config import ConfigError
    from xfer.data.formats import set_max_image_pixels
    from xfer.predictor import PredictorError

    try:
        if args.batch_size < 1:
            raise PredictorError(f"--batch-size {args.batch_size}: must be at least 1")
        skipped: list = []
        paths = list_images(args.inputs, skipped)
        uri = args.model or default_model_uri(layout)
        store = without_credentials(args.tracking_uri) if args.tracking_uri else tracking_uri(layout)
        set_max_image_pixels(max_image_pixels(layout))
    except (PredictorError, ConfigError, TrackingURIError) as err:
        raise InputError(str(err)) from None
    return paths, skipped, uri, store


def say_skipped(command: str, skipped: list) -> None:
    if skipped:
        listed = ", ".join(f"{p} ({kind})" for p, kind in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"xfer {command}: skipped {len(skipped)} file(s) that are not regular files, never opened: {listed}", file=sys.stderr)


def load_or_say(command: str, uri: str, store: str):
    """The model at `uri`, or None after printing why it cannot be loaded (with any secret in the message masked)."""
    from tasks.tracking import load_model

    try:
        return load_model(uri, store)
    except Exception as err:  # MLflow raises several types for a missing model or alias
        from xfer.redact import redact

        print(redact(f"xfer {command}: cannot load model {uri}: {err}"), file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    from xfer.data.images import ImageReadError
    from xfer.io import write_text
    from xfer.layout import Layout
    from xfer.predictor import PredictorError, image_files

    try:
        paths, skipped, uri, store = resolve_inputs(args, Layout(Path(args.root)), image_files)
    except InputError as err:
        print(f"xfer predict: {err}", file=sys.stderr)
        return 2
    say_skipped("predict", skipped)
    if (model := load_or_say("predict", uri, store)) is None:
        return 2
    try:
        frame = predict_files(model, paths, args.batch_size)
    except (ImageReadError, PredictorError) as err:
        print(f"xfer predict: {err}; nothing written", file=sys.stderr)
        return 2
    write_text(args.out, frame.to_csv(index=False))
    print(f"{len(frame)} predictions from {uri} -> {args.out}")
    return 0
