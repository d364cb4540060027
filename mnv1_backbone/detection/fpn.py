"""The FPN family on MobileNetV1: a feature pyramid over the backbone's taps, and Faster/Mask R-CNN, RetinaNet
and FCOS builders on it (DESIGN.md §6: `BackboneWithFPN` cannot tap our layers, so `MobileNetV1FPN` wraps
`torchvision.ops.FeaturePyramidNetwork`; anchors 4x each level's stride)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ..backbone import MobileNetV1Backbone
from .builders import (
    IMAGE_MEAN,
    IMAGE_STD,
    NUM_STAGES,
    WeightsPath,
    _freeze_all_batch_norms,
    _load_detector_weights,
    _make_backbone,
    _validate_num_classes,
    _validate_trainable_layers,
)

__all__ = [
    "MobileNetV1FPN",
    "fasterrcnn_mobilenet_v1_fpn",
    "fcos_mobilenet_v1_fpn",
    "maskrcnn_mobilenet_v1_fpn",
    "mobilenet_v1_fpn_backbone",
    "retinanet_mobilenet_v1_fpn",
]


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
    return {"image_mean": IMAGE_MEAN, "image_std": IMAGE_STD, **kwargs}


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
