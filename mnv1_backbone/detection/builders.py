"""What the detector builders share: argument checks, the backbone (and its weights), detector weights.

torchvision's builder conventions (DESIGN.md §6): `weights_backbone` initialises the backbone from a classifier
checkpoint, `trainable_backbone_layers` counts stages from the top, `weights` loads a whole detector. Image mean
and std are 0.5, as Google's weights expect inputs in [-1, 1].
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..backbone import MobileNetV1Backbone
from ..config import STAGES, MobileNetV1Config
from ..layers import FrozenBatchNorm2d

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "NUM_STAGES", "BackboneWeights", "WeightsPath"]

NUM_STAGES = len(STAGES)
# Google's preprocessing maps pixels to [-1, 1]; torchvision's detectors default to ImageNet statistics.
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class BackboneWeights:
    """A `weights_backbone` with reading options, where the file alone cannot say them.

    Attributes:
        path: anything `mnv1_backbone.weights.load_any` reads (HF directory, our `.safetensors`, TF checkpoint,
            frozen `.pb` or `.tgz`, timm state-dict file or `"timm/<name>"` Hub id).
        tf_padding: for TF files: False for checkpoints trained with TF-slim's `use_explicit_padding=True`
            (symmetric padding); Google's releases use SAME padding (True). Other formats record their padding.
        prefer_ema: for TF checkpoints: their ExponentialMovingAverage shadows (True) or the raw variables.
    """

    path: str | os.PathLike
    tf_padding: bool = True
    prefer_ema: bool = True

    def __str__(self) -> str:
        return str(self.path)


WeightsPath = str | os.PathLike | BackboneWeights | None


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


def _read_classifier_weights(
    path: str | os.PathLike | BackboneWeights,
) -> tuple[MobileNetV1Config, dict[str, Tensor]]:
    from ..weights import load_any

    if isinstance(path, BackboneWeights):
        return load_any(path.path, prefer_ema=path.prefer_ema, tf_padding=path.tf_padding)
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
