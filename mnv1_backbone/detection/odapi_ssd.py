"""The OD-API's classic ``ssd_mobilenet_v1``: feature extractor, convolutional box predictor, TF name table.

Follows ``models/ssd_mobilenet_v1_feature_extractor.py`` (TF-slim MobileNetV1 under ``FeatureExtractor/MobilenetV1``,
taps ``Conv2d_11_pointwise`` and ``Conv2d_13_pointwise``), ``models/feature_map_generators.py``
(``multi_resolution_feature_maps``: four extra maps of layer depth 512, 256, 256, 128, each a 1x1 conv to half the
depth, ``{base}_1_Conv2d_{i}_1x1_{d/2}``, then a 3x3 stride-2 conv ``{base}_2_Conv2d_{i}_3x3_s2_{d}``, depthwise +
1x1 with ``use_depthwise``, explicitly padded with ``use_explicit_padding``) and
``predictors/convolutional_box_predictor.py`` + ``predictors/heads/{box,class}_head.py`` (per map ``BoxPredictor_k``:
optional 1x1 layers, then ``BoxEncodingPredictor`` and ``ClassPredictor`` convs with bias, outputs laid out
(y, x, anchor)). The backbone is our `MobileNetV1Backbone` (TF "SAME" padding, or symmetric padding, which is what
TF-slim's ``use_explicit_padding`` does); the OD-API's extra layers and predictors use the ``conv_hyperparams`` of the
config (BatchNorm epsilon, activation), the backbone TF-slim's own arg scope (epsilon 1e-3, ReLU6) unless
``override_base_feature_extractor_hyperparams``.

`ODAPISSDNetwork.forward` takes images already resized and mapped to [-1, 1] and returns raw box encodings
(N, A, 4) as (ty, tx, th, tw), class logits (N, A, num_classes + 1) and the maps' (h, w): the same contract as
the FPN network of `odapi_fpn`. `tf_variable_table` maps every state-dict tensor to its TF variable name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..backbone import MobileNetV1Backbone
from ..layers import make_activation, tf_pad, tf_padded_conv2d

__all__ = ["ConvUnit", "ODAPISSDNetwork", "TFVariable", "layer_depth"]

EXTRA_LAYER_DEPTHS = (512, 256, 256, 128)
# The OD-API's `hyperparams.proto` activation names -> `make_activation` names.
_ACTIVATIONS = {"NONE": "identity", "RELU": "relu", "RELU_6": "relu6"}


def layer_depth(depth: float, depth_multiplier: float, min_depth: int) -> int:
    """``feature_map_generators.get_depth_fn``: ``max(int(depth * depth_multiplier), min_depth)``."""
    return max(int(depth * depth_multiplier), min_depth)


class TFVariable(NamedTuple):
    """Where a state-dict tensor comes from: a TF variable name and how to lay it out.

    ``kind``: "conv" (HWIO -> OIHW), "depthwise" (HW-C-1 -> C1HW), "vector" (as is), or "ones"/"zeros" for
    BatchNorm parameters that TF does not create (slim ``scale=False`` / ``center=False``).
    """

    name: str
    kind: str


class ConvUnit(nn.Module):
    """Conv2d -> optional BatchNorm -> activation, padded like TF ("SAME", or symmetric = ``fixed_padding``).

    Without BatchNorm the conv has a bias (slim adds one when there is no normalizer).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        depthwise: bool = False,
        tf_same: bool = True,
        batch_norm: bool = True,
        eps: float = 1e-3,
        activation: str = "RELU_6",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(_ACTIVATIONS)}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.depthwise = depthwise
        self.convolution, self.pad_at_runtime = tf_padded_conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            groups=in_channels if depthwise else 1,
            bias=not batch_norm,
            tf_same=tf_same,
        )
        self.normalization = nn.BatchNorm2d(out_channels, eps=eps, momentum=1.0 - 0.9997) if batch_norm else None
        self.activation = make_activation(_ACTIVATIONS[activation], inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad_at_runtime:
            x = tf_pad(x, self.kernel_size, self.stride)
        x = self.convolution(x)
        if self.normalization is not None:
            x = self.normalization(x)
        return self.activation(x)

    def tf_table(self, scope: str, *, center: bool = True, scale: bool = True) -> dict[str, TFVariable]:
        """State-dict suffix -> TF variable, for a slim conv at `scope`."""
        kernel = "depthwise_weights" if self.depthwise else "weights"
        table = {"convolution.weight": TFVariable(f"{scope}/{kernel}", "depthwise" if self.depthwise else "conv")}
        if self.normalization is None:
            table["convolution.bias"] = TFVariable(f"{scope}/biases", "vector")
            return table
        bn = f"{scope}/BatchNorm"
        table["normalization.weight"] = TFVariable(f"{bn}/gamma", "vector") if scale else TFVariable("", "ones")
        table["normalization.bias"] = TFVariable(f"{bn}/beta", "vector") if center else TFVariable("", "zeros")
        table["normalization.running_mean"] = TFVariable(f"{bn}/moving_mean", "vector")
        table["normalization.running_var"] = TFVariable(f"{bn}/moving_variance", "vector")
        return table


class _PredictionHead(nn.Module):
    """One ``BoxEncodingPredictor`` or ``ClassPredictor``: a kxk conv with bias (or depthwise kxk + 1x1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, use_depthwise: bool,
                 batch_norm: bool, eps: float, activation: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.depthwise = (
            ConvUnit(in_channels, in_channels, kernel_size, depthwise=True, batch_norm=batch_norm, eps=eps,
                     activation=activation)
            if use_depthwise else None
        )
        k = 1 if use_depthwise else kernel_size
        self.conv = nn.Conv2d(in_channels, out_channels, k, padding=(k - 1) // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(x)
        if self.depthwise is not None:
            x = self.depthwise(x)
        return self.conv(x)

    def tf_table(self, scope: str, *, center: bool, scale: bool) -> dict[str, TFVariable]:
        table = {"conv.weight": TFVariable(f"{scope}/weights", "conv"), "conv.bias": TFVariable(f"{scope}/biases",
                                                                                             "vector")}
        if self.depthwise is not None:
            for key, var in self.depthwise.tf_table(f"{scope}_depthwise", center=center, scale=scale).items():
                table[f"depthwise.{key}"] = var
        return table


class _BoxPredictorLevel(nn.Module):
    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *, kernel_size: int,
                 num_layers_before_predictor: int, min_depth: int, max_depth: int, use_depthwise: bool,
                 batch_norm: bool, eps: float, activation: str, dropout: float) -> None:
        super().__init__()
        depth = max(min(in_channels, max_depth), min_depth)
        self.layer_names: list[str] = []
        layers: list[nn.Module] = []
        if depth > 0 and num_layers_before_predictor > 0:
            channels = in_channels
            for i in range(num_layers_before_predictor):
                layers.append(ConvUnit(channels, depth, 1, batch_norm=batch_norm, eps=eps, activation=activation))
                self.layer_names.append(f"Conv2d_{i}_1x1_{depth}")
                channels = depth
            in_channels = depth
        self.layers = nn.Sequential(*layers)
        common = {"use_depthwise": use_depthwise, "batch_norm": batch_norm, "eps": eps, "activation": activation}
        self.box = _PredictionHead(in_channels, num_anchors * 4, kernel_size, **common)
        self.cls = _PredictionHead(in_channels, num_anchors * (num_classes + 1), kernel_size, dropout=dropout,
                                   **common)


class ODAPISSDNetwork(nn.Module):
    """The classic ``ssd_mobilenet_v1`` network: MobileNetV1 + 4 extra maps + per-map convolutional predictors.

    Args:
        num_classes: object classes (the logits have one more column, 0 = background).
        num_anchors_per_location: boxes per location of each of the 6 maps (3, 6, 6, 6, 6, 6 by default).
        depth_multiplier, min_depth: the feature extractor's (``min_depth`` 16 in the OD-API's default).
        use_explicit_padding: symmetric (``fixed_padding`` + VALID) instead of TF "SAME" padding.
        use_depthwise: extra layers' 3x3 convs as depthwise + 1x1.
        batch_norm, batch_norm_eps, batch_norm_center, batch_norm_scale, activation: the feature extractor's
            ``conv_hyperparams`` (extra layers).
        backbone_eps, backbone_activation: TF-slim's MobileNetV1 arg scope (1e-3, RELU_6), unless the config
            overrides the base hyperparameters.
        predictor_*: the ``convolutional_box_predictor``'s settings and its ``conv_hyperparams``.
        class_prediction_bias_init, init_std: initial class-head bias and conv weight std (new layers only).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        num_anchors_per_location: Sequence[int] = (3, 6, 6, 6, 6, 6),
        depth_multiplier: float = 1.0,
        min_depth: int = 16,
        use_explicit_padding: bool = False,
        use_depthwise: bool = False,
        batch_norm: bool = True,
        batch_norm_eps: float = 1e-3,
        batch_norm_center: bool = True,
        batch_norm_scale: bool = True,
        activation: str = "RELU_6",
        backbone_eps: float = 1e-3,
        backbone_activation: str = "RELU_6",
        backbone_batch_norm_center: bool = True,
        backbone_batch_norm_scale: bool = True,
        predictor_kernel_size: int = 1,
        predictor_num_layers_before_predictor: int = 0,
        predictor_min_depth: int = 0,
        predictor_max_depth: int = 0,
        predictor_use_depthwise: bool = False,
        predictor_batch_norm: bool = True,
        predictor_batch_norm_eps: float = 1e-3,
        predictor_batch_norm_center: bool = True,
        predictor_batch_norm_scale: bool = True,
        predictor_activation: str = "RELU_6",
        predictor_dropout: float = 0.0,
        class_prediction_bias_init: float = 0.0,
        init_std: float = 0.03,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if len(num_anchors_per_location) != 2 + len(EXTRA_LAYER_DEPTHS):
            raise ValueError(f"num_anchors_per_location needs 6 entries, got {list(num_anchors_per_location)}")
        if backbone_activation not in ("RELU_6", "RELU"):
            raise ValueError(f"backbone activation {backbone_activation!r} is not supported (RELU_6 or RELU)")
        self.num_classes = num_classes
        self.num_anchors_per_location = tuple(num_anchors_per_location)
        self._bn_flags = {
            "backbone": (backbone_batch_norm_center, backbone_batch_norm_scale),
            "extra": (batch_norm_center, batch_norm_scale),
            "predictor": (predictor_batch_norm_center, predictor_batch_norm_scale),
        }
        self.backbone = MobileNetV1Backbone(
            (11, 13),
            depth_multiplier=depth_multiplier,
            min_depth=min_depth,
            tf_padding=not use_explicit_padding,
            layer_norm_eps=backbone_eps,
            hidden_act="relu6" if backbone_activation == "RELU_6" else "relu",
        )
        channels = list(self.backbone.out_channels)
        self.extra_names: list[list[str]] = []
        extras = []
        base = "Conv2d_13_pointwise"
        common = {"batch_norm": batch_norm, "eps": batch_norm_eps, "activation": activation}
        in_channels = channels[-1]
        for offset, depth in enumerate(EXTRA_LAYER_DEPTHS):
            index = offset + 2
            mid = layer_depth(depth / 2, depth_multiplier, min_depth)
            out = layer_depth(depth, depth_multiplier, min_depth)
            name = f"{base}_2_Conv2d_{index}_3x3_s2_{out}"
            units = [ConvUnit(in_channels, mid, 1, **common)]
            names = [f"{base}_1_Conv2d_{index}_1x1_{mid}"]
            if use_depthwise:
                units += [
                    ConvUnit(mid, mid, 3, stride=2, depthwise=True, tf_same=not use_explicit_padding, **common),
                    ConvUnit(mid, out, 1, **common),
                ]
                names += [f"{name}_depthwise", name]
            else:
                units.append(ConvUnit(mid, out, 3, stride=2, tf_same=not use_explicit_padding, **common))
                names.append(name)
            extras.append(nn.Sequential(*units))
            self.extra_names.append(names)
            channels.append(out)
            in_channels = out
        self.extras = nn.ModuleList(extras)
        self.out_channels = channels
        self.predictors = nn.ModuleList(
            _BoxPredictorLevel(
                c,
                k,
                num_classes,
                kernel_size=predictor_kernel_size,
                num_layers_before_predictor=predictor_num_layers_before_predictor,
                min_depth=predictor_min_depth,
                max_depth=predictor_max_depth,
                use_depthwise=predictor_use_depthwise,
                batch_norm=predictor_batch_norm,
                eps=predictor_batch_norm_eps,
                activation=predictor_activation,
                dropout=predictor_dropout,
            )
            for c, k in zip(channels, self.num_anchors_per_location, strict=True)
        )
        # The OD-API samples configs' truncated_normal_initializer (stddev 0.03) for new layers; the backbone keeps
        # its own initialisation. Loading weights overwrites all of this.
        for module in [*self.extras.modules(), *self.predictors.modules()]:
            if isinstance(module, nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for conv in self.class_heads():
            nn.init.constant_(conv.bias, class_prediction_bias_init)

    def features(self, images: Tensor) -> list[Tensor]:
        """The six predictor maps of (N, 3, H, W) images in [-1, 1]."""
        taps = self.backbone(images)
        maps = [taps["Conv2d_11_pointwise"], taps["Conv2d_13_pointwise"]]
        x = maps[-1]
        for extra in self.extras:
            x = extra(x)
            maps.append(x)
        return maps

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
        """(N, 3, H, W) in [-1, 1] -> box encodings (N, A, 4), class logits (N, A, C + 1), maps' (h, w)."""
        boxes, logits, shapes = [], [], []
        n = images.shape[0]
        for feature, predictor in zip(self.features(images), self.predictors, strict=True):
            shapes.append((int(feature.shape[-2]), int(feature.shape[-1])))
            x = predictor.layers(feature)
            boxes.append(predictor.box(x).permute(0, 2, 3, 1).reshape(n, -1, 4))
            logits.append(predictor.cls(x).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes + 1))
        return torch.cat(boxes, dim=1), torch.cat(logits, dim=1), shapes

    def class_heads(self) -> list[nn.Conv2d]:
        """The final class convs (what fine-tuning with a new `num_classes` re-initialises)."""
        return [p.cls.conv for p in self.predictors]

    def tf_variable_table(self) -> dict[str, TFVariable]:
        """State-dict key -> TF variable name (the OD-API's graph), for every parameter and BatchNorm buffer."""
        table: dict[str, TFVariable] = {}
        fe = "FeatureExtractor/MobilenetV1"
        center, scale = self._bn_flags["backbone"]

        def add_bn_unit(prefix: str, scope: str, depthwise: bool) -> None:
            kernel = "depthwise_weights" if depthwise else "weights"
            table[f"{prefix}.convolution.weight"] = TFVariable(f"{scope}/{kernel}", "depthwise" if depthwise
                                                               else "conv")
            bn = f"{scope}/BatchNorm"
            table[f"{prefix}.normalization.weight"] = TFVariable(f"{bn}/gamma", "vector") if scale else TFVariable(
                "", "ones")
            table[f"{prefix}.normalization.bias"] = TFVariable(f"{bn}/beta", "vector") if center else TFVariable(
                "", "zeros")
            table[f"{prefix}.normalization.running_mean"] = TFVariable(f"{bn}/moving_mean", "vector")
            table[f"{prefix}.normalization.running_var"] = TFVariable(f"{bn}/moving_variance", "vector")

        add_bn_unit("backbone.conv_stem", f"{fe}/Conv2d_0", False)
        for i in range(len(self.backbone.layer)):
            block = i // 2 + 1
            kind = "depthwise" if i % 2 == 0 else "pointwise"
            add_bn_unit(f"backbone.layer.{i}", f"{fe}/Conv2d_{block}_{kind}", kind == "depthwise")
        center, scale = self._bn_flags["extra"]
        for e, (extra, names) in enumerate(zip(self.extras, self.extra_names, strict=True)):
            for u, (unit, name) in enumerate(zip(extra, names, strict=True)):
                for key, var in unit.tf_table(f"{fe}/{name}", center=center, scale=scale).items():
                    table[f"extras.{e}.{u}.{key}"] = var
        center, scale = self._bn_flags["predictor"]
        for p, predictor in enumerate(self.predictors):
            scope = f"BoxPredictor_{p}"
            for u, (unit, name) in enumerate(zip(predictor.layers, predictor.layer_names, strict=True)):
                for key, var in unit.tf_table(f"{scope}/{name}", center=center, scale=scale).items():
                    table[f"predictors.{p}.layers.{u}.{key}"] = var
            for head, name in ((predictor.box, "BoxEncodingPredictor"), (predictor.cls, "ClassPredictor")):
                attr = "box" if head is predictor.box else "cls"
                for key, var in head.tf_table(f"{scope}/{name}", center=center, scale=scale).items():
                    table[f"predictors.{p}.{attr}.{key}"] = var
        return table
