"""Fast paths compute the same function: folded/static/channels-last within 1e-4; int8 close on real photos."""

from __future__ import annotations

import copy
import itertools
import pickle
from pathlib import Path

import pytest
import torch
from conftest import randomize
from PIL import Image
from torch.nn import functional as F

from mnv1_backbone import (
    MobileNetV1Backbone,
    MobileNetV1Config,
    MobileNetV1ForImageClassification,
    MobileNetV1ImageProcessor,
    MobileNetV1Model,
)
from mnv1_backbone.inference import FoldedConvActivation, _OneDNNPackedWeights, optimize_for_inference
from mnv1_backbone.pretrained import find_bundled_frozen_graph
from mnv1_backbone.quantization import quantize_int8

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
    inputs = (example, torch.randn(1, 3, 97, 131, dtype=torch.float64), torch.randn(1, 3, 64, 33).double())
    with torch.no_grad():
        # 128 pads (0, 1) at every strided layer; 97x131 and 64x33 pad (1, 1) at some and (0, 1) at others.
        # Both forms of the pointwise layers (matrix product at any batch, oneDNN's conv at any batch).
        for max_batch, x in itertools.product((None, 0), inputs):
            for module in folded:
                module.matmul_max_batch = max_batch
            got, expected = fast(x, output_hidden_states=True), model(x, output_hidden_states=True)
            _close(got.logits, expected.logits, EXACT)
            _close(got.last_hidden_state, expected.last_hidden_state, EXACT)
            assert len(expected.hidden_states) == 26
            for got_map, expected_map in zip(got.hidden_states, expected.hidden_states, strict=True):
                _close(got_map, expected_map, EXACT)


@pytest.mark.parametrize(
    ("machine", "onednn", "expected"),
    [("x86_64", True, None), ("x86_64", False, 2), ("AMD64", False, 2), ("aarch64", True, None)],
)
def test_pointwise_form_follows_the_cpu_and_batch(
    monkeypatch, machine: str, onednn: bool, expected: int | None
) -> None:
    """Where oneDNN pre-packing is taken (x86 with oneDNN) no layer runs as a matrix product; otherwise matrix
    products where they were measured faster: on x86 up to batch 2, oneDNN's conv above; elsewhere always."""
    from mnv1_backbone import inference

    monkeypatch.setattr(inference.platform, "machine", lambda: machine)
    monkeypatch.setattr(inference.torch.backends.mkldnn, "is_available", lambda: onednn)
    fast = optimize_for_inference(MobileNetV1Backbone((3,), depth_multiplier=0.25))
    folded = [m for m in fast.modules() if isinstance(m, FoldedConvActivation)]
    prepacked = onednn and machine == "x86_64"
    assert {m.packed_weights is not None for m in folded} == {prepacked}
    assert {m.matmul_max_batch for m in folded} == {2 if machine != "aarch64" else None}
    calls, linear = [], F.linear
    monkeypatch.setattr(inference.F, "linear", lambda *args: calls.append(args[0].shape[0]) or linear(*args))
    with torch.no_grad():
        for batch in (1, 3):
            fast(torch.randn(batch, 3, 64, 64))
    matmul = [] if prepacked else [b for b in (1, 3) if expected is None or b <= expected]
    assert sorted(set(calls)) == matmul


ONEDNN = pytest.mark.skipif(
    not _OneDNNPackedWeights.available(torch.device("cpu"), torch.float32), reason="needs x86 and oneDNN"
)


def _without_prepacking(fast: torch.nn.Module) -> torch.nn.Module:
    plain = copy.deepcopy(fast)
    for module in plain.modules():
        if isinstance(module, FoldedConvActivation):
            module.packed_weights = None
    return plain


@ONEDNN
@pytest.mark.parametrize(
    ("activation", "tf_padding", "output_stride"),
    [("relu6", True, 32), ("relu6", False, 8), ("relu", True, 16), ("silu", True, 32)],
)
def test_prepacked_onednn_convs_are_the_same_function(
    monkeypatch, activation: str, tf_padding: bool, output_stride: int
) -> None:
    """float32 (oneDNN has no float64): every conv pre-packed, with ReLU6 / ReLU fused and SiLU after the conv,
    strided, dilated and TF-padded; as close to float64 as eager float32 is, and no plain conv runs."""
    from mnv1_backbone import inference

    backbone = MobileNetV1Backbone(
        (3, 9, 13), depth_multiplier=0.25, tf_padding=tf_padding, output_stride=output_stride, hidden_act=activation
    )
    backbone = randomize(backbone, seed=31).eval()
    fast = optimize_for_inference(backbone)
    folded = [m for m in fast.modules() if isinstance(m, FoldedConvActivation)]
    exact = copy.deepcopy(backbone).double()
    for x in (torch.randn(2, 3, 96, 96), torch.randn(1, 3, 97, 131)):
        with torch.inference_mode():
            eager, reference = backbone(x), exact(x.double())
            with monkeypatch.context() as patch:  # any plain conv would fail the call
                patch.setattr(inference.nn.Conv2d, "forward", lambda *args: pytest.fail("a plain conv ran"))
                got = fast(x)
        assert _error(got, reference) <= 2 * _error(eager, reference) + 1e-6, (
            _error(got, reference),
            _error(eager, reference),
        )
    assert all(len(m.packed_weights) == 2 for m in folded)  # one packed copy per input shape


@ONEDNN
def test_prepacked_weights_are_a_cache(monkeypatch) -> None:
    """Packed per input shape (those of the `max_shapes` most recently used kept), again when the weights change
    in place or are replaced, never copied."""
    from mnv1_backbone import inference

    monkeypatch.setattr(inference._OneDNNPackedWeights, "max_shapes", 2)
    model = randomize(MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25)), seed=32).eval()
    fast = optimize_for_inference(model)
    stem = fast.model.mobilenet_v1.conv_stem
    with torch.inference_mode():
        for size in (64, 96, 64, 128):  # 96 is the least recently used when 128 comes
            fast(torch.randn(1, 3, size, size))
        assert [shape[-1] for shape, _ in stem.packed_weights._by_shape] == [64, 128]
        x = torch.randn(1, 3, 128, 128)
        before = fast(x).logits
        state = fast.state_dict()
        state = {key: value * 0.5 if key.endswith("convolution.bias") else value for key, value in state.items()}
        fast.load_state_dict(state)
        changed, plain = fast(x).logits, _without_prepacking(fast)(x).logits
        assert not torch.allclose(changed, before, atol=1e-3)
        torch.testing.assert_close(changed, plain, atol=1e-5, rtol=1e-5)
        stem.convolution.weight.mul_(2)  # in place: the weight's version changes, the pack follows
        torch.testing.assert_close(fast(x).logits, _without_prepacking(fast)(x).logits, atol=1e-5, rtol=1e-5)
        state = {key: -value if key.endswith("convolution.weight") else value for key, value in state.items()}
        fast.load_state_dict(state, assign=True)  # new tensors: packed again
        replaced = fast(x).logits
        torch.testing.assert_close(replaced, _without_prepacking(fast)(x).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(replaced, changed, atol=1e-3)
        copied = copy.deepcopy(fast)
        unpickled = pickle.loads(pickle.dumps(fast))
        assert (
            len(copied.model.mobilenet_v1.conv_stem.packed_weights)
            == len(unpickled.model.mobilenet_v1.conv_stem.packed_weights)
            == 0
        )
        torch.testing.assert_close(copied(x).logits, fast(x).logits, atol=0, rtol=0)
        torch.testing.assert_close(unpickled(x).logits, fast(x).logits, atol=0, rtol=0)


@ONEDNN
def test_prepacking_falls_back_when_the_private_op_fails(monkeypatch) -> None:
    """`mkldnn::_convolution_pointwise` is private to torch: should a release change it, each layer warns and takes
    the plain convolution from then on, with the same outputs."""
    from mnv1_backbone import inference

    backbone = randomize(MobileNetV1Backbone((3,), depth_multiplier=0.25), seed=35).eval()
    fast = optimize_for_inference(backbone)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = _without_prepacking(fast)(x)["Conv2d_3_pointwise"]

    def changed_signature(*args):
        raise TypeError("_convolution_pointwise() takes 9 positional arguments but 10 were given")

    monkeypatch.setattr(inference, "_CONVOLUTION_POINTWISE", changed_signature)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="pre-packed convolution failed.*TypeError"):
        got = fast(x)["Conv2d_3_pointwise"]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert all(m.packed_weights is None for m in fast.modules() if isinstance(m, FoldedConvActivation))


@ONEDNN
def test_prepacked_model_serves_several_threads(monkeypatch) -> None:
    """Threads calling one fast model with more shapes than the cache keeps get the plain convolutions' outputs.

    A smoke test: the race the cache's lock closes (an entry evicted by one thread between another's insert and
    its move to the end) is too narrow to hit on demand."""
    from concurrent.futures import ThreadPoolExecutor

    from mnv1_backbone import inference

    monkeypatch.setattr(inference._OneDNNPackedWeights, "max_shapes", 2)
    backbone = randomize(MobileNetV1Backbone((3,), depth_multiplier=0.25), seed=34).eval()
    fast = optimize_for_inference(backbone)
    plain = _without_prepacking(fast)
    inputs = [torch.randn(1, 3, 32 + 8 * (i % 5), 40) for i in range(40)]
    with torch.inference_mode():
        expected = [plain(x)["Conv2d_3_pointwise"] for x in inputs]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda x: fast(x)["Conv2d_3_pointwise"], inputs))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@ONEDNN
def test_prepacking_steps_aside_for_autograd_tracing_and_float64() -> None:
    """The fused op has no autograd, exporters need plain convs and oneDNN has no float64: an input that needs
    gradients, torch.export and a fast model cast to float64 take the conv (the same function)."""
    backbone = randomize(MobileNetV1Backbone((5,), depth_multiplier=0.25), seed=33).eval()
    fast = optimize_for_inference(backbone)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    fast(x)["Conv2d_5_pointwise"].sum().backward()
    expected = x.detach().clone().requires_grad_()
    backbone(expected)["Conv2d_5_pointwise"].sum().backward()
    torch.testing.assert_close(x.grad, expected.grad, atol=1e-4, rtol=1e-4)
    program = torch.export.export(fast, (x.detach(),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in target for target in targets), targets
    assert "aten.conv2d.default" in targets, targets
    plain = _without_prepacking(fast).double()
    exact = fast.double()
    with torch.inference_mode():
        got, expected = exact(x.detach().double()), plain(x.detach().double())
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert all(len(m.packed_weights) == 0 for m in exact.modules() if isinstance(m, FoldedConvActivation))


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
    0.9981 to float32 and the same top-1 (21 photos: 21/21 top-1, mean cosine 0.9957, benchmarks/bf16_accuracy.py)."""
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
