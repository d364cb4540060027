"""Which detector the demo trains and how to rebuild it: builder names, their kwargs, pretrained backbone weights.

A `ModelSpec` is everything needed to rebuild a trained detector without its training data: the builder name
(`ssdlite`, `fasterrcnn`, `retinanet`, `fcos`, `maskrcnn`, the builders of `mnv1_backbone.detection`), the
keyword arguments it was called with, the SSD default-box scales, and the label mapping (contiguous label <->
COCO category id, category names). Training stores it in every checkpoint and in the metadata of the exported
`model.safetensors`, so `evaluate` and `predict` need nothing but the checkpoint.

`train --init-from PATH` (builder `odapi`) starts instead from a TF Object Detection API SSD-MobileNetV1 model
(`mnv1_backbone.detection.from_tf_object_detection`: a model folder, a model-zoo ``.tar.gz``, a frozen graph, or a
folder written by `mnv1 convert`): `odapi_model_spec` records the imported model's typed ``pipeline.config`` (with
the dataset's number of classes) in the spec, so that `evaluate`, `predict` and `--resume` rebuild it without the TF
files; the imported detector trains with its own OD-API loss and its 1-based labels are the dataset's contiguous
labels.

The pretrained backbone is Google's ImageNet MobileNetV1 1.0/224 frozen graph that the PyPI package `nudity`
ships as `files/retrained_graph.pb` (only its last layer was retrained; the trunk is Google's). It is located
with `importlib.util.find_spec`, without importing `nudity` (whose import needs TensorFlow).
"""

from __future__ import annotations

import copy
import dataclasses
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
from mnv1_backbone.detection.odapi import CONFIG_NAME as ODAPI_CONFIG_NAME
from mnv1_backbone.detection.odapi import ODAPISSDDetector, build_network
from mnv1_backbone.detection.tf_pipeline import config_from_dict
from mnv1_backbone.weights import load_state_dict_file, load_state_dict_strict

from .checkpoint import SPEC_METADATA_KEY, load_checkpoint

__all__ = [
    "BUILDERS",
    "ModelSpec",
    "build_model",
    "default_backbone_weights",
    "load_odapi_detector",
    "fit_class_head",
    "load_trained_model",
    "odapi_model_spec",
    "odapi_ssd_mobilenet_v1",
    "resolve_backbone_weights",
]

logger = logging.getLogger(__name__)

#: Keyword arguments of an imported OD-API model that `--model-kwargs` may set with `--init-from`.
ODAPI_KWARGS = ("legacy_anchor_order", "clip_before_nms", "score_thresh", "nms_thresh", "detections_per_img",
                "freeze_batch_norm_statistics")


def load_odapi_detector(
    path: str | Path,
    *,
    num_classes: int | None = None,
    legacy_anchor_order: bool = False,
    clip_before_nms: bool | None = None,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    detections_per_img: int | None = None,
) -> ODAPISSDDetector:
    """An OD-API detector from `path`: a folder written by `mnv1 convert` / `save_pretrained` (``config.json`` +
    ``model.safetensors``), or anything `from_tf_object_detection` reads (folder, ``.tar.gz``, ``.pb``).

    `num_classes` (without background) different from the model's gives a new class head (the feature extractor
    and the box head stay the imported ones); the other arguments are `from_tf_object_detection`'s.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--init-from: {path} does not exist")
    if (path / ODAPI_CONFIG_NAME).is_file() and not (path / "pipeline.config").is_file():
        model = ODAPISSDDetector.from_pretrained(path)
        if legacy_anchor_order and not model.legacy_anchor_order:
            raise ValueError(f"{path / ODAPI_CONFIG_NAME} records legacy_anchor_order false; the anchor order of a "
                             "converted model is fixed when it is converted")
    else:
        model = _read_tf_model(path, legacy_anchor_order)
    # Rewrap the loaded network to apply the post-processing overrides, as from_tf_object_detection does.
    model = ODAPISSDDetector(
        model.config, model.network, legacy_anchor_order=model.legacy_anchor_order,
        clip_before_nms=model.clip_before_nms if clip_before_nms is None else clip_before_nms,
        id2label=model.id2label, score_thresh=score_thresh, nms_thresh=nms_thresh,
        detections_per_img=detections_per_img)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_class_head(num_classes)
    return model.eval()


_last_tf_read: tuple[tuple, ODAPISSDDetector] | None = None


def _read_tf_model(path: Path, legacy_anchor_order: bool) -> ODAPISSDDetector:
    """`from_tf_object_detection(path)`, read once per process: `odapi_model_spec` reads the model for its config
    and labels and the `odapi` builder then for its weights (seconds for a zoo model). A copy is returned, as the
    callers change the class head; the file's size and modification time are part of the key. The clip order
    is post-processing only: read with its default (from the model's date), the caller's is applied after."""
    global _last_tf_read
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, legacy_anchor_order)
    if _last_tf_read is None or _last_tf_read[0] != key:
        # Building the network draws initial weights that the read then replaces: keep that off the global random
        # state, so that a run draws the same numbers (class head, data order) whether this read was cached or not.
        with torch.random.fork_rng(devices=[]):
            model = detection.from_tf_object_detection(path, legacy_anchor_order=legacy_anchor_order)
        _last_tf_read = (key, model)
    return copy.deepcopy(_last_tf_read[1])


def _class_head_keys(model: ODAPISSDDetector) -> set[str]:
    """The network's state-dict keys whose first dimension is anchors x (classes + 1): those whose shape changes
    with the number of classes (networks built on the meta device: shapes only, no memory)."""
    config = model.config
    with torch.device("meta"):
        one = build_network(config, legacy_anchor_order=model.legacy_anchor_order).state_dict()
        more = build_network(dataclasses.replace(config, num_classes=config.num_classes + 1),
                             legacy_anchor_order=model.legacy_anchor_order).state_dict()
    return {key for key in one if one[key].shape != more[key].shape}


def fit_class_head(model: ODAPISSDDetector, num_classes: int, class_map: Mapping[int, int]) -> None:
    """Give an imported `model` a class head for `num_classes` classes (background not counted).

    Without `class_map`: the head is kept when the count is the same, else new (randomly initialised). With it:
    a new head whose background and whose class k (for each k -> m in `class_map`) start from the imported
    background and class m, so that classes the model already knows keep their scores; the others start new.
    The OD-API lays out a class predictor's outputs as (anchor, class) (``class_predictions_with_background``
    reshapes them to (N, H*W*A, C + 1)), so class m of anchor a is output a * (C + 1) + m.
    """
    if not class_map:
        if num_classes != model.num_classes:
            model.reset_class_head(num_classes)
        return
    bad = {k: m for k, m in class_map.items() if not (1 <= k <= num_classes and 1 <= m <= model.num_classes)}
    if bad:
        raise ValueError(f"class_map {bad}: classes must be in [1, {num_classes}] and imported classes in "
                         f"[1, {model.num_classes}]")
    keys = _class_head_keys(model)
    old_slots = model.num_classes + 1
    old = {key: value.detach().clone() for key, value in model.network.state_dict().items() if key in keys}
    model.reset_class_head(num_classes)
    new = model.network.state_dict()
    with torch.no_grad():
        for key in keys:
            source = old[key].reshape(-1, old_slots, *old[key].shape[1:])
            target = new[key].view(source.shape[0], num_classes + 1, *new[key].shape[1:])
            target[:, 0] = source[:, 0]
            for k, m in class_map.items():
                target[:, k] = source[:, m]


def odapi_ssd_mobilenet_v1(
    *,
    num_classes: int,
    pipeline: Mapping[str, Any],
    legacy_anchor_order: bool = False,
    clip_before_nms: bool = False,
    init_from: str | None = None,
    class_map: Mapping[str, int] | None = None,
    depth_multiplier: float | None = None,
    freeze_batch_norm_statistics: bool = True,
) -> ODAPISSDDetector:
    """The `odapi` builder: the OD-API SSD that `pipeline` (an `SSDPipelineConfig.to_dict()`) describes.

    Args:
        num_classes: torchvision's count, background included (the demo's `ModelSpec.num_classes`); the detector
            gets ``num_classes - 1`` classes, its 1-based labels being the dataset's contiguous labels.
        pipeline: the typed pipeline config, with that number of classes and the post-processing overrides.
        init_from: the imported model's path; without it the weights are random (a checkpoint restores them).
        class_map: class k (a string key, as JSON has it) -> the imported class whose class-head rows it starts
            from (`odapi_model_spec` matches the names); see `fit_class_head`.
        depth_multiplier: only checked against the config (the demo records every model's width).
        freeze_batch_norm_statistics: `ODAPISSDDetector`'s attribute (BatchNorm statistics fixed in training).
    """
    config = config_from_dict(dict(pipeline))
    if config.num_classes != num_classes - 1:
        raise ValueError(f"the pipeline config has {config.num_classes} classes but {num_classes - 1} (plus "
                         "background) were asked for")
    width = config.feature_extractor.depth_multiplier
    if depth_multiplier is not None and not math.isclose(depth_multiplier, width):
        raise ValueError(f"depth_multiplier {depth_multiplier:g} differs from the imported model's {width:g}; "
                         "leave --depth-multiplier out with --init-from")
    if init_from is not None:
        model = load_odapi_detector(init_from, legacy_anchor_order=legacy_anchor_order,
                                    clip_before_nms=clip_before_nms)
        fit_class_head(model, config.num_classes, {int(k): int(v) for k, v in (class_map or {}).items()})
        imported = dataclasses.replace(model.config, post_processing=config.post_processing)
        if imported != config or model.legacy_anchor_order != legacy_anchor_order:
            raise ValueError(f"{init_from} no longer holds the model this run was started from (its pipeline "
                             "config or anchor order changed)")
        network = model.network
    else:
        network = build_network(config, legacy_anchor_order=legacy_anchor_order)
    model = ODAPISSDDetector(config, network, legacy_anchor_order=legacy_anchor_order,
                             clip_before_nms=clip_before_nms)
    model.freeze_batch_norm_statistics = bool(freeze_batch_norm_statistics)
    return model


#: `--model` choices and the builder each one calls (`odapi` needs `--init-from`).
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "ssdlite": detection.ssdlite_mobilenet_v1,
    "fasterrcnn": detection.fasterrcnn_mobilenet_v1_fpn,
    "retinanet": detection.retinanet_mobilenet_v1_fpn,
    "fcos": detection.fcos_mobilenet_v1_fpn,
    "maskrcnn": detection.maskrcnn_mobilenet_v1_fpn,
    "odapi": odapi_ssd_mobilenet_v1,
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
        kwargs = {k: v for k, v in self.kwargs.items()
                  if k not in ("weights_backbone", "trainable_backbone_layers", "init_from")}
        return ModelSpec(self.builder, kwargs, list(self.categories), dict(self.label_to_cat_id), self.box_scales,
                         dict(self.extra))


def build_model(spec: ModelSpec) -> nn.Module:
    """Call the spec's builder with its kwargs and apply its default-box scales."""
    kwargs = dict(spec.kwargs)
    model = BUILDERS[spec.builder](num_classes=spec.num_classes, **kwargs)
    if spec.box_scales is not None:
        _set_box_scales(model, *spec.box_scales)
    return model


def odapi_model_spec(
    init_from: str | Path,
    categories: list[str],
    label_to_cat_id: dict[int, int],
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    depth_multiplier: float | None = None,
    image_size: int | None = None,
) -> ModelSpec:
    """The spec of a detector fine-tuned from the OD-API model at `init_from` on a dataset with `categories`.

    The model is read here to record its pipeline config (with the dataset's number of classes and the
    post-processing overrides of `model_kwargs`, see `ODAPI_KWARGS`) and its anchor and clip orders; the builder
    reads the weights again from `init_from`. Dataset categories named as one of the model's classes (its label map,
    case-insensitive: COCO's names for the COCO models) start from that class (`fit_class_head`); without any such
    name the class head is new when the number of classes differs, kept otherwise (logged).
    An `image_size` (the demo's square resize) other than the model's input size is worth a warning.
    """
    kwargs = dict(model_kwargs or {})
    unknown = sorted(set(kwargs) - set(ODAPI_KWARGS))
    if unknown:
        raise ValueError(f"--model-kwargs {unknown} do not apply to an imported OD-API model; it takes "
                         f"{list(ODAPI_KWARGS)}")
    num_classes = len(categories) - 1
    freeze = bool(kwargs.pop("freeze_batch_norm_statistics", True))
    model = load_odapi_detector(init_from, **kwargs)
    known: dict[str, int] = {}
    for ident, name in sorted(model.id2label.items()):
        if name.strip().lower() not in ("n/a", ""):
            known.setdefault(name.strip().lower(), ident)
    class_map = {k: known[name.strip().lower()] for k, name in enumerate(categories[1:], 1)
                 if name.strip().lower() in known}
    if class_map:
        logger.info("--init-from %s: feature extractor and box head imported; %d of %d categories start from the "
                    "imported class of the same name (%s), the others from a new class head", init_from,
                    len(class_map), num_classes, ", ".join(categories[k] for k in class_map))
    elif model.num_classes != num_classes:
        logger.info("--init-from %s: feature extractor and box head imported; new class head for %d classes (the "
                    "model has %d)", init_from, num_classes, model.num_classes)
    else:
        logger.info("--init-from %s: every weight imported, the class head included (%d classes, taken in the "
                    "dataset's category order)", init_from, num_classes)
    fit_class_head(model, num_classes, class_map)
    height, width = model.image_size
    if image_size is not None and (height, width) != (image_size, image_size):
        # The data pipeline resizes to a square of image_size, then the detector to its fixed_shape_resizer size.
        logger.warning("--image-size %d: images are resized to %dx%d, then by the detector to its %dx%d input; "
                       "--image-size %d resizes once", image_size, image_size, image_size, height, width,
                       height if height == width else max(height, width))
    spec_kwargs: dict[str, Any] = {
        "init_from": str(init_from),
        "pipeline": model.config.to_dict(),
        "legacy_anchor_order": model.legacy_anchor_order,
        "clip_before_nms": model.clip_before_nms,
        "class_map": {str(k): m for k, m in class_map.items()},
        "freeze_batch_norm_statistics": freeze,
    }
    if depth_multiplier is not None:
        spec_kwargs["depth_multiplier"] = depth_multiplier
    return ModelSpec("odapi", spec_kwargs, list(categories), dict(label_to_cat_id))


def backbone_depth_multiplier(model: nn.Module) -> float:
    """Width of the MobileNetV1 inside any of the demo's detectors."""
    if isinstance(model, ODAPISSDDetector):
        return float(model.config.feature_extractor.depth_multiplier)
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
