"""Write tests/fixtures/odapi_fpn/<case>/: small ssd_mobilenet_v1_fpn variants run by the REAL OD-API code.

Why: the `fpn_shared` case of tests/fixtures/odapi/ covers the zoo configuration (SAME padding, regular convs,
separate towers with BatchNorm). These cases cover the other branches of the OD-API code that
`mnv1_backbone.detection.odapi_fpn` reproduces: explicit padding (including the padded top-down map the OD-API
carries to the next level), the depthwise FPN (narrowed trunk blocks 12/13, separable smoothing and bottom-up convs),
the shared and depthwise prediction tower, a predictor without BatchNorm (biased tower convs), FPN BatchNorm
without gamma, the trunk's own hyperparameters (no override), levels 2..6, pad_to_multiple, box_encodings_clip_range,
and anchors on sides that 2**level does not divide.

A maintainer tool, not run by the tests. It reuses tools/make_odapi_fixtures.py (same environment, same TF shim,
same `build_case`; see that file's docstring for the setup) with two changes: its weight draw also fills
`pointwise_weights` (separable convs), and only the arrays the FPN tests read are kept, to keep the files small
(no frozen graph, no raw photos, no detections).

    /tmp/tfenv/bin/python tools/make_odapi_fpn_variants.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_odapi_fixtures as base  # noqa: E402

OUT_ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "odapi_fpn"
KEEP = ("preprocessed_0", "preprocessed_1", "box_encodings_0", "box_encodings_1", "class_predictions_0",
        "class_predictions_1", "anchors", "feature_map_shapes")


def _random_weights(sess, tf, rng, class_bias):
    """Seeded weights for every variable (separable convs too), BatchNorm statistics perturbed."""
    for var in tf.global_variables():
        name = var.op.name
        shape = var.shape.as_list()
        if name == "global_step":
            continue
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "moving_mean":
            value = rng.normal(0.0, 0.1, shape)
        elif leaf in ("moving_variance", "gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "beta":
            value = rng.normal(0.0, 0.1, shape)
        elif leaf in ("weights", "depthwise_weights", "pointwise_weights"):
            fan_in = shape[0] * shape[1] * (1 if leaf == "depthwise_weights" else shape[2])
            gain = 0.5 if "/BoxPredictor/" in name or "/ClassPredictor/" in name else 2.0
            value = rng.normal(0.0, np.sqrt(gain / fan_in), shape)
        elif leaf == "biases":
            value = (class_bias if "ClassPredictor" in name else 0.0) + rng.normal(0.0, 0.2, shape)
        else:
            raise ValueError(f"no rule for variable {name} {shape}")
        var.load(value.astype(np.float32), sess)


def _config(*, height, width, feature_extractor, fe_batch_norm, override, predictor, predictor_batch_norm,
            min_level, max_level, anchors):
    return f"""
model {{ ssd {{
    num_classes: 3
{base._COMMON_HEAD}
    encode_background_as_zeros: true
    anchor_generator {{ multiscale_anchor_generator {{ min_level: {min_level} max_level: {max_level} {anchors} }} }}
    image_resizer {{ fixed_shape_resizer {{ height: {height} width: {width} }} }}
    box_predictor {{ weight_shared_convolutional_box_predictor {{
        depth: 16 class_prediction_bias_init: -4.6 kernel_size: 3 {predictor}
        conv_hyperparams {{ activation: RELU_6
          initializer {{ random_normal_initializer {{ stddev: 0.01 mean: 0.0 }} }} {predictor_batch_norm} }} }} }}
    feature_extractor {{
      type: 'ssd_mobilenet_v1_fpn' min_depth: 8 depth_multiplier: 0.125
      fpn {{ min_level: {min_level} max_level: {max_level} }} {feature_extractor}
      conv_hyperparams {{ activation: RELU_6
        initializer {{ random_normal_initializer {{ stddev: 0.01 mean: 0.0 }} }} batch_norm {{ {fe_batch_norm} }} }}
      override_base_feature_extractor_hyperparams: {"true" if override else "false"}
    }}
    loss {{ classification_loss {{ weighted_sigmoid_focal {{ alpha: 0.25 gamma: 2.0 }} }}
      localization_loss {{ weighted_smooth_l1 {{ }} }} classification_weight: 1.0 localization_weight: 1.0 }}
    post_processing {{ batch_non_max_suppression {{ score_threshold: 0.1 iou_threshold: 0.6
        max_detections_per_class: 20 max_total_detections: 30 }} score_converter: SIGMOID }}
}} }}
"""


_COMMON = dict(frozen=False, class_bias=-2.5, legacy_anchors=False, clip_before_nms=False, quantized=False)
CASES = {
    "explicit_depthwise_shared": dict(_COMMON, seed=21, config=_config(
        height=80, width=48, feature_extractor="use_explicit_padding: true use_depthwise: true",
        fe_batch_norm="scale: true decay: 0.997 epsilon: 0.001", override=True,
        predictor="num_layers_before_predictor: 2 share_prediction_tower: true use_depthwise: true",
        predictor_batch_norm="batch_norm { scale: true decay: 0.997 epsilon: 0.01 }",
        min_level=3, max_level=7, anchors="anchor_scale: 4.0 aspect_ratios: [1.0, 2.0, 0.5] scales_per_octave: 2")),
    "no_predictor_bn_levels_2_6": dict(_COMMON, seed=22, config=_config(
        height=40, width=56, feature_extractor="pad_to_multiple: 32",
        fe_batch_norm="scale: false decay: 0.997 epsilon: 0.01", override=False,
        predictor="num_layers_before_predictor: 1 box_encodings_clip_range { min: -1.5 max: 1.5 }",
        predictor_batch_norm="", min_level=2, max_level=6,
        anchors="anchor_scale: 3.0 aspect_ratios: [1.0, 2.0] scales_per_octave: 3")),
}


def main() -> None:
    base.OUT_ROOT = OUT_ROOT
    base._random_weights = _random_weights
    tf, tf2 = base.install_tf1_shim()
    images = base._load_images()
    for name, spec in CASES.items():
        arrays = base.build_case(name, spec, tf, images)
        np.savez_compressed(OUT_ROOT / name / "reference.npz", **{k: arrays[k] for k in KEEP})
        print(f"{name}: TF {tf2.__version__}, anchors {arrays['anchors'].shape}, "
              f"feature maps {arrays['feature_map_shapes'].tolist()}")


if __name__ == "__main__":
    main()
