"""TF Object Detection API import: pipeline.config reader, anchors, box coder, TF1 resize, postprocessing, the
detector against TensorFlow's own numbers (tests/fixtures/odapi/, written by tools/make_odapi_fixtures.py with real
TF), archives and frozen graphs, bad input, training losses and fine-tuning, save/load."""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnv1_backbone.detection.anchors import ssd_anchor_box_specs, ssd_anchors
from mnv1_backbone.detection.box_coder import decode_boxes, encode_boxes
from mnv1_backbone.detection.odapi import (
    ODAPISSDDetector,
    coco_label_map,
    date_from_name,
    from_tf_object_detection,
    read_label_map,
)
from mnv1_backbone.detection.odapi_postprocess import postprocess_detections, resize_bilinear_tf1
from mnv1_backbone.detection.tf_pipeline import PipelineConfigError, SSDPipelineConfig, parse_text_proto
from mnv1_backbone.errors import StateDictMismatchError, WeightsFormatError

FIXTURES = Path(__file__).parent / "fixtures" / "odapi"
# case -> (legacy_anchor_order, clip_before_nms), as tests/fixtures/odapi/README.md describes each case.
CASES = {
    "ssd_k1_sigmoid": (False, False),
    "ssd_k3_legacy_explicit_depthwise_softmax": (True, True),
    "fpn_shared": (False, False),
    "ssd_quantized": (False, False),
}


def _case_dir(case: str) -> Path:
    folder = FIXTURES / case
    if not (folder / "reference.npz").is_file():
        pytest.skip(f"fixture {case} not generated yet (tools/make_odapi_fixtures.py)")
    return folder


_CACHE: dict[str, ODAPISSDDetector] = {}


def _load(case: str, path: Path | None = None, **kwargs) -> ODAPISSDDetector:
    """Load a fixture case; plain loads of the folder are cached (a deep copy is returned: tests may train it)."""
    legacy, clip = CASES[case]
    cacheable = path is None and not kwargs
    if cacheable and case in _CACHE:
        return copy.deepcopy(_CACHE[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantized case warns about its FakeQuant ranges (tested below)
        options = {"legacy_anchor_order": legacy, "clip_before_nms": clip, **kwargs}
        model = from_tf_object_detection(path or _case_dir(case), **options)
    if cacheable:
        _CACHE[case] = copy.deepcopy(model)
    return model


def _image(reference, i: int) -> torch.Tensor:
    return torch.from_numpy(reference[f"image_{i}"]).permute(2, 0, 1).float() / 255.0


def _tf_detections(reference, i: int, height: int, width: int):
    n = int(reference[f"num_detections_{i}"][0])
    boxes = torch.from_numpy(reference[f"detection_boxes_{i}"][0, :n])[:, [1, 0, 3, 2]]
    boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
    scores = torch.from_numpy(reference[f"detection_scores_{i}"][0, :n])
    labels = torch.from_numpy(reference[f"detection_classes_{i}"][0, :n]).long()
    return boxes, scores, labels


def _assert_same_detections(ours: dict, reference, i: int, height: int, width: int) -> None:
    boxes, scores, labels = _tf_detections(reference, i, height, width)
    assert ours["labels"].tolist() == labels.tolist()
    assert (ours["boxes"] - boxes).abs().max().item() <= 0.5
    assert (ours["scores"] - scores).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------------------------------
# pipeline.config reader
# --------------------------------------------------------------------------------------------------------------

MINIMAL = """
model {
  ssd {
    num_classes: 3
    image_resizer { fixed_shape_resizer { height: 96 width: 96 } }
    feature_extractor {
      type: 'ssd_mobilenet_v1'
      depth_multiplier: 0.25
      min_depth: 16
      conv_hyperparams { activation: RELU_6, batch_norm { scale: true, epsilon: 0.001, } }
    }
    box_coder { faster_rcnn_box_coder { } }
    matcher { argmax_matcher { matched_threshold: 0.5 unmatched_threshold: 0.4 } }
    box_predictor { convolutional_box_predictor { kernel_size: 1
      conv_hyperparams { activation: RELU_6 batch_norm { scale: true } } } }
    anchor_generator { ssd_anchor_generator { num_layers: 6 aspect_ratios: [1.0, 2.0, 0.5] } }
    post_processing {
      batch_non_max_suppression { score_threshold: 0.3 iou_threshold: 0.5 max_detections_per_class: 10
        max_total_detections: 20 }
      score_converter: SIGMOID
    }
    loss {
      classification_loss { weighted_sigmoid { } }
      localization_loss { weighted_smooth_l1 { } }
      hard_example_miner { num_hard_examples: 100 iou_threshold: 0.99 loss_type: CLASSIFICATION
        max_negatives_per_positive: 3 }
    }
  }
}
train_config { batch_size: 2 data_augmentation_options { random_horizontal_flip { } } }
"""


def test_parser_nested_repeated_comments_strings_enums():
    text = r"""
    # a comment
    a: 1  b: -2.5e-1 c: 0.5f d: inf  # trailing comment
    s: "tab\there \"q\" \x41\101" 'and' "more"
    e: RELU_6 flag: true
    sub { x: 1 x: 2 y: [3, 4] inner < z: 'deep' > }
    sub: { x: 5 }
    """
    root = parse_text_proto(text)
    assert root.last("a") == 1 and root.last("b") == -0.25 and root.last("c") == 0.5 and root.last("d") == math.inf
    assert root.last("s") == 'tab\there "q" AAandmore'
    assert root.last("e") == "RELU_6" and root.last("flag") == "true"
    subs = root.values("sub")
    assert len(subs) == 2 and subs[0].values("x") == [1, 2] and subs[0].values("y") == [3, 4]
    assert subs[0].message("inner").last("z") == "deep" and subs[1].last("x") == 5
    assert subs[0].message("inner").path == "sub.inner"


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: 'open", "unterminated string"),
        ("a { b: 1", "missing '}'"),
        ("a: 1 }", "expected a name"),
        ("a 1", "expected ':'"),
        ("a: [1, 2", "expected ',' or ']'"),
        ("a: 's\\q'", "unknown escape"),
        ("[ext.field]: 1", "extension"),
    ],
)
def test_parser_errors_name_the_line(text, message):
    with pytest.raises(PipelineConfigError, match=message) as info:
        parse_text_proto("\n" + text, source="my.config")
    assert "my.config, line 2" in str(info.value)


def test_parser_bounds_size_and_depth():
    with pytest.raises(PipelineConfigError, match="nested deeper than 32"):
        parse_text_proto("a { " * 40 + "}" * 40)
    with pytest.raises(PipelineConfigError, match="more than the"):
        parse_text_proto(b"a: 1 " * (1 << 20))


def test_config_reads_fields_defaults_and_ignores_unknown_fields():
    config = SSDPipelineConfig.from_text(MINIMAL.replace("num_classes: 3", "num_classes: 3 some_future_field: 7"))
    assert config.num_classes == 3 and (config.image_height, config.image_width) == (96, 96)
    assert config.feature_extractor.depth_multiplier == 0.25 and config.feature_extractor.hyperparams.batch_norm
    assert config.anchor_generator.aspect_ratios == (1.0, 2.0, 0.5)
    assert config.anchor_generator.min_scale == 0.2 and config.anchor_generator.max_scale == 0.95  # proto defaults
    assert config.box_coder_scales == (10.0, 10.0, 5.0, 5.0)
    assert config.matcher.unmatched_threshold == 0.4
    assert config.post_processing.score_converter == "SIGMOID" and config.post_processing.max_total_detections == 20
    assert config.loss.hard_example_miner and config.loss.max_negatives_per_positive == 3
    assert config.loss.hard_example_loss_type == "CLASSIFICATION" and config.loss.focal_alpha is None


@pytest.mark.parametrize(
    "old, new, field",
    [
        ("type: 'ssd_mobilenet_v1'", "type: 'ssd_resnet50_v1_fpn'", "model.ssd.feature_extractor.type"),
        ("type: 'ssd_mobilenet_v1'", "type: 'ssd_mobilenet_v1_ppn'", "model.ssd.feature_extractor.type"),
        ("faster_rcnn_box_coder { }", "square_box_coder { }", "model.ssd.box_coder.square_box_coder"),
        ("fixed_shape_resizer { height: 96 width: 96 }", "keep_aspect_ratio_resizer { }",
         "model.ssd.image_resizer.keep_aspect_ratio_resizer"),
        ("score_converter: SIGMOID", "score_converter: SIGMOID calibration_config { }",
         "model.ssd.post_processing.calibration_config"),
        ("score_converter: SIGMOID", "score_converter: SQUARE", "model.ssd.post_processing.score_converter"),
        ("num_classes: 3", "num_classes: 'three'", "model.ssd.num_classes"),
    ],
)
def test_config_refuses_unsupported_settings_naming_the_field(old, new, field):
    assert old in MINIMAL
    with pytest.raises(PipelineConfigError, match=field.replace(".", r"\.")):
        SSDPipelineConfig.from_text(MINIMAL.replace(old, new))


def test_config_refuses_other_meta_architectures():
    with pytest.raises(PipelineConfigError, match=r"model\.faster_rcnn"):
        SSDPipelineConfig.from_text("model { faster_rcnn { num_classes: 3 } }")


# --------------------------------------------------------------------------------------------------------------
# anchors, box coder, resize, postprocessing
# --------------------------------------------------------------------------------------------------------------


def test_ssd_anchors_hand_computed_both_orders():
    specs = ssd_anchor_box_specs(num_layers=2, min_scale=0.2, max_scale=0.9, aspect_ratios=(1.0, 2.0))
    assert specs[0] == [(0.1, 1.0), (0.2, 2.0), (0.2, 0.5)]
    assert np.allclose(specs[1], [(0.9, 1.0), (0.9, 2.0), (math.sqrt(0.9), 1.0)])
    legacy = ssd_anchor_box_specs(num_layers=2, min_scale=0.2, max_scale=0.9, aspect_ratios=(1.0, 2.0),
                                  legacy_order=True)
    assert np.allclose(legacy[1], [(0.9, 1.0), (math.sqrt(0.9), 1.0), (0.9, 2.0)])
    anchors = ssd_anchors([(2, 1), (1, 1)], specs).double()
    r = math.sqrt(2.0)
    expected = [
        # layer 0, 2x1 grid: centres (0.25, 0.5) then (0.75, 0.5)
        [0.25 - 0.05, 0.5 - 0.05, 0.25 + 0.05, 0.5 + 0.05],
        [0.25 - 0.1 / r, 0.5 - 0.1 * r, 0.25 + 0.1 / r, 0.5 + 0.1 * r],
        [0.25 - 0.1 * r, 0.5 - 0.1 / r, 0.25 + 0.1 * r, 0.5 + 0.1 / r],
        [0.75 - 0.05, 0.5 - 0.05, 0.75 + 0.05, 0.5 + 0.05],
        [0.75 - 0.1 / r, 0.5 - 0.1 * r, 0.75 + 0.1 / r, 0.5 + 0.1 * r],
        [0.75 - 0.1 * r, 0.5 - 0.1 / r, 0.75 + 0.1 * r, 0.5 + 0.1 / r],
        # layer 1, one cell
        [0.05, 0.05, 0.95, 0.95],
        [0.5 - 0.45 / r, 0.5 - 0.45 * r, 0.5 + 0.45 / r, 0.5 + 0.45 * r],
        [0.5 - math.sqrt(0.9) / 2, 0.5 - math.sqrt(0.9) / 2, 0.5 + math.sqrt(0.9) / 2, 0.5 + math.sqrt(0.9) / 2],
    ]
    assert torch.allclose(anchors, torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_legacy_order_needs_aspect_ratio_one():
    with pytest.raises(ValueError, match="no 1.0"):
        ssd_anchor_box_specs(aspect_ratios=(2.0, 0.5), legacy_order=True)


def test_box_coder_round_trip_and_known_code():
    generator = torch.Generator().manual_seed(0)
    anchors = torch.rand(50, 2, generator=generator).repeat(1, 2) + torch.tensor([0, 0, 0.1, 0.2])
    boxes = torch.rand(50, 2, generator=generator).repeat(1, 2) + torch.tensor([0, 0, 0.3, 0.05])
    codes = encode_boxes(boxes, anchors)
    assert torch.allclose(decode_boxes(codes, anchors), boxes, atol=1e-5)
    # A box twice the anchor's height, shifted by half an anchor height: ty = 10 * 0.5, th = 5 * log 2.
    code = encode_boxes(torch.tensor([[0.1, 0.0, 0.5, 0.2]]), torch.tensor([[0.0, 0.0, 0.2, 0.2]]))
    assert torch.allclose(code, torch.tensor([[10 * 1.0, 0.0, 5 * math.log(2.0), 0.0]]), atol=1e-4)


def test_resize_bilinear_tf1_hand_computed():
    image = torch.tensor([[[0.0, 10.0], [20.0, 30.0]]])
    # TF 1.x (no half-pixel offset): out i samples in i * 2 / 4 = 0, 0.5, 1, 1.5 -> clamped to the last pixel.
    expected = torch.tensor([[0.0, 5.0, 10.0, 10.0], [10.0, 15.0, 20.0, 20.0], [20.0, 25.0, 30.0, 30.0],
                             [20.0, 25.0, 30.0, 30.0]])
    assert torch.equal(resize_bilinear_tf1(image, (4, 4))[0], expected)


def test_postprocess_clip_orders_differ_at_the_border():
    # Two boxes of one class reaching out of the image: unclipped IoU 1/3 (both survive NMS at 0.6), clipped to
    # the image both are [0, 0, 0.2, 0.5] (IoU 1, one survives).
    anchors = torch.tensor([[-1.0, 0.0, 0.2, 0.5], [-0.2, 0.0, 0.2, 0.5]])
    codes = torch.zeros(2, 4)
    logits = torch.tensor([[-9.0, 2.0], [-9.0, 1.0]])
    kwargs = {"score_threshold": 0.1, "iou_threshold": 0.6, "max_detections_per_class": 10,
              "max_total_detections": 10}
    modern = postprocess_detections(codes, logits, anchors, clip_before_nms=False, **kwargs)
    legacy = postprocess_detections(codes, logits, anchors, clip_before_nms=True, **kwargs)
    assert len(modern.scores) == 2 and len(legacy.scores) == 1
    assert modern.boxes.min() >= 0 and modern.labels.tolist() == [1, 1]


# --------------------------------------------------------------------------------------------------------------
# against TensorFlow's numbers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_fixture_parity(case):
    folder = _case_dir(case)
    reference = np.load(folder / "reference.npz")
    model = _load(case)
    assert model.feature_map_shapes == [tuple(int(v) for v in s) for s in reference["feature_map_shapes"]]
    assert (model.anchors - torch.from_numpy(reference["anchors"])).abs().max().item() <= 1e-6
    for i in range(2):
        image = _image(reference, i)
        preprocessed = model.preprocess([image])
        assert (preprocessed.permute(0, 2, 3, 1) - torch.from_numpy(reference[f"preprocessed_{i}"])).abs().max() <= 1e-5
        with torch.no_grad():
            codes, logits, _ = model.network(torch.from_numpy(reference[f"preprocessed_{i}"]).permute(0, 3, 1, 2))
            assert (codes - torch.from_numpy(reference[f"box_encodings_{i}"])).abs().max().item() <= 1e-4
            assert (logits - torch.from_numpy(reference[f"class_predictions_{i}"])).abs().max().item() <= 1e-4
            detections = model([image])[0]
        assert len(detections["scores"]) > 0
        _assert_same_detections(detections, reference, i, image.shape[-2], image.shape[-1])


def test_legacy_anchor_order_changes_the_anchors():
    folder = _case_dir("ssd_k3_legacy_explicit_depthwise_softmax")
    reference = np.load(folder / "reference.npz")
    wrong = from_tf_object_detection(folder, legacy_anchor_order=False, clip_before_nms=True)
    assert (wrong.anchors - torch.from_numpy(reference["anchors"])).abs().max().item() > 0.01


def test_frozen_graph_loads_the_same_weights():
    folder = _case_dir("ssd_k1_sigmoid")
    from_checkpoint = _load("ssd_k1_sigmoid")
    from_graph = _load("ssd_k1_sigmoid", folder / "frozen_inference_graph.pb")
    a, b = from_checkpoint.network.state_dict(), from_graph.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_graph_alone_infers_the_config(tmp_path):
    folder = _case_dir("ssd_k1_sigmoid")
    reference = np.load(folder / "reference.npz")
    shutil.copy(folder / "frozen_inference_graph.pb", tmp_path)
    with pytest.warns(UserWarning, match="no pipeline.config beside it.*assumed BatchNorm epsilon"):
        inferred = from_tf_object_detection(tmp_path / "frozen_inference_graph.pb")
    full = _load("ssd_k1_sigmoid")
    assert inferred.network.state_dict().keys() == full.network.state_dict().keys()
    assert inferred.config.feature_extractor == full.config.feature_extractor
    assert inferred.config.box_predictor == full.config.box_predictor
    assert (inferred.anchors - torch.from_numpy(reference["anchors"])).abs().max().item() <= 1e-6
    pp, full_pp = inferred.config.post_processing, full.config.post_processing
    assert pp.score_converter == full_pp.score_converter and pp.max_total_detections == full_pp.max_total_detections
    assert math.isclose(pp.iou_threshold, full_pp.iou_threshold, rel_tol=1e-6)
    image = _image(reference, 0)
    with torch.no_grad():
        _assert_same_detections(inferred([image])[0], reference, 0, image.shape[-2], image.shape[-1])


def test_fpn_frozen_graph_alone_is_refused_clearly(tmp_path):
    shutil.copy(_case_dir("fpn_shared") / "frozen_inference_graph.pb", tmp_path)
    with pytest.raises(PipelineConfigError, match="ssd_mobilenet_v1_fpn graph without pipeline.config"):
        from_tf_object_detection(tmp_path / "frozen_inference_graph.pb")


def test_checkpoint_without_config_is_refused_clearly(tmp_path):
    folder = _case_dir("ssd_k1_sigmoid")
    for file in folder.glob("model.ckpt.*"):
        shutil.copy(file, tmp_path)
    with pytest.raises(PipelineConfigError, match="no pipeline.config beside the checkpoint"):
        from_tf_object_detection(tmp_path)


def _tarball(folder: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(folder.iterdir()):
            if file.name != "reference.npz":
                tar.add(file, arcname=f"{path.name.split('.')[0]}/{file.name}")
    return path


def test_tarball_loads_and_its_date_sets_the_clip_order(tmp_path):
    folder = _case_dir("ssd_k1_sigmoid")
    reference = np.load(folder / "reference.npz")
    modern = from_tf_object_detection(_tarball(folder, tmp_path / "ssd_mobilenet_v1_coco_2018_07_03.tar.gz"))
    assert not modern.clip_before_nms
    image = _image(reference, 0)
    with torch.no_grad():
        _assert_same_detections(modern([image])[0], reference, 0, image.shape[-2], image.shape[-1])
    old = from_tf_object_detection(_tarball(folder, tmp_path / "ssd_mobilenet_v1_coco_2018_01_28.tar.gz"))
    assert old.clip_before_nms
    assert date_from_name("ssd_mobilenet_v1_coco_11_06_2017") == (2017, 6, 11)


def test_truncated_tarball_names_the_file(tmp_path):
    archive = _tarball(_case_dir("ssd_k1_sigmoid"), tmp_path / "model_2018_07_03.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFormatError, match=r"model_2018_07_03\.tar\.gz.*(corrupt or truncated|truncated)"):
        from_tf_object_detection(archive)


def test_corrupt_checkpoint_names_the_file_and_tensor(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(_case_dir("ssd_k1_sigmoid"), folder)
    shard = folder / "model.ckpt.data-00000-of-00001"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightsFormatError, match=r"model\.ckpt.*(crc|CRC|checksum)"):
        from_tf_object_detection(folder)


def test_num_classes_mismatch_names_the_tensor_and_field(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(_case_dir("ssd_k1_sigmoid"), folder)
    config = folder / "pipeline.config"
    config.write_text(config.read_text().replace("num_classes: 4", "num_classes: 7"))
    with pytest.raises(StateDictMismatchError) as info:
        from_tf_object_detection(folder)
    message = str(info.value)
    assert "model.ckpt.index" in message and "ClassPredictor/biases" in message
    assert "model.ssd.num_classes is 7" in message and "num_classes 4" in message


def test_quantized_model_warns_once_and_loads_float_weights():
    folder = _case_dir("ssd_quantized")
    with pytest.warns(UserWarning, match="FakeQuant") as record:
        from_tf_object_detection(folder)
    assert sum("FakeQuant" in str(w.message) for w in record) == 1


# --------------------------------------------------------------------------------------------------------------
# labels, overrides, training, persistence
# --------------------------------------------------------------------------------------------------------------


def test_label_maps(tmp_path):
    coco = coco_label_map()
    assert len(coco) == 80 and coco[1] == "person" and coco[90] == "toothbrush" and 12 not in coco
    path = tmp_path / "label_map.pbtxt"
    path.write_text('item { id: 1 name: "/m/01" display_name: "cat" }\nitem { name: "dog" id: 2 }\n')
    assert read_label_map(path) == {1: "cat", 2: "dog"}
    model = _load("ssd_k1_sigmoid", label_map=path)
    assert model.id2label == {1: "cat", 2: "dog", 3: "class_3", 4: "class_4"}
    assert model.categories[:3] == ["__background__", "cat", "dog"]


def test_overrides_apply_torchvision_names():
    model = _load("ssd_k1_sigmoid", score_thresh=0.9, nms_thresh=0.3, detections_per_img=5)
    pp = model.config.post_processing
    assert (pp.score_threshold, pp.iou_threshold, pp.max_total_detections) == (0.9, 0.3, 5)
    with pytest.raises(TypeError, match="unknown overrides"):
        _load("ssd_k1_sigmoid", box_score_thresh=0.5)


def _shapes_set(n: int, size: int = 96, seed: int = 0):
    """Bright squares on a dark background; label 1 for small, 2 for large."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        image = torch.full((3, size, size), 0.1)
        side = int(torch.randint(12, 48, (1,), generator=generator))
        x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
        image[:, y : y + side, x : x + side] = 0.9
        images.append(image)
        targets.append({"boxes": torch.tensor([[x, y, x + side, y + side]], dtype=torch.float32),
                        "labels": torch.tensor([1 if side < 30 else 2])})
    return images, targets


def test_training_loss_keys_and_fine_tuning_lowers_the_loss():
    torch.manual_seed(0)
    model = _load("ssd_k1_sigmoid")
    model.reset_class_head(2)
    assert model.num_classes == 2 and model.network.predictors[0].cls.conv.out_channels == 3 * 3
    images, targets = _shapes_set(3)
    model.train()
    assert not model.network.backbone.conv_stem.normalization.training  # statistics stay fixed by default
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(5):
        losses = model(images, targets)
        assert set(losses) == {"classification_loss", "localization_loss"}
        total = sum(losses.values())
        first = total.item() if first is None else first
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    with torch.no_grad():
        last = sum(model(images, targets).values()).item()
    assert last < 0.7 * first


def test_standard_config_has_1917_anchors():
    text = MINIMAL.replace("height: 96 width: 96", "height: 300 width: 300").replace(
        "aspect_ratios: [1.0, 2.0, 0.5]", "aspect_ratios: [1.0, 2.0, 0.5, 3.0, 0.3333]")
    from mnv1_backbone.detection.odapi import build_network

    config = SSDPipelineConfig.from_text(text)
    model = ODAPISSDDetector(config, build_network(config))
    # ssd_mobilenet_v1_coco's well-known layout: 19x19x3 + (10x10 + 5x5 + 3x3 + 2x2 + 1x1) x 6 = 1917 anchors.
    assert model.feature_map_shapes == [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    assert model.anchors.shape == (1917, 4)


def test_new_class_head_takes_the_given_label_map(tmp_path):
    path = tmp_path / "labels.pbtxt"
    path.write_text("item { id: 1 name: 'face' } item { id: 2 name: 'hand' }")
    model = _load("ssd_k1_sigmoid", num_classes=2, label_map=path)
    assert model.id2label == {1: "face", 2: "hand"}


def test_fine_tuning_keeps_the_box_head_and_features():
    original = _load("ssd_k1_sigmoid")
    tuned = _load("ssd_k1_sigmoid", num_classes=2)
    a, b = original.network.state_dict(), tuned.network.state_dict()
    changed = sorted(k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k]))
    assert changed and all(".cls.conv." in k for k in changed)


def test_focal_loss_config_trains():
    model = _load("fpn_shared", num_classes=2)
    assert model.config.loss.classification == "weighted_sigmoid_focal"
    images, targets = _shapes_set(2, size=128)
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"classification_loss", "localization_loss"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_training_requires_valid_targets():
    model = _load("ssd_k1_sigmoid").train()
    images, targets = _shapes_set(1)
    with pytest.raises(ValueError, match=r"labels must be 1-based ids in \[1, 4\]"):
        model(images, [{"boxes": targets[0]["boxes"], "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="targets are required"):
        model(images)


def test_save_pretrained_round_trip(tmp_path):
    folder = _case_dir("ssd_k1_sigmoid")
    reference = np.load(folder / "reference.npz")
    model = _load("ssd_k1_sigmoid", score_thresh=0.2)
    model.save_pretrained(tmp_path / "converted")
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == ["config.json", "model.safetensors"]
    loaded = ODAPISSDDetector.from_pretrained(tmp_path / "converted")
    assert loaded.config == model.config and loaded.id2label == model.id2label
    assert torch.equal(loaded.anchors, model.anchors)
    image = _image(reference, 1)
    with torch.no_grad():
        a, b = model([image])[0], loaded([image])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_clip_order_loses_a_detection():
    folder = _case_dir("ssd_k1_sigmoid")
    reference = np.load(folder / "reference.npz")
    model = _load("ssd_k1_sigmoid", clip_before_nms=True)
    matched = 0
    total = 0
    for i in range(2):
        image = _image(reference, i)
        boxes, _, labels = _tf_detections(reference, i, image.shape[-2], image.shape[-1])
        with torch.no_grad():
            ours = model([image])[0]
        for box, label in zip(boxes, labels, strict=True):
            close = (ours["boxes"] - box).abs().amax(dim=1) <= 0.5
            matched += bool((close & (ours["labels"] == label)).any())
        total += len(labels)
    assert matched < total


def test_label_map_beside_the_model_is_used(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(_case_dir("ssd_k1_sigmoid"), folder)
    (folder / "my_label_map.pbtxt").write_text("item {\n  id: 2\n  name: 'mug'\n}\n")
    model = from_tf_object_detection(folder)
    assert model.id2label[2] == "mug" and model.id2label[1] == "class_1"


def test_moving_average_shadows_follow_eval_config():
    from mnv1_backbone.detection.odapi import _model_variables

    raw = {
        "A/weights": np.zeros(2, np.float32),
        "A/weights/ExponentialMovingAverage": np.ones(2, np.float32),
        "A/BatchNorm/moving_mean": np.full(2, 3.0, np.float32),
        "A/weights/RMSProp": np.zeros(2, np.float32),
        "global_step": np.array(5),
    }
    with_ema = _model_variables(raw, use_ema=True, source="x")
    assert sorted(with_ema) == ["A/BatchNorm/moving_mean", "A/weights"] and with_ema["A/weights"][0] == 1.0
    assert _model_variables(raw, use_ema=False, source="x")["A/weights"][0] == 0.0
    with pytest.warns(UserWarning, match="FakeQuant range variables"):
        quant = _model_variables({**raw, "A/weights_quant/min": np.zeros(()), "A/act_quant/max": np.zeros(())},
                                 use_ema=False, source="x")
    assert sorted(quant) == ["A/BatchNorm/moving_mean", "A/weights"]


def test_argmax_matcher_thresholds_and_forced_matches():
    model = _load("ssd_k1_sigmoid")
    config = model.config
    model.config = dataclasses.replace(config, matcher=dataclasses.replace(
        config.matcher, matched_threshold=0.5, unmatched_threshold=0.4, force_match_for_each_row=True))
    model.anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.6], [0.0, 0.0, 0.5, 0.8],
                                  [0.5, 0.5, 1.0, 1.0], [0.6, 0.6, 0.7, 0.7]])
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.55, 0.55, 0.75, 0.75]])
    cls_t, cls_w, reg_t, reg_w, match = model._assign(gt, torch.tensor([2, 3]))
    # IoUs with gt 0: 1, 0.83, 0.625, 0, 0 -> matched, matched, matched; gt 1's best anchor (IoU 0.25) is forced.
    # Anchor 3 (IoU 0.16 with gt 1) is below 0.4: background.
    assert match.tolist() == [0, 0, 0, -1, 1]
    assert cls_t.argmax(dim=1).tolist() == [2, 2, 2, 0, 3] and cls_w.tolist() == [1, 1, 1, 1, 1]
    assert reg_w.tolist() == [1, 1, 1, 0, 1] and torch.allclose(reg_t[0], torch.zeros(4), atol=1e-5)
    model.config = dataclasses.replace(config, matcher=dataclasses.replace(
        config.matcher, matched_threshold=0.7, unmatched_threshold=0.5, force_match_for_each_row=False))
    _, cls_w, _, reg_w, match = model._assign(gt, torch.tensor([2, 3]))
    assert match.tolist() == [0, 0, -2, -1, -1]  # 0.625 falls in the ignore band
    assert cls_w.tolist() == [1, 1, 0, 1, 1] and reg_w.tolist() == [1, 1, 0, 0, 0]


def test_hard_example_miner_keeps_negatives_per_positive():
    model = _load("ssd_k1_sigmoid")
    model.config = dataclasses.replace(model.config, loss=dataclasses.replace(
        model.config.loss, hard_example_miner=True, num_hard_examples=10, hard_example_iou_threshold=0.99,
        hard_example_loss_type="CLASSIFICATION", max_negatives_per_positive=2, min_negatives_per_image=0))
    # Five disjoint anchors, decoded boxes = anchors (zero codes); one positive.
    model.anchors = torch.tensor([[0.0, 0.1 * k, 0.1, 0.1 * k + 0.1] for k in range(5)])
    cls = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    loc = torch.tensor([[0.0, 0.0, 0.0, 7.0, 0.0]])
    matches = [torch.tensor([-1, -1, -1, 0, -1])]
    loc_sum, cls_sum = model._hard_example_mining(loc, cls, torch.zeros(1, 5, 4), matches)
    # Ranked by classification loss: anchors 0, 1, 2, 3 (positive), 4. One positive allows two negatives: 0 and 1.
    assert cls_sum.item() == pytest.approx(5.0 + 4.0 + 2.0) and loc_sum.item() == pytest.approx(7.0)


def test_variables_of_another_architecture_are_refused(tmp_path, monkeypatch):
    from mnv1_backbone.convert.checkpoint import TFCheckpoint

    folder = _case_dir("ssd_k1_sigmoid")
    original = TFCheckpoint.read_all

    def with_extra(self, **kwargs):
        return {**original(self, **kwargs), "FeatureExtractor/MobilenetV1/Conv2d_14_pointwise/weights":
                np.zeros((1, 1, 8, 8), np.float32), "some_training_counter": np.zeros((), np.float32)}

    monkeypatch.setattr(TFCheckpoint, "read_all", with_extra)
    with pytest.raises(StateDictMismatchError, match=r"1 unexpected: FeatureExtractor/MobilenetV1/Conv2d_14"):
        from_tf_object_detection(folder)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("ab_:{}<>[],;#'\"\\\n 0123456789.-exfn")), max_size=200))
def test_parser_fails_only_with_pipeline_config_error(text):
    try:
        parse_text_proto(text)
    except PipelineConfigError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(MINIMAL) - 1), st.integers(1, 30),
       st.sampled_from(["", "{", "}", "x", ":", "'", "-1", "9e9"]))
def test_config_reader_fails_only_with_pipeline_config_error(start, length, replacement):
    text = MINIMAL[:start] + replacement + MINIMAL[start + length :]
    try:
        SSDPipelineConfig.from_text(text)
    except PipelineConfigError:
        pass


# The OD-API's own losses (real TensorFlow, `python tools/odapi_tf_losses.py` in the fixtures' TF environment) for
# TF's preprocessed photos of each case and this ground truth (normalised ymin, xmin, ymax, xmax; 1-based labels).
TF_GROUNDTRUTH = {
    "boxes": [[[0.1, 0.2, 0.5, 0.6], [0.4, 0.1, 0.9, 0.45], [0.05, 0.7, 0.3, 0.98]], [[0.2, 0.3, 0.7, 0.9]]],
    "labels": [[1, 3, 2], [2]],
}
TF_LOSSES = {
    "ssd_k1_sigmoid": (26.114940643310547, 3.512195587158203),  # sigmoid + hard example mining
    "ssd_k3_legacy_explicit_depthwise_softmax": (5.410125732421875, 2.9248039722442627),  # softmax loss
    "fpn_shared": (0.9513063430786133, 0.8417928218841553),  # focal loss, background as zeros, codesize
    "ssd_quantized": (22.342086791992188, 4.300050258636475),
}


@pytest.mark.parametrize("case", list(TF_LOSSES))
def test_training_losses_match_tensorflow(case):
    folder = _case_dir(case)
    reference = np.load(folder / "reference.npz")
    model = _load(case)
    batch = torch.from_numpy(np.concatenate([reference["preprocessed_0"], reference["preprocessed_1"]]))
    batch = batch.permute(0, 3, 1, 2)
    size = batch.shape[-1]
    targets = [{"boxes": torch.tensor(boxes)[:, [1, 0, 3, 2]] * size, "labels": torch.tensor(labels)}
               for boxes, labels in zip(TF_GROUNDTRUTH["boxes"], TF_GROUNDTRUTH["labels"], strict=True)]
    with torch.no_grad():
        losses = model.loss_on_batch(batch, [(size, size)] * 2, targets)
    classification, localization = TF_LOSSES[case]
    assert losses["classification_loss"].item() == pytest.approx(classification, rel=1e-5)
    assert losses["localization_loss"].item() == pytest.approx(localization, rel=1e-5)


def test_graph_inference_fallbacks_for_older_exports():
    from mnv1_backbone.convert.frozen_graph import read_graph_nodes
    from mnv1_backbone.detection.odapi_graph import infer_config_from_graph

    nodes = read_graph_nodes(_case_dir("ssd_k1_sigmoid") / "frozen_inference_graph.pb")
    # Older OD-API code: an unnamed Postprocessor/Sigmoid and no score threshold inside the NMS.
    older = [dataclasses.replace(n, name="Postprocessor/Sigmoid") if n.name == "Postprocessor/convert_scores" else n
             for n in nodes if not n.name.endswith("non_max_suppression/score_threshold")]
    with pytest.raises(PipelineConfigError, match="no NMS score_threshold constant; pass score_thresh="):
        infer_config_from_graph(older, source="old.pb")
    config, legacy = infer_config_from_graph(older, source="old.pb", fallback_score_threshold=0.5)
    assert config.post_processing.score_converter == "SIGMOID" and config.post_processing.score_threshold == 0.5
    assert not legacy
