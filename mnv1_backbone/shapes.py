"""The tensors a `MobileNetV1Config` implies, known without building a model, and the strict check against them.

Readers and converters (`weights`, `hf_checkpoint`, `convert/`) sit below the models in the package's layering:
they return or take `(config, state_dict)` and never build a module. What they need to know about a model (its
keys and shapes, to check a file before anything is allocated or written) comes from here, computed from the
architecture table exactly as `layers.build_trunk` lays the modules out (HF's key names, DESIGN.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from .config import MobileNetV1Config, plan_layers
from .errors import StateDictMismatchError

__all__ = ["check_shapes", "classifier_shapes", "num_elements", "trunk_shapes"]

_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


def _conv_norm(prefix: str, weight_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    channels = weight_shape[0]
    shapes = {f"{prefix}.convolution.weight": weight_shape}
    shapes.update({f"{prefix}.normalization.{key}": (channels,) for key in _NORM_KEYS})
    shapes[f"{prefix}.normalization.num_batches_tracked"] = ()
    return shapes


def trunk_shapes(config: MobileNetV1Config, num_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the bare model's trunk (`conv_stem`, `layer.0` .. `layer.25`), HF's `MobileNetV1Model`
    keys without prefix; `num_layers` stops early, as a backbone that taps fewer blocks does."""
    plans = plan_layers(config.depth_multiplier, config.min_depth, 32, config.num_channels)
    stem = plans[0]
    shapes = _conv_norm("conv_stem", (stem.out_channels, stem.in_channels, 3, 3))
    layer = 0
    for plan in plans[1:]:
        shapes.update(_conv_norm(f"layer.{layer}", (plan.in_channels, 1, 3, 3)))  # depthwise
        shapes.update(_conv_norm(f"layer.{layer + 1}", (plan.out_channels, plan.in_channels, 1, 1)))  # pointwise
        layer += 2
    if num_layers is not None:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("layer.") or int(k.split(".")[1]) < num_layers}
    return shapes


def classifier_shapes(config: MobileNetV1Config) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of `MobileNetV1ForImageClassification(config).state_dict()`, in its order."""
    shapes = {f"mobilenet_v1.{k}": v for k, v in trunk_shapes(config).items()}
    if config.num_labels > 0:
        features = config.channels(len(plan_layers()) - 1)
        shapes["classifier.weight"] = (config.num_labels, features)
        shapes["classifier.bias"] = (config.num_labels,)
    return shapes


def num_elements(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """How many numbers tensors of these shapes hold together."""
    return sum(math.prod(shape) for shape in shapes.values())


def check_shapes(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Tensor], *, source: str, target: str
) -> None:
    """Raise one `StateDictMismatchError` listing every missing, unexpected or misshapen key of `state_dict`.

    `num_batches_tracked` is bookkeeping, not a weight: files without it pass, and frozen BatchNorms (which have
    none) accept files with it. `target` names what the tensors were meant for, in the message.
    """
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected and not k.endswith("num_batches_tracked")]
    misshapen = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k])
    ]
    if missing or unexpected or misshapen:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"{len(keys)} {title}: {shown}")
        raise StateDictMismatchError(f"{source} does not fit {target}: " + "; ".join(parts))
