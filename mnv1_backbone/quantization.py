"""Post-training static int8 quantization for CPU: `quantize_int8(model, calibration_images)`.

It quantizes the folded, mirrored network of `optimize_for_inference` (see `mnv1_backbone.inference`) with
PyTorch's FX graph mode and the x86 (fbgemm) backend: our models trace with `torch.fx`. Activation bits follow
the CPU (`int8_needs_reduce_range`); ReLU6 outputs are observed over [0, 6] as TF-Lite does; bias correction
removes the mean shift that rounding the weights causes.
"""

from __future__ import annotations

import copy
import logging
import os
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

    Bits are spent where they matter, within what fbgemm computes exactly. Its depthwise kernels on every
    CPU, and all its kernels on CPUs without AVX512-VNNI, sum pairs of u8 x s8 products in saturating int16:
    8-bit inputs need 7-bit weights there, or 7-bit inputs 8-bit weights. A depthwise conv sums only 9
    products per output, so its input rounding is not averaged away: its inputs get 8 bits and its weights 7
    (-63..63), on every CPU. A pointwise conv sums 64 to 1024 products: its inputs get 7 bits and its
    weights 8 where the CPU lacks VNNI (`reduce_range`, see `int8_needs_reduce_range`), 8 and 8 where it has
    it. Bias correction removes the mean output shift that rounding the weights causes.

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
        reduce_range: 7-bit inputs into dense (pointwise) convs and the classifier (True), 8 bits (False),
            or chosen for this CPU (None). True on a VNNI CPU computes what the AVX2 path computes.
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
    qconfig_mapping = get_default_qconfig_mapping(backend)
    activation = HistogramObserver.with_args(reduce_range=reduce_range)
    qconfig_mapping.set_global(QConfig(activation=activation, weight=_weight_observer(*DENSE_WEIGHT_RANGE)))
    for name in float_layers:
        qconfig_mapping.set_module_name(f"model.{name}", None)
    example = batches[0].flip(-2, -1) if mirrored else batches[0]
    prepared = prepare_fx(_MainOutput(float_model), qconfig_mapping, example_inputs=(example,))
    seven_bit = _observe_relu6_outputs(prepared, reduce_range)
    _seven_bit_depthwise_weights(prepared)
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
    # Channels-last throughout: fbgemm's and oneDNN's int8 convs compute in NHWC (an NCHW input is converted at
    # each layer's entry), and the float layers take channels-last too (benchmarks/run.py: int8 3.12x -> 3.42x
    # transformers at batch 1, 6.68x -> 7.70x at batch 8); the same accuracy on the int8 test's 21 photos.
    for module in quantized.modules():
        if type(module) is nn.Conv2d:  # the layers left in float
            module.to(memory_format=torch.channels_last)
    return _Optimized(quantized, mirrored=mirrored, channels_last=True, compile=False)


def _observe_relu6_outputs(prepared: torch.fx.GraphModule, reduce_range: bool) -> set[str]:
    """Make the observers around each ReLU6 see its output, clamped to [0, 6], as TF-Lite quantizes it.

    FX does not fuse ReLU6 into the conv: its output shares the conv's observer, which would see the
    pre-activation range (often [-30, 30]) and leave ~15 of 128 levels for [0, 6]; observing the
    clamped values instead lifts logit cosine from ~0.85 to ~0.98 on real photos.

    With `reduce_range`, a ReLU6 whose output reaches anything but depthwise convs (or the model's output) gets
    7 bits: a pointwise conv, or the classifier after pooling. Depthwise inputs keep 8 bits (their weights get
    7, see `_seven_bit_depthwise_weights`). Returns the names of the 7-bit ReLU6s.
    """
    from torch.ao.quantization.observer import ObserverBase

    def module(node: object) -> nn.Module | None:
        if isinstance(node, torch.fx.Node) and node.op == "call_module":
            return prepared.get_submodule(str(node.target))
        return None

    def only_depthwise_after(node: torch.fx.Node) -> bool:
        """Whether every consumer of `node`'s value (through observers and ReLU6) is a depthwise conv or the output."""
        for user in node.users:
            consumer = module(user)
            if isinstance(consumer, (ObserverBase, nn.ReLU6)):
                if not only_depthwise_after(user):
                    return False
            elif not (user.op == "output" or (isinstance(consumer, nn.Conv2d) and consumer.groups > 1)):
                return False
        return True

    seven_bit = {
        str(node.target)
        for node in prepared.graph.nodes
        if isinstance(module(node), nn.ReLU6) and reduce_range and not only_depthwise_after(node)
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


# fbgemm's int16 pair sums hold |a1 * w1 + a2 * w2| <= 32767: 8-bit inputs (0..255) with these 7-bit weights
# reach 32130; 7-bit inputs (0..127) with 8-bit weights (-128..127) reach 32512.
DEPTHWISE_WEIGHT_RANGE = (-63, 63)
DENSE_WEIGHT_RANGE = (-128, 127)


def _weight_observer(quant_min: int, quant_max: int):
    """Per-channel symmetric int8 weights within [quant_min, quant_max]."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    return PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=quant_min, quant_max=quant_max
    )


def _weight_range(conv: nn.Conv2d) -> tuple[int, int]:
    return DEPTHWISE_WEIGHT_RANGE if conv.groups > 1 else DENSE_WEIGHT_RANGE


def _seven_bit_depthwise_weights(prepared: torch.fx.GraphModule) -> None:
    """Give every quantized depthwise conv 7-bit weights (`DEPTHWISE_WEIGHT_RANGE`), so its 8-bit inputs cannot
    saturate fbgemm's int16 sums.

    Set on each module's qconfig after `prepare_fx`, which is where `convert_fx` makes its weight observer: a
    qconfig of its own before `prepare_fx` would also give the conv an input observer of its own, apart from
    the ReLU6 observer that `_observe_relu6_outputs` sets (measured: logit cosine 0.97 instead of 0.998).
    """
    from torch.ao.quantization import QConfig

    for module in prepared.modules():
        qconfig = getattr(module, "qconfig", None)
        # Conv followed by ReLU is fused (ConvReLU2d, a Sequential) and quantized as one module.
        conv = module[0] if isinstance(module, nn.Sequential) and len(module) else module
        if isinstance(conv, nn.Conv2d) and conv.groups > 1 and qconfig is not None:
            module.qconfig = QConfig(activation=qconfig.activation, weight=_weight_observer(*DEPTHWISE_WEIGHT_RANGE))


def _clip_relu6_to_quantized_range(quantized: torch.fx.GraphModule, seven_bit: set[str]) -> int:
    """Clip each ReLU6 at the top of the range its output is quantized to, not at 6, or drop it where that is free.

    With `reduce_range` a uint8 tensor still holds 0..255, so a value above the calibrated maximum would reach the
    next conv as more than 7 bits, where AVX2's int16 pair sums can overflow. Clipping at 127 steps (what a
    quantizer does at its range's end anyway) makes the 7-bit bound hold for every input. An 8-bit ReLU6 after a
    quantized conv does nothing: the conv's requantization already clamps to [0, 255 steps], within [0, 6]
    (its observer saw the clamped values); it goes (it cost 7% of the int8 model's time at batch 1).
    Returns the number of ReLU6s clipped or dropped.
    """

    def output_range(node: torch.fx.Node) -> tuple[float, bool] | None:
        """(scale of the uint8 tensor the ReLU6's output becomes, whether a quantized conv computed it)."""
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "call_module":
            conv = quantized.get_submodule(str(source.target))  # a quantized conv keeps its output qparams
            if hasattr(conv, "scale") and int(conv.zero_point) == 0:
                return float(conv.scale), True
        for user in node.users:  # a float ReLU6 (a layer left in float) feeding the next quantized layer
            if user.op == "call_function" and user.target is torch.quantize_per_tensor:
                scale, zero_point = (getattr(quantized, str(arg.target)) for arg in user.args[1:3])
                if int(zero_point) == 0:
                    return float(scale), False
        return None

    changed = 0
    for node in quantized.graph.nodes:
        if node.op != "call_module" or not isinstance(quantized.get_submodule(str(node.target)), nn.ReLU6):
            continue
        found = output_range(node)
        if found is None:
            continue
        scale, requantized = found
        parent, _, child = str(node.target).rpartition(".")
        owner = quantized.get_submodule(parent) if parent else quantized
        if str(node.target) in seven_bit:
            setattr(owner, child, nn.Hardtanh(0.0, min(6.0, 127 * scale), inplace=True))
        elif requantized and 255 * scale <= 6.0 * (1 + 1e-6):
            setattr(owner, child, nn.Identity())
        else:
            setattr(owner, child, nn.Hardtanh(0.0, min(6.0, 255 * scale), inplace=True))
        changed += 1
    return changed


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
    """Whether `backend`'s int8 kernels on this CPU need 7-bit inputs into dense convs (`reduce_range`).

    fbgemm (the x86 backend) without AVX512-VNNI multiplies u8 activations by s8 weights with `vpmaddubsw`,
    which sums pairs of products into saturating int16: 8-bit inputs with 8-bit weights overflow it. With
    AVX512-VNNI its dense kernels use `vpdpbusd`, which sums into int32. fbgemm has AVX2, AVX512 and
    AVX512-VNNI kernels only, so a CPU with AVX-VNNI but no AVX-512 (Alder Lake and later client chips) still
    takes the AVX2 path; `FBGEMM_ENABLE_INSTRUCTIONS` (AVX2, AVX512, AVX512_256) makes fbgemm take its
    pre-VNNI kernels on any CPU. qnnpack (ARM) and onednn do not need it.
    """
    if backend not in ("x86", "fbgemm"):
        return False
    # Asked of the hardware, as fbgemm does, and not of `torch.backends.cpu.get_cpu_capability()`: that names the
    # vector width of ATen's own kernels ("AVX512" with or without VNNI) and follows ATEN_CPU_CAPABILITY.
    forced = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
    return not _cpu_has_avx512_vnni() or forced in ("AVX2", "AVX512", "AVX512_256")


def _input_channel_means(model: nn.Module, batches: list[Tensor]) -> dict[nn.Module, Tensor]:
    """For each folded layer: the mean of each of its input channels over `batches`."""
    sums: dict[nn.Module, list] = {}
    handles = []

    def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        count = inputs[0].shape[0]
        total = inputs[0].detach().double().mean((0, 2, 3)) * count
        if module in sums:
            sums[module][0] += total
            sums[module][1] += count
        else:
            sums[module] = [total, count]

    for module in model.modules():
        if isinstance(module, FoldedConvActivation):
            handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {module: (total / count).float() for module, (total, count) in sums.items()}


def _correct_biases(model: nn.Module, batches: list[Tensor], skip: set[nn.Module]) -> int:
    """Remove the mean output shift that rounding the weights to int8 causes (bias correction).

    Rounding a layer's weights by dW shifts its output by dW applied to the input; on average, by dW summed over
    the kernel times each input channel's mean. Depthwise kernels (a 30 in the centre and taps below 1) lose
    the most. The rounding is the one the int8 conversion does (per-channel symmetric, `_weight_range` bits); the means
    come from the calibration data (Nagel et al. 2019, empirical bias correction). Returns the layers corrected.
    """
    means = _input_channel_means(model, batches)
    corrected = 0
    with torch.no_grad():
        for module, input_mean in means.items():
            if module in skip:
                continue
            conv = module.convolution
            quant_min, quant_max = _weight_range(conv)
            observer = _weight_observer(quant_min, quant_max)(ch_axis=0)
            observer(conv.weight)
            scale, zero_point = observer.calculate_qparams()
            rounded = torch.fake_quantize_per_channel_affine(
                conv.weight, scale, zero_point.int(), 0, quant_min, quant_max
            )
            error = (rounded - conv.weight).sum((2, 3))  # (out, in / groups)
            if conv.groups == 1:
                shift = error @ input_mean
            else:
                per_group = input_mean.reshape(conv.groups, -1).repeat_interleave(conv.out_channels // conv.groups, 0)
                shift = (error * per_group).sum(1)
            conv.bias.sub_(shift)
            corrected += 1
    return corrected
