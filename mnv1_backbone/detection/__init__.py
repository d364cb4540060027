"""MobileNetV1 in torchvision's detectors: SSDLite and the FPN family (Faster/Mask R-CNN, RetinaNet, FCOS).

The only module that imports `torchvision.models.detection`. Builders follow torchvision's own
(keyword-only `weights`, `weights_backbone`, `num_classes`, `trainable_backbone_layers`, `**kwargs`
forwarded to the detector) and its SSDLite recipe (DESIGN.md §6): taps at blocks 11 and 13, four
extra depthwise blocks (1x1 to out/2, 3x3 depthwise stride 2, 1x1 to out; out = 512, 256, 256, 128),
BN eps 1e-3 / momentum 0.03, N(0, 0.03) init of new convs, six levels of default boxes.
torchvision keeps its helpers for these private, so they are written here.
Image mean and std are 0.5, as Google's weights expect inputs in [-1, 1].
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ..backbone import MobileNetV1Backbone
from ..config import STAGES, MobileNetV1Config
from ..layers import FrozenBatchNorm2d
from .odapi import from_tf_object_detection as from_tf_object_detection  # TF OD-API import (issue 12)

__all__ = [
    "MobileNetV1FPN",
    "SSDLiteFeatureExtractor",
    "SSDNetwork",
    "decode_ssd",
    "fasterrcnn_mobilenet_v1_fpn",
    "fcos_mobilenet_v1_fpn",
    "maskrcnn_mobilenet_v1_fpn",
    "mobilenet_v1_fpn_backbone",
    "retinanet_mobilenet_v1_fpn",
    "ssdlite320_mobilenet_v1",
    "ssdlite_mobilenet_v1",
]

NUM_STAGES = len(STAGES)
# Google's preprocessing maps pixels to [-1, 1]; torchvision's detectors default to ImageNet statistics.
_IMAGE_MEAN = [0.5, 0.5, 0.5]
_IMAGE_STD = [0.5, 0.5, 0.5]
SSDLITE_EXTRA_CHANNELS = (512, 256, 256, 128)
WeightsPath = str | os.PathLike | None


# --- SSDLite -----------------------------------------------------------------------------------------


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, norm_layer: Callable[..., nn.Module], stride: int = 1
) -> nn.Sequential:
    groups = in_channels if kernel_size == 3 else 1  # the 3x3 of an extra block is depthwise
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        norm_layer(out_channels),
        nn.ReLU6(inplace=True),
    )


def ssdlite_extra_block(in_channels: int, out_channels: int, norm_layer: Callable[..., nn.Module]) -> nn.Sequential:
    """One extra SSDLite level: 1x1 to out/2, 3x3 depthwise stride 2, 1x1 to out (each with BN and ReLU6)."""
    hidden = out_channels // 2
    return nn.Sequential(
        _conv_bn_relu6(in_channels, hidden, 1, norm_layer),
        _conv_bn_relu6(hidden, hidden, 3, norm_layer, stride=2),
        _conv_bn_relu6(hidden, out_channels, 1, norm_layer),
    )


class SSDLiteFeatureExtractor(nn.Module):
    """The backbone's two taps plus extra stride-2 blocks: six maps for SSD's six anchor levels."""

    def __init__(
        self,
        backbone: MobileNetV1Backbone,
        extra_channels: Sequence[int] = SSDLITE_EXTRA_CHANNELS,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)
        self.backbone = backbone
        in_channels = backbone.out_channels[-1]
        extras = []
        for channels in extra_channels:
            extras.append(ssdlite_extra_block(in_channels, channels, norm_layer))
            in_channels = channels
        self.extra = nn.ModuleList(extras)
        for module in self.extra.modules():
            if isinstance(module, nn.Conv2d):  # torchvision's recipe for the new layers
                nn.init.normal_(module.weight, mean=0.0, std=0.03)
        self.out_channels = list(backbone.out_channels) + list(extra_channels)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)
        out: dict[str, Tensor] = OrderedDict()
        for i, value in enumerate(features.values()):
            out[str(i)] = value
            x = value
        offset = len(out)
        for i, block in enumerate(self.extra):
            x = block(x)
            out[str(offset + i)] = x
        return out


def ssdlite_mobilenet_v1(
    *,
    size: int = 320,
    weights: WeightsPath = None,
    weights_backbone: WeightsPath = None,
    num_classes: int = 91,
    trainable_backbone_layers: int | None = None,
    depth_multiplier: float | None = None,
    **kwargs: Any,
) -> SSD:
    """SSDLite with a MobileNetV1 backbone at `size` x `size` (torchvision's SSDLite recipe).

    Args:
        size: input side the detector resizes images to (320 as torchvision's; 300 and 512 work too).
        weights: a detector state dict file (`.safetensors` or `.pt`, e.g. a demo checkpoint's weights).
        weights_backbone: an HF directory, our `.safetensors` or a TF frozen `.pb`: the classifier whose
            trunk initialises the backbone.
        num_classes: including the background class 0.
        trainable_backbone_layers: stages (0-6) trainable from the top; all six when not pretrained.
        depth_multiplier: backbone width; taken from `weights_backbone` when that is given.
        **kwargs: forwarded to `torchvision.models.detection.ssd.SSD` (e.g. `score_thresh`).
    """
    if not isinstance(size, int) or size < 64:
        raise ValueError(f"size must be an int >= 64, got {size!r}")
    _validate_num_classes(num_classes)
    trainable = _validate_trainable_layers(weights_backbone is not None, trainable_backbone_layers, 6)
    backbone = _make_backbone((11, 13), weights_backbone, depth_multiplier)
    backbone.freeze(NUM_STAGES - trainable)
    features = SSDLiteFeatureExtractor(backbone)
    anchor_generator = kwargs.pop("anchor_generator", None) or DefaultBoxGenerator(
        [[2, 3] for _ in features.out_channels], min_ratio=0.2, max_ratio=0.95
    )
    norm_layer = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)
    head = SSDLiteHead(features.out_channels, anchor_generator.num_anchors_per_location(), num_classes, norm_layer)
    defaults = {
        "score_thresh": 0.001,
        "nms_thresh": 0.55,
        "detections_per_img": 300,
        "topk_candidates": 300,
        "image_mean": _IMAGE_MEAN,
        "image_std": _IMAGE_STD,
    }
    model = SSD(features, anchor_generator, (size, size), num_classes, head=head, **{**defaults, **kwargs})
    return _load_detector_weights(model, weights)


def ssdlite320_mobilenet_v1(
    *,
    weights: WeightsPath = None,
    weights_backbone: WeightsPath = None,
    num_classes: int = 91,
    trainable_backbone_layers: int | None = None,
    depth_multiplier: float | None = None,
    **kwargs: Any,
) -> SSD:
    """SSDLite-MobileNetV1 at 320x320; see `ssdlite_mobilenet_v1` for the arguments."""
    return ssdlite_mobilenet_v1(
        size=320,
        weights=weights,
        weights_backbone=weights_backbone,
        num_classes=num_classes,
        trainable_backbone_layers=trainable_backbone_layers,
        depth_multiplier=depth_multiplier,
        **kwargs,
    )


class SSDNetwork(nn.Module):
    """The part of a torchvision `SSD` that exports: normalisation, backbone, head and anchors, at one size.

    `torch.export` and ONNX cannot follow SSD's post-processing (score thresholds and NMS give sizes that
    depend on the data), so a deployment runs this network in its runtime and decodes after it, with
    `decode_ssd` or its own NMS. The input is (B, 3, H, W) in [0, 1] already resized to `size`, which is
    all SSD's transform does besides normalising (it resizes every image to its fixed size).

    Returns (box_regression (B, A, 4), class_logits (B, A, num_classes), anchors (A, 4) as x1, y1, x2, y2
    in input pixels).
    """

    def __init__(self, model: SSD) -> None:
        super().__init__()
        transform = model.transform
        if transform.fixed_size is None:
            raise ValueError("SSDNetwork needs an SSD with a fixed input size")
        self.size: tuple[int, int] = (int(transform.fixed_size[0]), int(transform.fixed_size[1]))
        self.register_buffer("image_mean", torch.tensor(transform.image_mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(transform.image_std).reshape(1, -1, 1, 1), persistent=False)
        self.backbone = model.backbone
        self.head = model.head
        self.anchor_generator = model.anchor_generator

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.size:
            raise ValueError(f"expected (B, 3, {self.size[0]}, {self.size[1]}) images, got {tuple(images.shape)}")
        features = list(self.backbone((images - self.image_mean) / self.image_std).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(ImageList(images[:1], [self.size]), features)[0]
        return head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors


def decode_ssd(
    model: SSD,
    box_regression: Tensor,
    class_logits: Tensor,
    anchors: Tensor,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[dict[str, Tensor]]:
    """Detections from `SSDNetwork`'s outputs, exactly as `model(images)` gives them: boxes decoded from the
    anchors, per-class score threshold, top-k and NMS with the model's settings, then (with
    `original_sizes`, one (H, W) per image) scaled from the network's input size to the original images."""
    size = (int(model.transform.fixed_size[0]), int(model.transform.fixed_size[1]))
    batch = box_regression.shape[0]
    head_outputs = {"bbox_regression": box_regression, "cls_logits": class_logits}
    detections = model.postprocess_detections(head_outputs, [anchors] * batch, [size] * batch)
    if original_sizes is not None:
        if len(original_sizes) != batch:
            raise ValueError(f"got {len(original_sizes)} original sizes for {batch} images")
        detections = model.transform.postprocess(detections, [size] * batch, [tuple(s) for s in original_sizes])
    return detections


# --- FPN family --------------------------------------------------------------------------------------


class MobileNetV1FPN(nn.Module):
    """Backbone outputs through `torchvision.ops.FeaturePyramidNetwork`.

    Returns an ordered dict "0", "1", ... (one per tapped block, finest first) plus the extra block's
    levels ("pool" for `LastLevelMaxPool`, "p6", "p7" for `LastLevelP6P7`), each `out_channels` wide.
    torchvision's `BackboneWithFPN` cannot tap our layers (only direct children), hence this wrapper.
    """

    def __init__(
        self,
        backbone: MobileNetV1Backbone,
        fpn_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(
            backbone.out_channels, fpn_channels, extra_blocks=extra_blocks, norm_layer=norm_layer
        )
        self.out_channels = fpn_channels
        self.strides = list(backbone.strides) + _extra_strides(extra_blocks, backbone.strides[-1])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.body(x)
        renamed: dict[str, Tensor] = OrderedDict()
        for i, value in enumerate(features.values()):
            renamed[str(i)] = value
        return self.fpn(renamed)


def _extra_strides(extra_blocks: ExtraFPNBlock | None, last_stride: int) -> list[int]:
    if isinstance(extra_blocks, LastLevelMaxPool):
        return [last_stride * 2]
    if isinstance(extra_blocks, LastLevelP6P7):
        return [last_stride * 2, last_stride * 4]
    return []


def mobilenet_v1_fpn_backbone(
    *,
    out_indices: Sequence[int] = (5, 11, 13),
    fpn_channels: int = 256,
    extra_blocks: ExtraFPNBlock | None = None,
    trainable_layers: int = NUM_STAGES,
    weights_backbone: WeightsPath = None,
    depth_multiplier: float | None = None,
    frozen_batch_norm: bool | None = None,
    output_stride: int = 32,
    norm_layer: Callable[..., nn.Module] | None = None,
) -> MobileNetV1FPN:
    """A MobileNetV1 + FPN feature extractor for any torchvision detector (int `out_channels`).

    Args:
        out_indices: tapped blocks (default C3/C4/C5 at strides 8/16/32).
        fpn_channels: channels of every FPN level.
        extra_blocks: e.g. `LastLevelMaxPool()` (default) or `LastLevelP6P7(256, 256)`.
        trainable_layers: stages trainable from the top (0-6).
        weights_backbone: classifier checkpoint whose trunk initialises the backbone.
        frozen_batch_norm: use frozen BatchNorm everywhere in the backbone; default: when pretrained.
        norm_layer: normalisation inside the FPN (None, as torchvision's).
    """
    if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= NUM_STAGES:
        raise ValueError(f"trainable_layers must be an int in [0, {NUM_STAGES}], got {trainable_layers!r}")
    backbone = _make_backbone(out_indices, weights_backbone, depth_multiplier, output_stride=output_stride)
    if frozen_batch_norm if frozen_batch_norm is not None else weights_backbone is not None:
        _freeze_all_batch_norms(backbone)
    backbone.freeze(NUM_STAGES - trainable_layers)
    extra_blocks = extra_blocks if extra_blocks is not None else LastLevelMaxPool()
    return MobileNetV1FPN(backbone, fpn_channels, extra_blocks, norm_layer)


def _anchor_sizes(strides: Sequence[int], scales_per_octave: int) -> tuple[tuple[int, ...], ...]:
    """Anchors 4x each level's stride (torchvision's 32..512 for strides 8..128), with intermediate octave scales."""
    return tuple(
        tuple(int(4 * stride * 2 ** (i / scales_per_octave)) for i in range(scales_per_octave)) for stride in strides
    )


def _fpn_detector_backbone(
    weights_backbone: WeightsPath,
    trainable_backbone_layers: int | None,
    depth_multiplier: float | None,
    extra_blocks: ExtraFPNBlock,
    out_indices: Sequence[int],
) -> MobileNetV1FPN:
    trainable = _validate_trainable_layers(weights_backbone is not None, trainable_backbone_layers, 3)
    return mobilenet_v1_fpn_backbone(
        out_indices=out_indices,
        extra_blocks=extra_blocks,
        trainable_layers=trainable,
        weights_backbone=weights_backbone,
        depth_multiplier=depth_multiplier,
    )


def _fpn_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"image_mean": _IMAGE_MEAN, "image_std": _IMAGE_STD, **kwargs}


def fasterrcnn_mobilenet_v1_fpn(
    *,
    weights: WeightsPath = None,
    weights_backbone: WeightsPath = None,
    num_classes: int = 91,
    trainable_backbone_layers: int | None = None,
    depth_multiplier: float | None = None,
    out_indices: Sequence[int] = (5, 11, 13),
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN on MobileNetV1 + FPN (taps 5/11/13 + max-pool level: strides 8-64, four RoI levels).

    Arguments as `ssdlite_mobilenet_v1`; `**kwargs` go to `torchvision.models.detection.FasterRCNN`.
    """
    return _build_rcnn(
        FasterRCNN, weights, weights_backbone, num_classes, trainable_backbone_layers, depth_multiplier, out_indices,
        kwargs,
    )


def maskrcnn_mobilenet_v1_fpn(
    *,
    weights: WeightsPath = None,
    weights_backbone: WeightsPath = None,
    num_classes: int = 91,
    trainable_backbone_layers: int | None = None,
    depth_multiplier: float | None = None,
    out_indices: Sequence[int] = (5, 11, 13),
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN on MobileNetV1 + FPN; as `fasterrcnn_mobilenet_v1_fpn`, plus a 14x14 mask RoI pooler."""
    kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(_roi_levels(out_indices), output_size=14, sampling_ratio=2))
    return _build_rcnn(
        MaskRCNN, weights, weights_backbone, num_classes, trainable_backbone_layers, depth_multiplier, out_indices,
        kwargs,
    )


def _build_rcnn(
    detector: type[FasterRCNN],
    weights: WeightsPath,
    weights_backbone: WeightsPath,
    num_classes: int,
    trainable_backbone_layers: int | None,
    depth_multiplier: float | None,
    out_indices: Sequence[int],
    kwargs: dict[str, Any],
) -> FasterRCNN:
    """Faster or Mask R-CNN: anchors 4x each level's stride with three ratios, 7x7 box RoIs over the taps."""
    _validate_num_classes(num_classes)
    backbone = _fpn_detector_backbone(
        weights_backbone, trainable_backbone_layers, depth_multiplier, LastLevelMaxPool(), out_indices
    )
    sizes = _anchor_sizes(backbone.strides, 1)
    kwargs.setdefault("rpn_anchor_generator", AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)))
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(_roi_levels(out_indices), output_size=7, sampling_ratio=2))
    model = detector(backbone, num_classes, **_fpn_defaults(kwargs))
    return _load_detector_weights(model, weights)


def retinanet_mobilenet_v1_fpn(
    *,
    weights: WeightsPath = None,
    weights_backbone: WeightsPath = None,
    num_classes: int = 91,
    trainable_backbone_layers: int | None = None,
    depth_multiplier: float | None = None,
    out_indices: Sequence[int] = (5, 11, 13),
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet on MobileNetV1 + FPN with P6/P7 (five levels, strides 8-128, 9 anchors per place)."""
    _validate_num_classes(num_classes)
    backbone = _fpn_detector_backbone(
        weights_backbone, trainable_backbone_layers, depth_multiplier, LastLevelP6P7(256, 256), out_indices
    )
    sizes = _anchor_sizes(backbone.strides, 3)
    anchor_generator = kwargs.pop("anchor_generator", AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)))
    head = kwargs.pop(
        "head", RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes)
    )
    model = RetinaNet(backbone, num_classes, anchor_generator=anchor_generator, head=head, **_fpn_defaults(kwargs))
    return _load_detector_weights(model, weights)


def fcos_mobilenet_v1_fpn(
    *,
    weights: WeightsPath = None,
    weights_backbone: WeightsPath = None,
    num_classes: int = 91,
    trainable_backbone_layers: int | None = None,
    depth_multiplier: float | None = None,
    out_indices: Sequence[int] = (5, 11, 13),
    **kwargs: Any,
) -> FCOS:
    """FCOS on MobileNetV1 + FPN with P6/P7 (five levels; one 'anchor' per place, the size of its stride)."""
    _validate_num_classes(num_classes)
    backbone = _fpn_detector_backbone(
        weights_backbone, trainable_backbone_layers, depth_multiplier, LastLevelP6P7(256, 256), out_indices
    )
    strides = backbone.strides
    kwargs.setdefault("anchor_generator", AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides)))
    model = FCOS(backbone, num_classes, **_fpn_defaults(kwargs))
    return _load_detector_weights(model, weights)


def _roi_levels(out_indices: Sequence[int]) -> list[str]:
    """RoI pooling reads the FPN levels of the tapped blocks ("0", "1", ...), not the extra pool level."""
    return [str(i) for i in range(len(out_indices))]


# --- shared helpers ----------------------------------------------------------------------------------


def _validate_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be an int >= 2, got {num_classes!r}")


def _validate_trainable_layers(is_trained: bool, trainable_layers: int | None, default: int) -> int:
    """torchvision's semantics: stages trainable from the top; all of them when nothing is pretrained."""
    if not is_trained:
        if trainable_layers is not None:
            warnings.warn(
                "Changing trainable_backbone_layers has no effect if weights_backbone is not set; "
                f"falling back to trainable_backbone_layers={NUM_STAGES} so that all layers are trainable",
                stacklevel=3,
            )
        return NUM_STAGES
    if trainable_layers is None:
        return default
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not (
        0 <= trainable_layers <= NUM_STAGES
    ):
        raise ValueError(f"trainable_backbone_layers must be an int in [0, {NUM_STAGES}], got {trainable_layers!r}")
    return trainable_layers


def _read_classifier_weights(path: str | os.PathLike) -> tuple[MobileNetV1Config, dict[str, Tensor]]:
    from ..weights import load_any

    return load_any(path)


def _make_backbone(
    out_indices: Sequence[int],
    weights_backbone: WeightsPath,
    depth_multiplier: float | None,
    output_stride: int = 32,
) -> MobileNetV1Backbone:
    if weights_backbone is None:
        return MobileNetV1Backbone(
            out_indices, depth_multiplier=1.0 if depth_multiplier is None else depth_multiplier,
            output_stride=output_stride, batch_norm_momentum=0.03,
        )
    config, state_dict = _read_classifier_weights(weights_backbone)
    if depth_multiplier is not None and not math.isclose(depth_multiplier, config.depth_multiplier):
        raise ValueError(
            f"depth_multiplier={depth_multiplier} does not match the backbone weights' {config.depth_multiplier} "
            f"({weights_backbone}); leave it unset to take the weights' width"
        )
    # TF's decay 0.9997 barely moves the statistics in fine-tuning; torchvision's SSDLite uses 0.03.
    backbone = MobileNetV1Backbone.from_config(
        config, out_indices, output_stride=output_stride, batch_norm_momentum=0.03
    )
    backbone.load_trunk(state_dict, source=str(weights_backbone))
    return backbone


def _freeze_all_batch_norms(backbone: MobileNetV1Backbone) -> None:
    """Frozen statistics everywhere (torchvision's choice for pretrained detection backbones); convs stay trainable."""
    for module in backbone.modules():
        normalization = getattr(module, "normalization", None)
        if isinstance(normalization, nn.BatchNorm2d):
            module.normalization = FrozenBatchNorm2d.from_batch_norm(normalization)


def _load_detector_weights(model: nn.Module, weights: WeightsPath) -> Any:
    if weights is None:
        return model
    from ..weights import load_state_dict_file, load_state_dict_strict

    load_state_dict_strict(model, load_state_dict_file(weights), source=str(weights))
    return model
