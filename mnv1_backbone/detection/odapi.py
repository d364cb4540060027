"""TF Object Detection API SSD-MobileNetV1 models as a torchvision-style detector: loading, inference, training.

`from_tf_object_detection` reads an OD-API export (a model directory, a model-zoo ``.tar.gz``, a checkpoint prefix or
a ``frozen_inference_graph.pb``) and returns an `ODAPISSDDetector`, whose contract is torchvision's detectors':

* eval: ``model(images)`` with a list of (3, H, W) float images in [0, 1], any sizes -> one dict per image with
  ``boxes`` (K, 4) as (x1, y1, x2, y2) input pixels, ``scores`` (K,) and ``labels`` (K,) int64, the OD-API's
  1-based class ids (as in its label maps and ``detection_classes``);
* train: ``model(images, targets)`` with ``targets[i] = {"boxes": (M, 4) x1y1x2y2 pixels, "labels": (M,) 1-based}``
  -> ``{"classification_loss", "localization_loss"}``, the OD-API's losses as ``pipeline.config`` sets them.

What is whose: the networks are ours (`odapi_ssd.ODAPISSDNetwork`, `odapi_fpn.FPNSSDNetwork` from our
`MobileNetV1Backbone`), because torchvision's `SSD`/`RetinaNet` resize with half-pixel centres, normalise with
mean/std, use softmax (SSD) or their own anchor layouts and box coder, none of which reproduce TF's numbers. From
torchvision we use `torchvision.ops`: `batched_nms` (same greedy rule as TF's NMS), `box_iou` (matching, as the
OD-API's ``iou_similarity``) and `sigmoid_focal_loss` (the OD-API's ``weighted_sigmoid_focal`` formula, same
alpha/gamma meaning). Anchors, box coder, resize and postprocessing are in `anchors`, `box_coder`,
`odapi_postprocess`.

`ODAPISSDDetector.save_pretrained(dir)` writes ``model.safetensors`` + ``config.json`` (the typed pipeline config,
anchor order, clip order, labels); `ODAPISSDDetector.from_pretrained(dir)` reads them back without any TF file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import batched_nms, box_iou, sigmoid_focal_loss

from .._io import atomic_write, atomic_write_text
from ..convert.checkpoint import TFCheckpoint, checkpoint_prefix
from ..convert.frozen_graph import read_graph_nodes
from ..errors import StateDictMismatchError, WeightsFormatError
from .anchors import ssd_anchor_box_specs, ssd_anchors
from .box_coder import decode_boxes, encode_boxes
from .odapi_graph import GRAPH_ASSUMPTIONS, infer_config_from_graph
from .odapi_postprocess import postprocess_detections, preprocess_image
from .odapi_ssd import ODAPISSDNetwork, TFVariable
from .tf_pipeline import (
    PipelineConfigError,
    SSDPipelineConfig,
    config_from_dict,
    parse_text_proto,
    read_pipeline_config,
)

__all__ = [
    "ODAPISSDDetector",
    "coco_label_map",
    "from_tf_object_detection",
    "read_label_map",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "odapi_ssd"
_EMA_SUFFIX = "/ExponentialMovingAverage"
_QUANT_RE = re.compile(r"(^|/)(act_quant|weights_quant|.*_quant)(/|$)|/(min|max)$")
_SLOT_RE = re.compile(r"/(RMSProp|RMSProp_1|Momentum|Adam|Adam_1|Adagrad|Ftrl|Ftrl_1)$|(^|/)beta[12]_power$")
_DEBIAS_RE = re.compile(r"/(biased|local_step)$")
# Model-zoo names carry a date: ..._11_06_2017 (dd_mm_yyyy) or ..._2018_01_28 (yyyy_mm_dd).
_DATE_RES = (re.compile(r"(?<!\d)(20\d\d)_(\d\d)_(\d\d)(?!\d)"), re.compile(r"(?<!\d)(\d\d)_(\d\d)_(20\d\d)(?!\d)"))
# What a model-zoo tarball holds that we read; graph.pbtxt (a text GraphDef, tens of MB), model.ckpt.meta and
# saved_model/ are left in the archive.
_ARCHIVE_MEMBER = re.compile(r"(\.index|\.data-\d{5}-of-\d{5}|frozen_inference_graph\.pb|pipeline\.config|"
                             r"label_map[^/]*\.pbtxt)$")
_MAX_MEMBER_BYTES = 1 << 30
_MODEL_SCOPES = ("FeatureExtractor/", "BoxPredictor", "WeightSharedConvolutionalBoxPredictor")


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


def coco_label_map() -> dict[int, str]:
    """The OD-API COCO models' labels: COCO category id (1..90, 80 used) -> name."""
    text = resources.files("mnv1_backbone").joinpath("data/coco_label_map.txt").read_text(encoding="utf-8")
    out = {}
    for line in text.splitlines():
        if line.strip():
            ident, name = line.split("\t", 1)
            out[int(ident)] = name
    return out


def read_label_map(path: str | os.PathLike[str]) -> dict[int, str]:
    """An OD-API ``label_map.pbtxt`` (``item { id: 1 name: "..." display_name: "..." }``) -> id -> display name."""
    path = Path(path)
    root = parse_text_proto(path.read_bytes(), source=str(path))
    out: dict[int, str] = {}
    for item in root.values("item"):
        if not hasattr(item, "fields"):
            raise PipelineConfigError(f"{path}: item must be a message")
        ident = item.last("id")
        name = item.last("display_name") or item.last("name")
        if not isinstance(ident, int) or ident < 0:
            raise PipelineConfigError(f"{path}: item {name!r} has no valid id (got {ident!r})")
        if ident in out:
            raise PipelineConfigError(f"{path}: id {ident} appears twice")
        out[ident] = str(name) if name is not None else f"class_{ident}"
    if not out:
        raise PipelineConfigError(f"{path}: no item {{ id: ... name: ... }} entries")
    return out


def _default_labels(num_classes: int) -> dict[int, str]:
    return {i: f"class_{i}" for i in range(1, num_classes + 1)}


# ----------------------------------------------------------------------------------------------------------------
# Networks from the config
# ----------------------------------------------------------------------------------------------------------------


def _num_anchors_per_location(config: SSDPipelineConfig, legacy_anchor_order: bool) -> list[int]:
    ag = config.anchor_generator
    if ag.kind == "multiscale":
        return [max(len(ag.aspect_ratios), 1) * ag.scales_per_octave]
    return [len(layer) for layer in _box_specs(config, legacy_anchor_order)]


def _box_specs(config: SSDPipelineConfig, legacy_anchor_order: bool) -> list[list[tuple[float, float]]]:
    ag = config.anchor_generator
    return ssd_anchor_box_specs(
        num_layers=ag.num_layers,
        min_scale=ag.min_scale,
        max_scale=ag.max_scale,
        scales=ag.scales,
        aspect_ratios=ag.aspect_ratios or (1.0, 2.0, 3.0, 1.0 / 2, 1.0 / 3),
        interpolated_scale_aspect_ratio=ag.interpolated_scale_aspect_ratio,
        reduce_boxes_in_lowest_layer=ag.reduce_boxes_in_lowest_layer,
        legacy_order=legacy_anchor_order,
    )


def build_network(config: SSDPipelineConfig, *, legacy_anchor_order: bool = False) -> nn.Module:
    """The (randomly initialised) network a config describes: ``ssd_mobilenet_v1`` or ``ssd_mobilenet_v1_fpn``."""
    fe, bp = config.feature_extractor, config.box_predictor
    hp, php = fe.hyperparams, bp.hyperparams
    base = hp if fe.override_base_feature_extractor_hyperparams else None
    if not config.is_fpn:
        return ODAPISSDNetwork(
            num_classes=config.num_classes,
            num_anchors_per_location=_num_anchors_per_location(config, legacy_anchor_order),
            depth_multiplier=fe.depth_multiplier,
            min_depth=fe.min_depth,
            use_explicit_padding=fe.use_explicit_padding,
            use_depthwise=fe.use_depthwise,
            batch_norm=hp.batch_norm,
            batch_norm_eps=hp.batch_norm_epsilon,
            batch_norm_center=hp.batch_norm_center,
            batch_norm_scale=hp.batch_norm_scale,
            activation=hp.activation,
            backbone_eps=base.batch_norm_epsilon if base else 1e-3,
            backbone_activation=base.activation if base else "RELU_6",
            backbone_batch_norm_center=base.batch_norm_center if base else True,
            backbone_batch_norm_scale=base.batch_norm_scale if base else True,
            predictor_kernel_size=bp.kernel_size,
            predictor_num_layers_before_predictor=bp.num_layers_before_predictor,
            predictor_min_depth=bp.min_depth,
            predictor_max_depth=bp.max_depth,
            predictor_use_depthwise=bp.use_depthwise,
            predictor_batch_norm=php.batch_norm,
            predictor_batch_norm_eps=php.batch_norm_epsilon,
            predictor_batch_norm_center=php.batch_norm_center,
            predictor_batch_norm_scale=php.batch_norm_scale,
            predictor_activation=php.activation,
            predictor_dropout=1.0 - bp.dropout_keep_probability if bp.use_dropout else 0.0,
            class_prediction_bias_init=bp.class_prediction_bias_init,
        )
    from .odapi_fpn import build_fpn_ssd_network

    for where, h in (("feature_extractor", hp), ("box_predictor.weight_shared_convolutional_box_predictor", php)):
        if h.activation != "RELU_6":
            raise PipelineConfigError(f"model.ssd.{where}.conv_hyperparams.activation: {h.activation} is not "
                                      "supported with ssd_mobilenet_v1_fpn (RELU_6 only)")
        if h.batch_norm and not h.batch_norm_center:
            raise PipelineConfigError(f"model.ssd.{where}.conv_hyperparams.batch_norm.center: false is not supported")
    if not hp.batch_norm:
        raise PipelineConfigError("model.ssd.feature_extractor.conv_hyperparams: no batch_norm is not supported with "
                                  "ssd_mobilenet_v1_fpn")
    return build_fpn_ssd_network(
        num_classes=config.num_classes,
        depth_multiplier=fe.depth_multiplier,
        min_depth=fe.min_depth,
        min_level=fe.fpn_min_level,
        max_level=fe.fpn_max_level,
        additional_layer_depth=fe.fpn_additional_layer_depth,
        use_explicit_padding=fe.use_explicit_padding,
        use_depthwise=fe.use_depthwise,
        batch_norm_eps=hp.batch_norm_epsilon,
        batch_norm_scale=hp.batch_norm_scale,
        backbone_batch_norm_eps=base.batch_norm_epsilon if base else None,
        backbone_batch_norm_scale=base.batch_norm_scale if base else None,
        predictor_depth=bp.depth,
        predictor_num_layers_before_predictor=bp.num_layers_before_predictor,
        predictor_kernel_size=bp.kernel_size,
        predictor_apply_batch_norm=php.batch_norm,
        predictor_batch_norm_eps=php.batch_norm_epsilon,
        predictor_batch_norm_scale=php.batch_norm_scale,
        predictor_share_tower=bp.share_prediction_tower,
        predictor_use_dropout=bp.use_dropout,
        predictor_dropout_keep_probability=bp.dropout_keep_probability,
        class_prediction_bias_init=bp.class_prediction_bias_init,
        num_anchors_per_location=_num_anchors_per_location(config, legacy_anchor_order)[0],
    )


def _tf_table(network: nn.Module) -> dict[str, TFVariable]:
    """State-dict key -> TF variable, for either network."""
    if isinstance(network, ODAPISSDNetwork):
        return network.tf_variable_table()
    from .odapi_fpn import fpn_tf_name_table

    return {entry.key: TFVariable(name, entry.layout) for name, entry in fpn_tf_name_table(network).items()}


def _to_torch(name: str, value: np.ndarray, kind: str) -> Tensor:
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise WeightsFormatError(f"TF variable {name!r} has dtype {array.dtype}; expected a float tensor")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if kind == "conv" and tensor.dim() == 4:
        return tensor.permute(3, 2, 0, 1)
    if kind == "depthwise" and tensor.dim() == 4:
        return tensor.permute(2, 3, 0, 1)
    return tensor


def _tf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if len(shape) == 4 and kind == "conv":
        return (shape[2], shape[3], shape[1], shape[0])
    if len(shape) == 4 and kind == "depthwise":
        return (shape[2], shape[3], shape[0], shape[1])
    return shape


def _load_variables(
    network: nn.Module,
    variables: Mapping[str, np.ndarray],
    *,
    source: str,
    strict_unexpected: bool,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Copy TF variables into `network` by its name table, all or nothing.

    Every missing or misshapen tensor (and, for checkpoints, every unexpected variable inside the model's scopes)
    is listed in one `StateDictMismatchError` naming `source`; nothing is copied then. Keys in `skip` (a class
    head being replaced) are neither required nor copied.
    """
    table = _tf_table(network)
    state = network.state_dict()
    missing, misshapen, converted = [], [], {}
    used = set()
    for key, var in table.items():
        if key in skip:
            used.add(var.name)
            continue
        if var.kind in ("ones", "zeros"):
            converted[key] = torch.ones_like(state[key]) if var.kind == "ones" else torch.zeros_like(state[key])
            continue
        if var.name not in variables:
            missing.append(var.name)
            continue
        used.add(var.name)
        tensor = _to_torch(var.name, variables[var.name], var.kind)
        if tuple(tensor.shape) != tuple(state[key].shape):
            misshapen.append(f"{var.name}: {tuple(np.shape(variables[var.name]))}, expected "
                             f"{_tf_shape(tuple(state[key].shape), var.kind)}")
            continue
        converted[key] = tensor
    unexpected = []
    if strict_unexpected:
        # Leftovers inside the model's scopes mean another architecture; anything else (a stray training-time
        # variable) is only logged.
        leftovers = sorted(name for name in variables if name not in used)
        unexpected = [name for name in leftovers if name.startswith(_MODEL_SCOPES)]
        if len(leftovers) > len(unexpected):
            logger.info("%s: ignored %d variables outside the model's scopes, e.g. %s", source,
                        len(leftovers) - len(unexpected), [n for n in leftovers if n not in unexpected][:5])
    if missing or misshapen or unexpected:
        parts = []
        for label, names in (("wrong shape", misshapen), ("missing", missing), ("unexpected", unexpected)):
            if names:
                shown = "; ".join(names[:12]) + (f"; ... ({len(names) - 12} more)" if len(names) > 12 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        raise StateDictMismatchError(f"{source}: TF variables do not match the model the config describes; "
                                     + " | ".join(parts))
    with torch.no_grad():
        for key, tensor in converted.items():
            state[key].copy_(tensor)


def _model_variables(raw: Mapping[str, np.ndarray], *, use_ema: bool, source: str) -> dict[str, np.ndarray]:
    """A checkpoint's model variables: EMA shadows substituted (when `use_ema`), training state and FakeQuant
    ranges dropped (the latter with one warning), as the OD-API exporter restores them."""
    out: dict[str, np.ndarray] = {}
    quant: list[str] = []
    shadows = {name[: -len(_EMA_SUFFIX)] for name in raw if name.endswith(_EMA_SUFFIX)}
    used_shadows = 0
    for name, value in raw.items():
        if name == "global_step" or name.endswith("/global_step") or _SLOT_RE.search(name) or _DEBIAS_RE.search(name):
            continue
        if _EMA_SUFFIX in name:
            continue
        if _QUANT_RE.search(name):
            quant.append(name)
            continue
        if use_ema and name in shadows:
            out[name] = raw[name + _EMA_SUFFIX]
            used_shadows += 1
        else:
            out[name] = value
    if quant:
        warnings.warn(f"{source}: ignoring {len(quant)} FakeQuant range variables (e.g. {quant[0]}); the float "
                      "weights are loaded and run in float", stacklevel=3)
    if use_ema and not used_shadows:
        warnings.warn(f"{source}: eval_config.use_moving_averages is true but the checkpoint has no "
                      "ExponentialMovingAverage shadows; using the raw variables", stacklevel=3)
    elif shadows and not use_ema:
        logger.info("%s: %d ExponentialMovingAverage shadows ignored (eval_config.use_moving_averages is false, as "
                    "the OD-API exporter would)", source, len(shadows))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The detector
# ----------------------------------------------------------------------------------------------------------------


class ODAPISSDDetector(nn.Module):
    """An OD-API SSD-MobileNetV1 (classic or FPN) with torchvision's detector contract (see the module docstring).

    Args:
        config: the typed ``pipeline.config``.
        network: the network it describes (`build_network`); weights are the caller's.
        legacy_anchor_order: the pre-November-2017 order of the interpolated anchor (classic SSD only).
        clip_before_nms: the pre-mid-2018 postprocessing order (`odapi_postprocess`).
        id2label: class id (1-based) -> name.
        score_thresh, nms_thresh, detections_per_img: override the config's post-processing
            (``score_threshold``, ``iou_threshold``, ``max_total_detections``).

    Attributes:
        freeze_batch_norm_statistics: True (default) keeps every BatchNorm's running statistics fixed in
            ``train()`` (their scale and shift still learn), as torchvision does for pretrained backbones: the
            OD-API trained them on batches of 24-64, and the small batches of fine-tuning (and the 1x1 top maps)
            cannot give usable batch statistics. Set it to False to train them as the OD-API does.
    """

    def __init__(
        self,
        config: SSDPipelineConfig,
        network: nn.Module,
        *,
        legacy_anchor_order: bool = False,
        clip_before_nms: bool = False,
        id2label: Mapping[int, str] | None = None,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        detections_per_img: int | None = None,
    ) -> None:
        super().__init__()
        pp = config.post_processing
        changes: dict[str, Any] = {}
        if score_thresh is not None:
            changes["score_threshold"] = float(score_thresh)
        if nms_thresh is not None:
            if not 0.0 <= nms_thresh <= 1.0:
                raise ValueError(f"nms_thresh must be in [0, 1], got {nms_thresh}")
            changes["iou_threshold"] = float(nms_thresh)
        if detections_per_img is not None:
            if detections_per_img < 1:
                raise ValueError(f"detections_per_img must be at least 1, got {detections_per_img}")
            changes["max_total_detections"] = int(detections_per_img)
        if changes:
            config = dataclasses.replace(config, post_processing=dataclasses.replace(pp, **changes))
        if legacy_anchor_order and config.is_fpn:
            raise ValueError("legacy_anchor_order applies to ssd_anchor_generator models, not to ssd_mobilenet_v1_fpn")
        self.config = config
        self.network = network
        self.freeze_batch_norm_statistics = True
        self.legacy_anchor_order = bool(legacy_anchor_order)
        self.clip_before_nms = bool(clip_before_nms)
        labels = dict(id2label) if id2label else _default_labels(config.num_classes)
        self.id2label = {i: labels.get(i, f"class_{i}") for i in range(1, config.num_classes + 1)}
        self.image_size = (config.image_height, config.image_width)
        anchors, shapes = self._make_anchors()
        self.feature_map_shapes = shapes
        self.register_buffer("anchors", anchors, persistent=False)

    @property
    def categories(self) -> list[str]:
        """torchvision's convention: index = label id, 0 = background, "N/A" for unused ids."""
        return ["__background__"] + [self.id2label[i] for i in range(1, self.config.num_classes + 1)]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _make_anchors(self) -> tuple[Tensor, list[tuple[int, int]]]:
        was_training = self.network.training
        self.network.eval()
        with torch.no_grad():
            probe = torch.zeros(1, 3, *self.image_size)
            _, logits, shapes = self.network(probe)
        self.network.train(was_training)
        shapes = [(int(h), int(w)) for h, w in shapes]
        ag = self.config.anchor_generator
        if ag.kind == "multiscale":
            from .anchors import multiscale_anchors

            anchors = multiscale_anchors(
                shapes, self.image_size, min_level=ag.min_level, max_level=ag.max_level,
                anchor_scale=ag.anchor_scale, aspect_ratios=list(ag.aspect_ratios) or [1.0],
                scales_per_octave=ag.scales_per_octave, normalize=ag.normalize_coordinates,
            )
        else:
            strides = list(zip(ag.height_stride, ag.width_stride, strict=True)) if ag.height_stride else None
            offsets = list(zip(ag.height_offset, ag.width_offset, strict=True)) if ag.height_offset else None
            anchors = ssd_anchors(
                shapes, _box_specs(self.config, self.legacy_anchor_order), image_size=self.image_size,
                base_anchor_size=(ag.base_anchor_height, ag.base_anchor_width), anchor_strides=strides,
                anchor_offsets=offsets,
            )
        if anchors.shape[0] != logits.shape[1]:
            raise ValueError(f"the anchor generator makes {anchors.shape[0]} anchors but the network predicts "
                             f"{logits.shape[1]} boxes (feature maps {shapes})")
        return anchors.to(torch.float32), shapes

    def train(self, mode: bool = True) -> ODAPISSDDetector:
        super().train(mode)
        if mode and self.freeze_batch_norm_statistics:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # --- inference -------------------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Tensor]) -> Tensor:
        """List of (3, H, W) images in [0, 1] -> (N, 3, h, w) in [-1, 1] at the config's size (TF's resize)."""
        if isinstance(images, Tensor) and images.dim() == 3:
            images = [images]
        batch = []
        for i, image in enumerate(images):
            if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
                shape = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"image {i}: expected a (3, H, W) tensor, got {shape}")
            batch.append(preprocess_image(image, self.image_size))
        return torch.stack(batch).to(self.anchors)  # the model's device and dtype

    def predict_raw(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Box encodings (N, A, 4) and class logits (N, A, C + 1) of images in [0, 1] (what TF's graph calls
        ``raw_box_encodings`` and ``class_predictions_with_background``)."""
        codes, logits, _ = self.network(self.preprocess(images))
        return codes, logits

    def postprocess(
        self, codes: Tensor, logits: Tensor, image_sizes: Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per image: OD-API postprocessing, then boxes scaled to that image's pixels as (x1, y1, x2, y2)."""
        pp = self.config.post_processing
        out = []
        for i, (height, width) in enumerate(image_sizes):
            det = postprocess_detections(
                codes[i], logits[i], self.anchors,
                box_coder_scales=self.config.box_coder_scales, score_converter=pp.score_converter,
                logit_scale=pp.logit_scale, score_threshold=pp.score_threshold, iou_threshold=pp.iou_threshold,
                max_detections_per_class=pp.max_detections_per_class, max_total_detections=pp.max_total_detections,
                clip_before_nms=self.clip_before_nms,
            )
            scale = det.boxes.new_tensor([width, height, width, height])
            boxes = det.boxes[:, [1, 0, 3, 2]] * scale
            out.append({"boxes": boxes, "scores": det.scores, "labels": det.labels.to(torch.int64)})
        return out

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        """eval: list of detections dicts; train: the loss dict (targets required)."""
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode (list of {'boxes', 'labels'} dicts)")
            return self.compute_loss(images, targets)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        codes, logits = self.predict_raw(images)
        return self.postprocess(codes, logits, sizes)

    # --- training ----------------------------------------------------------------------------------------------

    def compute_loss(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The OD-API SSD loss (``ssd_meta_arch.loss``) as the config sets it.

        Matching: IoU of anchors and boxes (`box_iou`), the ``argmax_matcher`` (matched/unmatched thresholds,
        the ignore band, ``force_match_for_each_row``). Classification: weighted sigmoid cross-entropy over all
        C + 1 columns (background one-hot for unmatched anchors, weight 0 for ignored ones) or the sigmoid focal
        loss (`torchvision.ops.sigmoid_focal_loss`; ``alpha`` only when the config sets it, as the OD-API's
        builder does). Localization: smooth L1 (``delta``) of the faster_rcnn codes of matched anchors. Then the
        ``hard_example_miner`` when configured, normalisation by the number of matches, and the loss weights.
        """
        if len(images) != len(targets):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        return self.loss_on_batch(self.preprocess(images), sizes, targets)

    def loss_on_batch(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]],
                      targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """`compute_loss` on an already preprocessed (N, 3, h, w) batch; `image_sizes` are the original images'
        (height, width), in whose pixels the target boxes are."""
        codes, logits, _ = self.network(batch)
        cls_targets, cls_weights, reg_targets, reg_weights, matches = [], [], [], [], []
        for i, ((height, width), target) in enumerate(zip(image_sizes, targets, strict=True)):
            boxes, labels = _check_target(target, i, self.config.num_classes)
            norm = boxes.to(self.anchors) / boxes.new_tensor([width, height, width, height]).to(self.anchors)
            gt = norm[:, [1, 0, 3, 2]]  # (ymin, xmin, ymax, xmax)
            c, cw, r, rw, m = self._assign(gt, labels.to(self.anchors.device))
            cls_targets.append(c)
            cls_weights.append(cw)
            reg_targets.append(r)
            reg_weights.append(rw)
            matches.append(m)
        cls_t, cls_w = torch.stack(cls_targets), torch.stack(cls_weights)
        reg_t, reg_w = torch.stack(reg_targets), torch.stack(reg_weights)
        loss_cfg = self.config.loss
        if loss_cfg.localization == "weighted_smooth_l1":
            loc = F.huber_loss(codes, reg_t, reduction="none", delta=loss_cfg.smooth_l1_delta).sum(-1) * reg_w
        elif loss_cfg.localization == "weighted_l2":
            loc = 0.5 * ((codes - reg_t) ** 2).sum(-1) * reg_w
        else:
            raise PipelineConfigError(f"model.ssd.loss.localization_loss.{loss_cfg.localization} is not supported")
        if loss_cfg.classification == "weighted_sigmoid":
            cls = F.binary_cross_entropy_with_logits(logits, cls_t, reduction="none")
        elif loss_cfg.classification == "weighted_sigmoid_focal":
            alpha = -1.0 if loss_cfg.focal_alpha is None else loss_cfg.focal_alpha
            cls = sigmoid_focal_loss(logits, cls_t, alpha=alpha, gamma=loss_cfg.focal_gamma, reduction="none")
        elif loss_cfg.classification == "weighted_softmax":
            cls = F.cross_entropy(logits.flatten(0, 1), cls_t.flatten(0, 1), reduction="none").view_as(cls_w)
            cls = cls[..., None]
        else:
            raise PipelineConfigError(f"model.ssd.loss.classification_loss.{loss_cfg.classification} is not "
                                      "supported for training")
        cls = (cls * cls_w[..., None]).sum(-1)
        if loss_cfg.hard_example_miner:
            loc_sum, cls_sum = self._hard_example_mining(loc, cls, codes, matches)
        else:
            loc_sum, cls_sum = loc.sum(), cls.sum()
        normalizer = reg_w.sum().clamp(min=1.0) if self.config.normalize_loss_by_num_matches else loc.new_tensor(1.0)
        loc_normalizer = normalizer * 4 if self.config.normalize_loc_loss_by_codesize else normalizer
        return {
            "classification_loss": cls_sum * (loss_cfg.classification_weight / normalizer),
            "localization_loss": loc_sum * (loss_cfg.localization_weight / loc_normalizer),
        }

    def _assign(self, gt: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``target_assigner.assign`` with the argmax matcher: per anchor, class targets (A, C + 1), class weights
        (A,), regression targets (A, 4), regression weights (A,), and the match (A,): gt index, -1 unmatched,
        -2 ignored."""
        m = self.config.matcher
        if math.isnan(m.matched_threshold):
            raise PipelineConfigError("model.ssd.matcher.bipartite_matcher is not supported for training")
        num_anchors = self.anchors.shape[0]
        num_slots = self.config.num_classes + 1
        device = self.anchors.device
        match = torch.full((num_anchors,), -1, dtype=torch.long, device=device)
        if gt.shape[0]:
            iou = box_iou(gt, self.anchors)  # (M, A); IoU is the same in (y, x) as in (x, y) order
            best, match = iou.max(dim=0)
            if not m.ignore_thresholds:
                below = best < m.unmatched_threshold
                between = (best >= m.unmatched_threshold) & (best < m.matched_threshold)
                match = torch.where(below, torch.full_like(match, -1 if m.negatives_lower_than_unmatched else -2),
                                    match)
                match = torch.where(between, torch.full_like(match, -2 if m.negatives_lower_than_unmatched else -1),
                                    match)
            if m.force_match_for_each_row:
                best_anchor = iou.argmax(dim=1)  # per gt row
                indicator = F.one_hot(best_anchor, num_anchors)  # (M, A)
                forced_row = indicator.argmax(dim=0)
                forced = indicator.amax(dim=0).bool()
                match = torch.where(forced, forced_row, match)
        matched = match >= 0
        safe = match.clamp(min=0)
        cls_t = torch.zeros(num_anchors, num_slots, device=device)
        if not self.config.encode_background_as_zeros:
            cls_t[:, 0] = 1.0
        if gt.shape[0]:
            onehot = F.one_hot(labels[safe].long(), num_slots).to(cls_t)
            cls_t = torch.where(matched[:, None], onehot, cls_t)
            reg_t = encode_boxes(gt[safe], self.anchors, self.config.box_coder_scales)
            reg_t = torch.where(matched[:, None], reg_t, torch.zeros_like(reg_t))
        else:
            reg_t = torch.zeros(num_anchors, 4, device=device)
        cls_w = torch.where(match == -1, torch.full_like(reg_t[:, 0], self.config.negative_class_weight),
                            (match != -2).to(cls_t))
        reg_w = matched.to(cls_t)
        return cls_t, cls_w, reg_t, reg_w, match

    def _hard_example_mining(self, loc: Tensor, cls: Tensor, codes: Tensor, matches: list[Tensor]
                             ) -> tuple[Tensor, Tensor]:
        """``core/losses.HardExampleMiner``: per image, NMS over the decoded predicted boxes ranked by loss, then
        at most ``max_negatives_per_positive`` negatives per positive (``min_negatives_per_image`` at least).

        As in the OD-API, an ignored anchor counts neither as positive nor negative, yet is kept when it falls
        within the negatives' quota (its loss weight is 0 anyway).
        """
        cfg = self.config.loss
        loc_total, cls_total = loc.new_zeros(()), cls.new_zeros(())
        with torch.no_grad():
            boxes = decode_boxes(codes.detach(), self.anchors, self.config.box_coder_scales)
        for i in range(loc.shape[0]):
            if cfg.hard_example_loss_type == "CLASSIFICATION":
                image_loss = cls[i]
            elif cfg.hard_example_loss_type == "LOCALIZATION":
                image_loss = loc[i]
            else:
                image_loss = cls[i] * cfg.classification_weight + loc[i] * cfg.localization_weight
            limit = cfg.num_hard_examples if cfg.num_hard_examples > 0 else image_loss.numel()
            keep = batched_nms(boxes[i], image_loss.detach(), torch.zeros_like(matches[i]),
                               cfg.hard_example_iou_threshold)[:limit]
            if cfg.max_negatives_per_positive > 0:
                positives = matches[i][keep] >= 0
                negatives = matches[i][keep] == -1
                max_negatives = max(cfg.min_negatives_per_image,
                                    int(cfg.max_negatives_per_positive * float(positives.sum())))
                keep = keep[positives | (torch.cumsum(negatives.long(), 0) <= max_negatives)]
            loc_total = loc_total + loc[i][keep].sum()
            cls_total = cls_total + cls[i][keep].sum()
        return loc_total, cls_total

    def reset_class_head(self, num_classes: int, id2label: Mapping[int, str] | None = None) -> None:
        """Replace the class head by a new, randomly initialised one for `num_classes` classes (fine-tuning),
        keeping the feature extractor, the box head and the anchors."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        new_config = dataclasses.replace(self.config, num_classes=num_classes)
        network = build_network(new_config, legacy_anchor_order=self.legacy_anchor_order)
        class_keys = _class_head_keys(network)
        new_state = network.state_dict()
        with torch.no_grad():
            for key, value in self.network.state_dict().items():
                if key not in class_keys:
                    new_state[key].copy_(value)
        self.network = network.to(self.anchors.device)
        self.config = new_config
        labels = dict(id2label) if id2label else _default_labels(num_classes)
        self.id2label = {i: labels.get(i, f"class_{i}") for i in range(1, num_classes + 1)}

    # --- persistence ---------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``model.safetensors`` and ``config.json`` (all that rebuilding the detector needs) to `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        # Atomic: a killed writer never leaves half a file that from_pretrained would trip over.
        atomic_write(directory / WEIGHTS_NAME,
                     lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "model_type": MODEL_TYPE}))
        config = {
            "model_type": MODEL_TYPE,
            "format_version": 1,
            "pipeline": self.config.to_dict(),
            "legacy_anchor_order": self.legacy_anchor_order,
            "clip_before_nms": self.clip_before_nms,
            "id2label": {str(k): v for k, v in self.id2label.items()},
            "feature_map_shapes": [list(s) for s in self.feature_map_shapes],
            "num_anchors": int(self.anchors.shape[0]),
        }
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> ODAPISSDDetector:
        """Read what `save_pretrained` wrote (no TF file needed)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise WeightsFormatError(f"{config_path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
            raise WeightsFormatError(f"{config_path}: model_type is not {MODEL_TYPE!r}")
        config = config_from_dict(data["pipeline"])
        legacy = bool(data.get("legacy_anchor_order", False))
        network = build_network(config, legacy_anchor_order=legacy)
        weights_path = directory / WEIGHTS_NAME
        try:
            state = load_file(str(weights_path))
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsFormatError(f"{weights_path}: cannot read ({exc})") from None
        expected = network.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise StateDictMismatchError(f"{weights_path}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                                         f"wrong shape {wrong[:8]}")
        network.load_state_dict(state)
        id2label = {int(k): v for k, v in data.get("id2label", {}).items()}
        model = cls(config, network, legacy_anchor_order=legacy, clip_before_nms=bool(data.get("clip_before_nms")),
                    id2label=id2label)
        if data.get("num_anchors") not in (None, model.anchors.shape[0]):
            raise WeightsFormatError(f"{config_path}: num_anchors {data['num_anchors']} but the config makes "
                                     f"{model.anchors.shape[0]}")
        return model.eval()


def _class_head_keys(network: nn.Module) -> set[str]:
    return {key for key, var in _tf_table(network).items()
            if re.search(r"(^|/)ClassPredictor(_depthwise)?/", var.name) and "_depthwise" not in var.name}


def _check_target(target: Mapping[str, Tensor], index: int, num_classes: int) -> tuple[Tensor, Tensor]:
    if not isinstance(target, Mapping) or "boxes" not in target or "labels" not in target:
        raise ValueError(f"target {index}: expected a dict with 'boxes' and 'labels'")
    boxes, labels = target["boxes"], target["labels"]
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"target {index}: boxes must be (M, 4), got {list(boxes.shape)}")
    if labels.shape != boxes.shape[:1]:
        raise ValueError(f"target {index}: {labels.shape[0] if labels.dim() else 0} labels for {boxes.shape[0]} boxes")
    if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
        raise ValueError(f"target {index}: labels must be 1-based ids in [1, {num_classes}], got "
                         f"{labels.unique().tolist()}")
    return boxes, labels


# ----------------------------------------------------------------------------------------------------------------
# Reading OD-API exports
# ----------------------------------------------------------------------------------------------------------------


def date_from_name(name: str) -> tuple[int, int, int] | None:
    """(year, month, day) of a model-zoo name such as ``ssd_mobilenet_v1_coco_2018_01_28`` or ``..._11_06_2017``."""
    match = _DATE_RES[0].search(name)
    if match:
        return int(match.group(1)), int(match.group(2)), int(match.group(3))
    match = _DATE_RES[1].search(name)
    if match:
        return int(match.group(3)), int(match.group(2)), int(match.group(1))
    return None


def _extract_archive(archive: Path, destination: Path) -> Path:
    """Extract the files an OD-API tarball needs (config, checkpoint, frozen graph, label maps) flat into
    `destination`, with the same refusals as `convert.archive` (unsafe paths, links, duplicates, oversize)."""
    with open(archive, "rb") as handle:
        magic = handle.read(6)
    mode = "r:gz" if magic.startswith(b"\x1f\x8b") else "r:bz2" if magic.startswith(b"BZh") else "r:"
    member_name = "<archive header>"
    try:
        with tarfile.open(archive, mode) as tar:
            for member in tar:
                member_name = member.name
                parts = PurePosixPath(member.name.replace("\\", "/")).parts
                if member.name.startswith(("/", "\\")) or ".." in parts:
                    raise WeightsFormatError(f"{archive}: refusing an unsafe member path {member.name!r}")
                if "saved_model" in parts or not _ARCHIVE_MEMBER.search(parts[-1] if parts else ""):
                    continue
                if not member.isfile():
                    raise WeightsFormatError(f"{archive}: member {member.name!r} is not a regular file; refused")
                if member.size > _MAX_MEMBER_BYTES:
                    raise WeightsFormatError(f"{archive}: member {member.name!r} is {member.size} bytes; refused")
                target = destination / parts[-1]
                if target.exists():
                    raise WeightsFormatError(f"{archive}: two members are named {parts[-1]!r}")
                stream = tar.extractfile(member)
                if stream is None:  # pragma: no cover - regular files always have data
                    continue
                with stream, open(target, "xb") as out:
                    while chunk := stream.read(1 << 20):
                        out.write(chunk)
                if target.stat().st_size != member.size:
                    raise WeightsFormatError(f"{archive}: member {member.name!r} is truncated")
    except WeightsFormatError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise WeightsFormatError(f"{archive}: the archive is corrupt or truncated (at member {member_name!r}): "
                                 f"{err}") from None
    return destination


def _locate(path: Path) -> tuple[Path, Path | None, Path | None, Path | None]:
    """(folder, pipeline.config, checkpoint prefix, frozen graph) for a folder, prefix, .index/.data file or .pb."""
    if path.is_dir():
        folder = path
        config = folder / "pipeline.config"
        indexes = sorted(folder.glob("*.index"))
        prefix = checkpoint_prefix(folder) if indexes else None
        graph = folder / "frozen_inference_graph.pb"
        return folder, config if config.is_file() else None, prefix, graph if graph.is_file() else None
    if path.suffix == ".pb":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        config = path.parent / "pipeline.config"
        return path.parent, config if config.is_file() else None, None, path
    prefix = checkpoint_prefix(path)
    config = prefix.parent / "pipeline.config"
    return prefix.parent, config if config.is_file() else None, prefix, None


def from_tf_object_detection(
    path: str | os.PathLike[str],
    *,
    legacy_anchor_order: bool = False,
    clip_before_nms: bool | None = None,
    label_map: str | os.PathLike[str] | Mapping[int, str] | None = None,
    **overrides: Any,
) -> ODAPISSDDetector:
    """Load a TF Object Detection API SSD-MobileNetV1 model as an `ODAPISSDDetector` (in eval mode).

    Args:
        path: a model folder (``pipeline.config`` + ``model.ckpt.*`` and/or ``frozen_inference_graph.pb``), a
            model-zoo ``.tar.gz`` of one, a checkpoint prefix (``.../model.ckpt``) or a ``.pb``. The checkpoint is
            preferred when both are there. Without ``pipeline.config`` only a frozen graph can be read, and only
            what the graph tells is inferred (see `infer_config_from_graph`).
        legacy_anchor_order: models trained with OD-API code before November 2017 (the zoo's ``*_11_06_2017``)
            put the interpolated-scale anchor right after aspect ratio 1.0.
        clip_before_nms: None = from a date in the file or folder name (before July 2018: clip before NMS, as
            that code did), else the modern order; or force either.
        label_map: a ``label_map.pbtxt`` path or an id -> name mapping. Default: a ``*label_map*.pbtxt`` beside
            the model, else COCO's names for 90-class models, else "class_i".
        overrides: torchvision's names: ``score_thresh``, ``nms_thresh``, ``detections_per_img`` replace the
            config's post-processing; ``num_classes`` (different from the model's) gives a new, randomly initialised
            class head for fine-tuning, keeping the feature extractor and the box head.

    Raises `PipelineConfigError` (unsupported or malformed config; names the field), `WeightsFormatError` (corrupt
    checkpoint, truncated archive) or `StateDictMismatchError` (weights that disagree with the config; names the
    file and the tensors). Nothing is returned half-loaded.
    """
    allowed = {"score_thresh", "nms_thresh", "detections_per_img", "num_classes"}
    unknown = set(overrides) - allowed
    if unknown:
        raise TypeError(f"unknown overrides {sorted(unknown)}; expected some of {sorted(allowed)}")
    path = Path(path)
    name = path.name
    if path.is_file() and name.lower().endswith((".tar.gz", ".tgz", ".tar")):
        with tempfile.TemporaryDirectory(prefix="odapi_") as tmp:
            folder = _extract_archive(path, Path(tmp))
            model = _load_folder(folder, legacy_anchor_order, clip_before_nms, label_map, overrides,
                                 date_source=name)
        return model
    # The date is read from the file's or folder's own name, not from the directories above it.
    date_source = path.name if path.is_dir() else f"{path.resolve().parent.name}/{path.name}"
    return _load_folder(path, legacy_anchor_order, clip_before_nms, label_map, overrides, date_source=date_source)


def _load_folder(path: Path, legacy: bool, clip_before_nms: bool | None,
                 label_map: Any, overrides: dict[str, Any], *, date_source: str) -> ODAPISSDDetector:
    folder, config_path, prefix, graph = _locate(path)
    if prefix is None and graph is None:
        raise FileNotFoundError(f"{path}: no checkpoint (*.index) and no frozen_inference_graph.pb")
    if config_path is not None:
        config = read_pipeline_config(config_path)
        graph_nodes = None
    else:
        if graph is None:
            raise PipelineConfigError(f"{folder}: no pipeline.config beside the checkpoint {prefix}; a checkpoint "
                                      "alone does not say the image size, anchors or post-processing")
        graph_nodes = read_graph_nodes(graph)
        config, graph_legacy = infer_config_from_graph(graph_nodes, source=str(graph),
                                                       fallback_score_threshold=overrides.get("score_thresh"))
        warnings.warn(f"{graph}: no pipeline.config beside it; read the architecture, anchors (order: "
                      f"{'legacy' if graph_legacy else 'modern'}) and post-processing from the graph, and assumed "
                      f"{GRAPH_ASSUMPTIONS}", stacklevel=3)
        legacy = graph_legacy
    date = date_from_name(date_source)
    if clip_before_nms is None:
        clip_before_nms = date is not None and date < (2018, 7, 1)
    if date is not None and date < (2017, 11, 1) and not legacy and not config.is_fpn:
        warnings.warn(f"{date_source}: dated {date[0]}-{date[1]:02d}-{date[2]:02d}, before November 2017; such models "
                      "put the interpolated anchor after aspect ratio 1.0: pass legacy_anchor_order=True", stacklevel=3)
    network = build_network(config, legacy_anchor_order=legacy)
    if prefix is not None:
        source = str(prefix) + ".index"
        raw = TFCheckpoint(prefix).read_all()
        variables = _model_variables(raw, use_ema=config.use_moving_averages, source=source)
        strict_unexpected = True
    else:
        source = str(graph)
        nodes = graph_nodes if graph_nodes is not None else read_graph_nodes(graph)
        variables = {n.name: n.value for n in nodes if n.op == "Const" and n.value is not None}
        strict_unexpected = False
    try:
        _load_variables(network, variables, source=source, strict_unexpected=strict_unexpected)
    except StateDictMismatchError as exc:
        hint = _num_classes_hint(network, variables, config)
        raise StateDictMismatchError(f"{exc}{hint}") from None
    labels = _resolve_labels(label_map, folder, config.num_classes)
    model = ODAPISSDDetector(
        config, network, legacy_anchor_order=legacy, clip_before_nms=clip_before_nms, id2label=labels,
        score_thresh=overrides.get("score_thresh"), nms_thresh=overrides.get("nms_thresh"),
        detections_per_img=overrides.get("detections_per_img"),
    )
    num_classes = overrides.get("num_classes")
    if num_classes is not None and num_classes != config.num_classes:
        # The new head's names come from the label map the caller gave, not from the model's own.
        new_labels = _resolve_labels(label_map, None, int(num_classes)) if label_map is not None else None
        model.reset_class_head(int(num_classes), new_labels)
    return model.eval()


def _num_classes_hint(network: nn.Module, variables: Mapping[str, np.ndarray], config: SSDPipelineConfig) -> str:
    """When the class head's size disagrees, say which num_classes the weights have."""
    for key, var in _tf_table(network).items():
        if var.name.endswith("ClassPredictor/biases") and var.name in variables:
            expected = network.state_dict()[key].shape[0]
            found = int(np.shape(variables[var.name])[0])
            if found != expected:
                per_location = expected // (config.num_classes + 1)
                if per_location and found % per_location == 0:
                    return (f" (model.ssd.num_classes is {config.num_classes} in pipeline.config, but {var.name} has "
                            f"{found} outputs = {per_location} anchors x {found // per_location} classes including "
                            f"background: the weights are for num_classes {found // per_location - 1})")
            break
    return ""


def _resolve_labels(label_map: Any, folder: Path | None, num_classes: int) -> dict[int, str]:
    if isinstance(label_map, Mapping):
        return {int(k): str(v) for k, v in label_map.items()}
    if label_map is not None:
        return read_label_map(label_map)
    found = sorted(folder.glob("*label_map*.pbtxt")) if folder is not None else []
    if len(found) == 1:
        return read_label_map(found[0])
    if num_classes == 90:
        coco = coco_label_map()
        return {i: coco.get(i, "N/A") for i in range(1, 91)}
    return _default_labels(num_classes)

