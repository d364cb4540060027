"""MobileNetV1 configuration and the architecture table.

`MobileNetV1Config` uses Hugging Face's `config.json` field names and defaults (transformers
`models/mobilenet_v1/configuration_mobilenet_v1.py`), so configs move between the two libraries
unchanged. `LAYER_TABLE` is TF-slim's `MOBILENETV1_CONV_DEFS` (paper Table 1), and
`plan_layers` applies TF-slim's output-stride rule (`mobilenet_v1_base`) to it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "LAYER_TABLE",
    "NUM_BLOCKS",
    "STAGES",
    "LayerDef",
    "LayerPlan",
    "MobileNetV1Config",
    "plan_layers",
]


def _finite(value: float) -> bool:
    """`math.isfinite`, False for ints too large for a float (JSON allows 1e400-sized integers)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class LayerDef:
    """One row of the architecture: TF-slim end point name, nominal stride and channels at alpha = 1."""

    name: str
    stride: int
    channels: int


# TF-slim `MOBILENETV1_CONV_DEFS`: block 0 is the 3x3 stem conv, blocks 1-13 are depthwise-separable.
LAYER_TABLE: tuple[LayerDef, ...] = (
    LayerDef("Conv2d_0", 2, 32),
    LayerDef("Conv2d_1", 1, 64),
    LayerDef("Conv2d_2", 2, 128),
    LayerDef("Conv2d_3", 1, 128),
    LayerDef("Conv2d_4", 2, 256),
    LayerDef("Conv2d_5", 1, 256),
    LayerDef("Conv2d_6", 2, 512),
    LayerDef("Conv2d_7", 1, 512),
    LayerDef("Conv2d_8", 1, 512),
    LayerDef("Conv2d_9", 1, 512),
    LayerDef("Conv2d_10", 1, 512),
    LayerDef("Conv2d_11", 1, 512),
    LayerDef("Conv2d_12", 2, 1024),
    LayerDef("Conv2d_13", 1, 1024),
)
NUM_BLOCKS = len(LAYER_TABLE) - 1  # 13 separable blocks after the stem

# Stages split at the strided blocks (stem | 1 | 2-3 | 4-5 | 6-11 | 12-13); the unit of freezing.
STAGES: tuple[tuple[int, ...], ...] = ((0,), (1,), (2, 3), (4, 5), (6, 7, 8, 9, 10, 11), (12, 13))

_OUTPUT_STRIDES = (8, 16, 32)
_ACTIVATIONS = ("relu6", "relu", "silu", "swish", "gelu", "hardswish", "tanh", "sigmoid")
_POOLING = ("global", "tf_slim")


@dataclass(frozen=True)
class LayerPlan:
    """How block `index` is built: channels in and out, depthwise stride and dilation, total stride after it."""

    index: int
    name: str
    in_channels: int
    out_channels: int
    stride: int
    dilation: int
    output_stride: int


def plan_layers(
    depth_multiplier: float = 1.0, min_depth: int = 8, output_stride: int = 32, num_channels: int = 3
) -> list[LayerPlan]:
    """Resolve channels, strides and dilations of all 14 blocks, as TF-slim's `mobilenet_v1_base` does.

    Walking the table, once the running stride reaches `output_stride` every further layer runs at
    stride 1 with the current rate, and the rate grows by the layer's nominal stride from the *next*
    layer on. The stem always keeps its nominal stride (TF-slim does not dilate plain convs).
    """
    if output_stride not in _OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride!r}")
    plans = []
    current_stride, rate = 1, 1
    in_channels = num_channels
    for index, layer in enumerate(LAYER_TABLE):
        out_channels = max(int(layer.channels * depth_multiplier), min_depth)
        if index > 0 and current_stride == output_stride:
            stride, dilation = 1, rate
            rate *= layer.stride
        else:
            stride, dilation = layer.stride, 1
            current_stride *= layer.stride
        plans.append(LayerPlan(index, layer.name, in_channels, out_channels, stride, dilation, current_stride))
        in_channels = out_channels
    return plans


# The most labels whose default names a config writes out when built (ImageNet-21k has 21,841).
_MAX_DEFAULT_LABELS = 1 << 17


def _default_id2label(num_labels: int) -> dict[int, str]:
    """The shipped ImageNet labels for Google's 1001 classes; "LABEL_i" otherwise, as transformers names them."""
    if num_labels == 1001:
        from .labels import imagenet_id2label

        return imagenet_id2label()
    return {i: f"LABEL_{i}" for i in range(num_labels)}


@dataclass
class MobileNetV1Config:
    """Hyper-parameters of a MobileNetV1, with Hugging Face's `config.json` names and defaults.

    Two fields of HF's port carry TensorFlow semantics under PyTorch names (DESIGN.md §4):

    * `classifier_dropout_prob` defaults to 0.999 in HF, which is TF's *keep* probability
      (transformers#22767). The value is kept as written so configs round-trip, but the model's
      dropout uses `classifier_dropout_rate`, which reads values above 0.5 as keep probabilities.
    * HF hard-codes `BatchNorm2d(momentum=0.9997)`: TF's moving-average *decay*. Our
      `batch_norm_momentum` is the PyTorch momentum, 1 - 0.9997 by default.

    Fields that HF does not have (`batch_norm_momentum`, `pooling`) are written to `config.json` too;
    transformers keeps unknown keys as plain attributes and ignores them.
    """

    num_channels: int = 3
    image_size: int = 224
    depth_multiplier: float = 1.0
    min_depth: int = 8
    hidden_act: str = "relu6"
    tf_padding: bool = True
    classifier_dropout_prob: float = 0.999
    initializer_range: float = 0.02
    layer_norm_eps: float = 0.001
    num_labels: int = 1001
    id2label: dict[int, str] | None = field(default=None, repr=False)
    batch_norm_momentum: float = 1.0 - 0.9997
    pooling: str = "global"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels != len(self.id2label):
                self.num_labels = len(self.id2label)
        self.validate()
        # A plain dict, as in transformers (`config.id2label[index]` works on any config, and is the same before
        # and after a save): the shipped ImageNet names for 1001 labels, "LABEL_i" otherwise. Label counts beyond
        # any real classifier (a hostile config.json may claim 10**12, to be refused by the loaders' size check)
        # are not materialised here; `resolved_id2label()` names them on demand.
        if self.id2label is None and self.num_labels <= _MAX_DEFAULT_LABELS:
            self.id2label = _default_id2label(self.num_labels)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # As transformers' `num_labels` setter: a new label count gets default names unless the names still fit.
        if name == "num_labels" and isinstance(getattr(self, "id2label", None), dict):
            if isinstance(value, int) and len(self.id2label) != value:
                super().__setattr__("id2label", _default_id2label(value) if value <= _MAX_DEFAULT_LABELS else None)

    def validate(self) -> None:
        """Raise `ValueError` naming the first field whose value a MobileNetV1 cannot be built with."""
        if not isinstance(self.num_channels, int) or self.num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {self.num_channels!r}")
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"image_size must be an int >= 32, got {self.image_size!r}")
        if not isinstance(self.depth_multiplier, (int, float)) or not _finite(self.depth_multiplier) or (
            self.depth_multiplier <= 0
        ):
            raise ValueError(f"depth_multiplier must be a finite number > 0, got {self.depth_multiplier!r}")
        if not isinstance(self.min_depth, int) or self.min_depth < 1:
            raise ValueError(f"min_depth must be an int >= 1, got {self.min_depth!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}")
        if not 0.0 <= self.classifier_dropout_prob < 1.0:
            raise ValueError(f"classifier_dropout_prob must be in [0, 1), got {self.classifier_dropout_prob!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not _finite(self.layer_norm_eps) or (
            not self.layer_norm_eps > 0
        ):
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not 0.0 <= self.batch_norm_momentum <= 1.0:
            raise ValueError(f"batch_norm_momentum must be in [0, 1], got {self.batch_norm_momentum!r}")
        if not isinstance(self.num_labels, int) or self.num_labels < 0:
            raise ValueError(f"num_labels must be an int >= 0, got {self.num_labels!r}")
        if self.pooling not in _POOLING:
            raise ValueError(f"pooling must be one of {_POOLING}, got {self.pooling!r}")

    @property
    def classifier_dropout_rate(self) -> float:
        """The dropout probability to train with; HF's 0.999 default is TF's keep probability, i.e. 0.001."""
        p = self.classifier_dropout_prob
        return 1.0 - p if p > 0.5 else p

    @property
    def label2id(self) -> dict[str, int]:
        """`{label: index}`, the inverse of `id2label` (a plain dict, as transformers' `label2id`)."""
        return {label: i for i, label in self.resolved_id2label().items()}

    def resolved_id2label(self) -> dict[int, str]:
        """A copy of `id2label` (kept for callers from before `id2label` was always set)."""
        if self.id2label is None:  # only if a caller set it to None after construction
            return _default_id2label(self.num_labels)
        return dict(self.id2label)

    def channels(self, block: int) -> int:
        """Output channels of block `block` (0 = stem) at this width."""
        return max(int(LAYER_TABLE[block].channels * self.depth_multiplier), self.min_depth)

    # --- JSON IO -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content, readable by transformers' `MobileNetV1Config`."""
        data: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name in ("extra", "id2label"):
                continue
            data[f.name] = getattr(self, f.name)
        id2label = self.resolved_id2label()
        data["id2label"] = {str(i): label for i, label in id2label.items()}
        data["label2id"] = {label: i for i, label in id2label.items()}
        data["model_type"] = "mobilenet_v1"
        data.setdefault("architectures", ["MobileNetV1ForImageClassification"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MobileNetV1Config:
        """Build from a `config.json` mapping; unknown keys are kept in `extra` and written back."""
        if not isinstance(data, dict):
            raise ValueError(f"a MobileNetV1 config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "mobilenet_v1")
        if model_type != "mobilenet_v1":
            raise ValueError(f"config is for model_type {model_type!r}, expected 'mobilenet_v1'")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in ("label2id", "model_type")}
        id2label = data.get("id2label")
        if id2label is not None:
            try:
                kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
            except (AttributeError, ValueError) as err:
                raise ValueError(f"config id2label must map integer ids to names: {err}") from None
        elif "num_labels" not in data and "label2id" in data:
            kwargs["num_labels"] = len(data["label2id"])
        if isinstance(kwargs.get("image_size"), (list, tuple)):
            # HF accepts [H, W]; MobileNetV1 checkpoints are square, so keep the first side.
            sides = kwargs["image_size"]
            try:
                kwargs["image_size"] = int(sides[0])
            except (IndexError, TypeError, ValueError, OverflowError):
                raise ValueError(f"image_size must be an int or a [height, width] pair, got {sides!r}") from None
        return cls(**kwargs, extra=extra)

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write `config.json` atomically (a crash never leaves half a file)."""
        from ._io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MobileNetV1Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        except RecursionError:
            # json's C parser recurses once per nesting level: "[" * 100000 would exhaust the stack.
            raise ValueError(f"{path} is not a config: its JSON is nested too deeply") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"{path}: {err}") from None
