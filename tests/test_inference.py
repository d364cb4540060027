"""Fast paths compute the same function: folded/static/channels-last within 1e-4; int8 close on real photos."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import randomize
from PIL import Image

from mnv1_backbone import (
    MobileNetV1Backbone,
    MobileNetV1Config,
    MobileNetV1ForImageClassification,
    MobileNetV1ImageProcessor,
    MobileNetV1Model,
)
from mnv1_backbone.inference import FoldedConvActivation, optimize_for_inference
from mnv1_backbone.pretrained import find_bundled_frozen_graph
from mnv1_backbone.quantization import first_depthwise_layer, quantize_int8

DATA = Path(__file__).parent / "data"


def _close(got, expected, atol: float = 1e-4) -> None:
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0)
    else:
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


# Random weights and BatchNorm statistics amplify float32 rounding (eager float32 itself is ~1e-3 off
# float64 on the last maps), so the rewrites are checked in float64, where they must be exact to 1e-9;
# float32 with real weights on real photos is checked to 1e-4 below.
EXACT = 1e-9


@pytest.mark.parametrize("tf_padding", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_classifier_fast_path_is_the_same_function(tf_padding: bool, channels_last: bool) -> None:
    config = MobileNetV1Config(depth_multiplier=0.25, tf_padding=tf_padding)
    model = randomize(MobileNetV1ForImageClassification(config), seed=21).double()
    example = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    fast = optimize_for_inference(model, example, channels_last=channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    folded = [m for m in fast.modules() if isinstance(m, FoldedConvActivation)]
    assert len(folded) == 27
    assert fast.mirrored == tf_padding  # TF padding is computed on the mirrored image, padding-free
    assert not any(m.pad_at_runtime for m in folded)
    assert sum(m.pointwise_as_matmul for m in folded) == (13 if channels_last else 0)
    with torch.no_grad():
        # 128 pads (0, 1) at every strided layer; 97x131 and 64x33 pad (1, 1) at some and (0, 1) at others.
        for x in (example, torch.randn(1, 3, 97, 131, dtype=torch.float64), torch.randn(1, 3, 64, 33).double()):
            got, expected = fast(x, output_hidden_states=True), model(x, output_hidden_states=True)
            _close(got.logits, expected.logits, EXACT)
            _close(got.last_hidden_state, expected.last_hidden_state, EXACT)
            assert len(expected.hidden_states) == 26
            for got_map, expected_map in zip(got.hidden_states, expected.hidden_states, strict=True):
                _close(got_map, expected_map, EXACT)


@pytest.mark.parametrize("size", [224, 256, 320])
def test_fast_path_with_tf_slim_pooling(size: int) -> None:
    """TF-slim's VALID 7x7/2 pooling is not mirror-symmetric on 8x8 or 10x10 maps: it must run unflipped."""
    config = MobileNetV1Config(depth_multiplier=0.25, pooling="tf_slim")
    model = randomize(MobileNetV1ForImageClassification(config), seed=22).double()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    fast = optimize_for_inference(model, x)
    with torch.no_grad():
        got, expected = fast(x), model(x)
    assert got.logits.shape == expected.logits.shape
    _close(got.logits, expected.logits, EXACT)
    _close(got.pooler_output, expected.pooler_output, EXACT)


def _error(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    return max((got[key].double() - exact[key]).abs().max().item() for key in exact)


@pytest.mark.filterwarnings("ignore")
def test_compiled_fast_path_rounds_no_worse_than_eager() -> None:
    """torch.compile with Inductor's weight freezing: the same function, to float32 rounding."""
    backbone = randomize(MobileNetV1Backbone((3, 5), depth_multiplier=0.25), seed=23)
    example = torch.randn(1, 3, 64, 64)
    fast = optimize_for_inference(backbone, example, compile=True)  # compiles here
    assert fast.feature_info == backbone.feature_info
    with torch.inference_mode():
        got, eager = fast(example), backbone(example)
        exact = copy.deepcopy(backbone).double()(example.double())
    assert list(got) == list(exact)
    assert _error(got, exact) <= 2 * _error(eager, exact) + 1e-6, (_error(got, exact), _error(eager, exact))


@pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="needs the real weights (nudity wheel)")
def test_fast_path_with_real_weights_on_real_photos() -> None:
    model = MobileNetV1ForImageClassification.from_tf(find_bundled_frozen_graph()).eval()
    photos = [Image.open(DATA / "chelsea.png"), Image.open(DATA / "coffee.png")]
    x = MobileNetV1ImageProcessor()(photos)["pixel_values"]
    fast = optimize_for_inference(model, x)
    backbone = MobileNetV1Backbone.from_tf(find_bundled_frozen_graph(), out_indices=(5, 11, 13)).eval()
    fast_backbone = optimize_for_inference(backbone, x)
    with torch.no_grad():
        _close(fast(x).logits, model(x).logits)
        _close(fast_backbone(x), backbone(x))


@pytest.mark.parametrize("output_stride", [32, 8])
def test_backbone_fast_path_is_the_same_function(output_stride: int) -> None:
    backbone = randomize(MobileNetV1Backbone((5, 11, 13), depth_multiplier=0.25, output_stride=output_stride), seed=2)
    backbone.freeze(2)  # frozen BatchNorms fold too
    backbone.double()
    example = torch.randn(1, 3, 320, 320, dtype=torch.float64)
    fast = optimize_for_inference(backbone, example)
    assert fast.feature_info == backbone.feature_info  # metadata passes through the wrapper
    with torch.no_grad():
        _close(fast(example), backbone(example), EXACT)
        other = torch.randn(2, 3, 96, 129, dtype=torch.float64)
        _close(fast(other), backbone(other), EXACT)


def test_bare_model_fast_path_and_the_original_is_untouched() -> None:
    model = randomize(MobileNetV1Model(MobileNetV1Config(depth_multiplier=0.25)), seed=3).double()
    fast = optimize_for_inference(model, channels_last=False)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        _close(fast(x).last_hidden_state, model(x).last_hidden_state, EXACT)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_optimize_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="no MobileNetV1 layers"):
        optimize_for_inference(torch.nn.Linear(2, 2))


def _seven_bit_expected(quantized, reduce_range: bool) -> dict[str, bool]:
    """Which ReLU6s of a quantized backbone must clip at 127 steps: all with 7-bit activations; else those
    feeding a depthwise conv (fbgemm's depthwise kernels sum in saturating int16 even with VNNI)."""
    modules = dict(quantized.model.named_modules())
    expected = {}
    for name in modules:
        if name.startswith("model.layer.") and name.endswith(".activation"):
            consumer = modules.get(f"model.layer.{int(name.split('.')[2]) + 1}.convolution")
            expected[name] = reduce_range or (consumer is not None and consumer.groups > 1)
    return expected


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("reduce_range", [True, False])
def test_int8_backbone_runs_and_stays_close(reduce_range: bool) -> None:
    backbone = randomize(MobileNetV1Backbone((5, 13), depth_multiplier=0.25), seed=4)
    images = [torch.rand(2, 3, 96, 96) * 2 - 1 for _ in range(3)]
    quantized = quantize_int8(backbone, images, reduce_range=reduce_range)
    assert quantized.mirrored  # quantized on the mirrored image; the maps come back unflipped
    # Every ReLU6 clips where its output range ends: 127 steps (7 bits) where the next conv needs it.
    seven_bit = _seven_bit_expected(quantized, reduce_range)
    assert sum(seven_bit.values()) == (26 if reduce_range else 12), seven_bit  # pointwise layers 1, 3, ..., 23
    for name, module in quantized.model.named_modules():
        if name.endswith("activation") and name != "model.conv_stem.activation":  # float, feeding a float layer
            conv = quantized.model.get_submodule(name.replace("activation", "convolution"))
            assert type(module) is torch.nn.Hardtanh and 0 < module.max_val <= 6, (name, module)
            if hasattr(conv, "scale"):  # quantized (the stem and the first depthwise conv stay float)
                steps = 127 if seven_bit.get(name, reduce_range) else 255
                assert module.max_val == pytest.approx(min(6.0, steps * conv.scale)), name
    with torch.no_grad():
        got, expected = quantized(images[0]), backbone(images[0])
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape
        cosine = torch.nn.functional.cosine_similarity(got[key].flatten(1), expected[key].flatten(1))
        assert cosine.min() > 0.9, (key, cosine)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="needs the real weights (nudity wheel)")
@pytest.mark.parametrize("reduce_range", [True, False])
def test_int8_convs_do_exact_integer_arithmetic(reduce_range: bool) -> None:
    """Every quantized conv gives what exact integer arithmetic gives, to its output rounding: no int16
    saturation in fbgemm's kernels. With 8-bit inputs its depthwise kernels were off by up to 150 output steps
    on this photo even with AVX512-VNNI (where the dense kernels are exact), so depthwise inputs keep 7 bits.
    Real weights: their large depthwise taps are what saturates."""
    model = MobileNetV1ForImageClassification.from_tf(find_bundled_frozen_graph()).eval()
    x = MobileNetV1ImageProcessor()(Image.open(DATA / "coffee.png"))["pixel_values"]
    quantized = quantize_int8(model, [x, x.flip(-1)], reduce_range=reduce_range)
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
    """reduce_range=None asks the CPU: without AVX512-VNNI every ReLU6 clips at 127 steps (7 bits)."""
    from mnv1_backbone import quantization

    backbone = randomize(MobileNetV1Backbone((5,), depth_multiplier=0.25), seed=7)
    images = [torch.rand(1, 3, 64, 64) * 2 - 1]
    for vnni, seven_bit in ((False, 9), (True, 4)):  # layers 1-9 quantized; 1, 3, 5, 7 feed depthwise convs
        monkeypatch.setattr(quantization, "_cpu_has_avx512_vnni", lambda vnni=vnni: vnni)
        quantized = quantize_int8(backbone, images)
        clipped = [
            module.max_val / quantized.model.get_submodule(name.replace("activation", "convolution")).scale
            for name, module in quantized.model.named_modules()
            if name.endswith("activation") and name not in ("model.conv_stem.activation", "model.layer.0.activation")
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_keeps_the_model_dtype(dtype: torch.dtype) -> None:
    """A half-precision model gives a half-precision fast path (folded in float32 first, then rounded once)."""
    backbone = randomize(MobileNetV1Backbone((5,), depth_multiplier=0.25), seed=6)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        exact = backbone(x)["Conv2d_5_pointwise"]
        half = copy.deepcopy(backbone).to(dtype)
        fast = optimize_for_inference(half, x.to(dtype))
        assert {parameter.dtype for parameter in fast.parameters()} == {dtype}
        got, eager = fast(x.to(dtype))["Conv2d_5_pointwise"], half(x.to(dtype))["Conv2d_5_pointwise"]
    assert got.dtype == dtype
    # As close to float32 as the eager half-precision model is (both round every layer to 8 or 11 bits).
    assert (got.float() - exact).abs().max() <= 2 * (eager.float() - exact).abs().max() + 1e-3


def test_bfloat16_fast_path_folds_once_and_gives_back_float32() -> None:
    """dtype=torch.bfloat16: weights folded in float64 and rounded once to bfloat16; inputs cast in, outputs
    (every map of a backbone) cast back to the caller's float32."""
    backbone = randomize(MobileNetV1Backbone((3, 5), depth_multiplier=0.25), seed=9)
    x = torch.randn(1, 3, 64, 64)
    fast = optimize_for_inference(backbone, x, dtype=torch.bfloat16)
    folded = optimize_for_inference(backbone.double(), channels_last=False)
    assert {parameter.dtype for parameter in fast.parameters()} == {torch.bfloat16}
    for got, exact in zip(fast.modules(), folded.modules(), strict=True):
        if isinstance(got, FoldedConvActivation):
            assert torch.equal(got.convolution.weight, exact.convolution.weight.to(torch.bfloat16))
            assert torch.equal(got.convolution.bias, exact.convolution.bias.to(torch.bfloat16))
    with torch.no_grad():
        got, expected = fast(x), backbone(x.double())
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(got[key].flatten().double(), expected[key].flatten(), dim=0)
        assert 0.99 < cosine < 1 - 1e-7, (key, cosine)  # close to float, and really computed in bfloat16
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        optimize_for_inference(backbone, dtype=torch.int8)


@pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="needs the real weights (nudity wheel)")
def test_bfloat16_fast_path_on_real_photos() -> None:
    """bfloat16 is an opt-in approximation, held to what it measured: on the two photos logit cosine 0.9991 and
    0.9981 to float32 and the same top-1 (19 photos: 19/19 top-1, mean cosine 0.9955, benchmarks/bf16_accuracy.py)."""
    model = MobileNetV1ForImageClassification.from_tf(find_bundled_frozen_graph()).eval()
    photos = [Image.open(DATA / "chelsea.png"), Image.open(DATA / "coffee.png")]
    x = MobileNetV1ImageProcessor()(photos)["pixel_values"]
    fast = optimize_for_inference(model, x, dtype=torch.bfloat16)
    with torch.inference_mode():
        got, reference = fast(x).logits, model(x).logits
    assert got.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(got, reference)
    assert cosine.min() > 0.997, cosine
    assert got.argmax(-1).tolist() == reference.argmax(-1).tolist() == [282, 968]
    assert (got - reference).abs().max() > 1e-2  # not silently float32


@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="needs the real weights (nudity wheel)")
def test_fast_path_exports_to_onnx_without_pad_or_batch_norm(tmp_path) -> None:
    """With channels_last=False the fast path exports as 27 Conv + Clip (BatchNorm folded, no Pad nodes).

    Real weights on a real photo: random weights amplify the float32 rounding differences between two conv
    implementations past 1e-4 (measured 1.0e-4 on maps that reach 6), trained ones do not.
    """
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    backbone = MobileNetV1Backbone.from_tf(find_bundled_frozen_graph(), out_indices=(5, 13)).eval()
    x = MobileNetV1ImageProcessor(size={"shortest_edge": 146}, crop_size={"height": 128, "width": 128})(
        Image.open(DATA / "chelsea.png")
    )["pixel_values"]
    fast = optimize_for_inference(backbone, x, channels_last=False)

    class FeatureTuple(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.model(pixel_values).values())

    path = tmp_path / "fast.onnx"
    torch.onnx.export(FeatureTuple(fast), (x,), path, dynamo=True, external_data=False, input_names=["x"])
    operators = [node.op_type for node in onnx.load(path).graph.node]
    assert operators.count("Conv") == 27 and "Pad" not in operators and "BatchNormalization" not in operators
    outputs = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = backbone(x)  # the model as loaded, not the fast path
    for got, want in zip(outputs, expected.values(), strict=True):
        assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4


def test_fast_paths_reject_what_they_cannot_take() -> None:
    config = MobileNetV1Config(depth_multiplier=0.25, pooling="tf_slim")
    with pytest.raises(ValueError, match="int8 needs global pooling"):
        quantize_int8(MobileNetV1ForImageClassification(config), [torch.rand(1, 3, 64, 64)])
    fast = optimize_for_inference(MobileNetV1Backbone((3,), depth_multiplier=0.25))
    with pytest.raises(TypeError, match=r"expected a 4-D \(batch, channels, height, width\) tensor, got list"):
        fast([torch.rand(3, 64, 64)])
    with pytest.raises(ValueError, match=r"4-D .* got shape \[3, 64, 64\]"):
        fast(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="needs at least 32x32"):
        fast(torch.rand(1, 3, 16, 64))  # the model's own checks still speak


@pytest.mark.filterwarnings("ignore")
def test_int8_with_other_activations_keeps_seven_bits() -> None:
    """Only ReLU6 outputs are narrowed per consumer; with ReLU the depthwise inputs must still get 7 bits, so
    asking for 8 bits gives the 7-bit model (the same numbers)."""
    backbone = randomize(MobileNetV1Backbone((5,), depth_multiplier=0.25, hidden_act="relu"), seed=8)
    images = [torch.rand(2, 3, 64, 64) * 2 - 1]
    with torch.no_grad():
        eight, seven = (quantize_int8(backbone, images, reduce_range=r)(images[0]) for r in (False, True))
    torch.testing.assert_close(eight, seven, atol=0, rtol=0)
    relu6 = randomize(MobileNetV1Backbone((5,), depth_multiplier=0.25), seed=8)
    with torch.no_grad():
        eight, seven = (quantize_int8(relu6, images, reduce_range=r)(images[0]) for r in (False, True))
    assert not torch.equal(eight["Conv2d_5_pointwise"], seven["Conv2d_5_pointwise"])  # ReLU6: 8 bits where safe
