"""int8 (`quantize_int8`): bits per conv kind, exact integer arithmetic (no int16 saturation), the float layers,
and closeness to float32 on a few real photos (tests/test_int8_accuracy.py judges 21)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize
from PIL import Image

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1ForImageClassification, MobileNetV1ImageProcessor
from mnv1_backbone.pretrained import find_bundled_frozen_graph
from mnv1_backbone.quantization import first_depthwise_layer, quantize_int8

DATA = Path(__file__).parent / "data"


def _seven_bit_expected(quantized, reduce_range: bool) -> dict[str, bool]:
    """Which ReLU6s of a quantized backbone must clip at 127 steps: with `reduce_range`, those feeding a pointwise
    conv (7-bit inputs, 8-bit weights); never those feeding a depthwise conv (8-bit inputs, 7-bit weights)."""
    modules = dict(quantized.model.named_modules())
    expected = {}
    for name in modules:
        if name.startswith("model.layer.") and name.endswith(".activation"):
            consumer = modules.get(f"model.layer.{int(name.split('.')[2]) + 1}.convolution")
            expected[name] = reduce_range and consumer is not None and consumer.groups == 1
    return expected


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("reduce_range", [True, False])
def test_int8_backbone_runs_and_stays_close(reduce_range: bool) -> None:
    backbone = randomize(MobileNetV1Backbone((5, 13), depth_multiplier=0.25), seed=4)
    images = [torch.rand(2, 3, 96, 96) * 2 - 1 for _ in range(3)]
    quantized = quantize_int8(backbone, images, reduce_range=reduce_range)
    assert quantized.mirrored  # quantized on the mirrored image; the maps come back unflipped
    seven_bit = _seven_bit_expected(quantized, reduce_range)
    assert sum(seven_bit.values()) == (13 if reduce_range else 0), seven_bit  # depthwise layers 1, ..., 13
    for name, module in quantized.model.named_modules():
        if not name.endswith("activation") or name == "model.conv_stem.activation":  # float, feeding a float layer
            continue
        conv = quantized.model.get_submodule(name.replace("activation", "convolution"))
        if hasattr(conv, "scale") and not seven_bit[name]:
            # 8 bits after a quantized conv: its requantization already clamps to [0, 255 steps] within [0, 6].
            assert type(module) is torch.nn.Identity and 255 * conv.scale <= 6 + 1e-5, (name, module)
        elif hasattr(conv, "scale"):  # 127 steps (7 bits) where the next conv needs it
            assert type(module) is torch.nn.Hardtanh, (name, module)
            assert module.max_val == pytest.approx(min(6.0, 127 * conv.scale)), name
        else:  # the first depthwise conv stays float: clipped where the next layer's input range ends
            assert type(module) is torch.nn.Hardtanh and 0 < module.max_val <= 6, (name, module)
    with torch.no_grad():
        got, expected = quantized(images[0]), backbone(images[0])
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape
        cosine = torch.nn.functional.cosine_similarity(got[key].flatten(1), expected[key].flatten(1))
        assert cosine.min() > 0.9, (key, cosine)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="needs the real weights (nudity wheel)")
@pytest.mark.parametrize("backend", ["x86", "fbgemm"])
@pytest.mark.parametrize("reduce_range", [True, False])
def test_int8_convs_do_exact_integer_arithmetic(reduce_range: bool, backend: str) -> None:
    """Every quantized conv gives what exact integer arithmetic gives, to its output rounding: no int16
    saturation in fbgemm's kernels. With 8-bit inputs and 8-bit weights its depthwise kernels were off by up to
    150 output steps on this photo even with AVX512-VNNI (where the dense kernels are exact), so depthwise
    weights get 7 bits. Real weights: their large depthwise taps are what saturates. Both engines: "x86" sends
    convs of up to 100 groups to oneDNN on VNNI CPUs and the rest to fbgemm; "fbgemm" runs them all there, as
    "x86" does on CPUs without VNNI."""
    model = MobileNetV1ForImageClassification.from_tf(find_bundled_frozen_graph()).eval()
    x = MobileNetV1ImageProcessor()(Image.open(DATA / "coffee.png"))["pixel_values"]
    quantized = quantize_int8(model, [x, x.flip(-1)], reduce_range=reduce_range, backend=backend)
    errors = {}

    def check(name):
        def hook(conv, inputs, output):
            exact = torch.nn.functional.conv2d(
                inputs[0].dequantize(), conv.weight().dequantize(), conv.bias(), conv.stride, conv.padding,
                conv.dilation, conv.groups,
            )
            low, high = -output.q_zero_point() * output.q_scale(), (255 - output.q_zero_point()) * output.q_scale()
            errors[name] = float((output.dequantize() - exact.clamp(low, high)).abs().max() / output.q_scale())

        return hook

    for name, module in quantized.model.named_modules():
        if isinstance(module, torch.ao.nn.quantized.Conv2d):
            module.register_forward_hook(check(name))
    with torch.no_grad():
        quantized(x)
    assert len(errors) == 25  # 27 convs less the float stem and first depthwise conv
    assert max(errors.values()) <= 0.51, {name: error for name, error in errors.items() if error > 0.51}


def test_int8_activation_bits_follow_the_cpu(monkeypatch) -> None:
    from mnv1_backbone import quantization

    monkeypatch.setattr(quantization, "_cpu_has_avx512_vnni", lambda: True)
    assert not quantization.int8_needs_reduce_range("x86") and not quantization.int8_needs_reduce_range("fbgemm")
    monkeypatch.setattr(quantization, "_cpu_has_avx512_vnni", lambda: False)
    assert quantization.int8_needs_reduce_range("x86") and quantization.int8_needs_reduce_range("fbgemm")
    assert not quantization.int8_needs_reduce_range("qnnpack")


@pytest.mark.filterwarnings("ignore")
def test_int8_takes_the_cpu_path_unless_told(monkeypatch) -> None:
    """reduce_range=None asks the CPU: without AVX512-VNNI the ReLU6s feeding pointwise convs clip at 127 steps."""
    from mnv1_backbone import quantization

    backbone = randomize(MobileNetV1Backbone((5,), depth_multiplier=0.25), seed=7)
    images = [torch.rand(1, 3, 64, 64) * 2 - 1]
    for vnni, seven_bit in ((False, 4), (True, 0)):  # layers 1-9 quantized; depthwise 2, 4, 6, 8 feed pointwise
        monkeypatch.setattr(quantization, "_cpu_has_avx512_vnni", lambda vnni=vnni: vnni)
        quantized = quantize_int8(backbone, images)
        clipped = [
            module.max_val / quantized.model.get_submodule(name.replace("activation", "convolution")).scale
            for name, module in quantized.model.named_modules()
            if type(module) is torch.nn.Hardtanh and name != "model.layer.0.activation"
        ]
        assert sum(steps == pytest.approx(127) for steps in clipped) == seven_bit, (vnni, clipped)


def test_int8_leaves_the_named_layers_in_float() -> None:
    backbone = randomize(MobileNetV1Backbone((3,), depth_multiplier=0.25), seed=5)
    images = [torch.rand(1, 3, 64, 64) * 2 - 1]
    assert first_depthwise_layer(backbone) == "layer.0"

    def float_convs(model: torch.nn.Module) -> int:
        return sum(type(m) is torch.nn.Conv2d for m in model.modules())

    assert float_convs(quantize_int8(backbone, images)) == 2  # the stem and the first depthwise conv, by default
    assert float_convs(quantize_int8(backbone, images, float_layers=())) == 0
    assert float_convs(quantize_int8(backbone, images, float_layers=("conv_stem", "layer.2"))) == 2
    with pytest.raises(ValueError, match=r"float_layers \['layer.99'\] are not layers of MobileNetV1Backbone"):
        quantize_int8(backbone, images, float_layers=("layer.99",))


def test_int8_needs_calibration_data() -> None:
    with pytest.raises(ValueError, match="calibration_images is empty"):
        quantize_int8(MobileNetV1Backbone((5,), depth_multiplier=0.25), [])


def _real_photos() -> list[Image.Image]:
    """Chelsea and the espresso (scikit-image, in tests/data) and Grace Hopper (shipped with matplotlib)."""
    import matplotlib

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [Image.open(DATA / "chelsea.png"), Image.open(DATA / "coffee.png"), Image.open(hopper)]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="needs the real weights (nudity wheel)")
def test_int8_classifier_on_real_photos() -> None:
    model = MobileNetV1ForImageClassification.from_tf(find_bundled_frozen_graph()).eval()
    processor = MobileNetV1ImageProcessor()
    photos = _real_photos()
    x = processor(photos)["pixel_values"]
    # Calibrate on other views of the photos (left and right crops, mirrored) than the ones evaluated.
    views = []
    for photo in photos:
        width, height = photo.size
        views += [photo.crop((0, 0, width * 7 // 10, height)), photo.crop((width * 3 // 10, 0, width, height))]
    calibration = [processor(views[i : i + 2])["pixel_values"].flip(-1) for i in range(0, len(views), 2)]
    quantized = quantize_int8(model, calibration)
    with torch.no_grad():
        logits, reference = quantized(x), model(x).logits
    cosine = torch.nn.functional.cosine_similarity(logits, reference)
    # Measured 0.988 / 0.981 / 0.990 (x86 on AVX2: 7-bit activations); with the first depthwise conv in
    # int8 too (float_layers=()), roughly 0.985 / 0.973 / 0.984.
    assert cosine.min() > 0.975, cosine
    assert logits[1].argmax() == reference[1].argmax() == 968  # espresso
    assert logits[2].argmax() == reference[2].argmax()  # military uniform
    assert 282 <= logits[0].argmax() <= 286  # a cat (float: tabby 0.43, Egyptian cat 0.30)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("hidden_act", ["relu6", "relu"])
def test_int8_depthwise_weights_have_seven_bits(hidden_act: str) -> None:
    """Depthwise weights within -63..63 (so 8-bit inputs cannot saturate fbgemm's int16 sums), pointwise weights
    using the full -128..127, whatever the activation (ReLU outputs are observed by a histogram, not clipped)."""
    backbone = randomize(MobileNetV1Backbone((5,), depth_multiplier=0.25, hidden_act=hidden_act), seed=8)
    images = [torch.rand(2, 3, 64, 64) * 2 - 1]
    quantized = quantize_int8(backbone, images, reduce_range=False)
    convs = [m for m in quantized.modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)]
    depthwise = [conv.weight().int_repr().abs().max().item() for conv in convs if conv.groups > 1]
    pointwise = [conv.weight().int_repr().abs().max().item() for conv in convs if conv.groups == 1]
    assert len(depthwise) == 4 and set(depthwise) == {63}, depthwise  # 2, 4, 6, 8 (1 is float)
    assert len(pointwise) == 5 and set(pointwise) >= {127}, pointwise  # per channel: the largest tap reaches 127
    with torch.no_grad():
        got, expected = quantized(images[0]), backbone(images[0])
    got, expected = got["Conv2d_5_pointwise"].flatten(1), expected["Conv2d_5_pointwise"].flatten(1)
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    assert cosine.min() > 0.9, cosine


def test_int8_needs_reduce_range_follows_fbgemm_instruction_override(monkeypatch) -> None:
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (or AVX512) makes fbgemm take its int16 kernels even on a VNNI CPU."""
    from mnv1_backbone import quantization

    monkeypatch.setattr(quantization, "_cpu_has_avx512_vnni", lambda: True)
    for value, needed in (("AVX2", True), ("avx512", True), ("AVX512_256", True), ("AVX512_E1", False), ("", False)):
        monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", value)
        assert quantization.int8_needs_reduce_range("x86") is needed, value
    monkeypatch.setattr(quantization, "_cpu_has_avx512_vnni", lambda: False)
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX512_E1")
    assert quantization.int8_needs_reduce_range("x86")  # the override cannot add what the CPU lacks


@pytest.mark.filterwarnings("ignore")
def test_int8_and_fast_path_models_deep_copy_whole() -> None:
    """`copy.deepcopy` of the fast path and of the int8 model copies the wrapper too (it flips the input for the
    mirrored computation); it used to find the int8 GraphModule's `__deepcopy__` through attribute forwarding and
    return a copy of the inner model alone, which gave other logits."""
    import copy

    from mnv1_backbone.inference import optimize_for_inference

    backbone = randomize(MobileNetV1Backbone((5,), depth_multiplier=0.25), seed=9)
    images = [torch.rand(2, 3, 64, 64) * 2 - 1]
    for fast in (optimize_for_inference(backbone), quantize_int8(backbone, images)):
        duplicate = copy.deepcopy(fast)
        assert type(duplicate) is type(fast) and duplicate.mirrored
        with torch.no_grad():
            torch.testing.assert_close(duplicate(images[0]), fast(images[0]), atol=0, rtol=0)
