"""Infer an OD-API ``ssd_mobilenet_v1`` configuration from a ``frozen_inference_graph.pb`` alone.

Older model-zoo tarballs (``*_11_06_2017``) ship no ``pipeline.config``. The frozen graph still tells most of it:

* the network, from the weights' names and shapes: depth multiplier (``Conv2d_13_pointwise`` has
  ``1024 * depth_multiplier`` channels), ``min_depth`` (``Conv2d_0``), ``use_depthwise`` (``..._depthwise``
  extra layers), ``use_explicit_padding`` (``Pad`` ops inside ``FeatureExtractor``), the activation (``Relu6`` /
  ``Relu`` ops), the box predictor's kernel size, extra layers and boxes per location, ``num_classes``;
* the image size (the ``ResizeImage`` size constant);
* the anchors: ``MultipleGridAnchorGenerator`` keeps each layer's aspect ratios (``Sqrt/x``) and scales (the
  constant divided by them) as constants, in the model's order, so both anchor orders are read, not guessed;
* the post-processing: ``Postprocessor/convert_scores`` (Sigmoid, Softmax or Identity), ``scale_logits``, the NMS
  ``iou_threshold`` / ``score_threshold`` / per-class and total maxima.

What a graph does not carry is assumed from the OD-API's defaults and said in one warning: BatchNorm epsilon 1e-3
(``FusedBatchNorm`` keeps it in an attribute this reader does not decode), base anchor size 1 and default anchor
strides/offsets, and the training settings (losses, matcher) of the OD-API's sample config.
``ssd_mobilenet_v1_fpn`` graphs are refused: put the ``pipeline.config`` beside them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .anchors import ssd_anchor_box_specs
from .tf_pipeline import (
    AnchorGeneratorConfig,
    BoxPredictorConfig,
    FeatureExtractorConfig,
    HyperparamsConfig,
    LossConfig,
    MatcherConfig,
    PipelineConfigError,
    PostProcessingConfig,
    SSDPipelineConfig,
)

__all__ = ["GRAPH_ASSUMPTIONS", "infer_config_from_graph"]

GRAPH_ASSUMPTIONS = (
    "BatchNorm epsilon 0.001, base anchor size 1x1 with default anchor strides and offsets, and the training "
    "settings of the OD-API's ssd_mobilenet_v1 sample config (weighted sigmoid + smooth L1 losses, hard example "
    "mining 3000 / 0.99 / CLASSIFICATION / 3 negatives per positive, argmax matcher 0.5 with force_match_for_each_row)"
)
_FE = "FeatureExtractor/MobilenetV1"
_NMS = "Postprocessor/BatchMultiClassNonMaxSuppression/map/while/MultiClassNonMaxSuppression"


def _natural(name: str) -> tuple[int, ...]:
    """Sort key of TF's uniquified names: ``x`` < ``x_1`` < ``x_2`` < ... < ``x_10``."""
    match = re.search(r"_(\d+)$", name.split("/")[-1])
    return (int(match.group(1)) + 1,) if match else (0,)


def infer_config_from_graph(
    nodes: Sequence[Any], *, source: str, fallback_score_threshold: float | None = None
) -> tuple[SSDPipelineConfig, bool]:
    """(config, legacy_anchor_order) for a frozen OD-API ``ssd_mobilenet_v1`` graph; see the module docstring.

    `fallback_score_threshold` (the caller's ``score_thresh``) stands in for a graph whose NMS has no score
    threshold constant (OD-API code that filtered scores before NMS).

    Raises `PipelineConfigError` naming `source` and what could not be read.
    """
    consts = {n.name: n.value for n in nodes if n.op == "Const" and n.value is not None}
    ops = {n.name: n.op for n in nodes}
    inputs = {n.name: tuple(i.split(":")[0].lstrip("^") for i in n.inputs) for n in nodes}

    def need(name: str, what: str) -> np.ndarray:
        if name not in consts:
            raise PipelineConfigError(f"{source}: no pipeline.config, and the graph has no {name} ({what}); put the "
                                      "model's pipeline.config beside the graph")
        return np.asarray(consts[name])

    if any(name.startswith(f"{_FE}/fpn/") for name in consts):
        raise PipelineConfigError(f"{source}: an ssd_mobilenet_v1_fpn graph without pipeline.config; its levels, "
                                  "predictor and anchors are not inferred from the graph: put the pipeline.config "
                                  "beside it")
    if f"{_FE}/Conv2d_13_pointwise/weights" not in consts:
        found = sorted({name.split("/")[0] + "/" + name.split("/")[1] for name in consts if "/" in name})[:6]
        raise PipelineConfigError(f"{source}: not an OD-API ssd_mobilenet_v1 graph (no {_FE}/Conv2d_13_pointwise/"
                                  f"weights; scopes found: {found})")
    conv0 = int(need(f"{_FE}/Conv2d_0/weights", "the first conv").shape[3])
    conv13 = int(need(f"{_FE}/Conv2d_13_pointwise/weights", "the last MobileNet layer").shape[3])
    depth_multiplier = conv13 / 1024.0
    min_depth = conv0  # every layer is at least int(32 * depth_multiplier) wide, so this changes nothing else
    use_depthwise = any(re.search(r"_2_Conv2d_\d+_3x3_s2_\d+_depthwise/depthwise_weights$", n) for n in consts)
    explicit = any(op in ("Pad", "PadV2") for name, op in ops.items() if name.startswith(f"{_FE}/"))
    extra_ops = {op for name, op in ops.items() if name.startswith(f"{_FE}/Conv2d_13_pointwise_2_")}
    activation = "RELU_6" if "Relu6" in extra_ops else "RELU" if "Relu" in extra_ops else "NONE"

    per_location, kernel = [], None
    layers_before = 0
    predictor_depthwise = False
    for level in range(6):
        scope = f"BoxPredictor_{level}"
        biases = need(f"{scope}/BoxEncodingPredictor/biases", "the box predictor")
        per_location.append(int(biases.shape[0]) // 4)
        weights = need(f"{scope}/BoxEncodingPredictor/weights", "the box predictor")
        predictor_depthwise = f"{scope}/BoxEncodingPredictor_depthwise/depthwise_weights" in consts
        if predictor_depthwise:
            kernel = int(consts[f"{scope}/BoxEncodingPredictor_depthwise/depthwise_weights"].shape[0])
        else:
            kernel = int(weights.shape[0])
        layers_before = sum(1 for name in consts if re.fullmatch(rf"{scope}/Conv2d_\d+_1x1_\d+/weights", name))
    class_biases = need("BoxPredictor_0/ClassPredictor/biases", "the class predictor")
    num_classes = int(class_biases.shape[0]) // per_location[0] - 1
    if layers_before:
        raise PipelineConfigError(f"{source}: box predictor layers before the predictor (BoxPredictor_k/Conv2d_*) "
                                  "are not inferred from a graph; put the pipeline.config beside it")

    size = None
    for name, value in consts.items():
        if "Preprocessor" in name and "ResizeImage" in name and np.asarray(value).shape == (2,):
            size = [int(v) for v in np.asarray(value)]
            break
    if size is None:
        raise PipelineConfigError(f"{source}: no fixed_shape_resizer size (Preprocessor/.../ResizeImage) in the graph")

    # Anchors: per layer, RealDiv(scales, Sqrt(aspect ratios)) inside MultipleGridAnchorGenerator.
    sqrt_nodes = sorted((name for name, op in ops.items() if op == "Sqrt"
                         and name.startswith("MultipleGridAnchorGenerator/")), key=_natural)
    specs = []
    for sqrt in sqrt_nodes:
        ratios = consts.get(inputs[sqrt][0]) if inputs[sqrt] else None
        scales = None
        for name, ins in inputs.items():
            if ops.get(name) == "RealDiv" and len(ins) == 2 and ins[1] == sqrt and ins[0] in consts:
                scales = consts[ins[0]]
                break
        if ratios is None or scales is None or np.shape(ratios) != np.shape(scales):
            raise PipelineConfigError(f"{source}: cannot read the anchor scales and aspect ratios at {sqrt}")
        specs.append([(float(s), float(r)) for s, r in zip(np.ravel(scales), np.ravel(ratios), strict=True)])
    if len(specs) != 6 or [len(s) for s in specs] != per_location:
        raise PipelineConfigError(f"{source}: the graph's anchor generator ({[len(s) for s in specs]} boxes per "
                                  f"layer) does not match its box predictor ({per_location})")
    anchor_config, legacy = _anchor_config(specs, source)

    converters = {"Sigmoid": "SIGMOID", "Softmax": "SOFTMAX", "Identity": "IDENTITY"}
    converter = converters.get(ops.get("Postprocessor/convert_scores", ""))
    if converter is None:
        # Code older than the named converter applied tf.sigmoid / tf.nn.softmax directly in the Postprocessor scope.
        found = {op for name, op in ops.items() if name.count("/") == 1 and name.startswith("Postprocessor/")
                 and op in ("Sigmoid", "Softmax")}
        if len(found) != 1:
            raise PipelineConfigError(f"{source}: cannot read the score converter (no Postprocessor/convert_scores, "
                                      f"score ops found: {sorted(found)})")
        converter = converters[found.pop()]
    score_threshold = consts.get(f"{_NMS}/non_max_suppression/score_threshold")
    if score_threshold is None:
        if fallback_score_threshold is None:
            raise PipelineConfigError(f"{source}: the graph has no NMS score_threshold constant; pass score_thresh= "
                                      "or put the model's pipeline.config beside the graph")
        score_threshold = fallback_score_threshold
    post = PostProcessingConfig(
        score_threshold=float(score_threshold),
        iou_threshold=float(need(f"{_NMS}/non_max_suppression/iou_threshold", "the NMS IoU threshold")),
        max_detections_per_class=int(need(f"{_NMS}/Minimum/x", "the per-class maximum")),
        max_total_detections=int(need(f"{_NMS}/Minimum_{num_classes}/x", "the total maximum")),
        score_converter=converter,
        logit_scale=float(consts.get("Postprocessor/scale_logits/y", 1.0)),
    )
    has_gamma = any(re.search(r"_1_Conv2d_\d+_1x1_\d+/BatchNorm/gamma$", name) for name in consts)
    hyper = HyperparamsConfig(activation=activation, batch_norm=True, batch_norm_epsilon=0.001,
                              batch_norm_scale=has_gamma)
    config = SSDPipelineConfig(
        num_classes=num_classes,
        image_height=size[0],
        image_width=size[1],
        feature_extractor=FeatureExtractorConfig(
            type="ssd_mobilenet_v1", depth_multiplier=depth_multiplier, min_depth=min_depth, hyperparams=hyper,
            use_explicit_padding=explicit, use_depthwise=use_depthwise,
        ),
        box_predictor=BoxPredictorConfig(kind="convolutional", hyperparams=hyper, kernel_size=kernel or 1,
                                         use_depthwise=predictor_depthwise),
        anchor_generator=anchor_config,
        post_processing=post,
        matcher=MatcherConfig(force_match_for_each_row=True),
        loss=LossConfig(hard_example_miner=True, num_hard_examples=3000, hard_example_iou_threshold=0.99,
                        hard_example_loss_type="CLASSIFICATION", max_negatives_per_positive=3),
    )
    return config, legacy


def _anchor_config(specs: list[list[tuple[float, float]]], source: str) -> tuple[AnchorGeneratorConfig, bool]:
    """The ssd_anchor_generator settings (and order) that reproduce `specs`, or a refusal."""
    reduce_lowest = len(specs[0]) == 3 and np.isclose(specs[0][0][0], 0.1) and specs[0][0][1] == 1.0
    scales = [layer[1][0] if i == 0 and reduce_lowest else layer[0][0] for i, layer in enumerate(specs)]
    upper = specs[-1] if len(specs) > 1 else specs[0]
    # The interpolated box is the one whose scale differs from the layer's scale.
    odd = [k for k, (s, _) in enumerate(upper) if not np.isclose(s, scales[-1], rtol=1e-6)]
    interpolated_ratio = upper[odd[0]][1] if odd else 0.0
    ratios = [r for k, (_, r) in enumerate(upper) if k not in odd]
    legacy = bool(odd) and odd[0] != len(upper) - 1
    candidate = AnchorGeneratorConfig(
        kind="ssd", num_layers=len(specs), scales=tuple(scales), aspect_ratios=tuple(ratios),
        interpolated_scale_aspect_ratio=interpolated_ratio, reduce_boxes_in_lowest_layer=reduce_lowest,
    )
    rebuilt = ssd_anchor_box_specs(
        num_layers=len(specs), scales=scales, aspect_ratios=ratios, interpolated_scale_aspect_ratio=interpolated_ratio,
        reduce_boxes_in_lowest_layer=reduce_lowest, legacy_order=legacy,
    )
    flat = np.array([v for layer in specs for box in layer for v in box])
    flat_rebuilt = np.array([v for layer in rebuilt for box in layer for v in box]) if [
        len(x) for x in rebuilt] == [len(x) for x in specs] else None
    if flat_rebuilt is None or not np.allclose(flat, flat_rebuilt, rtol=1e-6, atol=1e-7):
        raise PipelineConfigError(f"{source}: the graph's anchors are not those of an ssd_anchor_generator this "
                                  "reader can express; put the pipeline.config beside the graph")
    return candidate, legacy
