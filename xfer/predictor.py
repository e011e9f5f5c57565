"""A trained model as one self-contained folder: images in, class probabilities out.

The bundle holds what the evaluate stage scored (the head on frozen backbone
features, the fine-tuned network, or their fusion) together with its
preprocessing, so a served copy predicts exactly what evaluate measured:

    <bundle>/predictor.json        which model, class names, preprocessing
    <bundle>/finetune/             fine-tuned network (xfer.finetune.save_classifier)
    <bundle>/head/                 head weights and spec (xfer.heads.save_head)
    <bundle>/frozen_backbone.pt    the backbone whose features the head was trained on

Images may be file paths or HxW / HxWxC arrays (uint8 0..255, or floats in 0..1).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from xfer.backbones import Preprocessing
from xfer.data.images import IMAGE_SUFFIXES, ImageReadError, to_tensor
from xfer.finetune import load_classifier
from xfer.heads import load_head
from xfer.io import save_torch, write_json
from xfer.metrics import fuse_probabilities

BUNDLE_FILE = "predictor.json"
FROZEN_BACKBONE_FILE = "frozen_backbone.pt"
MODELS = ("head", "finetune", "fusion")
# Which trained parts each servable model needs.
PARTS = {"head": ("head",), "finetune": ("finetune",), "fusion": ("head", "finetune")}
# Columns of a prediction frame besides one probability column per class.
CLASS_COLUMN = "class"
PROBABILITY_COLUMN = "probability"


class PredictorError(ValueError):
    """A bundle or an input the predictor cannot use."""


def write_bundle(out_dir: Path, model: str, head_dir: Path, finetune_dir: Path, frozen_backbone: nn.Module | None, backbone_name: str, prep: Preprocessing) -> Path:
    """Copy the parts `model` needs into `out_dir` (created; must not exist)."""
    if model not in MODELS:
        raise PredictorError(f"model {model!r}: expected one of {', '.join(MODELS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    class_names = None
    if "finetune" in PARTS[model]:
        shutil.copytree(finetune_dir, out_dir / "finetune")
        _, spec = load_classifier(out_dir / "finetune")
        class_names = spec.class_names
        if spec.prep() != prep:
            raise PredictorError(f"the fine-tuned model's preprocessing {spec.preprocessing} differs from the backbone's {prep.as_dict()}")
    if "head" in PARTS[model]:
        if frozen_backbone is None:
            raise PredictorError(f"model {model!r} needs the frozen backbone the head was trained on")
        shutil.copytree(head_dir, out_dir / "head")
        _, head_spec = load_head(out_dir / "head")
        if class_names is not None and head_spec["class_names"] != class_names:
            raise PredictorError("the head and the fine-tuned model name different classes")
        class_names = head_spec["class_names"]
        save_torch(out_dir / FROZEN_BACKBONE_FILE, {k: v.detach().cpu() for k, v in frozen_backbone.state_dict().items()})
    write_json(out_dir / BUNDLE_FILE, {"model": model, "backbone": backbone_name, "class_names": class_names, "preprocessing": prep.as_dict()})
    return out_dir


@dataclass
class Predictor:
    model: str
    class_names: list[str]
    prep: Preprocessing
    head: nn.Module | None
    frozen_backbone: nn.Module | None
    classifier: nn.Module | None

    @torch.inference_mode()
    def predict_proba(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """(N, classes) probabilities, in input order."""
        out = [self._batch_proba(torch.stack([self._tensor(img) for img in images[i : i + batch_size]])) for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    def _batch_proba(self, x: torch.Tensor) -> np.ndarray:
        members = []
        if self.head is not None:
            # The head was trained on target-domain features: normalise them as evaluate does.
            members.append(torch.softmax(self.head(self.frozen_backbone(x).float(), "target"), 1).numpy())
        if self.classifier is not None:
            members.append(torch.softmax(self.classifier(x).float(), 1).numpy())
        return fuse_probabilities(members) if len(members) > 1 else members[0]

    def _tensor(self, image: Any) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as img:
                    return to_tensor(img, self.prep)
            except (OSError, UnidentifiedImageError) as err:
                raise ImageReadError(f"cannot read image {image}: {err}") from None
        if isinstance(image, Image.Image):
            return to_tensor(image, self.prep)
        return to_tensor(array_to_image(np.asarray(image)), self.prep)

    def frame(self, probabilities: np.ndarray) -> pd.DataFrame:
        """Predicted class, its probability, and one column per class."""
        best = probabilities.argmax(1)
        frame = pd.DataFrame({CLASS_COLUMN: [self.class_names[i] for i in best], PROBABILITY_COLUMN: probabilities.max(1)})
        for i, name in enumerate(self.class_names):
            frame[name] = probabilities[:, i]
        return frame


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


def load_bundle(bundle_dir: Path) -> Predictor:
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / BUNDLE_FILE).is_file():
        raise PredictorError(f"{bundle_dir / BUNDLE_FILE} not found: not a predictor bundle")
    info = json.loads((bundle_dir / BUNDLE_FILE).read_text())
    head = frozen = classifier = None
    if "head" in PARTS[info["model"]]:
        head, _ = load_head(bundle_dir / "head")
        frozen = timm.create_model(info["backbone"], pretrained=False, num_classes=0)
        frozen.load_state_dict(torch.load(bundle_dir / FROZEN_BACKBONE_FILE, map_location="cpu", weights_only=True))
        frozen.eval()
    if "finetune" in PARTS[info["model"]]:
        classifier, _ = load_classifier(bundle_dir / "finetune")
    p = info["preprocessing"]
    prep = Preprocessing(p["image_size"], tuple(p["mean"]), tuple(p["std"]), p.get("channels", 3))
    return Predictor(info["model"], info["class_names"], prep, head, frozen, classifier)


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) under folders."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            found.append(item)
        else:
            raise PredictorError(f"{item}: no such file or folder")
    if not found:
        raise PredictorError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}")
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
