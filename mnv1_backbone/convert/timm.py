"""timm's MobileNetV1 (`mobilenetv1_100`, `mobilenetv1_125`) to Hugging Face keys: a pure name table, no timm needed.

timm's `mobilenetv1_*` (`timm/models/efficientnet.py`, `_gen_mobilenet_v1`) is the paper's network with
symmetric padding (our `tf_padding=False`), BatchNorm eps 1e-5 (momentum 0.1), ReLU6 and a 1000-way classifier
without a background class. Its modules: `conv_stem` + `bn1`, then `blocks.<stage>.<i>` (stages of 1, 2, 2, 6 and
2 depthwise-separable blocks: `conv_dw` + `bn1`, `conv_pw` + `bn2`), then `classifier`. Block k (1..13) in
execution order maps to HF's `layer.{2k-2}` (depthwise) and `layer.{2k-1}` (pointwise). The `_100h` variant adds
a `conv_head` before the classifier: not this architecture, refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mnv1_backbone.errors import StateDictMismatchError

__all__ = ["TIMM_PREPROCESSING", "is_timm_state_dict", "timm_preprocessing", "timm_to_hf"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(conv_dw|bn1|conv_pw|bn2)\.(.+)$")
_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_NUM_BLOCKS = 13

# timm's pretrained_cfg of the published weights (`ra4_e3600_r224_in1k`): bicubic, mean = std = 0.5, 224 crops
# of a resize to int(224 / crop_pct); crop_pct 0.875 for the 1.0-wide model, 0.9 for the 1.25-wide one.
TIMM_PREPROCESSING: dict[float, dict[str, Any]] = {
    1.0: {"input_size": 224, "crop_pct": 0.875, "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3},
    1.25: {"input_size": 224, "crop_pct": 0.9, "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3},
}


def is_timm_state_dict(keys: Any) -> bool:
    """Whether state-dict keys are timm's MobileNetV1 layout (stem `conv_stem.weight`, `blocks.0.0.conv_dw`)."""
    keys = set(keys)
    return "conv_stem.weight" in keys and "blocks.0.0.conv_dw.weight" in keys


def timm_preprocessing(depth_multiplier: float, pretrained_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """timm's evaluation settings: from `pretrained_cfg` (a timm model's, or a Hub repo's config.json) when given,
    else those of the published weights of this width (1.0-wide ones for other widths)."""
    settings = dict(TIMM_PREPROCESSING.get(float(depth_multiplier), TIMM_PREPROCESSING[1.0]))
    if pretrained_cfg:
        size = pretrained_cfg.get("input_size")
        if size is not None:
            settings["input_size"] = int(size[-1])
        for key in ("crop_pct", "interpolation", "mean", "std"):
            if pretrained_cfg.get(key) is not None:
                settings[key] = pretrained_cfg[key]
    return settings


def timm_to_hf(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Map a timm MobileNetV1 state dict to `(HF classifier state dict, MobileNetV1Config keyword arguments)`.

    The width comes from the stem (32 x depth_multiplier channels), the label count from the classifier (0 when
    the file has none, as timm's `num_classes=0` models). Shapes are checked by the caller against the config.
    Raises `StateDictMismatchError` naming the keys that are not timm's MobileNetV1.
    """
    if not is_timm_state_dict(state_dict):
        raise StateDictMismatchError(
            "not a timm MobileNetV1 state dict: it has no conv_stem.weight and blocks.0.0.conv_dw.weight"
        )
    if "conv_head.weight" in state_dict:
        raise StateDictMismatchError(
            "this timm model has a conv_head before its classifier (mobilenetv1_100h): not MobileNetV1's layout; "
            "use mobilenetv1_100 or mobilenetv1_125"
        )
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for k in state_dict if (m := _BLOCK.match(k))})
    if len(blocks) != _NUM_BLOCKS:
        raise StateDictMismatchError(f"a timm MobileNetV1 has {_NUM_BLOCKS} blocks, this state dict has {len(blocks)}")
    number = {stage_block: k for k, stage_block in enumerate(blocks, start=1)}
    converted: dict[str, Any] = {}
    unknown = []
    for key, value in state_dict.items():
        if key == "conv_stem.weight":
            converted["mobilenet_v1.conv_stem.convolution.weight"] = value
        elif key.startswith("bn1.") and key[4:] in _NORM:
            converted[f"mobilenet_v1.conv_stem.normalization.{key[4:]}"] = value
        elif key in ("classifier.weight", "classifier.bias"):
            converted[key] = value
        elif (match := _BLOCK.match(key)) is not None:
            k = number[(int(match.group(1)), int(match.group(2)))]
            part, name = match.group(3), match.group(4)
            layer = 2 * k - 2 if part in ("conv_dw", "bn1") else 2 * k - 1
            module = "convolution" if part.startswith("conv") else "normalization"
            converted[f"mobilenet_v1.layer.{layer}.{module}.{name}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise StateDictMismatchError(f"{len(unknown)} keys that timm's MobileNetV1 does not have: {unknown[:10]}")
    stem_channels = int(state_dict["conv_stem.weight"].shape[0])
    classifier = state_dict.get("classifier.weight")
    config = {
        "num_channels": int(state_dict["conv_stem.weight"].shape[1]),
        "depth_multiplier": stem_channels / 32,
        "tf_padding": False,
        "layer_norm_eps": 1e-5,
        "batch_norm_momentum": 0.1,
        "hidden_act": "relu6",
        "classifier_dropout_prob": 0.0,
        "num_labels": 0 if classifier is None else int(classifier.shape[0]),
    }
    return converted, config
