"""TF Object Detection API `ssd_mobilenet_v1_fpn` with the weight-shared box predictor, in PyTorch, TF-exact.

Follows the OD-API source (object_detection 0.0.3, Jan 2019): `models/ssd_mobilenet_v1_fpn_feature_extractor.py`,
`models/feature_map_generators.py` (`fpn_top_down_feature_maps`), `predictors/convolutional_box_predictor.py`
(`WeightSharedConvolutionalBoxPredictor`) and `predictors/heads/{box,class}_head.py`. The zoo model this targets is
`ssd_mobilenet_v1_fpn_shared_box_predictor_640x640_coco14_sync` (a RetinaNet-style detector; DESIGN.md §8).

Network, levels min_level..max_level (3..7 by default):
* the MobileNetV1 trunk (our `MobileNetV1Backbone`): level l >= 2 taps `Conv2d_{3,5,11,13}_pointwise` for l = 2..5;
  with `use_depthwise` the OD-API narrows blocks 12 and 13 to 512 and 256 base channels
  (its `_create_modified_mobilenet_config`);
* top-down (variable scope `FeatureExtractor/MobilenetV1/fpn`: the OD-API opens it inside the trunk's scope):
  `projection_i` 1x1 convs with bias, no norm, no activation; the coarsest tapped level is its projection alone;
  going down, nearest 2x upsampling (cropped to the finer map, as the OD-API does with explicit padding) plus the
  next projection, then `smoothing_i` (3x3, BatchNorm, ReLU6; separable with `use_depthwise`). With explicit padding
  the OD-API carries the *padded* sum to the next level, which shifts that level's crop by one pixel; so does this;
* bottom-up: levels above 5 are `fpn/bottom_up_Conv2d_{14,15,...}`, 3x3 stride 2 + BatchNorm + ReLU6 on the level below;
* FPN depth `max(int(additional_layer_depth * depth_multiplier), min_depth)`;
* the predictor: `BoxPredictionTower` and `ClassPredictionTower` (one `PredictionTower` if shared) of
  `num_layers_before_predictor` convs whose weights every level shares, each followed by that level's own BatchNorm
  (`conv2d_i/BatchNorm/feature_j`) and ReLU6 (always ReLU6: the OD-API calls `tf.nn.relu6` itself), then the
  `BoxPredictor` and `ClassPredictor` convs with bias, also shared. Outputs are laid out (y, x, anchor) per level and
  concatenated level by level, as the OD-API's reshape to (batch, -1, code) does.

Every conv pads as TF does: "SAME" (extra pixel after) by default, or `ops.fixed_padding` + VALID (symmetric) with
`use_explicit_padding`. `load_fpn_tf_variables` maps the TF variable names (read from the code above) to this
network's tensors, strictly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..backbone import MobileNetV1Backbone, block_output_name
from ..errors import StateDictMismatchError, WeightsFormatError
from ..layers import ConvNormActivation, init_weights, make_activation, tf_pad

__all__ = [
    "FPN_LEVEL_BLOCKS",
    "FPNSSDNetwork",
    "MobileNetV1FPNFeatureExtractor",
    "WeightSharedConvolutionalBoxPredictor",
    "build_fpn_ssd_network",
    "fpn_tf_name_table",
    "load_fpn_tf_variables",
]

# FPN level -> MobileNetV1 block whose pointwise output it taps (OD-API `feature_blocks`; ssd.proto's table).
FPN_LEVEL_BLOCKS = {2: 3, 3: 5, 4: 11, 5: 13}
_MAX_BASE_LEVEL = 5
_BACKBONE_SCOPE = "FeatureExtractor/MobilenetV1"
# The `fpn` variable scope is opened inside the `MobilenetV1` one (ssd_mobilenet_v1_fpn_feature_extractor.py).
_FPN_SCOPE = "FeatureExtractor/MobilenetV1/fpn"
_PREDICTOR_SCOPE = "WeightSharedConvolutionalBoxPredictor"
# The OD-API's `check_min_image_dim(33, ...)`.
MIN_IMAGE_SIZE = 33


def _pad(x: Tensor, kernel_size: int, stride: int, padding: str) -> Tensor:
    """TF's padding for a conv: "explicit" (`ops.fixed_padding`: symmetric, extra after), "same" (TF "SAME",
    depends on the size) or "none" (the input is already padded)."""
    if kernel_size == 1 or padding == "none":
        return x
    return tf_pad(x, kernel_size, stride, explicit=padding == "explicit")


class _TFConv(nn.Module):
    """slim `conv2d` or `separable_conv2d(depth_multiplier=1)` without norm or activation, TF-padded.

    A separable conv is a depthwise `kernel_size` conv (no bias) then a 1x1 pointwise conv; the bias, if any, is the
    pointwise conv's (slim adds it after the pointwise step).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        separable: bool = False,
        bias: bool = False,
        padding: str = "same",
    ) -> None:
        super().__init__()
        if padding not in ("same", "explicit", "none"):
            raise ValueError(f"padding must be 'same', 'explicit' or 'none', got {padding!r}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        if separable:
            self.depthwise: nn.Conv2d | None = nn.Conv2d(
                in_channels, in_channels, kernel_size, stride=stride, groups=in_channels, bias=False
            )
            self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        else:
            self.depthwise = None
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = _pad(x, self.kernel_size, self.stride, self.padding)
        if self.depthwise is not None:
            x = self.depthwise(x)
        return self.conv(x)


class _FPNConv(nn.Module):
    """A smoothing or bottom-up FPN layer: TF-padded conv (or separable conv), BatchNorm, ReLU6."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        separable: bool,
        padding: str,
        eps: float,
        momentum: float,
    ) -> None:
        super().__init__()
        self.convolution = _TFConv(in_channels, out_channels, 3, stride=stride, separable=separable, padding=padding)
        self.normalization = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.activation = make_activation("relu6", inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class MobileNetV1FPNFeatureExtractor(nn.Module):
    """The OD-API's `SSDMobileNetV1FpnFeatureExtractor.extract_features`: one map per level min_level..max_level.

    Args: see `build_fpn_ssd_network`. Shape: input (N, 3, H, W) in [-1, 1]; output a list of
    (N, depth, ceil(H / 2**l), ceil(W / 2**l)) for l = min_level..max_level.
    """

    def __init__(
        self,
        *,
        depth_multiplier: float = 1.0,
        min_depth: int = 16,
        min_level: int = 3,
        max_level: int = 7,
        additional_layer_depth: int = 256,
        use_explicit_padding: bool = False,
        use_depthwise: bool = False,
        batch_norm_eps: float = 1e-3,
        backbone_batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 1.0 - 0.997,
    ) -> None:
        super().__init__()
        if min_level not in FPN_LEVEL_BLOCKS:
            raise ValueError(f"fpn min_level must be one of {sorted(FPN_LEVEL_BLOCKS)}, got {min_level!r}")
        if not isinstance(max_level, int) or max_level < min_level:
            raise ValueError(f"fpn max_level must be an int >= min_level {min_level}, got {max_level!r}")
        self.min_level = min_level
        self.max_level = max_level
        self.use_explicit_padding = use_explicit_padding
        self.base_max_level = min(max_level, _MAX_BASE_LEVEL)
        self.depth = max(int(additional_layer_depth * depth_multiplier), min_depth)
        blocks = [FPN_LEVEL_BLOCKS[level] for level in range(min_level, self.base_max_level + 1)]
        # TF builds (and its checkpoint holds) the trunk up to Conv2d_13_pointwise whatever levels are tapped.
        self.backbone = MobileNetV1Backbone(
            tuple(sorted(set(blocks) | {13})),
            depth_multiplier=depth_multiplier,
            min_depth=min_depth,
            tf_padding=not use_explicit_padding,
            layer_norm_eps=backbone_batch_norm_eps,
        )
        if use_depthwise:
            self._narrow_top_blocks(depth_multiplier, min_depth, backbone_batch_norm_eps, not use_explicit_padding)
        self.tap_names = [block_output_name(block) for block in blocks]
        channels = {info.name: info.channels for info in self.backbone.feature_info}
        # projection_{i+1} and smoothing_{i+1} belong to the i-th tapped level (`fpn_top_down_feature_maps`).
        self.projections = nn.ModuleList(nn.Conv2d(channels[name], self.depth, 1) for name in self.tap_names)
        common = {"separable": use_depthwise, "eps": batch_norm_eps, "momentum": batch_norm_momentum}
        padding = "explicit" if use_explicit_padding else "same"
        # With explicit padding the smoothing convs get their input already padded (see forward).
        self.smoothings = nn.ModuleList(
            _FPNConv(self.depth, self.depth, stride=1, padding="none" if use_explicit_padding else "same", **common)
            for _ in range(len(self.tap_names) - 1)
        )
        self.bottom_up = nn.ModuleList(
            _FPNConv(self.depth, self.depth, stride=2, padding=padding, **common)
            for _ in range(self.base_max_level + 1, max_level + 1)
        )

    def _narrow_top_blocks(self, depth_multiplier: float, min_depth: int, eps: float, tf_padding: bool) -> None:
        """Blocks 12 and 13 with 512 and 256 base channels, as the OD-API's depthwise FPN variant builds them."""
        layers = self.backbone.layer
        momentum = layers[0].normalization.momentum
        in_12 = layers[22].convolution.in_channels
        out_12 = max(int(512 * depth_multiplier), min_depth)
        out_13 = max(int(256 * depth_multiplier), min_depth)
        common = {"tf_padding": tf_padding, "eps": eps, "momentum": momentum}
        layers[23] = ConvNormActivation(in_12, out_12, 1, **common)
        layers[24] = ConvNormActivation(out_12, out_12, 3, groups=out_12, **common)
        layers[25] = ConvNormActivation(out_12, out_13, 1, **common)
        for index in (23, 24, 25):
            init_weights(layers[index])
        self.backbone.feature_info = tuple(
            dataclasses.replace(info, channels=out_13) if info.index == 13 else info
            for info in self.backbone.feature_info
        )

    @property
    def levels(self) -> list[int]:
        return list(range(self.min_level, self.max_level + 1))

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = self.backbone(x)
        features = [taps[name] for name in self.tap_names]
        top_down = self.projections[-1](features[-1])
        outputs = [top_down]
        for i in range(len(features) - 2, -1, -1):
            residual = self.projections[i](features[i])
            # Nearest 2x upsampling, cropped to the finer map: the OD-API crops with explicit padding; with SAME
            # padding TF only accepts sizes where the crop is a no-op (it fails on the others).
            top_down = top_down.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            top_down = top_down[:, :, : residual.shape[2], : residual.shape[3]] + residual
            if self.use_explicit_padding:
                # `fpn_top_down_feature_maps` pads `top_down` in place before smoothing it, so the map it carries
                # to the next finer level is the padded one: that level's crop keeps the padding's first row and
                # column (a one-pixel shift). TF-exact means doing the same.
                top_down = _pad(top_down, 3, 1, "explicit")
            outputs.insert(0, self.smoothings[i](top_down))
        last = outputs[-1]
        for layer in self.bottom_up:
            last = layer(last)
            outputs.append(last)
        return outputs


class _Tower(nn.Module):
    """`num_layers` convs shared by all levels, each followed by the level's own BatchNorm (or a bias) and ReLU6."""

    def __init__(
        self,
        in_channels: int,
        depth: int,
        num_layers: int,
        num_levels: int,
        *,
        kernel_size: int,
        separable: bool,
        apply_batch_norm: bool,
        eps: float,
        momentum: float,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(num_layers):
            # slim's conv2d adds a bias only when it has no normalizer (`normalizer_fn=tf.identity` with BatchNorm).
            conv_in = in_channels if i == 0 else depth
            self.convs.append(_TFConv(conv_in, depth, kernel_size, separable=separable, bias=not apply_batch_norm))
            if apply_batch_norm:
                self.norms.append(
                    nn.ModuleList(nn.BatchNorm2d(depth, eps=eps, momentum=momentum) for _ in range(num_levels))
                )
        self.apply_batch_norm = apply_batch_norm

    def forward(self, x: Tensor, level_index: int) -> Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.apply_batch_norm:
                x = self.norms[i][level_index](x)
            x = F.relu6(x)
        return x


class WeightSharedConvolutionalBoxPredictor(nn.Module):
    """The OD-API's `WeightSharedConvolutionalBoxPredictor` with its weight-shared box and class heads.

    Shape: a list of L maps (N, in_channels, H_l, W_l) -> box encodings (N, A, box_code_size) and class logits
    (N, A, num_classes + 1), A = sum_l H_l * W_l * num_anchors_per_location, ordered (level, y, x, anchor).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_levels: int,
        num_classes: int,
        num_anchors_per_location: int,
        depth: int = 256,
        num_layers_before_predictor: int = 4,
        kernel_size: int = 3,
        apply_batch_norm: bool = True,
        share_prediction_tower: bool = False,
        use_depthwise: bool = False,
        use_dropout: bool = False,
        dropout_keep_probability: float = 0.8,
        class_prediction_bias_init: float = 0.0,
        box_code_size: int = 4,
        box_encodings_clip_range: tuple[float, float] | None = None,
        batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 1.0 - 0.997,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors_per_location = num_anchors_per_location
        self.box_code_size = box_code_size
        self.share_prediction_tower = share_prediction_tower
        self.box_encodings_clip_range = box_encodings_clip_range
        tower = {
            "kernel_size": kernel_size,
            "separable": use_depthwise,
            "apply_batch_norm": apply_batch_norm,
            "eps": batch_norm_eps,
            "momentum": batch_norm_momentum,
        }
        self.box_tower = _Tower(in_channels, depth, num_layers_before_predictor, num_levels, **tower)
        self.class_tower = (
            None
            if share_prediction_tower
            else _Tower(in_channels, depth, num_layers_before_predictor, num_levels, **tower)
        )
        head_in = depth if num_layers_before_predictor > 0 else in_channels
        self.box_predictor = _TFConv(
            head_in, num_anchors_per_location * box_code_size, kernel_size, separable=use_depthwise, bias=True
        )
        self.class_predictor = _TFConv(
            head_in, num_anchors_per_location * (num_classes + 1), kernel_size, separable=use_depthwise, bias=True
        )
        self.dropout = nn.Dropout(1.0 - dropout_keep_probability) if use_dropout else nn.Identity()
        # The configs' random_normal_initializer (stddev 0.01); the class bias makes initial scores ~sigmoid(init).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.class_predictor.conv.bias, class_prediction_bias_init)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        boxes, classes = [], []
        for level_index, feature in enumerate(features):
            box_feature = self.box_tower(feature, level_index)
            class_feature = box_feature if self.class_tower is None else self.class_tower(feature, level_index)
            box = self.box_predictor(box_feature)
            if self.box_encodings_clip_range is not None:
                box = box.clamp(self.box_encodings_clip_range[0], self.box_encodings_clip_range[1])
            logits = self.class_predictor(self.dropout(class_feature))
            n = feature.shape[0]
            # NCHW -> NHWC, then TF's reshape to (batch, -1, code): anchors ordered (y, x, anchor).
            boxes.append(box.permute(0, 2, 3, 1).reshape(n, -1, self.box_code_size))
            classes.append(logits.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes + 1))
        return torch.cat(boxes, dim=1), torch.cat(classes, dim=1)


class FPNSSDNetwork(nn.Module):
    """Feature extractor + weight-shared predictor: the raw outputs of the OD-API's `SSDMetaArch.predict`.

    `forward(images)` takes (N, 3, H, W) images already resized and scaled to [-1, 1] and returns box encodings
    (N, A, 4) as (ty, tx, th, tw), class logits (N, A, num_classes + 1) (column 0 = background) and the (h, w) of
    each level's map, for the anchor generator (anchors ordered (level, y, x, anchor)).
    """

    def __init__(
        self,
        feature_extractor: MobileNetV1FPNFeatureExtractor,
        box_predictor: WeightSharedConvolutionalBoxPredictor,
        *,
        pad_to_multiple: int = 1,
        batch_norm_scale: Mapping[str, bool] | None = None,
    ) -> None:
        super().__init__()
        self.feature_extractor = feature_extractor
        self.box_predictor = box_predictor
        self.pad_to_multiple = pad_to_multiple
        self.num_classes = box_predictor.num_classes
        # Which BatchNorms have a gamma in TF ("backbone", "fpn", "predictor"): the name table leaves the others
        # out and loading sets their weight to 1.
        self.batch_norm_scale = {"backbone": True, "fpn": True, "predictor": True, **(batch_norm_scale or {})}

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
        if images.dim() != 4 or images.shape[-2] < MIN_IMAGE_SIZE or images.shape[-1] < MIN_IMAGE_SIZE:
            raise ValueError(
                f"expected (N, C, H, W) images with H, W >= {MIN_IMAGE_SIZE} (the OD-API's minimum), "
                f"got shape {list(images.shape)}"
            )
        if self.pad_to_multiple > 1:
            # `ops.pad_to_multiple`: zeros appended at the bottom and right.
            m = self.pad_to_multiple
            pad_h = -images.shape[-2] % m
            pad_w = -images.shape[-1] % m
            images = F.pad(images, [0, pad_w, 0, pad_h])
        features = self.feature_extractor(images)
        box_encodings, class_logits = self.box_predictor(features)
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        return box_encodings, class_logits, shapes


def _check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def build_fpn_ssd_network(
    *,
    num_classes: int,
    depth_multiplier: float = 1.0,
    min_depth: int = 16,
    min_level: int = 3,
    max_level: int = 7,
    additional_layer_depth: int = 256,
    use_explicit_padding: bool = False,
    use_depthwise: bool = False,
    pad_to_multiple: int = 1,
    batch_norm_eps: float = 1e-3,
    batch_norm_scale: bool = True,
    backbone_batch_norm_eps: float | None = None,
    backbone_batch_norm_scale: bool | None = None,
    batch_norm_decay: float = 0.997,
    predictor_depth: int = 256,
    predictor_num_layers_before_predictor: int = 4,
    predictor_kernel_size: int = 3,
    predictor_apply_batch_norm: bool = True,
    predictor_batch_norm_eps: float = 1e-3,
    predictor_batch_norm_scale: bool = True,
    predictor_share_tower: bool = False,
    predictor_use_depthwise: bool = False,
    predictor_use_dropout: bool = False,
    predictor_dropout_keep_probability: float = 0.8,
    class_prediction_bias_init: float = 0.0,
    box_code_size: int = 4,
    box_encodings_clip_range: tuple[float, float] | None = None,
    num_anchors_per_location: int = 6,
) -> FPNSSDNetwork:
    """The `ssd_mobilenet_v1_fpn` network with a `weight_shared_convolutional_box_predictor`, from config values.

    Keyword arguments (pipeline.config field under `model.ssd` in brackets; defaults are the 640x640 zoo model's):
        num_classes: object classes, without background [num_classes].
        depth_multiplier, min_depth: trunk and FPN width [feature_extractor.depth_multiplier / min_depth].
        min_level, max_level: FPN levels; min_level in 2..5 [feature_extractor.fpn.min_level / max_level].
        additional_layer_depth: FPN depth before the multiplier [feature_extractor.fpn.additional_layer_depth].
        use_explicit_padding: symmetric padding instead of TF "SAME" [feature_extractor.use_explicit_padding].
        use_depthwise: separable FPN convs, trunk blocks 12/13 narrowed [feature_extractor.use_depthwise].
        pad_to_multiple: zero-pad the image bottom/right to a multiple [feature_extractor.pad_to_multiple].
        batch_norm_eps, batch_norm_scale: the FPN layers' BatchNorm
            [feature_extractor.conv_hyperparams.batch_norm.epsilon / scale; `scale` defaults to false in the proto].
        backbone_batch_norm_eps, backbone_batch_norm_scale: the trunk's BatchNorm. The OD-API gives the trunk
            TF-slim MobileNet's own (eps 1e-3, with gamma) unless `override_base_feature_extractor_hyperparams`,
            when it takes the feature extractor's: pass those two values then. None = 1e-3 and True.
        batch_norm_decay: TF moving-average decay of the new layers' BatchNorm (training only; momentum = 1 - decay).
        predictor_depth, predictor_num_layers_before_predictor, predictor_kernel_size, predictor_share_tower,
            predictor_use_depthwise, predictor_use_dropout, predictor_dropout_keep_probability,
            class_prediction_bias_init, box_code_size: [box_predictor.weight_shared_convolutional_box_predictor.
            depth / num_layers_before_predictor / kernel_size / share_prediction_tower / use_depthwise /
            use_dropout / dropout_keep_probability / class_prediction_bias_init / box_code_size]. `depth` is not
            scaled by the depth multiplier.
        predictor_apply_batch_norm: whether the predictor's conv_hyperparams has a `batch_norm` (else the tower convs
            get a shared bias instead).
        predictor_batch_norm_eps, predictor_batch_norm_scale: [...box_predictor conv_hyperparams.batch_norm.epsilon /
            scale].
        box_encodings_clip_range: (min, max) [...box_encodings_clip_range], or None.
        num_anchors_per_location: len(aspect_ratios) * scales_per_octave of the multiscale_anchor_generator.

    BatchNorms without `scale` keep gamma = 1 (the checkpoint has no gamma for them). Unsupported here, to be
    rejected by the config reader: conv_hyperparams without batch_norm in the feature extractor, `center: false`,
    activations other than RELU_6, the predictor's `score_converter: SIGMOID`.
    """
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("min_depth", min_depth)
    _check_positive_int("additional_layer_depth", additional_layer_depth)
    _check_positive_int("pad_to_multiple", pad_to_multiple)
    _check_positive_int("predictor_depth", predictor_depth)
    _check_positive_int("predictor_num_layers_before_predictor", predictor_num_layers_before_predictor, 0)
    _check_positive_int("predictor_kernel_size", predictor_kernel_size)
    _check_positive_int("box_code_size", box_code_size)
    _check_positive_int("num_anchors_per_location", num_anchors_per_location)
    if not isinstance(depth_multiplier, (int, float)) or isinstance(depth_multiplier, bool) or depth_multiplier <= 0:
        raise ValueError(f"depth_multiplier must be a positive number, got {depth_multiplier!r}")
    if not 0.0 <= batch_norm_decay < 1.0:
        raise ValueError(f"batch_norm_decay must be in [0, 1), got {batch_norm_decay!r}")
    for name, eps in (("batch_norm_eps", batch_norm_eps), ("predictor_batch_norm_eps", predictor_batch_norm_eps)):
        if not eps > 0:
            raise ValueError(f"{name} must be positive, got {eps!r}")
    if box_encodings_clip_range is not None:
        low, high = box_encodings_clip_range
        if not low <= high:
            raise ValueError(f"box_encodings_clip_range must be (min, max) with min <= max, got {(low, high)!r}")
    if predictor_use_dropout and not 0.0 < predictor_dropout_keep_probability <= 1.0:
        raise ValueError(
            f"predictor_dropout_keep_probability must be in (0, 1], got {predictor_dropout_keep_probability!r}"
        )
    momentum = 1.0 - batch_norm_decay
    extractor = MobileNetV1FPNFeatureExtractor(
        depth_multiplier=depth_multiplier,
        min_depth=min_depth,
        min_level=min_level,
        max_level=max_level,
        additional_layer_depth=additional_layer_depth,
        use_explicit_padding=use_explicit_padding,
        use_depthwise=use_depthwise,
        batch_norm_eps=batch_norm_eps,
        backbone_batch_norm_eps=1e-3 if backbone_batch_norm_eps is None else backbone_batch_norm_eps,
        batch_norm_momentum=momentum,
    )
    predictor = WeightSharedConvolutionalBoxPredictor(
        in_channels=extractor.depth,
        num_levels=len(extractor.levels),
        num_classes=num_classes,
        num_anchors_per_location=num_anchors_per_location,
        depth=predictor_depth,
        num_layers_before_predictor=predictor_num_layers_before_predictor,
        kernel_size=predictor_kernel_size,
        apply_batch_norm=predictor_apply_batch_norm,
        share_prediction_tower=predictor_share_tower,
        use_depthwise=predictor_use_depthwise,
        use_dropout=predictor_use_dropout,
        dropout_keep_probability=predictor_dropout_keep_probability,
        class_prediction_bias_init=class_prediction_bias_init,
        box_code_size=box_code_size,
        box_encodings_clip_range=None if box_encodings_clip_range is None else tuple(box_encodings_clip_range),
        batch_norm_eps=predictor_batch_norm_eps,
        batch_norm_momentum=momentum,
    )
    scale = {
        "backbone": True if backbone_batch_norm_scale is None else bool(backbone_batch_norm_scale),
        "fpn": bool(batch_norm_scale),
        "predictor": bool(predictor_batch_norm_scale),
    }
    return FPNSSDNetwork(extractor, predictor, pad_to_multiple=pad_to_multiple, batch_norm_scale=scale)


# --- TF variable names ---------------------------------------------------------------------------------------------


class TFVariable(NamedTuple):
    """Where one TF variable goes: the state-dict key and how to lay it out."""

    key: str  # state-dict key in the network
    layout: str  # "conv" (HWIO -> OIHW), "depthwise" (HWC1 -> C1HW) or "vector"


def _batch_norm_entries(tf_scope: str, key: str, scale: bool) -> dict[str, TFVariable]:
    entries = {
        f"{tf_scope}/beta": TFVariable(f"{key}.bias", "vector"),
        f"{tf_scope}/moving_mean": TFVariable(f"{key}.running_mean", "vector"),
        f"{tf_scope}/moving_variance": TFVariable(f"{key}.running_var", "vector"),
    }
    if scale:
        entries[f"{tf_scope}/gamma"] = TFVariable(f"{key}.weight", "vector")
    return entries


def _tf_conv_entries(tf_scope: str, key: str, conv: _TFConv) -> dict[str, TFVariable]:
    """slim's names: `weights` (+ `biases`), or `depthwise_weights` + `pointwise_weights` (+ `biases`)."""
    if conv.depthwise is not None:
        entries = {
            f"{tf_scope}/depthwise_weights": TFVariable(f"{key}.depthwise.weight", "depthwise"),
            f"{tf_scope}/pointwise_weights": TFVariable(f"{key}.conv.weight", "conv"),
        }
    else:
        entries = {f"{tf_scope}/weights": TFVariable(f"{key}.conv.weight", "conv")}
    if conv.conv.bias is not None:
        entries[f"{tf_scope}/biases"] = TFVariable(f"{key}.conv.bias", "vector")
    return entries


def fpn_tf_name_table(network: FPNSSDNetwork) -> dict[str, TFVariable]:
    """TF variable name -> (state-dict key, layout) for every weight and statistic of `network`.

    Names come from the OD-API code: the SSD meta-architecture's `FeatureExtractor` scope, TF-slim's MobileNetV1
    (`MobilenetV1/Conv2d_k_{depthwise,pointwise}`), the extractor's `fpn` scope, and the predictor's
    `WeightSharedConvolutionalBoxPredictor` scope.
    """
    scale = network.batch_norm_scale
    extractor = network.feature_extractor
    table: dict[str, TFVariable] = {}
    backbone = extractor.backbone
    trunk = [("Conv2d_0", "feature_extractor.backbone.conv_stem", backbone.conv_stem)]
    for i, layer in enumerate(backbone.layer):
        block, kind = i // 2 + 1, ("depthwise" if i % 2 == 0 else "pointwise")
        trunk.append((f"Conv2d_{block}_{kind}", f"feature_extractor.backbone.layer.{i}", layer))
    for scope, key, layer in trunk:
        depthwise = layer.convolution.groups > 1
        kernel = "depthwise_weights" if depthwise else "weights"
        table[f"{_BACKBONE_SCOPE}/{scope}/{kernel}"] = TFVariable(
            f"{key}.convolution.weight", "depthwise" if depthwise else "conv"
        )
        norm_scope = f"{_BACKBONE_SCOPE}/{scope}/BatchNorm"
        table.update(_batch_norm_entries(norm_scope, f"{key}.normalization", scale["backbone"]))
    for i in range(len(extractor.projections)):
        key = f"feature_extractor.projections.{i}"
        table[f"{_FPN_SCOPE}/projection_{i + 1}/weights"] = TFVariable(f"{key}.weight", "conv")
        table[f"{_FPN_SCOPE}/projection_{i + 1}/biases"] = TFVariable(f"{key}.bias", "vector")
    fpn_layers = [(f"smoothing_{i + 1}", f"smoothings.{i}", m) for i, m in enumerate(extractor.smoothings)]
    fpn_layers += [
        (f"bottom_up_Conv2d_{i + 14}", f"bottom_up.{i}", m) for i, m in enumerate(extractor.bottom_up)
    ]
    for scope, key, layer in fpn_layers:
        key = f"feature_extractor.{key}"
        table.update(_tf_conv_entries(f"{_FPN_SCOPE}/{scope}", f"{key}.convolution", layer.convolution))
        table.update(_batch_norm_entries(f"{_FPN_SCOPE}/{scope}/BatchNorm", f"{key}.normalization", scale["fpn"]))
    predictor = network.box_predictor
    towers = [("PredictionTower" if predictor.share_prediction_tower else "BoxPredictionTower", "box_tower")]
    if predictor.class_tower is not None:
        towers.append(("ClassPredictionTower", "class_tower"))
    for tower_scope, attribute in towers:
        tower: _Tower = getattr(predictor, attribute)
        for i, conv in enumerate(tower.convs):
            scope = f"{_PREDICTOR_SCOPE}/{tower_scope}/conv2d_{i}"
            table.update(_tf_conv_entries(scope, f"box_predictor.{attribute}.convs.{i}", conv))
            if tower.apply_batch_norm:
                for j in range(len(tower.norms[i])):
                    table.update(
                        _batch_norm_entries(
                            f"{scope}/BatchNorm/feature_{j}",
                            f"box_predictor.{attribute}.norms.{i}.{j}",
                            scale["predictor"],
                        )
                    )
    for scope, attribute in (("BoxPredictor", "box_predictor"), ("ClassPredictor", "class_predictor")):
        head = getattr(predictor, attribute)
        table.update(_tf_conv_entries(f"{_PREDICTOR_SCOPE}/{scope}", f"box_predictor.{attribute}", head))
    return table


def _to_torch_layout(name: str, value: np.ndarray, layout: str) -> Tensor:
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise WeightsFormatError(f"TF variable {name!r} has dtype {array.dtype}; expected a float tensor")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if layout == "conv":
        return tensor.permute(3, 2, 0, 1) if tensor.dim() == 4 else tensor
    if layout == "depthwise":
        return tensor.permute(2, 3, 0, 1) if tensor.dim() == 4 else tensor
    return tensor


def load_fpn_tf_variables(network: FPNSSDNetwork, variables: Mapping[str, np.ndarray]) -> None:
    """Copy the model's TF variables (name -> array, e.g. `TFCheckpoint.read_all()`) into `network`, strictly.

    `variables` must hold exactly the network's variables: training-only entries (global_step, optimizer slots,
    `ExponentialMovingAverage` shadows) are the caller's to drop or substitute. Every missing, unexpected or
    misshapen name is listed in one `StateDictMismatchError`; non-float tensors raise `WeightsFormatError`.
    BatchNorms whose TF layer has no gamma (`scale: false`) get weight 1.
    """
    if not isinstance(network, FPNSSDNetwork):
        raise TypeError(f"network must be an FPNSSDNetwork (build_fpn_ssd_network), got {type(network).__name__}")
    table = fpn_tf_name_table(network)
    state = network.state_dict()
    missing = sorted(set(table) - set(variables))
    unexpected = sorted(set(variables) - set(table))
    converted: dict[str, Tensor] = {}
    misshapen = []
    for name in sorted(set(table) & set(variables)):
        entry = table[name]
        tensor = _to_torch_layout(name, variables[name], entry.layout)
        expected = tuple(state[entry.key].shape)
        if tuple(tensor.shape) != expected:
            tf_expected = _tf_shape(expected, entry.layout)
            misshapen.append(f"{name}: {tuple(np.shape(variables[name]))}, expected {tf_expected}")
            continue
        converted[entry.key] = tensor
    if missing or unexpected or misshapen:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if names:
                shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        raise StateDictMismatchError("TF variables do not match the ssd_mobilenet_v1_fpn network; " + "; ".join(parts))
    with torch.no_grad():
        for key, tensor in converted.items():
            state[key].copy_(tensor)
        mapped = {entry.key for entry in table.values()}
        for module_name, module in network.named_modules():
            if isinstance(module, nn.BatchNorm2d) and f"{module_name}.weight" not in mapped:
                module.weight.fill_(1.0)


def _tf_shape(torch_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if len(torch_shape) == 4 and layout == "conv":
        out, inp, h, w = torch_shape
        return (h, w, inp, out)
    if len(torch_shape) == 4 and layout == "depthwise":
        channels, multiplier, h, w = torch_shape
        return (h, w, channels, multiplier)
    return torch_shape
