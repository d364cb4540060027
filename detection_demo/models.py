"""Which detector the demo trains and how to rebuild it: builder names, their kwargs, pretrained backbone weights.

A `ModelSpec` is everything needed to rebuild a trained detector without its training data: the builder name
(`ssdlite`, `fasterrcnn`, `retinanet`, `fcos`, `maskrcnn`, the builders of `mnv1_backbone.detection`), the
keyword arguments it was called with, the SSD default-box scales, and the label mapping (contiguous label <->
COCO category id, category names). Training stores it in every checkpoint and in the metadata of the exported
`model.safetensors`, so `evaluate` and `predict` need nothing but the checkpoint.

The pretrained backbone is Google's ImageNet MobileNetV1 1.0/224 frozen graph that the PyPI package `nudity`
ships as `files/retrained_graph.pb` (only its last layer was retrained; the trunk is Google's). It is located
with `importlib.util.find_spec`, without importing `nudity` (whose import needs TensorFlow).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD

from mnv1_backbone import detection
from mnv1_backbone.weights import load_state_dict_file, load_state_dict_strict

from .checkpoint import SPEC_METADATA_KEY, load_checkpoint

__all__ = [
    "BUILDERS",
    "ModelSpec",
    "build_model",
    "default_backbone_weights",
    "load_trained_model",
    "resolve_backbone_weights",
]

logger = logging.getLogger(__name__)

#: `--model` choices and the builder each one calls.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "ssdlite": detection.ssdlite_mobilenet_v1,
    "fasterrcnn": detection.fasterrcnn_mobilenet_v1_fpn,
    "retinanet": detection.retinanet_mobilenet_v1_fpn,
    "fcos": detection.fcos_mobilenet_v1_fpn,
    "maskrcnn": detection.maskrcnn_mobilenet_v1_fpn,
}

#: Width of the one pretrained backbone available offline (Google's mobilenet_v1_1.0_224).
PRETRAINED_DEPTH_MULTIPLIER = 1.0
_PRETRAINED_PACKAGE = "nudity"
_PRETRAINED_FILE = ("files", "retrained_graph.pb")


def default_backbone_weights() -> Path | None:
    """Path of the ImageNet MobileNetV1 1.0 frozen graph shipped by the `nudity` package, or None if absent."""
    try:
        spec = importlib.util.find_spec(_PRETRAINED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_PRETRAINED_FILE)
        if path.is_file():
            return path
    return None


def resolve_backbone_weights(value: str | None, depth_multiplier: float | None) -> Path | None:
    """What `--weights-backbone` means: "auto" (the default), "none", or a path.

    "auto" is the pretrained frozen graph when it is installed and the requested width is its width (1.0);
    otherwise random initialisation, with a warning saying why.
    """
    if value is None or value.lower() == "none":
        return None
    if value.lower() != "auto":
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"--weights-backbone: {path} does not exist")
        return path
    if depth_multiplier is not None and not math.isclose(depth_multiplier, PRETRAINED_DEPTH_MULTIPLIER):
        logger.warning(
            "no pretrained backbone of width %g (the available one is %g): training the backbone from scratch",
            depth_multiplier, PRETRAINED_DEPTH_MULTIPLIER,
        )
        return None
    path = default_backbone_weights()
    if path is None:
        logger.warning(
            "pretrained MobileNetV1 weights not found (pip install --no-deps nudity==0.2.3 ships them): "
            "training the backbone from random initialisation, which needs far more epochs"
        )
    return path


@dataclass
class ModelSpec:
    """A detector's recipe: enough to rebuild it (architecture and labels) from a checkpoint alone.

    Attributes:
        builder: a key of `BUILDERS`.
        kwargs: the builder's keyword arguments, JSON-serialisable (no `weights`, which a checkpoint holds).
        categories: category names by contiguous label; index 0 is "__background__".
        label_to_cat_id: contiguous label (1..K) -> COCO category id, for writing COCO results.
        box_scales: SSD only: (smallest, largest) default-box scale as fractions of the input side, replacing the
            builder's (0.2, 0.95); None keeps the builder's. The number of boxes per place is unchanged, so the
            head and the weights are the same; only the box decoding differs.
    """

    builder: str
    kwargs: dict[str, Any]
    categories: list[str]
    label_to_cat_id: dict[int, int]
    box_scales: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.builder not in BUILDERS:
            raise ValueError(f"unknown model {self.builder!r}; expected one of {sorted(BUILDERS)}")
        if self.box_scales is not None:
            low, high = self.box_scales
            if not 0.0 < low < high <= 1.0:
                raise ValueError(f"box_scales must satisfy 0 < smallest < largest <= 1, got {self.box_scales!r}")
            if self.builder != "ssdlite":
                raise ValueError(f"box_scales applies to ssdlite only, not {self.builder!r}")
            self.box_scales = (float(low), float(high))
        self.label_to_cat_id = {int(k): int(v) for k, v in self.label_to_cat_id.items()}

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        data = dict(data)
        if data.get("box_scales") is not None:
            data["box_scales"] = tuple(data["box_scales"])
        return cls(**data)

    def for_inference(self) -> ModelSpec:
        """This spec without the backbone weights file: the checkpoint holds every weight already.

        The width is kept explicitly (it came from the weights file). Frozen and trainable BatchNorm layers
        compute the same in eval mode, so the rebuilt model predicts exactly as the trained one.
        """
        kwargs = {k: v for k, v in self.kwargs.items() if k not in ("weights_backbone", "trainable_backbone_layers")}
        return ModelSpec(self.builder, kwargs, list(self.categories), dict(self.label_to_cat_id), self.box_scales,
                         dict(self.extra))


def build_model(spec: ModelSpec) -> nn.Module:
    """Call the spec's builder with its kwargs and apply its default-box scales."""
    kwargs = dict(spec.kwargs)
    model = BUILDERS[spec.builder](num_classes=spec.num_classes, **kwargs)
    if spec.box_scales is not None:
        _set_box_scales(model, *spec.box_scales)
    return model


def backbone_depth_multiplier(model: nn.Module) -> float:
    """Width of the MobileNetV1 inside any of the demo's detectors."""
    features = model.backbone
    backbone = features.backbone if hasattr(features, "backbone") else features.body
    return float(backbone.config.depth_multiplier)


def _set_box_scales(model: nn.Module, smallest: float, largest: float) -> None:
    """Replace an SSD's default boxes by ones from `smallest` to `largest` (same aspect ratios and count).

    `DefaultBoxGenerator` spaces the scales linearly over the levels, as the SSD paper does; torchvision's SSDLite
    uses 0.2-0.95 (COCO's object sizes). Small objects need a smaller first scale.
    """
    if not isinstance(model, SSD):
        raise TypeError(f"box scales apply to SSD models, got {type(model).__name__}")
    old = model.anchor_generator
    new = DefaultBoxGenerator(old.aspect_ratios, min_ratio=smallest, max_ratio=largest, clip=old.clip)
    if new.num_anchors_per_location() != old.num_anchors_per_location():  # pragma: no cover - same aspect ratios
        raise RuntimeError("new default boxes do not fit the head")
    model.anchor_generator = new


def load_trained_model(checkpoint_path: str | Path, device: str | torch.device = "cpu",
                       ) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild the detector of a training checkpoint (or an exported `.safetensors`) in eval mode on `device`.

    Needs nothing but the file: the builder, its kwargs and the labels are stored in it.

    Returns:
        The model, its `ModelSpec`, and the training settings (`TrainConfig` fields plus `data_paths`; empty for a
        `.safetensors` file).
    """
    path = Path(checkpoint_path)
    if path.suffix == ".safetensors":
        spec, state_dict = _read_safetensors(path)
        args: dict[str, Any] = {}
    else:
        checkpoint = load_checkpoint(path)
        spec, state_dict, args = ModelSpec.from_dict(checkpoint["model_spec"]), checkpoint["model"], checkpoint["args"]
    model = build_model(spec.for_inference())
    load_state_dict_strict(model, state_dict, source=str(path))
    return model.to(device).eval(), spec, args


def _read_safetensors(path: Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if SPEC_METADATA_KEY not in metadata:
        raise ValueError(f"{path} has no {SPEC_METADATA_KEY!r} metadata: not exported by detection_demo")
    return ModelSpec.from_dict(json.loads(metadata[SPEC_METADATA_KEY])), load_state_dict_file(path)
