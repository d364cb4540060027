"""Tests for the OD-API `ssd_mobilenet_v1_fpn` port: network, weight-shared predictor, multiscale anchors, TF names.

Ground truth is TensorFlow running the OD-API's own code: `tests/fixtures/odapi/fpn_shared/` (the zoo model's
configuration, tools/make_odapi_fixtures.py) and `tests/fixtures/odapi_fpn/` (the other branches of the code:
explicit padding, depthwise FPN and predictor, shared tower, no predictor BatchNorm, levels 2-6, ...;
tools/make_odapi_fpn_variants.py). The rest checks shapes, hand-computed anchors, the output layout and the loader's
errors on small random networks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mnv1_backbone.convert.checkpoint import TFCheckpoint
from mnv1_backbone.detection.anchors import multiscale_anchors
from mnv1_backbone.detection.odapi_fpn import (
    FPNSSDNetwork,
    build_fpn_ssd_network,
    fpn_tf_name_table,
    load_fpn_tf_variables,
)
from mnv1_backbone.errors import StateDictMismatchError, WeightsFormatError

FIXTURES = Path(__file__).parent / "fixtures"
ZOO_CASE = FIXTURES / "odapi" / "fpn_shared"
VARIANTS = FIXTURES / "odapi_fpn"

SMALL = dict(num_classes=3, depth_multiplier=0.25, predictor_depth=16, predictor_num_layers_before_predictor=2)

# build_fpn_ssd_network's arguments and multiscale_anchors' for each fixture, as its pipeline.config says.
CASES = {
    "fpn_shared": (
        ZOO_CASE,
        dict(num_classes=3, depth_multiplier=0.25, min_depth=16, predictor_depth=32,
             predictor_num_layers_before_predictor=2),
        dict(min_level=3, max_level=7, anchor_scale=4.0, aspect_ratios=(1.0, 2.0, 0.5), scales_per_octave=2),
    ),
    "explicit_depthwise_shared": (
        VARIANTS / "explicit_depthwise_shared",
        dict(num_classes=3, depth_multiplier=0.125, min_depth=8, use_explicit_padding=True, use_depthwise=True,
             predictor_depth=16, predictor_num_layers_before_predictor=2, predictor_share_tower=True,
             predictor_use_depthwise=True, predictor_batch_norm_eps=0.01),
        dict(min_level=3, max_level=7, anchor_scale=4.0, aspect_ratios=(1.0, 2.0, 0.5), scales_per_octave=2),
    ),
    "no_predictor_bn_levels_2_6": (
        VARIANTS / "no_predictor_bn_levels_2_6",
        dict(num_classes=3, depth_multiplier=0.125, min_depth=8, min_level=2, max_level=6, pad_to_multiple=32,
             batch_norm_eps=0.01, batch_norm_scale=False, predictor_depth=16,
             predictor_num_layers_before_predictor=1, predictor_apply_batch_norm=False,
             box_encodings_clip_range=(-1.5, 1.5), num_anchors_per_location=6),
        dict(min_level=2, max_level=6, anchor_scale=3.0, aspect_ratios=(1.0, 2.0), scales_per_octave=3),
    ),
}


def _small_network(**kwargs) -> FPNSSDNetwork:
    torch.manual_seed(0)
    return build_fpn_ssd_network(**{**SMALL, **kwargs}).eval()


def _randomize(network: nn.Module, seed: int = 0) -> None:
    """Random weights and BatchNorm statistics, so every tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var") or (name.endswith(".weight") and tensor.dim() == 1):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))


def _tf_variables(network: FPNSSDNetwork) -> dict[str, np.ndarray]:
    """The network's tensors under their TF names and layouts (the inverse of the loader)."""
    state = network.state_dict()
    out = {}
    for name, entry in fpn_tf_name_table(network).items():
        tensor = state[entry.key].detach()
        if entry.layout == "conv" and tensor.dim() == 4:
            tensor = tensor.permute(2, 3, 1, 0)
        elif entry.layout == "depthwise":
            tensor = tensor.permute(2, 3, 0, 1)
        out[name] = tensor.numpy().copy()
    return out


# --- shapes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_explicit_padding": True},
        {"use_depthwise": True, "predictor_use_depthwise": True},
        {"predictor_share_tower": True, "predictor_apply_batch_norm": False},
        {"min_level": 2, "max_level": 6, "num_anchors_per_location": 9},
        {"min_level": 4, "max_level": 5, "predictor_num_layers_before_predictor": 0},
    ],
)
def test_output_shapes(options):
    network = _small_network(**options)
    height, width = 96, 64
    codes, logits, shapes = network(torch.zeros(2, 3, height, width))
    min_level, max_level = options.get("min_level", 3), options.get("max_level", 7)
    levels = range(min_level, max_level + 1)
    expected = [(math.ceil(height / 2**level), math.ceil(width / 2**level)) for level in levels]
    assert shapes == expected
    anchors = sum(h * w for h, w in expected) * options.get("num_anchors_per_location", 6)
    assert codes.shape == (2, anchors, 4)
    assert logits.shape == (2, anchors, 4)


def test_depths_follow_the_od_api():
    network = _small_network(depth_multiplier=0.25, min_depth=16)
    extractor = network.feature_extractor
    assert extractor.depth == 64  # max(int(256 * 0.25), 16)
    assert [p.out_channels for p in extractor.projections] == [64, 64, 64]
    assert [p.in_channels for p in extractor.projections] == [64, 128, 256]  # Conv2d_5/11/13_pointwise at 0.25
    tower = network.box_predictor.box_tower
    assert [c.conv.out_channels for c in tower.convs] == [16, 16]  # predictor depth: not scaled
    assert network.box_predictor.class_predictor.conv.out_channels == 6 * 4
    narrow = _small_network(depth_multiplier=0.25, use_depthwise=True).feature_extractor
    # The depthwise variant's trunk: Conv2d_12 512 and Conv2d_13 256 base channels.
    assert narrow.backbone.layer[23].convolution.out_channels == 128
    assert narrow.backbone.layer[25].convolution.out_channels == 64
    assert narrow.projections[-1].in_channels == 64
    assert narrow.smoothings[0].convolution.depthwise is not None


def test_upsampling_crops_odd_maps():
    # 40 x 40 pixels: level 5 is 2 x 2, level 4 is 3 x 3: the upsampled 4 x 4 map is cropped to it.
    network = _small_network()
    _, _, shapes = network(torch.zeros(1, 3, 40, 40))
    assert shapes[:3] == [(5, 5), (3, 3), (2, 2)]


def test_pad_to_multiple_pads_bottom_right_with_zeros():
    network = _small_network(pad_to_multiple=32)
    _randomize(network)
    image = torch.rand(1, 3, 50, 70) * 2 - 1
    padded = torch.zeros(1, 3, 64, 96)
    padded[..., :50, :70] = image
    reference = _small_network()
    reference.load_state_dict(network.state_dict())
    with torch.no_grad():
        got, want = network(image), reference(padded)
    assert got[2] == want[2] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_level must be one of"):
        build_fpn_ssd_network(num_classes=3, min_level=1)
    with pytest.raises(ValueError, match="max_level must be an int >= min_level 3"):
        build_fpn_ssd_network(num_classes=3, max_level=2)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        build_fpn_ssd_network(num_classes=0)
    with pytest.raises(ValueError, match="box_encodings_clip_range"):
        build_fpn_ssd_network(num_classes=3, box_encodings_clip_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="at least 33|H, W >= 33"):
        _small_network()(torch.zeros(1, 3, 32, 64))


# --- output layout -------------------------------------------------------------------------------------------------


def test_outputs_are_laid_out_level_y_x_anchor_then_code():
    """Entry (level l, y, x, anchor k, code c) is channel k * code + c of the head's map at (y, x)."""
    network = _small_network(num_anchors_per_location=3)
    _randomize(network)
    image = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        codes, logits, shapes = network(image)
        features = network.feature_extractor(image)
        predictor = network.box_predictor
        offset = 0
        for level, ((h, w), feature) in enumerate(zip(shapes, features, strict=True)):
            box_map = predictor.box_predictor(predictor.box_tower(feature, level))[0]
            class_map = predictor.class_predictor(predictor.class_tower(feature, level))[0]
            for y, x, k in [(0, 0, 0), (h - 1, 0, 2), (0, w - 1, 1), (h - 1, w - 1, 2)]:
                index = offset + (y * w + x) * 3 + k
                torch.testing.assert_close(codes[0, index], box_map[k * 4 : k * 4 + 4, y, x])
                torch.testing.assert_close(logits[0, index], class_map[k * 4 : k * 4 + 4, y, x])
            offset += h * w * 3
        assert offset == codes.shape[1]


def test_zero_weights_give_the_head_biases():
    """With every conv weight zero the outputs are the predictor biases, repeated at every location and level."""
    network = _small_network(num_anchors_per_location=2, class_prediction_bias_init=-4.6)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
        network.box_predictor.box_predictor.conv.bias.copy_(torch.arange(8.0))
    codes, logits, shapes = network(torch.rand(1, 3, 64, 64))
    count = sum(h * w for h, w in shapes) * 2
    torch.testing.assert_close(codes[0], torch.arange(8.0).view(2, 4).repeat(count // 2, 1))
    torch.testing.assert_close(logits, torch.full((1, count, 4), -4.6))


def test_weights_are_shared_across_levels_but_batch_norm_is_not():
    network = _small_network()
    predictor = network.box_predictor
    assert len(predictor.box_tower.convs) == 2
    assert len(predictor.box_tower.norms[0]) == 5  # one BatchNorm per level
    assert predictor.box_tower.convs[0].conv.bias is None  # BatchNorm follows: slim adds no bias
    no_bn = _small_network(predictor_apply_batch_norm=False).box_predictor
    assert no_bn.box_tower.convs[0].conv.bias is not None and len(no_bn.box_tower.norms) == 0
    shared = _small_network(predictor_share_tower=True).box_predictor
    assert shared.class_tower is None


# --- anchors -------------------------------------------------------------------------------------------------------


def test_multiscale_anchors_hand_computed():
    # One level (3): stride 8, base 4 * 8 = 32 px, offset 4 px (16 is a multiple of 8); 2 x 2 map on 16 x 16 pixels.
    anchors = multiscale_anchors(
        [(2, 2)], (16, 16), min_level=3, max_level=3, anchor_scale=4.0, aspect_ratios=(1.0, 2.0), scales_per_octave=2
    )
    r2 = math.sqrt(2.0)
    # Per location, aspect ratio by aspect ratio, scales 1 and sqrt(2): (h, w) in pixels.
    sizes = [(32, 32), (32 * r2, 32 * r2), (32 / r2, 32 * r2), (32, 64)]
    expected = []
    for cy in (4, 12):
        for cx in (4, 12):
            for h, w in sizes:
                expected.append([(cy - h / 2) / 16, (cx - w / 2) / 16, (cy + h / 2) / 16, (cx + w / 2) / 16])
    torch.testing.assert_close(anchors, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)
    assert anchors[0].tolist() == [-0.75, -0.75, 1.25, 1.25]


def test_multiscale_anchor_offsets_and_levels():
    # 48 x 40 image: 48 is a multiple of 16, 40 is not: level 4 centres start at 8 px in y, 0 px in x.
    anchors = multiscale_anchors(
        [(6, 5), (3, 3)], (48, 40), min_level=3, max_level=4, anchor_scale=1.0, aspect_ratios=(1.0,),
        scales_per_octave=1, normalize=False,
    )
    assert anchors.shape == (6 * 5 + 3 * 3, 4)
    assert anchors[0].tolist() == [0.0, 0.0, 8.0, 8.0]  # level 3: 48 % 8 == 40 % 8 == 0, offsets 4 px
    level4 = anchors[30:]
    assert level4[0].tolist() == [0.0, -8.0, 16.0, 8.0]  # centre (8, 0), side 16
    assert level4[1].tolist() == [0.0, 8.0, 16.0, 24.0]  # next x: stride 16
    assert level4[3].tolist() == [16.0, -8.0, 32.0, 8.0]  # next row
    normalized = multiscale_anchors(
        [(6, 5), (3, 3)], (48, 40), min_level=3, max_level=4, anchor_scale=1.0, aspect_ratios=(1.0,),
        scales_per_octave=1,
    )
    torch.testing.assert_close(normalized, anchors / torch.tensor([48.0, 40.0, 48.0, 40.0]))


def test_multiscale_anchors_reject_bad_input():
    with pytest.raises(ValueError, match="got 2 feature maps for levels 3..7"):
        multiscale_anchors([(4, 4), (2, 2)], (32, 32))
    with pytest.raises(ValueError, match="image height must be a positive int"):
        multiscale_anchors([(1, 1)], (0, 32), min_level=3, max_level=3)
    with pytest.raises(ValueError, match="scales_per_octave"):
        multiscale_anchors([(1, 1)], (32, 32), min_level=3, max_level=3, scales_per_octave=0)
    with pytest.raises(ValueError, match="max_level 2 is below min_level 3"):
        multiscale_anchors([], (32, 32), min_level=3, max_level=2)


# --- TF names and loading ------------------------------------------------------------------------------------------


def test_name_table_covers_every_tensor_once():
    for options in ({}, {"use_depthwise": True, "predictor_use_depthwise": True, "predictor_share_tower": True}):
        network = _small_network(**options)
        table = fpn_tf_name_table(network)
        keys = [entry.key for entry in table.values()]
        assert len(keys) == len(set(keys))
        weights = {k for k in network.state_dict() if not k.endswith("num_batches_tracked")}
        assert set(keys) == weights


def test_name_table_uses_the_od_api_scopes():
    table = fpn_tf_name_table(_small_network())
    for name in [
        "FeatureExtractor/MobilenetV1/Conv2d_0/weights",
        "FeatureExtractor/MobilenetV1/Conv2d_13_depthwise/depthwise_weights",
        "FeatureExtractor/MobilenetV1/fpn/projection_3/biases",
        "FeatureExtractor/MobilenetV1/fpn/smoothing_1/BatchNorm/moving_variance",
        "FeatureExtractor/MobilenetV1/fpn/bottom_up_Conv2d_15/weights",
        "WeightSharedConvolutionalBoxPredictor/BoxPredictionTower/conv2d_1/weights",
        "WeightSharedConvolutionalBoxPredictor/ClassPredictionTower/conv2d_0/BatchNorm/feature_4/gamma",
        "WeightSharedConvolutionalBoxPredictor/ClassPredictor/biases",
    ]:
        assert name in table, name
    assert "FeatureExtractor/MobilenetV1/fpn/smoothing_3/weights" not in table  # the top level is not smoothed
    assert not any(name.endswith("conv2d_0/biases") for name in table)  # BatchNorm instead of a bias
    depthwise = fpn_tf_name_table(_small_network(use_depthwise=True, predictor_share_tower=True))
    assert "FeatureExtractor/MobilenetV1/fpn/smoothing_1/pointwise_weights" in depthwise
    assert "WeightSharedConvolutionalBoxPredictor/PredictionTower/conv2d_0/weights" in depthwise


def test_load_round_trip():
    source = _small_network(use_depthwise=True, predictor_use_depthwise=True)
    _randomize(source, seed=1)
    target = _small_network(use_depthwise=True, predictor_use_depthwise=True)
    load_fpn_tf_variables(target, _tf_variables(source))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        for got, want in zip(target(image)[:2], source(image)[:2], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_without_gamma_sets_unit_scale():
    source = _small_network(batch_norm_scale=False)
    variables = _tf_variables(source)
    assert not any("fpn" in name and name.endswith("gamma") for name in variables)
    target = _small_network(batch_norm_scale=False)
    with torch.no_grad():
        target.feature_extractor.smoothings[0].normalization.weight.fill_(3.0)
    load_fpn_tf_variables(target, variables)
    assert torch.equal(target.feature_extractor.smoothings[0].normalization.weight, torch.ones(64))


def test_load_reports_every_mismatch():
    network = _small_network()
    variables = _tf_variables(network)
    del variables["WeightSharedConvolutionalBoxPredictor/ClassPredictor/biases"]
    variables["FeatureExtractor/MobilenetV1/fpn/smoothing_3/weights"] = np.zeros((3, 3, 64, 64), np.float32)
    name = "FeatureExtractor/MobilenetV1/fpn/projection_1/weights"
    variables[name] = np.zeros((1, 1, 64, 65), np.float32)
    with pytest.raises(StateDictMismatchError) as info:
        load_fpn_tf_variables(network, variables)
    message = str(info.value)
    assert "1 missing: WeightSharedConvolutionalBoxPredictor/ClassPredictor/biases" in message
    assert "1 unexpected: FeatureExtractor/MobilenetV1/fpn/smoothing_3/weights" in message
    assert f"{name}: (1, 1, 64, 65), expected (1, 1, 64, 64)" in message


def test_load_rejects_non_float_and_leaves_network_untouched():
    network = _small_network()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    variables = _tf_variables(_small_network())
    variables["WeightSharedConvolutionalBoxPredictor/BoxPredictor/biases"] = np.zeros(24, np.int32)
    with pytest.raises(WeightsFormatError, match="BoxPredictor/biases.*int32"):
        load_fpn_tf_variables(network, variables)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    with pytest.raises(TypeError, match="FPNSSDNetwork"):
        load_fpn_tf_variables(nn.Conv2d(1, 1, 1), variables)  # type: ignore[arg-type]


# --- parity with TensorFlow ----------------------------------------------------------------------------------------


def _load_case(name: str) -> tuple[FPNSSDNetwork, dict[str, np.ndarray], dict]:
    folder, options, anchor_options = CASES[name]
    if not (folder / "reference.npz").exists():
        pytest.skip(f"fixture {folder} not written yet")
    variables = TFCheckpoint(folder / "model.ckpt").read_all()
    assert variables.pop("global_step").shape == ()
    network = build_fpn_ssd_network(**options).eval()
    load_fpn_tf_variables(network, variables)
    with np.load(folder / "reference.npz") as reference:
        return network, dict(reference), anchor_options


@pytest.mark.parametrize("name", sorted(CASES))
def test_raw_outputs_match_tensorflow(name):
    network, reference, anchor_options = _load_case(name)
    for i in range(2):
        image = torch.from_numpy(reference[f"preprocessed_{i}"]).permute(0, 3, 1, 2)
        with torch.no_grad():
            codes, logits, shapes = network(image)
        assert shapes == [tuple(s) for s in reference["feature_map_shapes"].tolist()]
        torch.testing.assert_close(codes, torch.from_numpy(reference[f"box_encodings_{i}"]), rtol=0, atol=1e-4)
        torch.testing.assert_close(logits, torch.from_numpy(reference[f"class_predictions_{i}"]), rtol=0, atol=1e-4)
    size = tuple(reference["preprocessed_0"].shape[1:3])
    anchors = multiscale_anchors(shapes, size, **anchor_options)
    torch.testing.assert_close(anchors, torch.from_numpy(reference["anchors"]), rtol=0, atol=1e-6)


def test_fixture_configs_match_the_arguments_used():
    """The kwargs above are read off each case's pipeline.config: fail loudly if a fixture is regenerated."""
    for name, (folder, options, anchor_options) in CASES.items():
        config_path = folder / "pipeline.config"
        if not config_path.exists():
            continue
        text = " ".join(config_path.read_text().split())
        assert f"depth: {options['predictor_depth']}" in text, name
        assert f"num_layers_before_predictor: {options['predictor_num_layers_before_predictor']}" in text, name
        assert f"depth_multiplier: {options['depth_multiplier']}" in text, name
        assert f"anchor_scale: {anchor_options['anchor_scale']}" in text, name
        assert f"scales_per_octave: {anchor_options['scales_per_octave']}" in text, name


@pytest.mark.parametrize("source", ["model folder (checkpoint)", "frozen_inference_graph.pb"])
def test_end_to_end_detections_match_tensorflow(source):
    """A's `from_tf_object_detection` on the fpn_shared export: same detections as TF from the raw photos."""
    odapi = pytest.importorskip("mnv1_backbone.detection.odapi")
    if not (ZOO_CASE / "reference.npz").exists():
        pytest.skip("fixture fpn_shared not written yet")
    path = ZOO_CASE / source if source.endswith(".pb") else ZOO_CASE
    model = odapi.from_tf_object_detection(path)
    reference = np.load(ZOO_CASE / "reference.npz")
    for i in range(2):
        image = reference[f"image_{i}"]
        height, width = image.shape[:2]
        with torch.no_grad():
            (detections,) = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])
        count = int(reference[f"num_detections_{i}"][0])
        assert count > 0
        assert len(detections["scores"]) == count
        boxes = torch.from_numpy(reference[f"detection_boxes_{i}"][0, :count])
        pixels = boxes[:, [1, 0, 3, 2]] * torch.tensor([width, height, width, height], dtype=torch.float32)
        torch.testing.assert_close(
            detections["labels"], torch.from_numpy(reference[f"detection_classes_{i}"][0, :count]).long()
        )
        torch.testing.assert_close(detections["boxes"], pixels, rtol=0, atol=0.5)
        torch.testing.assert_close(
            detections["scores"], torch.from_numpy(reference[f"detection_scores_{i}"][0, :count]), rtol=0, atol=1e-4
        )
