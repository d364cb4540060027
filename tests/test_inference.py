"""Fast paths compute the same function: folded/static/channels-last within 1e-4; int8 close on real photos."""

from __future__ import annotations

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
from mnv1_backbone.inference import FoldedConvActivation, optimize_for_inference, quantize_int8
from mnv1_backbone.pretrained import find_bundled_frozen_graph

DATA = Path(__file__).parent / "data"


def _close(got, expected, atol: float = 1e-4) -> None:
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0)
    else:
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("tf_padding", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_classifier_fast_path_matches_eager(tf_padding: bool, channels_last: bool) -> None:
    config = MobileNetV1Config(depth_multiplier=0.5, tf_padding=tf_padding)
    model = randomize(MobileNetV1ForImageClassification(config), seed=21)
    with torch.no_grad():  # logits of the size real ones have (~10), so 1e-4 means what it does for them
        model.classifier.weight.mul_(0.1)
    example = torch.randn(2, 3, 224, 224)
    fast = optimize_for_inference(model, example, channels_last=channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, FoldedConvActivation) for m in fast.modules()) == 27
    with torch.no_grad():
        _close(fast(example).logits, model(example).logits)
        other = torch.randn(1, 3, 97, 131)  # another size takes the dynamic padding: still exact
        _close(fast(other).logits, model(other).logits)


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
def test_backbone_fast_path_matches_eager(output_stride: int) -> None:
    backbone = randomize(MobileNetV1Backbone((5, 11, 13), depth_multiplier=0.25, output_stride=output_stride), seed=2)
    backbone.freeze(2)  # frozen BatchNorms fold too
    example = torch.randn(1, 3, 320, 320)
    fast = optimize_for_inference(backbone, example)
    assert fast.feature_info == backbone.feature_info  # metadata passes through the wrapper
    # Random weights and BatchNorm statistics amplify float32 rounding more than trained ones do: the
    # bound here is relative to the feature scale (ReLU6: 6); trained weights meet 1e-4 absolute (below).
    with torch.no_grad():
        _close(fast(example), backbone(example), atol=6 * 5e-5)
        other = torch.randn(2, 3, 96, 128)
        _close(fast(other), backbone(other), atol=6 * 5e-5)


def test_bare_model_fast_path_and_the_original_is_untouched() -> None:
    model = randomize(MobileNetV1Model(MobileNetV1Config(depth_multiplier=0.25)), seed=3)
    fast = optimize_for_inference(model, channels_last=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _close(fast(x).last_hidden_state, model(x).last_hidden_state)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_optimize_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="no MobileNetV1 layers"):
        optimize_for_inference(torch.nn.Linear(2, 2))


@pytest.mark.filterwarnings("ignore")
def test_int8_backbone_runs_and_stays_close() -> None:
    backbone = randomize(MobileNetV1Backbone((5, 13), depth_multiplier=0.25), seed=4)
    images = [torch.rand(2, 3, 96, 96) * 2 - 1 for _ in range(3)]
    quantized = quantize_int8(backbone, images)
    with torch.no_grad():
        got, expected = quantized(images[0]), backbone(images[0])
    assert list(got) == list(expected)
    for key in expected:
        cosine = torch.nn.functional.cosine_similarity(got[key].flatten(1), expected[key].flatten(1))
        assert cosine.min() > 0.9, (key, cosine)


def test_int8_needs_calibration_data() -> None:
    with pytest.raises(ValueError, match="calibration_images is empty"):
        quantize_int8(MobileNetV1Backbone((5,), depth_multiplier=0.25), [])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="needs the real weights (nudity wheel)")
def test_int8_classifier_on_real_photos() -> None:
    model = MobileNetV1ForImageClassification.from_tf(find_bundled_frozen_graph()).eval()
    photos = [Image.open(DATA / "chelsea.png"), Image.open(DATA / "coffee.png")]
    x = MobileNetV1ImageProcessor()(photos)["pixel_values"]
    quantized = quantize_int8(model, [x, torch.flip(x, [3])])
    with torch.no_grad():
        logits, reference = quantized(x), model(x).logits
    cosine = torch.nn.functional.cosine_similarity(logits, reference)
    # Measured: 0.985 (cat) and 0.974 (espresso); the cat's top-1 moves between the cat classes.
    assert cosine.min() > 0.97, cosine
    assert logits[1].argmax() == reference[1].argmax() == 968
    assert 282 <= logits[0].argmax() <= 286
