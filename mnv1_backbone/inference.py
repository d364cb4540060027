"""Inference fast paths: BatchNorm folding, padding-free TF "SAME", channels-last, torch.compile.

`optimize_for_inference(model, example_input=...)` returns a copy of a classifier, bare model or
backbone that computes the same function (within float32 rounding, tested to 1e-4) faster:

* BatchNorm is folded into each convolution's weight and bias (one op instead of two per layer);
* TF "SAME" padding costs nothing: a strided 3x3 conv pads (0, 1) on an even input, which is what
  PyTorch's symmetric `padding=1` computes on the mirrored image with mirrored kernels (its extra
  bottom/right zeros are never reached), and odd inputs pad (1, 1) either way. So the fast path flips
  the input once, runs every conv with native padding and flipped weights, and flips the spatial
  outputs back: no `F.pad` (an allocation, a fill and a copy of every strided layer's input), at any
  input size. Global pooling does not care; TF-slim's VALID 7x7 pooling runs unflipped;
* weights and activations use channels-last, which oneDNN's kernels prefer;
* on x86 CPUs with oneDNN, every conv (stem, depthwise, pointwise) runs as oneDNN's convolution on its
  weight pre-packed once per input shape, with ReLU6 fused into it: the kernel Inductor's weight freezing
  emits (`_OneDNNPackedWeights`). `F.conv2d` re-packs the weight on every call, and a matrix product
  runs ReLU6 as a second pass. benchmarks/pointwise.py, the 13 pointwise layers with their ReLU6 on 2
  AVX-512 cores: 5.80 ms pre-packed, 6.66 as matrix products, 8.37 through `F.conv2d` at batch 1 (48.5,
  53.4, 51.1 at batch 8; with oneDNN capped at AVX2, 5.82 against 6.32 and 7.19); the whole eager model
  was 1.21x / 1.19x faster than with matrix products at batch 1 and 1.09x / 1.07x faster than with
  `F.conv2d` at batch 8 (two runs of benchmarks/levers.py);
* elsewhere (other CPUs, inputs that need autograd, tracing) a 1x1 convolution on channels-last is a
  plain matrix product: the pointwise layers (95% of the multiply-adds) can run as `F.linear` on the
  (N, H, W, C) view, with no copy in or out. Before pre-packing, BLAS was 1.23x faster than `F.conv2d`
  at batch 1 and 1.16x at batch 2 but 0.85x at batch 8 on 2 AVX2 cores (1.26x, 1.20x, 1.03x at batch 1,
  2, 4 and 0.84x at 8 on 2 AVX-512 cores). So on x86 CPUs the matrix product is taken for batches up to
  2 (`_matmul_max_batch`), chosen per call from the input's batch; on other CPUs (not measured) always;
* `compile=True` adds `torch.compile` (Inductor) with weight freezing, which pre-packs the weights and
  fuses ReLU6 into oneDNN's convolutions (the convolutions stay convolutions there), and on the CPU
  Inductor's C++ wrapper (no Python between the kernels).

int8 is `mnv1_backbone.quantization`, which quantizes this folded, mirrored network.
"""

from __future__ import annotations

import copy
import platform
import threading
import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .classification import TFSlimAvgPool
from .layers import ConvNormActivation, FrozenBatchNorm2d, tf_pad

__all__ = [
    "FoldedConvActivation",
    "can_mirror",
    "fold_batch_norm",
    "optimize_for_inference",
]


class FoldedConvActivation(nn.Module):
    """A `ConvNormActivation` with its BatchNorm folded into the conv, for inference.

    Args:
        layer: the trained layer (BatchNorm2d or FrozenBatchNorm2d).
        mirrored: compute on spatially flipped inputs (see the module docstring): flipped kernel and
            PyTorch's symmetric padding instead of TF's run-time padding. Only for odd kernels.
        pointwise_as_matmul: a 1x1 stride-1 conv given a channels-last input runs as a matrix product
            on its (N, H, W, C) view (same function, another kernel); other inputs take the conv, and so
            do batches larger than the attribute `matmul_max_batch` (None, the default: any batch).
        dtype: of the folded weights (default: the layer's); the fold is computed in float64 and rounded
            once to it.

    The attribute `packed_weights` (None, the default) set to an `_OneDNNPackedWeights` runs the layer as
    oneDNN's convolution on pre-packed weights with the activation fused, where `_OneDNNPackedWeights.applies`.
    """

    def __init__(
        self,
        layer: ConvNormActivation,
        *,
        mirrored: bool = False,
        pointwise_as_matmul: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        conv, norm = layer.convolution, layer.normalization
        if not isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            raise TypeError(f"cannot fold {type(norm).__name__}")
        effective = (layer.kernel_size - 1) * layer.dilation + 1
        if mirrored and effective % 2 == 0:
            raise ValueError(f"a mirrored conv needs an odd kernel, got effective size {effective}")
        self.pad_at_runtime = layer.pad_at_runtime and not mirrored
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        self.convolution = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=(effective - 1) // 2 if mirrored else conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=True,
        ).to(device=conv.weight.device, dtype=dtype or conv.weight.dtype)
        # Folded in float64 (float32 on MPS, which has no float64) and rounded once to the model's dtype: a
        # half-precision model would otherwise round the scale, the product and the bias each on their own.
        exact = torch.float32 if conv.weight.device.type == "mps" else torch.float64
        scale = norm.weight.detach().to(exact) / torch.sqrt(norm.running_var.to(exact) + norm.eps)
        weight = conv.weight.detach().to(exact) * scale.reshape(-1, 1, 1, 1)
        with torch.no_grad():
            self.convolution.weight.copy_(weight.flip(-2, -1) if mirrored else weight)
            self.convolution.bias.copy_(norm.bias.detach().to(exact) - norm.running_mean.to(exact) * scale)
        self.activation = layer.activation
        self.matmul_max_batch: int | None = None
        self.packed_weights: _OneDNNPackedWeights | None = None
        self.pointwise_as_matmul = (
            pointwise_as_matmul
            and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.groups == 1
            and conv.padding == (0, 0)
            and not self.pad_at_runtime
        )

    def forward(self, x: Tensor) -> Tensor:
        packed = self.packed_weights
        if packed is not None:
            conv = self.convolution
            if packed.applies(x, conv.weight):
                padded = tf_pad(x, self.kernel_size, self.stride, self.dilation) if self.pad_at_runtime else x
                try:
                    return packed.convolution(padded, conv, self.activation)
                except (RuntimeError, TypeError) as error:
                    # The fused op is private to torch (Inductor's): if a torch release changes it, this layer
                    # takes the plain path from now on rather than failing every call.
                    self.packed_weights = None
                    warnings.warn(
                        f"oneDNN's pre-packed convolution failed ({type(error).__name__}: {error}); the fast path "
                        "uses plain convolutions instead",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        if (
            self.pointwise_as_matmul
            and (self.matmul_max_batch is None or x.shape[0] <= self.matmul_max_batch)
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            weight = self.convolution.weight.flatten(1)
            # (N, C, H, W) channels-last is (N, H, W, C) in memory: permuting is free both ways.
            y = F.linear(x.permute(0, 2, 3, 1), weight, self.convolution.bias)
            return self.activation(y).permute(0, 3, 1, 2)
        if self.pad_at_runtime:
            x = tf_pad(x, self.kernel_size, self.stride, self.dilation)
        return self.activation(self.convolution(x))


def _is_x86_cpu(device: torch.device) -> bool:
    """The CPUs the fast path's kernel choices were measured on (one AVX2 and one AVX-512 AMD EPYC)."""
    return device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _convolution_pointwise_op():
    try:
        return torch.ops.mkldnn._convolution_pointwise.default
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return None


_CONVOLUTION_POINTWISE = _convolution_pointwise_op()


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the pre-packed path takes: float32, and bfloat16 where oneDNN computes it natively."""
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


_ONEDNN_DTYPES = _onednn_dtypes()


class _OneDNNPackedWeights:
    """oneDNN's pre-packed copies of one conv's weight, one per input shape, and the fused call that uses them.

    oneDNN lays a weight out for the shape it will meet (a copy packed for batch 8 ran a batch-1 input 12x
    slower than one packed for batch 1), so a copy is packed per input shape on first sight, and those of the
    `max_shapes` most recently used shapes are kept: at most that many copies of the weight in memory. A copy
    is used only while the conv's weight and bias are the tensors it was made from, unchanged (same storage,
    same version): weights loaded with `load_state_dict` or replaced are packed again (changes made through
    `.data`, or inside `inference_mode` to a model copied there, keep no version and go unseen). A cache, not
    state: `copy.deepcopy` and pickling give an empty one (oneDNN's opaque tensors cannot be copied).
    """

    max_shapes = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (input shape, dtype) -> (what the pack was made from, the fused op's arguments after the input, the
        # activation to run after the op or None).
        self._by_shape: OrderedDict[tuple, tuple[tuple, tuple, nn.Module | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_shape)

    def __deepcopy__(self, memo) -> _OneDNNPackedWeights:
        return type(self)()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @staticmethod
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        """Measured on x86 only (AVX-512 and, oneDNN capped to AVX2, its AVX2 kernels); bf16 where oneDNN has it."""
        if not _is_x86_cpu(device):
            return False
        if not torch.backends.mkldnn.is_available() or _CONVOLUTION_POINTWISE is None:
            return False
        return dtype in _ONEDNN_DTYPES

    @staticmethod
    def applies(x: Tensor, weight: Tensor) -> bool:
        """Eager inference calls only: no autograd (the fused op has none), no tracing (exporters and Inductor
        need the plain conv), a CPU input of the weight's dtype, one oneDNN takes (not a model cast to float64
        after it was built)."""
        if torch.compiler.is_compiling() or not isinstance(x, Tensor):
            return False
        return (
            x.is_cpu
            and x.dtype == weight.dtype
            and x.dtype in _ONEDNN_DTYPES
            and x.dim() == 4
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        )

    def convolution(self, x: Tensor, conv: nn.Conv2d, activation: nn.Module) -> Tensor:
        key = (tuple(x.shape), x.dtype)
        source = self._source(conv)
        with self._lock:  # one model served from several threads: the bookkeeping is not atomic
            entry = self._by_shape.get(key)
            if entry is None or not self._same_source(entry[0], source):
                entry = (source, *self._pack(x, conv, activation))
                self._by_shape[key] = entry
            self._by_shape.move_to_end(key)  # the least recently used shape goes first
            while len(self._by_shape) > self.max_shapes:
                self._by_shape.popitem(last=False)
        _, arguments, after = entry
        y = _CONVOLUTION_POINTWISE(x, *arguments)
        return y if after is None else after(y)

    @staticmethod
    def _source(conv: nn.Conv2d) -> tuple:
        """What a pack depends on: the weight and bias objects, their storage and their versions. Holding the
        objects keeps their addresses from being reused by new tensors while the entry lives."""

        def version(t: Tensor) -> int | None:
            return None if t.is_inference() else t._version  # inference tensors keep no version

        weight, bias = conv.weight, conv.bias
        return (weight, weight.data_ptr(), version(weight), bias, bias.data_ptr(), version(bias))

    @staticmethod
    def _same_source(a: tuple, b: tuple) -> bool:
        # Tensors by identity (`==` would compare their values elementwise), the rest by value.
        return all(x is y if isinstance(x, Tensor) else x == y for x, y in zip(a, b, strict=True))

    @staticmethod
    def _pack(x: Tensor, conv: nn.Conv2d, activation: nn.Module) -> tuple[tuple, nn.Module | None]:
        """The fused op's arguments after the input (the weight packed for `x`'s shape), and what runs after it."""
        # oneDNN fuses these activations as a post-op; any other runs after the conv.
        after = None
        if isinstance(activation, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
            fused, scalars = "hardtanh", [float(activation.min_val), float(activation.max_val)]
        elif isinstance(activation, nn.ReLU):
            fused, scalars = "relu", []
        else:
            fused, scalars, after = "none", [], None if isinstance(activation, nn.Identity) else activation
        padding, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight, padding, stride, dilation, conv.groups, list(x.shape)
        )
        return (packed, conv.bias, padding, stride, dilation, conv.groups, fused, scalars, ""), after


class _Unmirrored(nn.Module):
    """Runs a layer that is not mirror-symmetric (TF-slim's VALID pooling) on unflipped maps."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.flip(-2, -1)).flip(-2, -1)


def can_mirror(model: nn.Module) -> bool:
    """Whether the mirrored computation reproduces `model`'s TF padding: it has run-time padded layers,
    all of stride 2, and every kernel is odd (true for every MobileNetV1)."""
    layers = [m for m in model.modules() if isinstance(m, ConvNormActivation)]
    odd = all(((m.kernel_size - 1) * m.dilation + 1) % 2 == 1 for m in layers)
    padded = [m for m in layers if m.pad_at_runtime]
    return odd and bool(padded) and all(m.stride == 2 for m in padded)


def fold_batch_norm(
    model: nn.Module, *, mirrored: bool = False, pointwise_as_matmul: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Replace every `ConvNormActivation` of `model` (in place) by its folded, inference-only form.

    With `mirrored`, the model then expects spatially flipped inputs and gives flipped maps (checked
    with `can_mirror`); `optimize_for_inference` does the flipping.
    """
    if mirrored and not can_mirror(model):
        raise ValueError(f"{type(model).__name__} has layers whose TF padding mirroring does not reproduce")
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, ConvNormActivation):
            folded = FoldedConvActivation(
                module, mirrored=mirrored, pointwise_as_matmul=pointwise_as_matmul, dtype=dtype
            )
            setattr(parent, child, folded)
        elif mirrored and isinstance(module, TFSlimAvgPool):
            setattr(parent, child, _Unmirrored(module))
    return model


def optimize_for_inference(
    model: nn.Module,
    example_input: Tensor | None = None,
    *,
    channels_last: bool = True,
    compile: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A faster copy of `model` for inference (eval mode, no training): see the module docstring.

    Run it under `torch.inference_mode()` (or `torch.no_grad()`): Inductor freezes weights only then.

    Args:
        model: a `MobileNetV1ForImageClassification`, `MobileNetV1Model` or `MobileNetV1Backbone`.
        example_input: (B, C, H, W) of the size you will run: with `compile`, compiled here rather
            than on the first call. (No size is baked in: every input size gives exact results.)
        channels_last: convert weights (and inputs, at run time) to channels-last; eager convs run on
            pre-packed oneDNN weights with ReLU6 fused (x86 CPUs), or 1x1 convs as matrix products
            (elsewhere). Inductor (`compile`) does its own pre-packing and fusion.
        compile: wrap with `torch.compile` and weight freezing (slow first call per input size).
        dtype: compute in this floating dtype (opt-in `torch.bfloat16` for CPUs with AVX512-BF16 or AMX:
            not the same function, see docs/performance.md for its accuracy); inputs are converted to it
            and outputs back to the input's dtype. Default: the model's dtype.
    """
    if not any(isinstance(m, ConvNormActivation) for m in model.modules()):
        raise TypeError(f"{type(model).__name__} has no MobileNetV1 layers to optimise")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    optimized = copy.deepcopy(model).eval()
    for parameter in optimized.parameters():
        parameter.requires_grad_(False)
    mirrored = can_mirror(optimized)
    fold_batch_norm(optimized, mirrored=mirrored, pointwise_as_matmul=channels_last and not compile, dtype=dtype)
    parameter = next(optimized.parameters())
    max_batch = _matmul_max_batch(parameter.device)
    prepack = (
        channels_last and not compile and _OneDNNPackedWeights.available(parameter.device, dtype or parameter.dtype)
    )
    for module in optimized.modules():
        if isinstance(module, FoldedConvActivation):
            module.matmul_max_batch = max_batch
            module.packed_weights = _OneDNNPackedWeights() if prepack else None
    if dtype is not None:
        optimized = optimized.to(dtype)  # the rest (classifier, ...); the folded convs already are
    if channels_last:
        optimized = optimized.to(memory_format=torch.channels_last)
    fast = _Optimized(optimized, mirrored=mirrored, channels_last=channels_last, compile=compile, dtype=dtype)
    if compile and example_input is not None:
        with torch.inference_mode():
            fast(example_input)
    return fast


def _matmul_max_batch(device: torch.device) -> int | None:
    """The largest batch whose pointwise layers run as matrix products (None: any), from what was measured.

    x86 CPUs (one AVX2 and one AVX-512 AMD EPYC measured, 2 threads): up to batch 2, where BLAS beat oneDNN's
    1x1 convolution by 1.16-1.26x; at batch 8 it lost (0.84x). Other devices and architectures keep the
    matrix product at every batch, as before this was measured.
    """
    if not _is_x86_cpu(device):
        return None
    return 2


def _map_tensors(output, fn):
    """Apply `fn` to every tensor of a model output (tensor, NamedTuple, dict, list)."""
    if isinstance(output, Tensor):
        return fn(output)
    if isinstance(output, dict):
        return type(output)((key, _map_tensors(value, fn)) for key, value in output.items())
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(_map_tensors(value, fn) for value in output))
    if isinstance(output, (list, tuple)):
        return type(output)(_map_tensors(value, fn) for value in output)
    return output


def _unmirror(output):
    """Flip every (N, C, H, W) tensor of a model output back."""
    return _map_tensors(output, lambda t: t.flip(-2, -1) if t.dim() == 4 else t)


class _Optimized(nn.Module):
    """Runs the optimised model: flips and channels-last inputs; Inductor freezing while compiling.

    Attributes the wrapped model has (`config`, `feature_info`, ...) read through.
    """

    def __init__(
        self, model: nn.Module, *, mirrored: bool, channels_last: bool, compile: bool, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.mirrored = mirrored
        self.channels_last = channels_last
        self.dtype = dtype
        self.cpp_wrapper = all(p.device.type == "cpu" for p in model.parameters())
        self.compiled = torch.compile(self.run) if compile else None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Protocol names stay this wrapper's: `copy.deepcopy` looks up `__deepcopy__` on the instance, and an
            # int8 model's inner GraphModule has one, so forwarding it made a copy of the inner model alone, which
            # computes on unflipped inputs (logits off by 5.7 on a real photo).
            if name.startswith("__") and name.endswith("__"):
                raise
            return getattr(self._modules["model"], name)

    def run(self, x: Tensor, *args, **kwargs):
        # Checked before flipping and the memory-format change, whose own errors would not say what is wrong.
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a 4-D (batch, channels, height, width) tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D (batch, channels, height, width) tensor, got shape {list(x.shape)}")
        input_dtype = x.dtype
        if self.mirrored:
            x = x.flip(-2, -1)
        # One copy for both the cast and the layout change.
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        x = x.to(dtype=self.dtype or x.dtype, memory_format=layout)
        output = self.model(x, *args, **kwargs)
        if self.mirrored:
            output = _unmirror(output)
        if self.dtype is not None and self.dtype != input_dtype and input_dtype.is_floating_point:
            output = _map_tensors(output, lambda t: t.to(input_dtype) if t.is_floating_point() else t)
        return output

    def forward(self, x: Tensor, *args, **kwargs):
        if self.compiled is None:
            return self.run(x, *args, **kwargs)
        from torch._inductor import config as inductor_config  # imported here: Inductor is slow to import

        # Read when Dynamo compiles (the first call for each input size): weights become constants, so
        # Inductor pre-packs them and fuses ReLU6 into oneDNN's convolutions. On the CPU its C++ wrapper
        # replaces the Python code that calls the kernels: 1.05x and 1.09x at batch 1 in two A/B runs on
        # 2 AVX-512 cores, no change at batch 8 (benchmarks/levers.py); not measured on GPUs.
        options = {"freezing": True, "cpp_wrapper": self.cpp_wrapper}
        with inductor_config.patch(options):
            return self.compiled(x, *args, **kwargs)
