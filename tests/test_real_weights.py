"""Google's real ImageNet weights (the frozen graph shipped by the `nudity` wheel) on real photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1ForImageClassification, MobileNetV1ImageProcessor
from mnv1_backbone.pretrained import find_bundled_frozen_graph

DATA = Path(__file__).parent / "data"
GRAPH = find_bundled_frozen_graph()
pytestmark = pytest.mark.skipif(GRAPH is None, reason="pip install --no-deps nudity==0.2.3 for the real weights")

CAT_CLASSES = range(282, 287)  # tabby, tiger cat, Persian, Siamese, Egyptian cat (+1 for background)
ESPRESSO = 968


@pytest.fixture(scope="module")
def model() -> MobileNetV1ForImageClassification:
    return MobileNetV1ForImageClassification.from_tf(GRAPH).eval()


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    images = [Image.open(DATA / "chelsea.png"), Image.open(DATA / "coffee.png")]
    return MobileNetV1ImageProcessor()(images, return_tensors="pt")["pixel_values"]


def test_config_is_inferred_from_the_graph(model) -> None:
    assert model.config.depth_multiplier == 1.0 and model.config.num_labels == 1001
    assert model.config.resolved_id2label()[ESPRESSO] == "espresso"
    assert sum(p.numel() for p in model.parameters()) == 4_233_001


def test_photos_are_classified(model, pixel_values) -> None:
    with torch.no_grad():
        probabilities = model(pixel_values).logits.softmax(-1)
    # Top-1 is a cat class and the cat classes together hold most of the mass (tabby alone is ~0.43:
    # the network splits the photo between tabby, tiger cat and Egyptian cat).
    assert probabilities[0].argmax().item() in CAT_CLASSES
    assert probabilities[0, CAT_CLASSES.start : CAT_CLASSES.stop].sum().item() > 0.5
    assert probabilities[1].argmax().item() == ESPRESSO


def test_transformers_gives_the_same_logits_with_the_same_weights(model, pixel_values, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(tmp_path)
    theirs = transformers.MobileNetV1ForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours_logits = model(pixel_values).logits
        their_logits = theirs(pixel_values).logits
    assert (ours_logits - their_logits).abs().max().item() <= 1e-4


def test_backbone_from_tf_matches_the_classifier_trunk(model, pixel_values) -> None:
    backbone = MobileNetV1Backbone.from_tf(GRAPH, out_indices=(5, 13)).eval()
    with torch.no_grad():
        hidden = model(pixel_values, output_hidden_states=True).hidden_states
        features = backbone(pixel_values)
    torch.testing.assert_close(features["Conv2d_5_pointwise"], hidden[9], atol=0, rtol=0)
    torch.testing.assert_close(features["Conv2d_13_pointwise"], hidden[25], atol=0, rtol=0)


def test_truncated_graph_raises_a_clear_error(tmp_path) -> None:
    from mnv1_backbone import WeightsFormatError

    data = GRAPH.read_bytes()
    (tmp_path / "cut.pb").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsFormatError, match="cut.pb"):
        MobileNetV1ForImageClassification.from_tf(tmp_path / "cut.pb")
