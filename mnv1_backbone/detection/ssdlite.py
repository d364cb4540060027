"""SSDLite on MobileNetV1 (torchvision's SSDLite recipe) and the part of an SSD that exports.

Taps at blocks 11 and 13, four extra depthwise blocks (1x1 to out/2, 3x3 depthwise stride 2, 1x1 to out;
out = 512, 256, 256, 128), BN eps 1e-3 / momentum 0.03, N(0, 0.03) init of new convs, six levels of default
boxes (DESIGN.md §6). torchvision keeps its helpers for these private, so they are written here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead

from ..backbone import MobileNetV1Backbone
from .builders import (
    IMAGE_MEAN,
    IMAGE_STD,
    NUM_STAGES,
    WeightsPath,
    _load_detector_weights,
    _make_backbone,
    _validate_num_classes,
    _validate_trainable_layers,
)

__all__ = [
    "SSDLITE_EXTRA_CHANNELS",
    "SSDLiteFeatureExtractor",
    "SSDNetwork",
    "decode_ssd",
    "ssdlite320_mobilenet_v1",
    "ssdlite_extra_block",
    "ssdlite_mobilenet_v1",
]

SSDLITE_EXTRA_CHANNELS = (512, 256, 256, 128)


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
        weights_backbone: the classifier whose trunk initialises the backbone: an HF directory, our
            `.safetensors`, Google's TF files (checkpoint, frozen `.pb`, `.tgz`), timm's MobileNetV1 (a state-dict
            file or a `"timm/<name>"` Hub id), or a `BackboneWeights(path, tf_padding=False)` for TF checkpoints
            trained with `use_explicit_padding=True`.
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
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
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
