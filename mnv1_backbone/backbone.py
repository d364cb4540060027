"""`MobileNetV1Backbone`: the trunk as a multi-scale feature extractor for detection and segmentation.

Outputs are TF-slim's end points (`Conv2d_0` for the stem, `Conv2d_k_pointwise` for block k), so
`out_indices=(5, 11, 13)` are the C3/C4/C5 taps of TF's `ssd_mobilenet_v1_fpn`. Channels and
strides of each output are declared in `feature_info` when the model is built (as timm's
`feature_info` and detectron2's `output_shape()` do), output stride 8/16 comes from dilation as in
TF-slim's `mobilenet_v1_base`, and stages can be frozen for fine-tuning (detectron2's `freeze(at)`,
mmdet's `frozen_stages` / `norm_eval`). State-dict keys are Hugging Face's `MobileNetV1Model` keys.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch.fx
from torch import Tensor, nn

from .config import NUM_BLOCKS, STAGES, MobileNetV1Config, plan_layers
from .layers import ConvNormActivation, FrozenBatchNorm2d, build_trunk, check_input, init_weights

__all__ = ["FeatureInfo", "MobileNetV1Backbone", "MIN_INPUT_SIZE"]

# fx patches wrapped functions per module: keep the input check one opaque call when traced.
torch.fx.wrap("check_input")

# The smallest input whose last feature map still has one pixel (total stride 32).
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class FeatureInfo:
    """Metadata of one backbone output, known without running the model.

    Attributes:
        name: key in the output dict (TF-slim end point name, e.g. "Conv2d_11_pointwise").
        index: block number (0 = stem, k = `Conv2d_k_pointwise`).
        channels: number of channels of the map.
        stride: input pixels per output pixel (the map is ceil(H / stride) x ceil(W / stride)).
        module: state-dict path of the layer that produces it (e.g. "layer.21").
    """

    name: str
    index: int
    channels: int
    stride: int
    module: str


def block_module_name(block: int) -> str:
    """State-dict path of the layer whose output is block `block`'s output: the stem or the pointwise conv."""
    return "conv_stem" if block == 0 else f"layer.{2 * block - 1}"


def block_output_name(block: int) -> str:
    """TF-slim's end point name of block `block`."""
    return "Conv2d_0" if block == 0 else f"Conv2d_{block}_pointwise"


class MobileNetV1Backbone(nn.Module):
    """MobileNetV1 trunk returning an ordered dict of the requested block outputs.

    Args:
        out_indices: increasing block numbers in [0, 13] (0 = stem, k = `Conv2d_k_pointwise`). Only
            the layers up to the last requested block are built and run.
        depth_multiplier: width multiplier alpha; channels are `max(int(c * alpha), min_depth)`.
        min_depth: the fewest channels any layer gets.
        tf_padding: TF "SAME" padding, needed for Google's weights.
        output_stride: 32 (plain), 16 or 8: later depthwise convs are dilated instead of strided,
            exactly as TF-slim does.
        frozen_stages: freeze the first N of the 6 stages (stem | 1 | 2-3 | 4-5 | 6-11 | 12-13):
            no gradients, BatchNorm replaced by `FrozenBatchNorm2d` with the same eps.
        norm_eval: keep every BatchNorm in eval mode (running statistics fixed) even in `train()`.
        num_channels: input channels (3 for RGB).
        hidden_act: activation name, as `MobileNetV1Config.hidden_act`.
        layer_norm_eps: BatchNorm epsilon (1e-3 for Google's weights).
        batch_norm_momentum: PyTorch BatchNorm momentum (1 - TF's decay).

    Shape:
        input (B, num_channels, H, W) with H, W >= 32; output k is (B, C_k, ceil(H / s_k), ceil(W / s_k))
        with C_k, s_k from `feature_info`.
    """

    # Metadata for Python callers; TorchScript need not compile it.
    __jit_unused_properties__ = ["out_channels", "strides", "output_names", "size_divisibility"]

    def __init__(
        self,
        out_indices: Sequence[int] = (5, 11, 13),
        *,
        depth_multiplier: float = 1.0,
        min_depth: int = 8,
        tf_padding: bool = True,
        output_stride: int = 32,
        frozen_stages: int = 0,
        norm_eval: bool = False,
        num_channels: int = 3,
        hidden_act: str = "relu6",
        layer_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 1.0 - 0.9997,
    ) -> None:
        super().__init__()
        self.out_indices = _validate_out_indices(out_indices)
        # Validation of the width and the rest is the config's job; one set of rules and messages.
        self.config = MobileNetV1Config(
            num_channels=num_channels,
            depth_multiplier=depth_multiplier,
            min_depth=min_depth,
            tf_padding=tf_padding,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            batch_norm_momentum=batch_norm_momentum,
            num_labels=0,
        )
        self.output_stride = output_stride
        self.num_channels = num_channels
        self.min_input_size = MIN_INPUT_SIZE
        last = self.out_indices[-1]
        plans = plan_layers(depth_multiplier, min_depth, output_stride, num_channels)[: last + 1]
        self.conv_stem, self.layer = build_trunk(
            plans, tf_padding=tf_padding, eps=layer_norm_eps, momentum=batch_norm_momentum, activation=hidden_act
        )
        self.feature_info: tuple[FeatureInfo, ...] = tuple(
            FeatureInfo(
                block_output_name(k), k, plans[k].out_channels, plans[k].output_stride, block_module_name(k)
            )
            for k in self.out_indices
        )
        # Output name per entry of `self.layer` ("" = not returned), so forward stays one plain loop.
        self._stem_output = self.feature_info[0].name if self.out_indices[0] == 0 else ""
        self._layer_outputs = [""] * len(self.layer)
        for info in self.feature_info:
            if info.index > 0:
                self._layer_outputs[2 * info.index - 1] = info.name
        init_weights(self)
        self.norm_eval = norm_eval
        self.frozen_stages = 0
        self.freeze(frozen_stages)

    # --- metadata --------------------------------------------------------------------------------

    @property
    def out_channels(self) -> list[int]:
        """Channels of each output, in order (what torchvision's `SSD` reads)."""
        return [info.channels for info in self.feature_info]

    @property
    def strides(self) -> list[int]:
        return [info.stride for info in self.feature_info]

    @property
    def output_names(self) -> list[str]:
        return [info.name for info in self.feature_info]

    @property
    def size_divisibility(self) -> int:
        """Inputs whose sides are multiples of this give maps that tile the input exactly."""
        return max(self.strides)

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args: x (B, C, H, W) with H, W >= 32. Returns: OrderedDict name -> (B, C_k, H_k, W_k)."""
        x = check_input(x, self.num_channels, self.min_input_size)
        out: dict[str, Tensor] = OrderedDict()
        x = self.conv_stem(x)
        if self._stem_output != "":
            out[self._stem_output] = x
        for i, layer in enumerate(self.layer):
            x = layer(x)
            name = self._layer_outputs[i]
            if name != "":
                out[name] = x
        return out

    # --- fine-tuning -----------------------------------------------------------------------------

    def stage_modules(self, stage: int) -> list[ConvNormActivation]:
        """The layers of stage `stage` (0-5) that this backbone built."""
        modules: list[ConvNormActivation] = []
        for block in STAGES[stage]:
            if block == 0:
                modules.append(self.conv_stem)
            elif 2 * block - 1 < len(self.layer):
                modules.extend([self.layer[2 * block - 2], self.layer[2 * block - 1]])
        return modules

    def freeze(self, frozen_stages: int) -> MobileNetV1Backbone:
        """Freeze the first `frozen_stages` of the 6 stages: no gradients, frozen BatchNorm statistics.

        Freezing only adds: stages frozen earlier stay frozen. BatchNorm becomes our `FrozenBatchNorm2d`
        with this model's eps (torchvision's default 1e-5 would not match Google's 1e-3) and
        bit-identical outputs.
        """
        if not isinstance(frozen_stages, int) or not 0 <= frozen_stages <= len(STAGES):
            raise ValueError(f"frozen_stages must be an int in [0, {len(STAGES)}], got {frozen_stages!r}")
        for stage in range(frozen_stages):
            for module in self.stage_modules(stage):
                for parameter in module.parameters():
                    parameter.requires_grad_(False)
                if isinstance(module.normalization, nn.BatchNorm2d):
                    module.normalization = FrozenBatchNorm2d.from_batch_norm(module.normalization)
        self.frozen_stages = max(self.frozen_stages, frozen_stages)
        return self

    def train(self, mode: bool = True) -> MobileNetV1Backbone:
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # --- weights ---------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: MobileNetV1Config, out_indices: Sequence[int] = (5, 11, 13), **kwargs):
        """A backbone with the architecture of `config` (e.g. a classifier's) and backbone-only options."""
        options = {
            "depth_multiplier": config.depth_multiplier,
            "min_depth": config.min_depth,
            "tf_padding": config.tf_padding,
            "num_channels": config.num_channels,
            "hidden_act": config.hidden_act,
            "layer_norm_eps": config.layer_norm_eps,
            "batch_norm_momentum": config.batch_norm_momentum,
        }
        return cls(out_indices, **{**options, **kwargs})

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, out_indices: Sequence[int] = (5, 11, 13), **kwargs
    ) -> MobileNetV1Backbone:
        """Load the trunk of a classifier checkpoint: an HF directory or Hub id, or our `.safetensors` file.

        Keyword arguments are backbone options (`output_stride`, `frozen_stages`, `norm_eval`, ...);
        the architecture (width, padding, ...) comes from the checkpoint's config. Returns the backbone in eval
        mode, as transformers' loaders do; call `.train()` to fine-tune.
        """
        from .weights import load_checkpoint

        config, state_dict = load_checkpoint(path)
        return cls.from_state_dict(config, state_dict, out_indices, source=str(path), **kwargs)

    @classmethod
    def from_tf(
        cls,
        path: str | os.PathLike,
        out_indices: Sequence[int] = (5, 11, 13),
        *,
        prefer_ema: bool = True,
        tf_padding: bool = True,
        **kwargs,
    ) -> MobileNetV1Backbone:
        """Load the trunk from Google's TF release files, without TensorFlow, in eval mode.

        `path` is a checkpoint prefix (`dir/mobilenet_v1_1.0_224.ckpt`), a frozen `.pb` GraphDef, or a release
        archive `mobilenet_v1_<alpha>_<res>[_quant].tgz` (checkpoint preferred). `prefer_ema=False` loads the raw
        variables instead of their ExponentialMovingAverage shadows; the logits layer is dropped. `tf_padding=False`
        for checkpoints trained with TF-slim's `use_explicit_padding=True` (a checkpoint does not record it).
        """
        from .weights import load_tf

        config, state_dict = load_tf(path, prefer_ema=prefer_ema, tf_padding=tf_padding)
        return cls.from_state_dict(config, state_dict, out_indices, source=str(path), **kwargs)

    @classmethod
    def from_timm(
        cls, source: nn.Module | dict[str, Tensor] | str | os.PathLike, out_indices: Sequence[int] = (5, 11, 13),
        **kwargs,
    ) -> MobileNetV1Backbone:
        """Load the trunk of timm's MobileNetV1 (a timm model, its state dict, a file, or a `"timm/<name>"` Hub id
        fetched only then), in eval mode: symmetric padding, BatchNorm eps 1e-5; the classifier is dropped."""
        from .weights import load_timm

        if isinstance(source, nn.Module):
            source = source.state_dict()
        weights = load_timm(source)
        name = "timm state dict" if isinstance(source, dict) else str(source)
        return cls.from_state_dict(weights.config, weights.state_dict, out_indices, source=name, **kwargs)

    @classmethod
    def from_state_dict(
        cls,
        config: MobileNetV1Config,
        state_dict: dict[str, Tensor],
        out_indices: Sequence[int] = (5, 11, 13),
        *,
        source: str = "state dict",
        **kwargs,
    ) -> MobileNetV1Backbone:
        """The backbone of `config` with a classifier's or bare model's `state_dict` loaded strictly, in eval mode;
        keyword arguments are backbone options (not the architecture, which is the config's)."""
        from .weights import load_state_dict_strict

        _reject_architecture_kwargs(kwargs)
        frozen_stages = kwargs.pop("frozen_stages", 0)
        model = cls.from_config(config, out_indices, **kwargs)
        trunk = trunk_state_dict(state_dict, num_layers=len(model.layer))
        load_state_dict_strict(model, trunk, source=source)
        return model.freeze(frozen_stages).eval()

    def load_trunk(self, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
        """Load a classifier's or bare model's state dict (HF keys) into this backbone, strictly."""
        from .weights import load_state_dict_strict

        load_state_dict_strict(self, trunk_state_dict(state_dict, num_layers=len(self.layer)), source=source)


def trunk_state_dict(state_dict: dict[str, Tensor], num_layers: int = 2 * NUM_BLOCKS) -> dict[str, Tensor]:
    """The trunk's tensors of a classifier or bare-model state dict, keyed as this backbone's.

    Drops the `mobilenet_v1.` prefix, the classifier head, and the layers past `num_layers` (a backbone
    that stops early does not build them); everything else is kept so strict loading reports it.
    """
    trunk = {}
    for key, value in state_dict.items():
        if key.startswith("mobilenet_v1."):
            key = key[len("mobilenet_v1.") :]
        elif key.startswith("classifier."):
            continue
        if key.startswith("layer."):
            index = key.split(".")[1]
            if index.isdigit() and int(index) >= num_layers:
                continue
        trunk[key] = value
    return trunk


def _validate_out_indices(out_indices: Iterable[int]) -> tuple[int, ...]:
    try:
        indices = tuple(out_indices)
    except TypeError:
        raise ValueError(f"out_indices must be a sequence of block numbers, got {out_indices!r}") from None
    if not indices:
        raise ValueError("out_indices is empty; ask for at least one block in [0, 13]")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= NUM_BLOCKS:
            raise ValueError(f"out_indices entries must be ints in [0, {NUM_BLOCKS}], got {index!r} in {indices}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"out_indices has duplicates: {indices}")
    if list(indices) != sorted(indices):
        raise ValueError(f"out_indices must be in increasing order, got {indices}")
    return indices


def _reject_architecture_kwargs(kwargs: dict) -> None:
    fixed = {"depth_multiplier", "min_depth", "tf_padding", "num_channels", "hidden_act", "layer_norm_eps"}
    clash = sorted(fixed & kwargs.keys())
    if clash:
        raise ValueError(f"{clash} come from the checkpoint's config and cannot be changed when loading weights")
