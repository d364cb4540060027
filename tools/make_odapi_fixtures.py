"""Write the TF Object Detection API SSD-MobileNetV1 fixtures under tests/fixtures/odapi/ with REAL TensorFlow.

Why: `mnv1_backbone.detection` imports OD-API exports (pipeline.config, checkpoint, frozen graph) and must reproduce
their outputs; these fixtures are the ground truth its tests compare against, so they are produced by the OD-API's
own code, not by a re-implementation.

This is a maintainer tool, not part of the package, and is NOT run by the tests. It needs a throwaway environment:

    python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf_slim tf_keras==2.21.0 pillow grpcio-tools
    # the OD-API source: the PyPI wheel object_detection-0.0.3 (a 2018/2019 snapshot of
    # tensorflow/models/research/object_detection), unzipped:
    unzip object_detection-0.0.3-py3-none-any.whl -d /tmp/odapi/src
    # the wheel ships no compiled protos and no `nets` package: take, from a tensorflow/models checkout,
    # research/object_detection/protos/*.proto -> /tmp/odapi/protosrc/object_detection/protos/ and
    # research/slim/nets/mobilenet_v1.py -> /tmp/odapi/slim/nets/mobilenet_v1.py (plus an empty __init__.py), then
    cd /tmp/odapi/protosrc && /tmp/tfenv/bin/python -m grpc_tools.protoc -I. --python_out=/tmp/odapi/src \
        object_detection/protos/*.proto
    /tmp/tfenv/bin/python tools/make_odapi_fixtures.py [--cases ssd_k1_sigmoid fpn_shared ...]

(ODAPI_SRC and ODAPI_SLIM override /tmp/odapi/src and /tmp/odapi/slim.)

What runs verbatim (OD-API 0.0.3 code under TF 2.x via `tensorflow.compat.v1` + `disable_v2_behavior()`):
`model_builder.build(pipeline.model, is_training=False)` (feature extractors, box predictors, anchor generators, box
coder, image resizer, post-processing), `model.preprocess/predict/postprocess`, and the exporter's
`_image_tensor_input_placeholder` and `add_output_tensor_nodes`. Where this script departs from running OD-API code
verbatim (all listed in tests/fixtures/odapi/README.md):

1. Import shim: `import tensorflow` inside the OD-API yields `tf.compat.v1` with `tf.contrib.slim` = `tf_slim`
   (also `tf.contrib.layers`, `tf.contrib.framework`); every other `tensorflow.contrib.*` module and every `nets.*`
   module other than `nets.mobilenet_v1` is an empty stub (only needed by code paths not used here: faster-rcnn,
   TPU, the exporter's nn-resize rewrite); `object_detection.utils.visualization_utils` is stubbed (matplotlib);
   `tf_keras.legacy_tf_layers` is aliased to `tf_keras.src.legacy_tf_layers` (tf_slim.batch_norm needs it).
2. Freezing: `tf.compat.v1.graph_util.convert_variables_to_constants` on the export graph with the exporter's four
   output names (what `freeze_graph.freeze_graph_with_def_protos` does inside `exporter._export_inference_graph`),
   without the saved_model; the checkpoint is written by `tf.compat.v1.train.Saver` (V2 format) from the same graph.
3. Weights: all variables are overwritten with seeded NumPy draws (see `_random_weights`), not trained.
4. Case ssd_k3_legacy_explicit_depthwise_softmax: (a) legacy anchor order: `create_ssd_anchors` is wrapped so that
   in every layer but the reduced lowest one the interpolated-scale anchor (appended LAST by 0.0.3) is moved to right
   after the aspect-ratio-1.0 anchor (pre-November-2017 OD-API order); (b) clip-before-NMS: the model's
   `_non_max_suppression_fn` is wrapped so that the decoded boxes are clipped to [0, 0, 1, 1] and boxes whose
   clipped area is zero get score 0 (below score_threshold, i.e. dropped) BEFORE the per-class NMS (the 0.0.3 code
   itself runs NMS on unclipped boxes and clips the survivors afterwards).
5. Case ssd_quantized: `tf.contrib.quantize` does not exist in TF 2.x, so the graph is NOT rewritten; the
   checkpoint gets, beside the float weights, the FakeQuant range variables contrib.quantize would create
   (`<op context>/weights_quant/min|max` = range of the BatchNorm-folded weights, `<op context>/act_quant/min|max` =
   observed range of the layer output on the fixture images; see `_add_quant_ranges`). The reference outputs are the
   FLOAT network's; no frozen graph is written for this case.
6. FPN case: the shared predictor's output layers are rescaled after the random draw (`_calibrate_shared_heads`) so
   that scores are not all saturated.

Each case is cross-checked after writing: a NumPy re-run of decode + score conversion + NMS in the case's clip
order must reproduce TF's detections (`_verify`), and the frozen graph must reproduce the in-session outputs.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # plain Eigen kernels: reproducible reference numbers

REPO = Path(__file__).resolve().parents[1]
OUT_ROOT = REPO / "tests" / "fixtures" / "odapi"
IMAGES = [REPO / "tests" / "data" / "chelsea.png", REPO / "tests" / "data" / "coffee.png"]
ODAPI_SRC = os.environ.get("ODAPI_SRC", "/tmp/odapi/src")
ODAPI_SLIM = os.environ.get("ODAPI_SLIM", "/tmp/odapi/slim")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for TF1-only packages that the OD-API imports but the SSD inference path never uses."""

    def find_spec(self, name, path=None, target=None):
        if name.startswith("tensorflow.contrib.") or (name.startswith("nets.") and name != "nets.mobilenet_v1"):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install_tf1_shim():
    """Make `import tensorflow` give TF1 (`tf.compat.v1`, graph mode) with `tf.contrib.slim` = tf_slim."""
    import tensorflow as tf2

    # tf_slim.batch_norm uses tf.compat.v1.layers.BatchNormalization, which TF 2.21 lazily loads from
    # `tf_keras.legacy_tf_layers`; tf_keras 2.21 keeps it under `tf_keras.src`.
    import tf_keras.src.legacy_tf_layers as legacy_layers
    import tf_keras.src.legacy_tf_layers.normalization as legacy_normalization
    import tf_slim

    sys.modules.setdefault("tf_keras.legacy_tf_layers", legacy_layers)
    sys.modules.setdefault("tf_keras.legacy_tf_layers.normalization", legacy_normalization)
    tf1 = tf2.compat.v1
    tf1.disable_v2_behavior()
    contrib = types.ModuleType("tensorflow.contrib")
    contrib.__path__ = []
    contrib.slim = tf_slim
    contrib.layers = tf_slim  # tf_slim re-exports the contrib.layers API (layers, regularizers, initializers)
    contrib.framework = tf_slim
    tf1.contrib = contrib
    sys.modules["tensorflow"] = tf1
    sys.modules["tensorflow.contrib"] = contrib
    sys.modules["tensorflow.contrib.slim"] = tf_slim
    sys.meta_path.insert(0, _StubFinder())
    sys.modules["object_detection.utils.visualization_utils"] = types.ModuleType(
        "object_detection.utils.visualization_utils")
    sys.path[:0] = [ODAPI_SRC, ODAPI_SLIM]
    return tf1, tf2


# --------------------------------------------------------------------------------------------- pipeline configs

_HYPER = """
        activation: RELU_6
        regularizer { l2_regularizer { weight: 0.00004 } }
        initializer { truncated_normal_initializer { stddev: 0.03 mean: 0.0 } }
        batch_norm { train: true scale: true center: true decay: 0.9997 epsilon: 0.001 }
"""

_COMMON_HEAD = """
    box_coder { faster_rcnn_box_coder { y_scale: 10.0 x_scale: 10.0 height_scale: 5.0 width_scale: 5.0 } }
    matcher { argmax_matcher { matched_threshold: 0.5 unmatched_threshold: 0.5 ignore_thresholds: false
                               negatives_lower_than_unmatched: true force_match_for_each_row: true } }
    similarity_calculator { iou_similarity { } }
"""

_LOSS = """
    loss {
      classification_loss { CLASSIFICATION_LOSS }
      localization_loss { weighted_smooth_l1 { } }
      hard_example_miner { num_hard_examples: 3000 iou_threshold: 0.99 loss_type: CLASSIFICATION
                           max_negatives_per_positive: 3 min_negatives_per_image: 0 }
      classification_weight: 1.0
      localization_weight: 1.0
    }
    normalize_loss_by_num_matches: true
"""


def _classic_ssd(*, num_classes, size, kernel_size, score_converter, score_threshold, iou_threshold,
                 explicit_padding=False, depthwise=False):
    extra = ""
    if explicit_padding:
        extra += "      use_explicit_padding: true\n"
    if depthwise:
        extra += "      use_depthwise: true\n"
    return f"""
model {{
  ssd {{
    num_classes: {num_classes}
{_COMMON_HEAD}
    anchor_generator {{
      ssd_anchor_generator {{
        num_layers: 6 min_scale: 0.2 max_scale: 0.95
        aspect_ratios: 1.0 aspect_ratios: 2.0 aspect_ratios: 0.5 aspect_ratios: 3.0 aspect_ratios: 0.3333
      }}
    }}
    image_resizer {{ fixed_shape_resizer {{ height: {size} width: {size} }} }}
    box_predictor {{
      convolutional_box_predictor {{
        min_depth: 0 max_depth: 0 num_layers_before_predictor: 0 use_dropout: false
        dropout_keep_probability: 0.8 kernel_size: {kernel_size} box_code_size: 4 apply_sigmoid_to_scores: false
        conv_hyperparams {{ {_HYPER} }}
      }}
    }}
    feature_extractor {{
      type: 'ssd_mobilenet_v1'
      min_depth: 16
      depth_multiplier: 0.25
{extra}      conv_hyperparams {{ {_HYPER} }}
    }}
{_LOSS.replace("CLASSIFICATION_LOSS", f"weighted_{score_converter.lower()} {{ }}")}
    post_processing {{
      batch_non_max_suppression {{ score_threshold: {score_threshold} iou_threshold: {iou_threshold}
                                   max_detections_per_class: 20 max_total_detections: 30 }}
      score_converter: {score_converter}
    }}
  }}
}}
"""


def _fpn_ssd(*, num_classes, size, score_threshold, iou_threshold):
    return f"""
model {{
  ssd {{
    num_classes: {num_classes}
{_COMMON_HEAD}
    encode_background_as_zeros: true
    anchor_generator {{
      multiscale_anchor_generator {{ min_level: 3 max_level: 7 anchor_scale: 4.0 aspect_ratios: [1.0, 2.0, 0.5]
                                     scales_per_octave: 2 }}
    }}
    image_resizer {{ fixed_shape_resizer {{ height: {size} width: {size} }} }}
    box_predictor {{
      weight_shared_convolutional_box_predictor {{
        depth: 32
        class_prediction_bias_init: -4.6
        conv_hyperparams {{
          activation: RELU_6
          regularizer {{ l2_regularizer {{ weight: 0.00004 }} }}
          initializer {{ random_normal_initializer {{ stddev: 0.01 mean: 0.0 }} }}
          batch_norm {{ scale: true decay: 0.997 epsilon: 0.001 }}
        }}
        num_layers_before_predictor: 2
        kernel_size: 3
      }}
    }}
    feature_extractor {{
      type: 'ssd_mobilenet_v1_fpn'
      fpn {{ min_level: 3 max_level: 7 }}
      min_depth: 16
      depth_multiplier: 0.25
      conv_hyperparams {{
        activation: RELU_6
        regularizer {{ l2_regularizer {{ weight: 0.00004 }} }}
        initializer {{ random_normal_initializer {{ stddev: 0.01 mean: 0.0 }} }}
        batch_norm {{ scale: true decay: 0.997 epsilon: 0.001 }}
      }}
      override_base_feature_extractor_hyperparams: true
    }}
    loss {{
      classification_loss {{ weighted_sigmoid_focal {{ alpha: 0.25 gamma: 2.0 }} }}
      localization_loss {{ weighted_smooth_l1 {{ }} }}
      classification_weight: 1.0
      localization_weight: 1.0
    }}
    normalize_loss_by_num_matches: true
    normalize_loc_loss_by_codesize: true
    post_processing {{
      batch_non_max_suppression {{ score_threshold: {score_threshold} iou_threshold: {iou_threshold}
                                   max_detections_per_class: 20 max_total_detections: 30 }}
      score_converter: SIGMOID
    }}
  }}
}}
"""


_QUANT = "\ngraph_rewriter { quantization { delay: 0 weight_bits: 8 activation_bits: 8 } }\n"

CASES = {
    "ssd_k1_sigmoid": dict(
        config=_classic_ssd(num_classes=4, size=128, kernel_size=1, score_converter="SIGMOID", score_threshold=0.35,
                            iou_threshold=0.45),
        seed=1, frozen=True, class_bias=-3.0, legacy_anchors=False, clip_before_nms=False, quantized=False),
    "ssd_k3_legacy_explicit_depthwise_softmax": dict(
        config=_classic_ssd(num_classes=3, size=128, kernel_size=3, score_converter="SOFTMAX",
                            score_threshold=0.3, iou_threshold=0.4, explicit_padding=True, depthwise=True),
        seed=2, frozen=False, class_bias=0.0, background_bias=2.0, legacy_anchors=True, clip_before_nms=True,
        quantized=False),
    "fpn_shared": dict(
        config=_fpn_ssd(num_classes=3, size=128, score_threshold=0.395, iou_threshold=0.45),
        seed=3, frozen=True, class_bias=-3.0, legacy_anchors=False, clip_before_nms=False, quantized=False,
        calibrate_shared_heads=True),
    "ssd_quantized": dict(
        config=_classic_ssd(num_classes=4, size=128, kernel_size=1, score_converter="SIGMOID",
                            score_threshold=0.7, iou_threshold=0.45) + _QUANT,
        seed=4, frozen=False, class_bias=-3.0, legacy_anchors=False, clip_before_nms=False, quantized=True),
}


# --------------------------------------------------------------------------------------------- case patches


def _legacy_anchor_patch(mgag):
    """Wrap create_ssd_anchors: move the interpolated-scale anchor right after aspect ratio 1.0 (pre-Nov-2017)."""
    original = mgag.create_ssd_anchors

    def create_ssd_anchors_legacy(*args, **kwargs):
        gen = original(*args, **kwargs)
        reduce_lowest = kwargs.get("reduce_boxes_in_lowest_layer", True)
        interp_ratio = kwargs.get("interpolated_scale_aspect_ratio", 1.0)
        assert interp_ratio > 0.0, "legacy order needs the interpolated anchor"
        new_specs = []
        for layer, specs in enumerate(gen._box_specs):
            specs = list(specs)
            if not (layer == 0 and reduce_lowest):
                interpolated = specs.pop()  # 0.0.3 appends it last
                idx = [ar for _, ar in specs].index(1.0)
                specs.insert(idx + 1, interpolated)
            new_specs.append(specs)
        return mgag.MultipleGridAnchorGenerator(new_specs, gen._base_anchor_size, gen._anchor_strides,
                                               gen._anchor_offsets)

    mgag.create_ssd_anchors = create_ssd_anchors_legacy
    return original


def _clip_before_nms(model, tf):
    """Clip decoded boxes to [0, 0, 1, 1] and drop zero-area ones before the per-class NMS (legacy order)."""
    nms_fn = model._non_max_suppression_fn

    def wrapped(boxes, scores, clip_window=None, **kwargs):
        # boxes: [batch, A, 1, 4]; scores: [batch, A, num_classes] (converted, background removed).
        clipped = tf.clip_by_value(boxes, 0.0, 1.0)
        area = (clipped[..., 2] - clipped[..., 0]) * (clipped[..., 3] - clipped[..., 1])  # [batch, A, 1]
        scores = tf.where(tf.broadcast_to(area > 0.0, tf.shape(scores)), scores, tf.zeros_like(scores))
        return nms_fn(clipped, scores, clip_window=clip_window, **kwargs)

    model._non_max_suppression_fn = wrapped


# --------------------------------------------------------------------------------------------- weights


def _random_weights(sess, tf, rng, class_bias, background_bias=0.0, columns=None):
    """Overwrite every variable with a seeded draw; BatchNorm statistics perturbed so outputs are not trivial."""
    for var in tf.global_variables():
        name = var.op.name
        shape = var.shape.as_list()
        if name == "global_step":
            continue
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "moving_mean":
            value = rng.normal(0.0, 0.1, shape)
        elif leaf == "moving_variance":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "beta":
            value = rng.normal(0.0, 0.1, shape)
        elif leaf in ("weights", "depthwise_weights"):
            fan_in = shape[0] * shape[1] * (shape[2] if leaf == "weights" else 1)
            gain = 2.0  # He-style: keeps ReLU6 activations alive through the 13 blocks
            if "ClassPredictor" in name and "Tower" not in name:
                gain = 6.0  # logits spread ~1: a fair number of scores pass a low threshold, few ties
            elif name.endswith(("BoxEncodingPredictor/weights", "BoxPredictor/weights")):
                gain = 1.5  # encodings ~0.6: boxes move and stretch visibly around their anchors
            value = rng.normal(0.0, np.sqrt(gain / fan_in), shape)
        elif leaf == "biases":
            if name.endswith("ClassPredictor/biases"):
                value = class_bias + rng.normal(0.0, 0.2, shape)
                if background_bias:  # SOFTMAX: column 0 of every anchor is the background logit
                    value[np.arange(shape[0]) % columns == 0] += background_bias
            else:
                value = rng.normal(0.0, 0.1, shape)
        else:
            raise ValueError(f"no rule for variable {name} {shape}")
        var.load(value.astype(np.float32), sess)


def _calibrate_shared_heads(sess, tf, run, feature_map_shapes, targets):
    """Rescale the weight-shared predictor's output layers so that its outputs have a chosen mean and spread.

    Why: the FPN tower's random activations are large, so plain draws give saturated scores (all ~1.0) and huge
    box offsets. Outputs are linear in the last layer: per output channel (anchor k, column c) we set
    W <- W * t / s and b <- mean_target - (t / s) * (mean - b), with mean and spread s over all positions of all
    levels (the layer is shared) of both images. `run()` returns [(box_encodings, class_predictions)] per image.
    """
    scope = "WeightSharedConvolutionalBoxPredictor"
    outputs = run()
    for index, (layer, (std_target, mean_target)) in enumerate(targets.items()):
        weights = [v for v in tf.global_variables() if v.op.name == f"{scope}/{layer}/weights"][0]
        biases = [v for v in tf.global_variables() if v.op.name == f"{scope}/{layer}/biases"][0]
        w, b = sess.run([weights, biases])
        columns = outputs[0][index].shape[-1]
        per_anchor = w.shape[-1] // columns
        rows = []
        for out in outputs:
            start = 0
            for h, wd in feature_map_shapes:
                n = h * wd * per_anchor
                rows.append(out[index][0, start:start + n].reshape(h * wd, per_anchor * columns))
                start += n
        values = np.concatenate(rows).astype(np.float64)
        mean = values.mean(0)
        scale = std_target / values.std(0)
        target = np.tile(np.asarray(mean_target, np.float64), per_anchor)
        weights.load((w * scale).astype(np.float32), sess)
        biases.load((target - scale * (mean - b)).astype(np.float32), sess)


# --------------------------------------------------------------------------------------------- main


def _load_images():
    from PIL import Image

    # a third of the photos' size (PIL bilinear) keeps reference.npz small; the stored arrays ARE the inputs
    images = []
    for path in IMAGES:
        img = Image.open(path).convert("RGB")
        img = img.resize((img.width // 3, img.height // 3), Image.BILINEAR)
        images.append(np.asarray(img, dtype=np.uint8))
    return images


def build_case(name, spec, tf, images):
    from google.protobuf import text_format
    from object_detection import exporter
    from object_detection.anchor_generators import multiple_grid_anchor_generator as mgag
    from object_detection.builders import model_builder
    from object_detection.protos import pipeline_pb2

    out = OUT_ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline_pb2.TrainEvalPipelineConfig()
    text_format.Merge(spec["config"], pipeline)

    original_anchors = _legacy_anchor_patch(mgag) if spec["legacy_anchors"] else None
    graph = tf.Graph()
    try:
        with graph.as_default():
            model = model_builder.build(pipeline.model, is_training=False)
            if spec["clip_before_nms"]:
                _clip_before_nms(model, tf)
            # exporter._build_detection_graph / _get_outputs_from_inputs, keeping handles on the raw tensors.
            placeholder, input_tensors = exporter._image_tensor_input_placeholder()
            inputs = tf.to_float(input_tensors)
            preprocessed, true_shapes = model.preprocess(inputs)
            predictions = model.predict(preprocessed, true_shapes)
            post = model.postprocess(predictions, true_shapes)
            outputs = exporter.add_output_tensor_nodes(post, "inference_op")
            tf.train.get_or_create_global_step()
            fetch = {
                "preprocessed": preprocessed,
                "anchors": predictions["anchors"],
                "box_encodings": predictions["box_encodings"],
                "class_predictions": predictions["class_predictions_with_background"],
                "feature_maps": list(predictions["feature_maps"]),
                **{k: outputs[k] for k in ("detection_boxes", "detection_scores", "detection_classes",
                                           "num_detections")},
            }
            sess = tf.Session(graph=graph)
            sess.run(tf.global_variables_initializer())
            _random_weights(sess, tf, np.random.default_rng(spec["seed"]), spec["class_bias"],
                            spec.get("background_bias", 0.0), fetch["class_predictions"].shape.as_list()[-1])
            if spec.get("calibrate_shared_heads"):
                shapes = [fm.shape.as_list()[1:3] for fm in predictions["feature_maps"]]

                def run():
                    return [sess.run([fetch["box_encodings"], fetch["class_predictions"]], {placeholder: img[None]})
                            for img in images]

                columns = fetch["class_predictions"].shape.as_list()[-1]
                _calibrate_shared_heads(sess, tf, run, shapes, {
                    "BoxPredictor": (0.6, [0.0] * 4),
                    "ClassPredictor": (1.0, [spec["class_bias"]] * columns)})
            results = [sess.run(fetch, {placeholder: img[None]}) for img in images]
            saver = tf.train.Saver(write_version=tf.train.SaverDef.V2)
            saver.save(sess, str(out / "model.ckpt"), write_meta_graph=False, write_state=False)
            if spec["quantized"]:
                _add_quant_ranges(sess, tf, graph, placeholder, images, out)
            if spec["frozen"]:
                frozen = tf.graph_util.convert_variables_to_constants(
                    sess, graph.as_graph_def(), list(outputs.keys()))
                for node in frozen.node:
                    node.device = ""
                (out / "frozen_inference_graph.pb").write_bytes(frozen.SerializeToString(deterministic=True))
            sess.close()
    finally:
        if original_anchors is not None:
            mgag.create_ssd_anchors = original_anchors

    # as exporter.export_inference_graph + config_util.save_pipeline_config write it
    pipeline.eval_config.use_moving_averages = False
    (out / "pipeline.config").write_text(text_format.MessageToString(pipeline))

    arrays = {}
    anchors0 = results[0]["anchors"]
    for i, (img, res) in enumerate(zip(images, results, strict=True)):
        np.testing.assert_array_equal(res["anchors"], anchors0)
        arrays[f"image_{i}"] = img
        arrays[f"preprocessed_{i}"] = res["preprocessed"].astype(np.float32)
        arrays[f"box_encodings_{i}"] = res["box_encodings"].astype(np.float32)
        arrays[f"class_predictions_{i}"] = res["class_predictions"].astype(np.float32)
        for k in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):
            arrays[f"{k}_{i}"] = res[k].astype(np.float32)
    arrays["anchors"] = anchors0.astype(np.float32)
    arrays["feature_map_shapes"] = np.array([fm.shape[1:3] for fm in results[0]["feature_maps"]], dtype=np.int64)
    np.savez_compressed(out / "reference.npz", **arrays)
    arrays["discriminates_clip_order"] = _verify(arrays, pipeline, spec["clip_before_nms"])
    if spec["frozen"]:
        _check_frozen(tf, out, images, results)
    return arrays


# --------------------------------------------------------------------------------------------- NumPy cross-check


def _decode(encodings, anchors, scales=(10.0, 10.0, 5.0, 5.0)):
    """faster_rcnn box coder decode: (ty, tx, th, tw) relative to (ymin, xmin, ymax, xmax) anchors."""
    ya, xa = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ty, tx, th, tw = (encodings / np.asarray(scales)).T
    h, w = np.exp(th) * ha, np.exp(tw) * wa
    yc, xc = ty * ha + ya, tx * wa + xa
    return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], 1)


def _iou(box, boxes):
    y0, x0 = np.minimum(box[0], box[2]), np.minimum(box[1], box[3])
    y1, x1 = np.maximum(box[0], box[2]), np.maximum(box[1], box[3])
    by0, bx0 = np.minimum(boxes[:, 0], boxes[:, 2]), np.minimum(boxes[:, 1], boxes[:, 3])
    by1, bx1 = np.maximum(boxes[:, 0], boxes[:, 2]), np.maximum(boxes[:, 1], boxes[:, 3])
    inter = (np.clip(np.minimum(y1, by1) - np.maximum(y0, by0), 0, None)
             * np.clip(np.minimum(x1, bx1) - np.maximum(x0, bx0), 0, None))
    union = (y1 - y0) * (x1 - x0) + (by1 - by0) * (bx1 - bx0) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _numpy_postprocess(boxes, scores, nms, clip_first):
    """Per-class greedy NMS, merge by score, clip to [0,0,1,1], drop zero-area, keep max_total (either clip order)."""
    if clip_first:
        boxes = np.clip(boxes, 0.0, 1.0)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        scores = np.where((area > 0)[:, None], scores, 0.0)
    dets = []
    for c in range(scores.shape[1]):
        keep = []
        for i in np.argsort(-scores[:, c], kind="stable"):
            if scores[i, c] <= nms.score_threshold or len(keep) == nms.max_detections_per_class:
                break
            if keep and (_iou(boxes[i], boxes[keep]) > nms.iou_threshold).any():
                continue
            keep.append(i)
        dets += [(scores[i, c], c + 1, np.clip(boxes[i], 0.0, 1.0)) for i in keep]
    dets.sort(key=lambda d: -d[0])
    dets = [d for d in dets if (d[2][2] - d[2][0]) * (d[2][3] - d[2][1]) > 0]
    return dets[:nms.max_total_detections]


def _verify(arrays, pipeline, clip_first):
    """reference.npz must be self-consistent: NumPy decode + score conversion + NMS in the case's clip order
    reproduces TF's detections; report whether the other clip order would differ (so the fixture tells them apart)."""
    ssd = pipeline.model.ssd
    nms = ssd.post_processing.batch_non_max_suppression
    converter = ssd.post_processing.score_converter
    if converter not in (type(ssd.post_processing).SIGMOID, type(ssd.post_processing).SOFTMAX):
        raise ValueError(f"score_converter {converter} not handled by the NumPy cross-check")
    sigmoid = converter == type(ssd.post_processing).SIGMOID
    anchors = arrays["anchors"].astype(np.float64)
    discriminates = []
    for i in range(2):
        boxes = _decode(arrays[f"box_encodings_{i}"][0].astype(np.float64), anchors)
        logits = arrays[f"class_predictions_{i}"][0].astype(np.float64)
        if sigmoid:
            scores = 1.0 / (1.0 + np.exp(-logits))
        else:
            e = np.exp(logits - logits.max(1, keepdims=True))
            scores = e / e.sum(1, keepdims=True)
        scores = scores[:, 1:]
        n = int(arrays[f"num_detections_{i}"][0])
        ref = (arrays[f"detection_scores_{i}"][0, :n], arrays[f"detection_classes_{i}"][0, :n],
               arrays[f"detection_boxes_{i}"][0, :n])
        same = []
        for order in (clip_first, not clip_first):
            dets = _numpy_postprocess(boxes, scores, nms, order)
            same.append(len(dets) == n and np.array_equal([d[1] for d in dets], ref[1])
                        and np.allclose([d[0] for d in dets], ref[0], atol=1e-5)
                        and np.allclose([d[2] for d in dets], ref[2], atol=1e-5))
        if not same[0]:
            raise AssertionError(f"image {i}: NumPy re-run of the post-processing does not reproduce TF")
        discriminates.append(not same[1])
    return discriminates


def _check_frozen(tf, out, images, results):
    """The frozen graph must reproduce the in-session outputs (same ops, constants instead of variables)."""
    graph_def = tf.GraphDef()
    graph_def.ParseFromString((out / "frozen_inference_graph.pb").read_bytes())
    with tf.Graph().as_default() as g:
        tf.import_graph_def(graph_def, name="")
        with tf.Session(graph=g) as sess:
            names = ["detection_boxes", "detection_scores", "detection_classes", "num_detections"]
            for img, res in zip(images, results, strict=True):
                got = sess.run([n + ":0" for n in names], {"image_tensor:0": img[None]})
                for n, v in zip(names, got, strict=True):
                    np.testing.assert_allclose(v, res[n], atol=1e-5, err_msg=n)  # grappler may fold differently


def _add_quant_ranges(sess, tf, graph, placeholder, images, out):
    """Re-save the checkpoint with contrib.quantize-style FakeQuant range variables beside the float weights.

    contrib.quantize names its variables after the convolution op's name scope (the "context"), which for the
    MobileNetV1 body is `FeatureExtractor/MobilenetV1/MobilenetV1/Conv2d_0` (op scope, doubled) while the weights
    live in `FeatureExtractor/MobilenetV1/Conv2d_0`. For every convolution we add
    `<context>/weights_quant/min|max`: the range of the weights the rewrite quantizes (BatchNorm folded in,
    w * gamma / sqrt(moving_variance + 0.001), widened to include 0 as LastValueQuantize does) and
    `<context>/act_quant/min|max`: the observed range of the layer's output (Relu6, or BiasAdd for the linear
    predictor layers) on the fixture images, widened to include 0 (what MovingAvgQuantize converges to).
    """
    values = {var.op.name: sess.run(var) for var in tf.global_variables()}
    extra = {}
    for name, value in list(values.items()):
        leaf = name.rsplit("/", 1)[-1]
        if leaf not in ("weights", "depthwise_weights"):
            continue
        layer = name.rsplit("/", 1)[0]
        convs = [op for op in graph.get_tensor_by_name(name + "/read:0").consumers()
                 if op.type in ("Conv2D", "DepthwiseConv2dNative")]
        if len(convs) != 1:
            raise RuntimeError(f"{name}: expected one convolution, got {[op.name for op in convs]}")
        context = convs[0].name.rsplit("/", 1)[0]
        weights = value.astype(np.float64)
        if f"{layer}/BatchNorm/gamma" in values:
            factor = values[f"{layer}/BatchNorm/gamma"] / np.sqrt(values[f"{layer}/BatchNorm/moving_variance"] + 1e-3)
            weights = weights * (factor.reshape(weights.shape[2], weights.shape[3]) if leaf == "depthwise_weights"
                                 else factor)
        extra[f"{context}/weights_quant/min"] = np.float32(min(weights.min(), 0.0))
        extra[f"{context}/weights_quant/max"] = np.float32(max(weights.max(), 0.0))
        names = [f"{context}/Relu6:0", f"{context}/BiasAdd:0"]
        output = next((graph.get_tensor_by_name(n) for n in names if _has_tensor(graph, n)), None)
        if output is None:
            raise RuntimeError(f"{context}: no Relu6 or BiasAdd output")
        lo, hi = 0.0, 0.0
        for img in images:
            v = sess.run(output, {placeholder: img[None]})
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
        extra[f"{context}/act_quant/min"] = np.float32(lo)
        extra[f"{context}/act_quant/max"] = np.float32(hi)
    values.update(extra)
    with tf.Graph().as_default():
        tf_vars = {k: tf.Variable(v, name=k.replace("/", "_")) for k, v in sorted(values.items())}
        with tf.Session() as s2:
            s2.run(tf.variables_initializer(list(tf_vars.values())))
            tf.train.Saver(var_list=tf_vars, write_version=tf.train.SaverDef.V2).save(
                s2, str(out / "model.ckpt"), write_meta_graph=False, write_state=False)
    return extra


def _has_tensor(graph, name):
    try:
        graph.get_tensor_by_name(name)
    except KeyError:
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    tf, tf2 = install_tf1_shim()
    images = _load_images()
    for name in args.cases:
        arrays = build_case(name, CASES[name], tf, images)
        dets = [int(arrays[f"num_detections_{i}"][0]) for i in range(len(images))]
        print(f"{name}: TF {tf2.__version__}, anchors {arrays['anchors'].shape}, "
              f"feature maps {arrays['feature_map_shapes'].tolist()}, detections {dets}, NumPy re-run matches; "
              f"other clip order would differ per image: {arrays['discriminates_clip_order']}")


if __name__ == "__main__":
    main()
