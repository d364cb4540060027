"""Post-training static int8 quantization for CPU: `quantize_int8(model, calibration_images)`.

It quantizes the folded, mirrored network of `optimize_for_inference` (see `mnv1_backbone.inference`) with
PyTorch's FX graph mode and the x86 (fbgemm) backend: our models trace with `torch.fx`. Activation bits follow
the CPU (`int8_needs_reduce_range`); ReLU6 outputs are observed over [0, 6] as TF-Lite does; bias correction
removes the mean shift that rounding the weights causes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.ao.quantization import HistogramObserver, MinMaxObserver  # torch imports torch.ao.quantization anyway

from .classification import TFSlimAvgPool
from .inference import FoldedConvActivation, _Optimized, can_mirror, fold_batch_norm
from .layers import ConvNormActivation

__all__ = ["first_depthwise_layer", "int8_needs_reduce_range", "quantize_int8"]

logger = logging.getLogger(__name__)


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


def first_depthwise_layer(model: nn.Module) -> str:
    """The name of `model`'s first depthwise layer (TF-slim's `Conv2d_1_depthwise`)."""
    for name, module in model.named_modules():
        if isinstance(module, ConvNormActivation) and module.convolution.groups > 1:
            return name
    raise ValueError(f"{type(model).__name__} has no depthwise layer")


def _default_float_layers(model: nn.Module) -> list[str]:
    """The stem, the first depthwise layer and a classifier's final linear layer: see `quantize_int8`."""
    stem = next(name for name, module in model.named_modules() if isinstance(module, ConvNormActivation))
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return [stem, first_depthwise_layer(model), *linear[-1:]]


def quantize_int8(
    model: nn.Module,
    calibration_images: Iterable[Tensor],
    *,
    backend: str = "x86",
    float_layers: Iterable[str] | None = None,
    reduce_range: bool | None = None,
    bias_correction: bool = True,
) -> nn.Module:
    """Post-training static int8 quantization for CPU (FX graph mode, per-channel weights).

    The folded, mirrored network of `optimize_for_inference` is quantized: with symmetric padding every
    depthwise conv hits fbgemm's fast 3x3 kernels (with TF's run-time padding int8 was slower than the
    float32 fast path: 51 ms against 23 ms per image on 2 cores). ReLU6 outputs are quantized over at
    most [0, 6], as TF-Lite does.

    Activation bits follow the CPU (see `int8_needs_reduce_range`): fbgemm without AVX512-VNNI sums
    u8 x s8 pairs in saturating int16, so every activation gets 7 bits there; with AVX512-VNNI the dense
    (pointwise) convs take 8-bit inputs, while inputs of depthwise convs stay at 7 bits on every CPU,
    as fbgemm's depthwise kernels saturate in int16 even with VNNI (measured). Bias correction removes the
    mean output shift that rounding the weights causes; it is what lifts the depthwise layers most.

    Args:
        model: a classifier, bare model or backbone (float32, eval mode).
        calibration_images: batches (B, C, H, W) of real, preprocessed images; a handful is enough.
        backend: the quantized engine ("x86" for Intel/AMD CPUs, "qnnpack" for ARM).
        float_layers: names of layers (as in `model.named_modules()`: `ConvNormActivation` layers or a
            linear classifier) left in float32. By default the stem, the first depthwise conv and the
            classifier: the first depthwise conv's folded weights reach +-30, so it magnifies the rounding
            of its input and loses the most to 8-bit weights of any layer; keeping the stem too moves the
            first rounding past it; a float classifier gives float logits, where 8-bit logits tied the
            top two classes of close calls. Together 2.7% of the multiply-adds.
        reduce_range: 7-bit activations everywhere (True), 8 bits into dense convs (False), or chosen
            for this CPU (None). True on a VNNI CPU reproduces the AVX2 path's arithmetic.
        bias_correction: correct each quantized layer's bias for the mean shift from rounding its weights
            (measured on the calibration images).

    Returns the quantized model; it returns the main output only: logits, the last hidden state, or
    the backbone's feature dict (float32).
    """
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engines = torch.backends.quantized.supported_engines
    if backend not in engines:
        raise ValueError(f"quantized backend {backend!r} not available; have {engines}")
    torch.backends.quantized.engine = backend
    batches = list(calibration_images)
    if not batches:
        raise ValueError("calibration_images is empty; pass a few preprocessed image batches")
    if any(isinstance(module, TFSlimAvgPool) for module in model.modules()):
        raise ValueError(
            "int8 needs global pooling: TF-slim pooling's output shape depends on the input size, which torch.fx "
            "cannot trace. The weights are the same: build the model with pooling='global' (at 224x224 both "
            "poolings give the same logits)"
        )
    float_model = copy.deepcopy(model).eval()
    float_layers = _default_float_layers(float_model) if float_layers is None else list(float_layers)
    layer_names = {
        name for name, module in float_model.named_modules() if isinstance(module, (ConvNormActivation, nn.Linear))
    }
    unknown = [name for name in float_layers if name not in layer_names]
    if unknown:
        raise ValueError(f"float_layers {unknown} are not layers of {type(model).__name__}: {sorted(layer_names)}")
    mirrored = can_mirror(float_model)
    fold_batch_norm(float_model, mirrored=mirrored)
    inputs = [batch.flip(-2, -1) if mirrored else batch for batch in batches]
    if bias_correction:
        kept = {float_model.get_submodule(name) for name in float_layers}
        _correct_biases(float_model, inputs, skip=kept)
    if reduce_range is None:
        reduce_range = int8_needs_reduce_range(backend)
    other = {type(m.activation).__name__ for m in float_model.modules() if isinstance(m, FoldedConvActivation)}
    other -= {"ReLU6"}
    if not reduce_range and other and backend in ("x86", "fbgemm"):
        # Only ReLU6 outputs are observed and clipped per consumer (7 bits into depthwise convs, whose fbgemm
        # kernels saturate in int16 on every CPU); with other activations keep 7 bits everywhere.
        logger.info("int8 with %s activations: 7-bit activations everywhere", sorted(other))
        reduce_range = True
    qconfig_mapping = get_default_qconfig_mapping(backend)
    activation = HistogramObserver.with_args(reduce_range=reduce_range)
    qconfig_mapping.set_global(QConfig(activation=activation, weight=qconfig_mapping.global_qconfig.weight))
    for name in float_layers:
        qconfig_mapping.set_module_name(f"model.{name}", None)
    example = batches[0].flip(-2, -1) if mirrored else batches[0]
    prepared = prepare_fx(_MainOutput(float_model), qconfig_mapping, example_inputs=(example,))
    seven_bit = _observe_relu6_outputs(prepared, reduce_range)
    with torch.no_grad():
        for batch in inputs:
            prepared(batch)
    quantized = convert_fx(prepared)
    clipped = _clip_relu6_to_quantized_range(quantized, seven_bit)
    logger.info(
        "quantized %s to int8 (%s): %d calibration batches, %d ReLU6 outputs clipped to their range (%d at 7 bits), "
        "bias correction %s, float: %s",
        type(model).__name__, backend, len(batches), clipped, len(seven_bit), bias_correction, float_layers,
    )
    return _Optimized(quantized, mirrored=mirrored, channels_last=False, compile=False)


def _observe_relu6_outputs(prepared: torch.fx.GraphModule, reduce_range: bool) -> set[str]:
    """Make the observers around each ReLU6 see its output, clamped to [0, 6], as TF-Lite quantizes it.

    FX does not fuse ReLU6 into the conv: its output shares the conv's observer, which would see the
    pre-activation range (often [-30, 30]) and leave ~15 of 128 levels for [0, 6]; observing the
    clamped values instead lifts logit cosine from ~0.85 to ~0.98 on real photos.

    A ReLU6 whose output feeds a depthwise conv gets 7 bits whatever `reduce_range` says: fbgemm's
    depthwise kernels sum u8 x s8 pairs in saturating int16 even on CPUs with AVX512-VNNI (measured: with
    8-bit inputs they were off by up to 150 output steps, on real photos). Returns those ReLU6s' names.
    """
    from torch.ao.quantization.observer import ObserverBase

    def module(node: object) -> nn.Module | None:
        if isinstance(node, torch.fx.Node) and node.op == "call_module":
            return prepared.get_submodule(str(node.target))
        return None

    def feeds_depthwise(node: torch.fx.Node) -> bool:
        for user in node.users:
            consumer = module(user)
            if isinstance(consumer, (ObserverBase, nn.ReLU6)) and feeds_depthwise(user):
                return True
            if isinstance(consumer, nn.Conv2d) and consumer.groups > 1:
                return True
        return False

    seven_bit = {
        str(node.target)
        for node in prepared.graph.nodes
        if isinstance(module(node), nn.ReLU6) and (reduce_range or feeds_depthwise(node))
    }
    for node in prepared.graph.nodes:
        if not isinstance(module(node), ObserverBase):
            continue
        relu6 = [user for user in node.users if isinstance(module(user), nn.ReLU6)]
        if node.args and isinstance(module(node.args[0]), nn.ReLU6):
            relu6.append(node.args[0])
        if relu6:
            parent, _, child = str(node.target).rpartition(".")
            owner = prepared.get_submodule(parent) if parent else prepared
            narrow = any(str(r.target) in seven_bit for r in relu6)
            setattr(owner, child, _ReLU6RangeObserver(reduce_range=narrow))
    return seven_bit


def _clip_relu6_to_quantized_range(quantized: torch.fx.GraphModule, seven_bit: set[str]) -> int:
    """Clip each ReLU6 at the top of the range its output is quantized to, not at 6.

    With `reduce_range` a uint8 tensor still holds 0..255, so a value above the calibrated maximum would reach the
    next conv as more than 7 bits, where AVX2's int16 pair sums can overflow. Clipping at 127 steps (what a
    quantizer does at its range's end anyway) makes the 7-bit bound hold for every input.
    """

    def output_scale(node: torch.fx.Node) -> float | None:
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "call_module":
            conv = quantized.get_submodule(str(source.target))  # a quantized conv keeps its output qparams
            if hasattr(conv, "scale") and int(conv.zero_point) == 0:
                return float(conv.scale)
        for user in node.users:  # a float ReLU6 (a layer left in float) feeding the next quantized layer
            if user.op == "call_function" and user.target is torch.quantize_per_tensor:
                scale, zero_point = (getattr(quantized, str(arg.target)) for arg in user.args[1:3])
                if int(zero_point) == 0:
                    return float(scale)
        return None

    clipped = 0
    for node in quantized.graph.nodes:
        if node.op != "call_module" or not isinstance(quantized.get_submodule(str(node.target)), nn.ReLU6):
            continue
        scale = output_scale(node)
        if scale is not None:
            parent, _, child = str(node.target).rpartition(".")
            owner = quantized.get_submodule(parent) if parent else quantized
            quant_max = 127 if str(node.target) in seven_bit else 255
            setattr(owner, child, nn.Hardtanh(0.0, min(6.0, quant_max * scale), inplace=True))
            clipped += 1
    return clipped


class _ReLU6RangeObserver(MinMaxObserver):
    """The range of ReLU6's output over the calibration data: values clamped to [0, 6] first, as TF-Lite does.

    Min-max, not a histogram: ReLU6 already bounds the outliers a histogram observer would clip, and on 19 real
    photos min-max matched it in logit cosine (0.9976 against 0.9975), kept one more top-1 and calibrates in half
    the time.
    """

    def forward(self, x_orig: Tensor) -> Tensor:
        super().forward(x_orig.detach().clamp(0.0, 6.0))
        return x_orig


def _cpu_has_avx512_vnni() -> bool:
    """AVX512-VNNI, as PyTorch's own check (cpuinfo) sees it, or from /proc/cpuinfo's flags."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)  # private in torch 2.x: cpuinfo's avx512vnni
    if check is not None:
        return bool(check())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return any(line.startswith("flags") and " avx512_vnni" in line for line in cpuinfo)
    except OSError:
        return False


def int8_needs_reduce_range(backend: str = "x86") -> bool:
    """Whether `backend`'s int8 kernels on this CPU need 7-bit activations (`reduce_range`).

    fbgemm (the x86 backend) without AVX512-VNNI multiplies u8 activations by s8 weights with `vpmaddubsw`,
    which sums pairs of products into saturating int16: 8-bit activations overflow it. With AVX512-VNNI its
    kernels use `vpdpbusd`, which sums into int32, and 8 bits are safe. fbgemm has AVX2, AVX512 and
    AVX512-VNNI kernels only, so a CPU with AVX-VNNI but no AVX-512 (Alder Lake and later client chips) still
    takes the AVX2 path. qnnpack (ARM) and onednn do not need it.
    """
    if backend not in ("x86", "fbgemm"):
        return False
    # Asked of the hardware, as fbgemm does, and not of `torch.backends.cpu.get_cpu_capability()`: that names the
    # vector width of ATen's own kernels ("AVX512" with or without VNNI) and follows ATEN_CPU_CAPABILITY.
    return not _cpu_has_avx512_vnni()


def _per_channel_statistics(model: nn.Module, batches: list[Tensor]) -> dict[nn.Module, tuple[Tensor, Tensor]]:
    """For each folded layer: the mean of each input channel and the maximum of each output channel."""
    sums: dict[nn.Module, list] = {}
    handles = []

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        mean = inputs[0].detach().double().mean((0, 2, 3)) * inputs[0].shape[0]
        peak = output.detach().amax((0, 2, 3))
        if module in sums:
            entry = sums[module]
            entry[0], entry[1], entry[2] = entry[0] + mean, torch.maximum(entry[1], peak), entry[2] + inputs[0].shape[0]
        else:
            sums[module] = [mean, peak, inputs[0].shape[0]]

    for module in model.modules():
        if isinstance(module, FoldedConvActivation):
            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {module: ((total / count).float(), peak) for module, (total, peak, count) in sums.items()}


def _correct_biases(model: nn.Module, batches: list[Tensor], skip: set[nn.Module]) -> int:
    """Remove the mean output shift that rounding the weights to int8 causes (bias correction).

    Rounding a layer's weights by dW shifts its output by dW applied to the input; on average, by dW summed over
    the kernel times each input channel's mean. Depthwise kernels (a 30 in the centre and taps below 1) lose
    the most. The rounding is the one the int8 conversion does (per-channel symmetric, 8 bits); the means
    come from the calibration data (Nagel et al. 2019, empirical bias correction). Returns the layers corrected.
    """
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    statistics = _per_channel_statistics(model, batches)
    corrected = 0
    with torch.no_grad():
        for module, (input_mean, _) in statistics.items():
            if module in skip:
                continue
            conv = module.convolution
            observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
            observer(conv.weight)
            scale, zero_point = observer.calculate_qparams()
            rounded = torch.fake_quantize_per_channel_affine(conv.weight, scale, zero_point.int(), 0, -128, 127)
            error = (rounded - conv.weight).sum((2, 3))  # (out, in / groups)
            if conv.groups == 1:
                shift = error @ input_mean
            else:
                per_group = input_mean.reshape(conv.groups, -1).repeat_interleave(conv.out_channels // conv.groups, 0)
                shift = (error * per_group).sum(1)
            conv.bias.sub_(shift)
            corrected += 1
    return corrected
