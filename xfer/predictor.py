"""A trained model as one self-contained folder: images in, class probabilities out.

The bundle holds what the evaluate stage scored (the head on frozen backbone
features, the fine-tuned network, or the fusion of those and of the fusion
backbones' heads), each part with its preprocessing, so a served copy predicts
exactly what evaluate measured:

    <bundle>/predictor.json        the model, class names, and each part's kind and preprocessing
    <bundle>/part<i>/              a fine-tuned network (xfer.finetune.save_classifier), or a
                                   head (xfer.heads.save_head) with frozen_backbone.pt, the
                                   backbone whose features it was trained on

Images may be file paths or HxW / HxWxC arrays (uint8 0..255, or floats in 0..1).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from xfer.data.formats import IMAGE_SUFFIXES, check_pixels, regular_file_problem
from xfer.data.images import ImageReadError, Preprocessing, to_tensor
from xfer.finetune import load_classifier
from xfer.heads import load_head
from xfer.io import save_torch, write_json
from xfer.metrics import fuse_probabilities

BUNDLE_FILE = "predictor.json"
FROZEN_BACKBONE_FILE = "frozen_backbone.pt"
MODELS = ("head", "finetune", "fusion")
# Columns of a prediction frame besides one probability column per class.
CLASS_COLUMN = "class"
PROBABILITY_COLUMN = "probability"
DEFAULT_BATCH_SIZE = 64


class PredictorError(ValueError):
    """A bundle or an input the predictor cannot use."""


@dataclass(frozen=True)
class HeadPart:
    """A head on the features of a frozen backbone (the head stage's model, or a fusion member's)."""

    head_dir: Path
    backbone: nn.Module
    backbone_name: str
    prep: Preprocessing


@dataclass(frozen=True)
class FinetunePart:
    """The fine-tuned network (the finetune stage's model)."""

    model_dir: Path


def write_bundle(out_dir: Path, model: str, parts: Sequence[HeadPart | FinetunePart]) -> Path:
    """Copy `parts` into `out_dir` (created; must not exist): one folder each, then predictor.json.

    With several parts the bundle predicts their fusion: the mean of their probabilities.
    """
    if model not in MODELS:
        raise PredictorError(f"model {model!r}: expected one of {', '.join(MODELS)}")
    if not parts:
        raise PredictorError("a bundle needs at least one part")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    members, class_names = [], None
    for i, part in enumerate(parts):
        folder = out_dir / f"part{i}"
        if isinstance(part, FinetunePart):
            shutil.copytree(part.model_dir, folder)
            spec = load_classifier(folder)[1]
            names, member = spec.class_names, {"kind": "finetune", "preprocessing": spec.preprocessing}
        else:
            shutil.copytree(part.head_dir, folder)
            save_torch(folder / FROZEN_BACKBONE_FILE, {k: v.detach().cpu() for k, v in part.backbone.state_dict().items()})
            names = load_head(folder)[1]["class_names"]
            member = {"kind": "head", "backbone": part.backbone_name, "preprocessing": part.prep.as_dict()}
        if class_names is not None and names != class_names:
            raise PredictorError(f"part {i} names other classes than part 0: {names} vs {class_names}")
        class_names = names
        members.append({"folder": folder.name, **member})
    write_json(out_dir / BUNDLE_FILE, {"model": model, "class_names": class_names, "members": members})
    return out_dir


@dataclass(frozen=True)
class Member:
    """One model of a bundle: images -> its backbone's pooled features -> class probabilities.

    The features are also what drift is measured on (xfer/monitor.py).
    """

    prep: Preprocessing
    features: Callable[[torch.Tensor], torch.Tensor]
    classify: Callable[[torch.Tensor], torch.Tensor]

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


@dataclass
class Predictor:
    model: str
    class_names: list[str]
    members: list[Member]

    @torch.inference_mode()
    def predict_proba(self, images: Sequence[Any], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """(N, classes) probabilities, in input order: the mean over the members."""
        return self.predict_with_features(images, batch_size, features=False)[1]

    @torch.inference_mode()
    def predict_with_features(
        self, images: Sequence[Any], batch_size: int = DEFAULT_BATCH_SIZE, features: bool = True, on_batch: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(first member's backbone features (N, dim) or None, probabilities (N, classes)), in input order.

        The features are the first member's: the head's frozen backbone, or the
        fine-tuned network's own backbone when that is the model.
        """
        probs_out, feats_out = [], []
        for start in range(0, len(images), batch_size):
            batch = [as_pil(img) for img in images[start : start + batch_size]]
            # Each member sees the images at its own size and normalisation.
            tensors = [torch.stack([to_tensor(img, m.prep) for img in batch]) for m in self.members]
            pooled = [m.features(x) for m, x in zip(self.members, tensors)]
            probs = [m.classify(f).float().numpy() for m, f in zip(self.members, pooled)]
            probs_out.append(fuse_probabilities(probs) if len(probs) > 1 else probs[0])
            if features:
                feats_out.append(pooled[0].float().numpy())
            if on_batch is not None:
                on_batch(len(batch))
        if not probs_out:
            return (np.zeros((0, 0), np.float32) if features else None), np.zeros((0, len(self.class_names)), np.float32)
        return (np.concatenate(feats_out) if features else None), np.concatenate(probs_out)

    def frame(self, probabilities: np.ndarray) -> pd.DataFrame:
        """Predicted class, its probability, and one column per class."""
        best = probabilities.argmax(1)
        frame = pd.DataFrame({CLASS_COLUMN: [self.class_names[i] for i in best], PROBABILITY_COLUMN: probabilities.max(1)})
        for i, name in enumerate(self.class_names):
            frame[name] = probabilities[:, i]
        return frame


def as_pil(image: Any) -> Image.Image:
    """A path, a PIL image or an array, decoded."""
    if isinstance(image, (str, Path)):
        # Never opened unless a regular file: a FIFO would block the read forever.
        if (problem := regular_file_problem(image)) is not None:
            raise ImageReadError(f"cannot read image {image}: {problem}")
        try:
            with Image.open(image) as img:
                check_pixels(img)
                return img.copy()
        except (OSError, UnidentifiedImageError) as err:
            raise ImageReadError(f"cannot read image {image}: {err}") from None
        except Image.DecompressionBombError as err:
            raise ImageReadError(f"cannot read image {image}: DecompressionBombError: {err}") from None
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    # A number, None or some other object where an image belongs (a JSON request can send any).
    if array.ndim == 0 or array.dtype.kind not in "biuf":
        raise PredictorError(f"expected an image file path or an HxWxC array; got {type(image).__name__} {image!r:.80}")
    return array_to_image(array)


def array_to_image(array: np.ndarray) -> Image.Image:
    """An HxW or HxWxC (C = 1, 3, 4) array as a PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise PredictorError(f"an image array must be HxW or HxWxC with C in 1, 3, 4; got shape {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and (array.min() < 0 or array.max() > 1):
            raise PredictorError(f"a float image array must hold values in 0..1; got {array.min():.3g}..{array.max():.3g}")
        array = np.clip(np.rint(array.astype(np.float64) * (255 if np.issubdtype(array.dtype, np.floating) else 1)), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _as_prep(p: dict) -> Preprocessing:
    return Preprocessing(p["image_size"], tuple(p["mean"]), tuple(p["std"]), p.get("channels", 3))


def _load_member(folder: Path, info: dict) -> Member:
    if info["kind"] == "finetune":
        classifier, _ = load_classifier(folder)
        return Member(_as_prep(info["preprocessing"]), classifier.backbone, lambda f: torch.softmax(classifier.head(f).float(), 1))
    head, _ = load_head(folder)
    frozen = timm.create_model(info["backbone"], pretrained=False, num_classes=0)
    frozen.load_state_dict(torch.load(folder / FROZEN_BACKBONE_FILE, map_location="cpu", weights_only=True))
    frozen.eval()
    # The head was trained on target-domain features: normalise them as evaluate does.
    return Member(_as_prep(info["preprocessing"]), frozen, lambda f: torch.softmax(head(f.float(), "target"), 1))


def bundle_info(bundle_dir: Path) -> dict:
    """predictor.json of a bundle: the model, class names and members, without loading a weight."""
    path = Path(bundle_dir) / BUNDLE_FILE
    if not path.is_file():
        raise PredictorError(f"{path} not found: not a predictor bundle")
    return json.loads(path.read_text())


def bundle_class_names(bundle_dir: Path) -> list[str]:
    return list(bundle_info(bundle_dir)["class_names"])


def load_bundle(bundle_dir: Path) -> Predictor:
    bundle_dir = Path(bundle_dir)
    info = bundle_info(bundle_dir)
    members = [_load_member(bundle_dir / m["folder"], m) for m in info["members"]]
    return Predictor(info["model"], info["class_names"], members)


def image_files(inputs: Iterable[str | Path], skipped: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Image files named directly or found (recursively, sorted) under folders.

    FIFOs, sockets, devices and dangling links are never opened: each is left
    out, and appended to `skipped` as (path, what it is).
    """
    found: list[Path] = []
    skipped = [] if skipped is None else skipped
    for item in map(Path, inputs):
        if item.is_dir():
            for p in sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                problem = regular_file_problem(p)
                if problem is None:
                    found.append(p)
                elif problem != "a folder":
                    skipped.append((p, problem))
        elif item.is_file():
            found.append(item)
        elif os.path.lexists(item):
            skipped.append((item, regular_file_problem(item) or "not a regular file"))
        else:
            raise PredictorError(f"{item}: no such file or folder")
    if not found:
        also = f" ({len(skipped)} skipped that are not regular files: {skipped[0][0]} is {skipped[0][1]})" if skipped else ""
        raise PredictorError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}{also}")
    return found


def as_image_list(model_input: Any) -> list[Any]:
    """What a served model accepts, as a list of images (paths or arrays).

    A DataFrame (column `image`, or its only column), a list, a single path,
    or an array: NxHxWxC / NxHxW batches, or one HxWxC image.
    """
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            return model_input["image"].tolist()
        if model_input.shape[1] == 1:
            return model_input.iloc[:, 0].tolist()
        raise PredictorError(f"a DataFrame input needs an `image` column; got columns {list(model_input.columns)}")
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, (str, Path)):
        return [model_input]
    if isinstance(model_input, np.ndarray):
        if model_input.dtype.kind in "OUS":
            return model_input.ravel().tolist()
        if model_input.ndim == 4 or (model_input.ndim == 3 and model_input.shape[2] not in (1, 3, 4)):
            return list(model_input)
        return [model_input]
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise PredictorError(f"cannot read images from a {type(model_input).__name__}: pass paths, arrays or a DataFrame with an `image` column")
