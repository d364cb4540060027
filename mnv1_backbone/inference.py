"""Inference fast paths: BatchNorm folding, static TF padding, channels-last, optional torch.compile; int8.

`optimize_for_inference(model, example_input=...)` returns a copy of a classifier, bare model or
backbone that computes the same function (within float32 rounding, tested to 1e-4) faster:

* BatchNorm is folded into each convolution's weight and bias (one op instead of two per layer);
* with an example input, the TF "SAME" padding of the strided convs is computed once for that size
  (other sizes still take the exact dynamic path, so the result is never wrong);
* weights and activations use channels-last, which oneDNN's depthwise and 1x1 kernels prefer;
* `compile=True` adds `torch.compile` (Inductor), which also fuses ReLU6 into the convolutions.

`quantize_int8(model, calibration_images)` is post-training static quantization for CPU with
PyTorch's FX graph mode and the x86 backend (our models trace with `torch.fx`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layers import ConvNormActivation, FrozenBatchNorm2d, tf_same_padding

__all__ = ["FoldedConvActivation", "fold_batch_norm", "optimize_for_inference", "quantize_int8"]

logger = logging.getLogger(__name__)


class FoldedConvActivation(nn.Module):
    """A `ConvNormActivation` with the BatchNorm folded into the conv, and padding fixed for one input size.

    `static_size` is the (H, W) this layer sees for the example input; for it the TF "SAME" pads are
    constants, for any other size they are computed as in `ConvNormActivation`.
    """

    def __init__(self, layer: ConvNormActivation, static_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        conv, norm = layer.convolution, layer.normalization
        if not isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            raise TypeError(f"cannot fold {type(norm).__name__}")
        scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
        self.convolution = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=True,
        ).to(conv.weight.device)
        with torch.no_grad():
            self.convolution.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            self.convolution.bias.copy_(norm.bias.detach() - norm.running_mean * scale)
        self.activation = layer.activation
        self.pad_at_runtime = layer.pad_at_runtime
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        self.static_height, self.static_width = static_size if static_size is not None else (-1, -1)
        self.static_pad: list[int] = [0, 0, 0, 0]
        if static_size is not None and self.pad_at_runtime:
            top, bottom = tf_same_padding(static_size[0], self.kernel_size, self.stride, self.dilation)
            left, right = tf_same_padding(static_size[1], self.kernel_size, self.stride, self.dilation)
            self.static_pad = [left, right, top, bottom]

    def forward(self, x: Tensor) -> Tensor:
        if self.pad_at_runtime:
            if x.shape[-2] == self.static_height and x.shape[-1] == self.static_width:
                x = F.pad(x, self.static_pad)
            else:
                top, bottom = tf_same_padding(x.shape[-2], self.kernel_size, self.stride, self.dilation)
                left, right = tf_same_padding(x.shape[-1], self.kernel_size, self.stride, self.dilation)
                x = F.pad(x, [left, right, top, bottom])
        return self.activation(self.convolution(x))


def _input_sizes(model: nn.Module, example_input: Tensor) -> dict[str, tuple[int, int]]:
    """The (H, W) each conv layer sees for `example_input`."""
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returning None leaves the inputs alone
            sizes.setdefault(name, (int(args[0].shape[-2]), int(args[0].shape[-1])))

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, ConvNormActivation)
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def fold_batch_norm(model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
    """Replace every `ConvNormActivation` of `model` (in place) by its folded, inference-only form."""
    sizes = _input_sizes(model, example_input) if example_input is not None else {}
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, ConvNormActivation)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FoldedConvActivation(module, sizes.get(name)))
    return model


def optimize_for_inference(
    model: nn.Module,
    example_input: Tensor | None = None,
    *,
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """A faster copy of `model` for inference (eval mode, no training): see the module docstring.

    Args:
        model: a `MobileNetV1ForImageClassification`, `MobileNetV1Model` or `MobileNetV1Backbone`.
        example_input: (B, C, H, W) of the size you will run, to make the TF padding static.
        channels_last: convert weights (and inputs, at run time) to channels-last.
        compile: wrap with `torch.compile` (slow first call; fuses ReLU6 into the convs).
    """
    if not any(isinstance(m, ConvNormActivation) for m in model.modules()):
        raise TypeError(f"{type(model).__name__} has no MobileNetV1 layers to optimise")
    optimized = copy.deepcopy(model).eval()
    for parameter in optimized.parameters():
        parameter.requires_grad_(False)
    fold_batch_norm(optimized, example_input)
    if channels_last:
        optimized = _ChannelsLast(optimized.to(memory_format=torch.channels_last))
    if compile:
        optimized = torch.compile(optimized)
    return optimized


class _ChannelsLast(nn.Module):
    """Feeds channels-last inputs to a channels-last model; outputs are returned as the model gives them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, x: Tensor, *args, **kwargs):
        return self.model(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)


class _MainOutput(nn.Module):
    """Returns the main tensor output (logits, last hidden state or the feature dict): what int8 keeps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor):
        out = self.model(x)
        if isinstance(out, dict):
            return out
        return out[0]  # logits for the classifier, last_hidden_state for the bare model


def quantize_int8(model: nn.Module, calibration_images: Iterable[Tensor], *, backend: str = "x86") -> nn.Module:
    """Post-training static int8 quantization for CPU (FX graph mode, per-channel weights).

    Args:
        model: a classifier, bare model or backbone (float32, eval mode).
        calibration_images: batches (B, C, H, W) of real, preprocessed images; a handful is enough.
        backend: the quantized engine ("x86" for Intel/AMD CPUs, "qnnpack" for ARM).
    """
    from torch.ao.quantization import MinMaxObserver, QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engines = torch.backends.quantized.supported_engines
    if backend not in engines:
        raise ValueError(f"quantized backend {backend!r} not available; have {engines}")
    torch.backends.quantized.engine = backend
    batches = list(calibration_images)
    if not batches:
        raise ValueError("calibration_images is empty; pass a few preprocessed image batches")
    float_model = _MainOutput(copy.deepcopy(model).eval())
    qconfig_mapping = get_default_qconfig_mapping(backend)
    # Min/max activation ranges (x86 kernels need the reduced 7-bit range), per-channel weights.
    activation = MinMaxObserver.with_args(reduce_range=backend in ("x86", "fbgemm"))
    qconfig_mapping.set_global(QConfig(activation=activation, weight=qconfig_mapping.global_qconfig.weight))
    prepared = prepare_fx(float_model, qconfig_mapping, example_inputs=(batches[0],))
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    clamped = _clamp_relu6_ranges(prepared)
    quantized = convert_fx(prepared)
    logger.info(
        "quantized %s to int8 (%s): %d calibration batches, %d ReLU6 ranges clamped to [0, 6]",
        type(model).__name__, backend, len(batches), clamped,
    )
    return quantized


def _clamp_relu6_ranges(prepared: torch.fx.GraphModule) -> int:
    """Quantize every ReLU6 output over [0, 6], as TF-Lite does.

    FX quantization does not fuse ReLU6 into the conv: its output shares the conv's observer, which saw
    the pre-activation range (often [-30, 30]) and so left ~15 of 128 levels for [0, 6]. Clamping that
    range to [0, 6] makes the requantization itself the ReLU6; logit cosine goes from ~0.85 to > 0.99.
    """
    from torch.ao.quantization.observer import ObserverBase

    def is_relu6(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(prepared.get_submodule(str(node.target)), nn.ReLU6)

    clamped = 0
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        observer = prepared.get_submodule(str(node.target))
        if not isinstance(observer, ObserverBase) or not hasattr(observer, "min_val"):
            continue
        source = node.args[0] if node.args else None
        if any(is_relu6(user) for user in node.users) or (isinstance(source, torch.fx.Node) and is_relu6(source)):
            observer.min_val.clamp_(min=0.0)
            observer.max_val.clamp_(max=6.0)
            clamped += 1
    return clamped
