"""Read an OD-API ``pipeline.config`` (protobuf text format) into a typed SSD configuration, without protobuf.

Two layers:

* `parse_text_proto`: a small, bounded reader of the protobuf text format (what ``text_format.Merge`` accepts
  for the messages we read): ``name: value`` and ``name { ... }`` / ``name < ... >`` / ``name: { ... }`` fields,
  repeated fields (repeated lines or ``[a, b]`` lists), ``#`` comments, single- or double-quoted strings with C
  escapes (adjacent strings concatenate), numbers (``1``, ``-0.5``, ``1e-3``, ``0.5f``, ``inf``, ``nan``), enum and
  boolean identifiers. Input size, nesting depth and field count are bounded, so a hostile file costs little.
  The result is a tree of `TextMessage` (field name -> list of values) with no schema.
* `SSDPipelineConfig.from_text` / `read_pipeline_config`: the schema part. It reads the fields of
  ``model.ssd`` that decide the numbers an SSD-MobileNetV1 produces, with the defaults of the OD-API's ``.proto``
  files (``object_detection/protos/*.proto``, as in the ``object-detection==0.0.3`` wheel), ignores fields it
  does not need (training input, optimizer, data augmentation ...), and refuses settings it cannot reproduce
  with a `PipelineConfigError` naming the field path (e.g. ``model.ssd.feature_extractor.type``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AnchorGeneratorConfig",
    "BoxPredictorConfig",
    "FeatureExtractorConfig",
    "HyperparamsConfig",
    "LossConfig",
    "MatcherConfig",
    "PipelineConfigError",
    "PostProcessingConfig",
    "SSDPipelineConfig",
    "SUPPORTED_FEATURE_EXTRACTORS",
    "TextMessage",
    "config_from_dict",
    "parse_text_proto",
    "read_pipeline_config",
]

MAX_TEXT_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
MAX_FIELDS = 100_000

SUPPORTED_FEATURE_EXTRACTORS = ("ssd_mobilenet_v1", "ssd_mobilenet_v1_fpn")


class PipelineConfigError(ValueError):
    """A ``pipeline.config`` is malformed, or asks for something this package does not reproduce."""


# ----------------------------------------------------------------------------------------------------------------
# The text format
# ----------------------------------------------------------------------------------------------------------------


class Identifier(str):
    """An unquoted word in value position: an enum name, ``true``/``false``, ``inf``/``nan``."""


@dataclass
class TextMessage:
    """One message of a parsed text proto: field name -> values in file order (sub-messages are `TextMessage`)."""

    path: str = ""
    fields: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, name: str, value: Any) -> None:
        self.fields.setdefault(name, []).append(value)

    def has(self, name: str) -> bool:
        return name in self.fields

    def child_path(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def values(self, name: str) -> list[Any]:
        return list(self.fields.get(name, []))

    def last(self, name: str) -> Any:
        """The value of a singular field (the text format keeps the last one), or None when absent."""
        values = self.fields.get(name)
        return values[-1] if values else None

    def message(self, name: str) -> TextMessage | None:
        value = self.last(name)
        if value is None:
            return None
        if not isinstance(value, TextMessage):
            raise PipelineConfigError(f"{self.child_path(name)}: expected a message {{ ... }}, got {value!r}")
        return value

    def oneof(self, names: tuple[str, ...]) -> str | None:
        """Which of the fields of a oneof is set (the last one set wins, as in protobuf)."""
        present = [name for name in self.fields if name in names]
        return present[-1] if present else None


class _Lexer:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.pos = 0
        self.source = source

    def error(self, message: str) -> PipelineConfigError:
        line = self.text.count("\n", 0, self.pos) + 1
        return PipelineConfigError(f"{self.source}, line {line}: {message}")

    def skip(self) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c in " \t\r\n\f\v":
                self.pos += 1
            elif c == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end + 1
            else:
                break

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = self.peek() or "end of file"
            raise self.error(f"expected {char!r}, found {found!r}")
        self.pos += 1

    def word(self) -> str:
        self.skip()
        start = self.pos
        text, n = self.text, len(self.text)
        while self.pos < n and (text[self.pos].isalnum() or text[self.pos] in "_.+-"):
            self.pos += 1
        if start == self.pos:
            found = text[self.pos] if self.pos < n else "end of file"
            raise self.error(f"expected a name or value, found {found!r}")
        return text[start : self.pos]

    def string(self) -> str:
        parts = []
        while self.peek() in ("'", '"'):
            parts.append(self._one_string())
        return "".join(parts)

    def _one_string(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        text, n = self.text, len(self.text)
        while True:
            if self.pos >= n or text[self.pos] == "\n":
                raise self.error("unterminated string")
            c = text[self.pos]
            if c == quote:
                self.pos += 1
                return "".join(out)
            if c != "\\":
                out.append(c)
                self.pos += 1
                continue
            if self.pos + 1 >= n:
                raise self.error("unterminated string")
            e = text[self.pos + 1]
            self.pos += 2
            simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b",
                      "f": "\f", "v": "\v", "?": "?"}
            if e in simple:
                out.append(simple[e])
            elif e in "xX":
                digits = ""
                while len(digits) < 2 and self.pos < n and text[self.pos] in "0123456789abcdefABCDEF":
                    digits += text[self.pos]
                    self.pos += 1
                if not digits:
                    raise self.error("\\x escape without hex digits")
                out.append(chr(int(digits, 16)))
            elif e in "01234567":
                digits = e
                while len(digits) < 3 and self.pos < n and text[self.pos] in "01234567":
                    digits += text[self.pos]
                    self.pos += 1
                out.append(chr(int(digits, 8)))
            else:
                raise self.error(f"unknown escape \\{e} in string")


def _scalar(token: str, lexer: _Lexer) -> Any:
    """A number (int or float) or an `Identifier`, from an unquoted token."""
    lowered = token.lower()
    if lowered.lstrip("+-") in ("inf", "infinity", "nan"):
        return float(lowered.replace("infinity", "inf"))
    if not (token[0].isdigit() or token[0] in "+-."):
        return Identifier(token)
    is_hex = lowered.lstrip("+-").startswith("0x")
    body = token[:-1] if lowered.endswith("f") and not is_hex else token
    try:
        if is_hex:
            return int(body, 16)
        if "." in body or "e" in body.lower():
            return float(body)
        return int(body, 10)
    except ValueError:
        raise lexer.error(f"bad number {token!r}") from None


def parse_text_proto(text: str | bytes, *, source: str = "<text>") -> TextMessage:
    """Parse protobuf text format into a `TextMessage` tree (no schema; see the module docstring).

    Raises `PipelineConfigError` naming the source and line for malformed text, input over 4 MiB, nesting
    deeper than 32 or more than 100,000 fields.
    """
    if isinstance(text, bytes):
        if len(text) > MAX_TEXT_BYTES:
            raise PipelineConfigError(f"{source}: {len(text)} bytes, more than the {MAX_TEXT_BYTES} a config may have")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PipelineConfigError(f"{source}: not UTF-8 text ({exc})") from None
    if len(text) > MAX_TEXT_BYTES:
        raise PipelineConfigError(f"{source}: {len(text)} characters, more than the {MAX_TEXT_BYTES} a config may have")
    lexer = _Lexer(text, source)
    count = [0]
    root = TextMessage()
    _parse_fields(lexer, root, closing="", depth=0, count=count)
    return root


def _parse_fields(lexer: _Lexer, message: TextMessage, *, closing: str, depth: int, count: list[int]) -> None:
    if depth > MAX_DEPTH:
        raise lexer.error(f"messages nested deeper than {MAX_DEPTH}")
    while True:
        c = lexer.peek()
        if c == closing:
            if closing:
                lexer.pos += 1
            return
        if c == "":
            raise lexer.error(f"missing {closing!r} before end of file")
        if c == "[":
            raise lexer.error("extension and Any fields ([...]) are not supported")
        name = lexer.word()
        if not (name[0].isalpha() or name[0] == "_") or not name.replace("_", "a").isalnum():
            raise lexer.error(f"bad field name {name!r}")
        count[0] += 1
        if count[0] > MAX_FIELDS:
            raise lexer.error(f"more than {MAX_FIELDS} fields")
        has_colon = lexer.peek() == ":"
        if has_colon:
            lexer.pos += 1
        c = lexer.peek()
        if c == "[" and has_colon:
            lexer.pos += 1
            if lexer.peek() == "]":
                lexer.pos += 1
                continue
            while True:
                message.add(name, _parse_value(lexer, message.child_path(name), depth, count))
                c = lexer.peek()
                lexer.pos += 1
                if c == "]":
                    break
                if c != ",":
                    lexer.pos -= 1
                    raise lexer.error(f"expected ',' or ']' in the list of {name!r}")
        else:
            if not has_colon and c not in "{<":
                raise lexer.error(f"expected ':' or '{{' after field {name!r}")
            message.add(name, _parse_value(lexer, message.child_path(name), depth, count))
        if lexer.peek() in ",;":
            lexer.pos += 1


def _parse_value(lexer: _Lexer, path: str, depth: int, count: list[int]) -> Any:
    c = lexer.peek()
    if c in "{<":
        lexer.pos += 1
        child = TextMessage(path)
        _parse_fields(lexer, child, closing="}" if c == "{" else ">", depth=depth + 1, count=count)
        return child
    if c in ("'", '"'):
        return lexer.string()
    return _scalar(lexer.word(), lexer)


# ----------------------------------------------------------------------------------------------------------------
# Typed views of the fields we use (defaults from the OD-API .proto files)
# ----------------------------------------------------------------------------------------------------------------


def _get(msg: TextMessage | None, name: str, kind: type, default: Any) -> Any:
    """A singular scalar field of `msg` converted to `kind`, or `default` when absent."""
    if msg is None or not msg.has(name):
        return default
    value = msg.last(name)
    return _convert(value, kind, msg.child_path(name))


def _get_list(msg: TextMessage | None, name: str, kind: type) -> tuple[Any, ...]:
    if msg is None:
        return ()
    return tuple(_convert(v, kind, msg.child_path(name)) for v in msg.values(name))


def _convert(value: Any, kind: type, path: str) -> Any:
    if isinstance(value, TextMessage):
        raise PipelineConfigError(f"{path}: expected a {kind.__name__}, got a message")
    if kind is bool:
        if isinstance(value, Identifier) and value in ("true", "True", "t", "false", "False", "f"):
            return value in ("true", "True", "t")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise PipelineConfigError(f"{path}: expected true or false, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise PipelineConfigError(f"{path}: expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, int):
            return value
        raise PipelineConfigError(f"{path}: expected an integer, got {value!r}")
    if kind is Identifier:
        if isinstance(value, Identifier):
            return str(value)
        raise PipelineConfigError(f"{path}: expected an enum name, got {value!r}")
    if isinstance(value, str) and not isinstance(value, Identifier):
        return value
    raise PipelineConfigError(f"{path}: expected a quoted string, got {value!r}")


def _enum(msg: TextMessage | None, name: str, allowed: tuple[str, ...], default: str) -> str:
    value = _get(msg, name, Identifier, default)
    if value not in allowed:
        path = msg.child_path(name) if msg is not None else name
        raise PipelineConfigError(f"{path}: {value!r} is not one of {list(allowed)}")
    return value


def _check_min(msg: TextMessage | None, name: str, value: int | float, minimum: int | float) -> None:
    if value < minimum:
        path = msg.child_path(name) if msg is not None else name
        raise PipelineConfigError(f"{path}: {value} is below the smallest allowed value {minimum}")


def _refuse(path: str, what: str) -> PipelineConfigError:
    return PipelineConfigError(f"{path}: {what} is not supported")


@dataclass(frozen=True)
class HyperparamsConfig:
    """``Hyperparams``: what a conv's output goes through (BatchNorm settings and the activation)."""

    activation: str = "RELU"
    batch_norm: bool = False
    batch_norm_epsilon: float = 0.001
    batch_norm_center: bool = True
    batch_norm_scale: bool = False

    @classmethod
    def parse(cls, msg: TextMessage | None, path: str) -> HyperparamsConfig:
        if msg is None:
            raise PipelineConfigError(f"{path}: missing (the OD-API requires conv_hyperparams)")
        activation = _enum(msg, "activation", ("NONE", "RELU", "RELU_6"), "RELU")
        if _get(msg, "op", Identifier, "CONV") != "CONV":
            raise _refuse(msg.child_path("op"), "op other than CONV")
        if msg.has("group_norm"):
            raise _refuse(msg.child_path("group_norm"), "group normalisation")
        bn = msg.message("batch_norm")
        if bn is None:
            return cls(activation=activation)
        return cls(
            activation=activation,
            batch_norm=True,
            batch_norm_epsilon=_get(bn, "epsilon", float, 0.001),
            batch_norm_center=_get(bn, "center", bool, True),
            batch_norm_scale=_get(bn, "scale", bool, False),
        )


@dataclass(frozen=True)
class FeatureExtractorConfig:
    type: str
    depth_multiplier: float = 1.0
    min_depth: int = 16
    hyperparams: HyperparamsConfig = HyperparamsConfig()
    override_base_feature_extractor_hyperparams: bool = False
    use_explicit_padding: bool = False
    use_depthwise: bool = False
    fpn_min_level: int = 3
    fpn_max_level: int = 7
    fpn_additional_layer_depth: int = 256


@dataclass(frozen=True)
class BoxPredictorConfig:
    """``convolutional_box_predictor`` (classic SSD) or ``weight_shared_convolutional_box_predictor`` (FPN)."""

    kind: str
    hyperparams: HyperparamsConfig = HyperparamsConfig()
    kernel_size: int = 1
    num_layers_before_predictor: int = 0
    min_depth: int = 0
    max_depth: int = 0
    depth: int = 0
    use_depthwise: bool = False
    class_prediction_bias_init: float = 0.0
    share_prediction_tower: bool = False
    use_dropout: bool = False  # training only: dropout before the class head
    dropout_keep_probability: float = 0.8


@dataclass(frozen=True)
class AnchorGeneratorConfig:
    """``ssd_anchor_generator`` (kind "ssd") or ``multiscale_anchor_generator`` (kind "multiscale")."""

    kind: str
    num_layers: int = 6
    min_scale: float = 0.2
    max_scale: float = 0.95
    scales: tuple[float, ...] = ()
    aspect_ratios: tuple[float, ...] = ()
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = True
    base_anchor_height: float = 1.0
    base_anchor_width: float = 1.0
    height_stride: tuple[int, ...] = ()
    width_stride: tuple[int, ...] = ()
    height_offset: tuple[int, ...] = ()
    width_offset: tuple[int, ...] = ()
    min_level: int = 3
    max_level: int = 7
    anchor_scale: float = 4.0
    scales_per_octave: int = 2
    normalize_coordinates: bool = True


@dataclass(frozen=True)
class PostProcessingConfig:
    score_threshold: float = 0.0
    iou_threshold: float = 0.6
    max_detections_per_class: int = 100
    max_total_detections: int = 100
    score_converter: str = "IDENTITY"
    logit_scale: float = 1.0


@dataclass(frozen=True)
class MatcherConfig:
    """``argmax_matcher``."""

    matched_threshold: float = 0.5
    unmatched_threshold: float = 0.5
    ignore_thresholds: bool = False
    negatives_lower_than_unmatched: bool = True
    force_match_for_each_row: bool = False


@dataclass(frozen=True)
class LossConfig:
    classification: str = "weighted_sigmoid"
    focal_gamma: float = 2.0
    focal_alpha: float | None = None  # None: not set in the config, so no alpha weighting (losses_builder)
    localization: str = "weighted_smooth_l1"
    smooth_l1_delta: float = 1.0
    classification_weight: float = 1.0
    localization_weight: float = 1.0
    hard_example_miner: bool = False
    num_hard_examples: int = 64
    hard_example_iou_threshold: float = 0.7
    hard_example_loss_type: str = "BOTH"
    max_negatives_per_positive: int = 0
    min_negatives_per_image: int = 0


@dataclass(frozen=True)
class SSDPipelineConfig:
    """Everything of ``model.ssd`` (and the two flags outside it) that decides an SSD-MobileNetV1's numbers."""

    num_classes: int
    image_height: int
    image_width: int
    feature_extractor: FeatureExtractorConfig
    box_predictor: BoxPredictorConfig
    anchor_generator: AnchorGeneratorConfig
    box_coder_scales: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    matcher: MatcherConfig = MatcherConfig()
    post_processing: PostProcessingConfig = PostProcessingConfig()
    loss: LossConfig = LossConfig()
    normalize_loss_by_num_matches: bool = True
    normalize_loc_loss_by_codesize: bool = False
    encode_background_as_zeros: bool = False  # training only: unmatched anchors' class target is all zeros
    negative_class_weight: float = 1.0  # training only: class-loss weight of unmatched anchors
    use_moving_averages: bool = False
    quantized: bool = False

    @property
    def is_fpn(self) -> bool:
        return self.feature_extractor.type == "ssd_mobilenet_v1_fpn"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_text(cls, text: str | bytes, *, source: str = "pipeline.config") -> SSDPipelineConfig:
        """Parse and check a whole ``pipeline.config``; errors name `source` and the field path."""
        root = parse_text_proto(text, source=source)
        try:
            return _ssd_config(root)
        except PipelineConfigError as exc:
            raise PipelineConfigError(f"{source}: {exc}") from None


def read_pipeline_config(path: str | os.PathLike[str]) -> SSDPipelineConfig:
    """`SSDPipelineConfig.from_text` of a file, refusing files over 4 MiB before reading them."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise PipelineConfigError(f"{path}: {size} bytes, more than the {MAX_TEXT_BYTES} a config may have")
    return SSDPipelineConfig.from_text(path.read_bytes(), source=str(path))


def _ssd_config(root: TextMessage) -> SSDPipelineConfig:
    model = root.message("model")
    if model is None:
        raise PipelineConfigError("model: missing")
    kind = model.oneof(tuple(model.fields))
    ssd = model.message("ssd")
    if ssd is None:
        raise _refuse(model.child_path(kind or "?"), f"the {kind!r} meta-architecture (only ssd is)")
    num_classes = _get(ssd, "num_classes", int, 0)
    if num_classes < 1:
        raise PipelineConfigError(f"{ssd.child_path('num_classes')}: must be at least 1, got {num_classes}")

    # image_resizer: fixed_shape_resizer with bilinear resizing is what every SSD-MobileNetV1 config uses.
    resizer = ssd.message("image_resizer")
    if resizer is None or resizer.oneof(tuple(resizer.fields)) != "fixed_shape_resizer":
        which = resizer.oneof(tuple(resizer.fields)) if resizer is not None else None
        raise _refuse(f"model.ssd.image_resizer.{which or ''}".rstrip("."), "an image resizer other than "
                      "fixed_shape_resizer")
    fixed = resizer.message("fixed_shape_resizer")
    method = _enum(fixed, "resize_method", ("BILINEAR", "NEAREST_NEIGHBOR", "BICUBIC", "AREA"), "BILINEAR")
    if method != "BILINEAR":
        raise _refuse(fixed.child_path("resize_method"), f"resize_method {method}")
    if _get(fixed, "convert_to_grayscale", bool, False):
        raise _refuse(fixed.child_path("convert_to_grayscale"), "convert_to_grayscale: true")
    height, width = _get(fixed, "height", int, 300), _get(fixed, "width", int, 300)
    if not (33 <= height <= 4096 and 33 <= width <= 4096):
        raise PipelineConfigError(f"{fixed.path}: image size {height}x{width} outside [33, 4096]")

    fe = ssd.message("feature_extractor")
    if fe is None:
        raise PipelineConfigError("model.ssd.feature_extractor: missing")
    fe_type = _get(fe, "type", str, "")
    if fe_type not in SUPPORTED_FEATURE_EXTRACTORS:
        raise _refuse(fe.child_path("type"), f"feature extractor {fe_type!r} (supported: "
                      f"{', '.join(SUPPORTED_FEATURE_EXTRACTORS)})")
    if _get(fe, "pad_to_multiple", int, 1) not in (0, 1) and (
        height % _get(fe, "pad_to_multiple", int, 1) or width % _get(fe, "pad_to_multiple", int, 1)
    ):
        raise _refuse(fe.child_path("pad_to_multiple"), "pad_to_multiple that does not divide the image size")
    fpn = fe.message("fpn")
    _check_min(fe, "min_depth", _get(fe, "min_depth", int, 16), 0)
    depth_multiplier = _get(fe, "depth_multiplier", float, 1.0)
    if not 0.0 < depth_multiplier <= 4.0:
        raise PipelineConfigError(f"{fe.child_path('depth_multiplier')}: {depth_multiplier} outside (0, 4]")
    feature_extractor = FeatureExtractorConfig(
        type=fe_type,
        depth_multiplier=depth_multiplier,
        min_depth=_get(fe, "min_depth", int, 16),
        hyperparams=HyperparamsConfig.parse(fe.message("conv_hyperparams"), fe.child_path("conv_hyperparams")),
        override_base_feature_extractor_hyperparams=_get(fe, "override_base_feature_extractor_hyperparams", bool,
                                                         False),
        use_explicit_padding=_get(fe, "use_explicit_padding", bool, False),
        use_depthwise=_get(fe, "use_depthwise", bool, False),
        fpn_min_level=_get(fpn, "min_level", int, 3),
        fpn_max_level=_get(fpn, "max_level", int, 7),
        fpn_additional_layer_depth=_get(fpn, "additional_layer_depth", int, 256),
    )
    if fe_type == "ssd_mobilenet_v1" and fpn is not None:
        raise _refuse(fe.child_path("fpn"), "an fpn block with feature extractor 'ssd_mobilenet_v1'")
    if fe.has("num_layers") and _get(fe, "num_layers", int, 6) != 6:
        raise _refuse(fe.child_path("num_layers"), "num_layers other than 6")

    coder = ssd.message("box_coder")
    coder_kind = coder.oneof(tuple(coder.fields)) if coder is not None else None
    if coder_kind != "faster_rcnn_box_coder":
        raise _refuse(f"model.ssd.box_coder.{coder_kind or ''}".rstrip("."), "a box coder other than "
                      "faster_rcnn_box_coder")
    frc = coder.message("faster_rcnn_box_coder")
    scales = (_get(frc, "y_scale", float, 10.0), _get(frc, "x_scale", float, 10.0),
              _get(frc, "height_scale", float, 5.0), _get(frc, "width_scale", float, 5.0))

    box_predictor = _box_predictor(ssd)
    anchor_generator = _anchor_generator(ssd)
    if feature_extractor.type == "ssd_mobilenet_v1_fpn":
        if box_predictor.kind != "weight_shared":
            raise _refuse("model.ssd.box_predictor.convolutional_box_predictor", "with ssd_mobilenet_v1_fpn, a box "
                          "predictor other than weight_shared_convolutional_box_predictor")
        if anchor_generator.kind != "multiscale":
            raise _refuse("model.ssd.anchor_generator.ssd_anchor_generator", "with ssd_mobilenet_v1_fpn, an anchor "
                          "generator other than multiscale_anchor_generator")
    else:
        if box_predictor.kind != "convolutional":
            raise _refuse("model.ssd.box_predictor.weight_shared_convolutional_box_predictor", "with "
                          "ssd_mobilenet_v1, a box predictor other than convolutional_box_predictor")
        if anchor_generator.kind != "ssd":
            raise _refuse("model.ssd.anchor_generator.multiscale_anchor_generator", "with ssd_mobilenet_v1, an "
                          "anchor generator other than ssd_anchor_generator")

    for name in ("add_background_class",):
        if not _get(ssd, name, bool, True):
            raise _refuse(ssd.child_path(name), f"{name}: false")
    for name in ("explicit_background_class", "use_confidences_as_targets"):
        if _get(ssd, name, bool, False):
            raise _refuse(ssd.child_path(name), f"{name}: true")
    if ssd.has("mask_head_config"):
        raise _refuse(ssd.child_path("mask_head_config"), "a mask head")

    eval_config = root.message("eval_config")
    rewriter = root.message("graph_rewriter")
    return SSDPipelineConfig(
        num_classes=num_classes,
        image_height=height,
        image_width=width,
        feature_extractor=feature_extractor,
        box_predictor=box_predictor,
        anchor_generator=anchor_generator,
        box_coder_scales=scales,
        matcher=_matcher(ssd),
        post_processing=_post_processing(ssd),
        loss=_loss(ssd),
        normalize_loss_by_num_matches=_get(ssd, "normalize_loss_by_num_matches", bool, True),
        normalize_loc_loss_by_codesize=_get(ssd, "normalize_loc_loss_by_codesize", bool, False),
        encode_background_as_zeros=_get(ssd, "encode_background_as_zeros", bool, False),
        negative_class_weight=_get(ssd, "negative_class_weight", float, 1.0),
        use_moving_averages=_get(eval_config, "use_moving_averages", bool, False),
        quantized=rewriter is not None and rewriter.has("quantization"),
    )


def _box_predictor(ssd: TextMessage) -> BoxPredictorConfig:
    bp = ssd.message("box_predictor")
    names = ("convolutional_box_predictor", "weight_shared_convolutional_box_predictor", "mask_rcnn_box_predictor",
             "rfcn_box_predictor")
    kind = bp.oneof(names) if bp is not None else None
    if kind not in names[:2]:
        raise _refuse(f"model.ssd.box_predictor.{kind or ''}".rstrip("."), "a box predictor other than "
                      "convolutional_box_predictor or weight_shared_convolutional_box_predictor")
    msg = bp.message(kind)
    if _get(msg, "box_code_size", int, 4) != 4:
        raise _refuse(msg.child_path("box_code_size"), "box_code_size other than 4")
    clip = msg.message("box_encodings_clip_range")
    if clip is not None:
        raise _refuse(msg.child_path("box_encodings_clip_range"), "box_encodings_clip_range")
    hyper = HyperparamsConfig.parse(msg.message("conv_hyperparams"), msg.child_path("conv_hyperparams"))
    for name, minimum in (("kernel_size", 1), ("num_layers_before_predictor", 0), ("min_depth", 0), ("max_depth", 0),
                          ("depth", 0)):
        _check_min(msg, name, _get(msg, name, int, minimum), minimum)
    if kind == "convolutional_box_predictor":
        if _get(msg, "apply_sigmoid_to_scores", bool, False):
            raise _refuse(msg.child_path("apply_sigmoid_to_scores"), "apply_sigmoid_to_scores: true")
        return BoxPredictorConfig(
            kind="convolutional",
            hyperparams=hyper,
            kernel_size=_get(msg, "kernel_size", int, 1),
            num_layers_before_predictor=_get(msg, "num_layers_before_predictor", int, 0),
            min_depth=_get(msg, "min_depth", int, 0),
            max_depth=_get(msg, "max_depth", int, 0),
            use_depthwise=_get(msg, "use_depthwise", bool, False),
            class_prediction_bias_init=_get(msg, "class_prediction_bias_init", float, 0.0),
            use_dropout=_get(msg, "use_dropout", bool, True),
            dropout_keep_probability=_keep_probability(msg),
        )
    converter = _enum(msg, "score_converter", ("IDENTITY", "SIGMOID"), "IDENTITY")
    if converter != "IDENTITY":
        raise _refuse(msg.child_path("score_converter"), f"score_converter {converter} inside the predictor")
    if _get(msg, "use_depthwise", bool, False):
        raise _refuse(msg.child_path("use_depthwise"), "use_depthwise: true in the weight-shared predictor")
    return BoxPredictorConfig(
        kind="weight_shared",
        hyperparams=hyper,
        kernel_size=_get(msg, "kernel_size", int, 3),
        num_layers_before_predictor=_get(msg, "num_layers_before_predictor", int, 0),
        depth=_get(msg, "depth", int, 0),
        class_prediction_bias_init=_get(msg, "class_prediction_bias_init", float, 0.0),
        share_prediction_tower=_get(msg, "share_prediction_tower", bool, False),
        use_dropout=_get(msg, "use_dropout", bool, False),
        dropout_keep_probability=_keep_probability(msg),
    )


def _keep_probability(msg: TextMessage) -> float:
    keep = _get(msg, "dropout_keep_probability", float, 0.8)
    if not 0.0 < keep <= 1.0:
        raise PipelineConfigError(f"{msg.child_path('dropout_keep_probability')}: {keep} outside (0, 1]")
    return keep


def _anchor_generator(ssd: TextMessage) -> AnchorGeneratorConfig:
    ag = ssd.message("anchor_generator")
    names = ("ssd_anchor_generator", "multiscale_anchor_generator", "grid_anchor_generator",
             "flexible_grid_anchor_generator")
    kind = ag.oneof(names) if ag is not None else None
    if kind not in names[:2]:
        raise _refuse(f"model.ssd.anchor_generator.{kind or ''}".rstrip("."), "an anchor generator other than "
                      "ssd_anchor_generator or multiscale_anchor_generator")
    msg = ag.message(kind)
    if kind == "multiscale_anchor_generator":
        return AnchorGeneratorConfig(
            kind="multiscale",
            min_level=_get(msg, "min_level", int, 3),
            max_level=_get(msg, "max_level", int, 7),
            anchor_scale=_get(msg, "anchor_scale", float, 4.0),
            aspect_ratios=_get_list(msg, "aspect_ratios", float),
            scales_per_octave=_get(msg, "scales_per_octave", int, 2),
            normalize_coordinates=_get(msg, "normalize_coordinates", bool, True),
        )
    config = AnchorGeneratorConfig(
        kind="ssd",
        num_layers=_get(msg, "num_layers", int, 6),
        min_scale=_get(msg, "min_scale", float, 0.2),
        max_scale=_get(msg, "max_scale", float, 0.95),
        scales=_get_list(msg, "scales", float),
        aspect_ratios=_get_list(msg, "aspect_ratios", float),
        interpolated_scale_aspect_ratio=_get(msg, "interpolated_scale_aspect_ratio", float, 1.0),
        reduce_boxes_in_lowest_layer=_get(msg, "reduce_boxes_in_lowest_layer", bool, True),
        base_anchor_height=_get(msg, "base_anchor_height", float, 1.0),
        base_anchor_width=_get(msg, "base_anchor_width", float, 1.0),
        height_stride=_get_list(msg, "height_stride", int),
        width_stride=_get_list(msg, "width_stride", int),
        height_offset=_get_list(msg, "height_offset", int),
        width_offset=_get_list(msg, "width_offset", int),
    )
    if config.num_layers != 6:
        raise _refuse(msg.child_path("num_layers"), f"num_layers {config.num_layers} (ssd_mobilenet_v1 has 6 maps)")
    for name in ("height_stride", "width_stride", "height_offset", "width_offset"):
        if len(getattr(config, name)) not in (0, config.num_layers):
            raise PipelineConfigError(f"{msg.child_path(name)}: {len(getattr(config, name))} values, expected "
                                      f"none or {config.num_layers}")
    if config.scales and len(config.scales) != config.num_layers:
        raise PipelineConfigError(f"{msg.child_path('scales')}: {len(config.scales)} values, expected "
                                  f"{config.num_layers}")
    return config


def _post_processing(ssd: TextMessage) -> PostProcessingConfig:
    pp = ssd.message("post_processing")
    nms = pp.message("batch_non_max_suppression") if pp is not None else None
    if nms is not None:
        for name in ("use_class_agnostic_nms",):
            if _get(nms, name, bool, False):
                raise _refuse(nms.child_path(name), f"{name}: true")
        if _get(nms, "soft_nms_sigma", float, 0.0) != 0.0:
            raise _refuse(nms.child_path("soft_nms_sigma"), "soft NMS")
    if pp is not None and pp.has("calibration_config"):
        raise _refuse(pp.child_path("calibration_config"), "score calibration")
    config = PostProcessingConfig(
        score_threshold=_get(nms, "score_threshold", float, 0.0),
        iou_threshold=_get(nms, "iou_threshold", float, 0.6),
        max_detections_per_class=_get(nms, "max_detections_per_class", int, 100),
        max_total_detections=_get(nms, "max_total_detections", int, 100),
        score_converter=_enum(pp, "score_converter", ("IDENTITY", "SIGMOID", "SOFTMAX"), "IDENTITY"),
        logit_scale=_get(pp, "logit_scale", float, 1.0),
    )
    _check_min(nms, "max_detections_per_class", config.max_detections_per_class, 1)
    _check_min(nms, "max_total_detections", config.max_total_detections, 1)
    if not 0.0 <= config.iou_threshold <= 1.0:
        raise PipelineConfigError(f"{nms.child_path('iou_threshold')}: {config.iou_threshold} outside [0, 1]")
    if config.logit_scale == 0.0 or not math.isfinite(config.logit_scale):
        raise PipelineConfigError(f"model.ssd.post_processing.logit_scale: {config.logit_scale} is not usable")
    return config


def _matcher(ssd: TextMessage) -> MatcherConfig:
    matcher = ssd.message("matcher")
    kind = matcher.oneof(("argmax_matcher", "bipartite_matcher")) if matcher is not None else None
    if kind == "bipartite_matcher":
        # Only training uses the matcher; refuse it there instead of failing to import an inference model.
        return MatcherConfig(matched_threshold=math.nan)
    msg = matcher.message("argmax_matcher") if kind else None
    return MatcherConfig(
        matched_threshold=_get(msg, "matched_threshold", float, 0.5),
        unmatched_threshold=_get(msg, "unmatched_threshold", float, 0.5),
        ignore_thresholds=_get(msg, "ignore_thresholds", bool, False),
        negatives_lower_than_unmatched=_get(msg, "negatives_lower_than_unmatched", bool, True),
        force_match_for_each_row=_get(msg, "force_match_for_each_row", bool, False),
    )


def _loss(ssd: TextMessage) -> LossConfig:
    loss = ssd.message("loss")
    if loss is None:
        return LossConfig()
    cls_msg = loss.message("classification_loss")
    cls_kind = cls_msg.oneof(tuple(cls_msg.fields)) if cls_msg is not None else "weighted_sigmoid"
    loc_msg = loss.message("localization_loss")
    loc_kind = loc_msg.oneof(tuple(loc_msg.fields)) if loc_msg is not None else "weighted_smooth_l1"
    focal = cls_msg.message("weighted_sigmoid_focal") if cls_msg is not None else None
    smooth = loc_msg.message("weighted_smooth_l1") if loc_msg is not None else None
    miner = loss.message("hard_example_miner")
    return LossConfig(
        classification=cls_kind or "weighted_sigmoid",
        focal_gamma=_get(focal, "gamma", float, 2.0),
        focal_alpha=_get(focal, "alpha", float, None),
        localization=loc_kind or "weighted_smooth_l1",
        smooth_l1_delta=_get(smooth, "delta", float, 1.0),
        classification_weight=_get(loss, "classification_weight", float, 1.0),
        localization_weight=_get(loss, "localization_weight", float, 1.0),
        hard_example_miner=miner is not None,
        num_hard_examples=_get(miner, "num_hard_examples", int, 64),
        hard_example_iou_threshold=_get(miner, "iou_threshold", float, 0.7),
        hard_example_loss_type=_enum(miner, "loss_type", ("BOTH", "CLASSIFICATION", "LOCALIZATION"), "BOTH"),
        max_negatives_per_positive=_get(miner, "max_negatives_per_positive", int, 0),
        min_negatives_per_image=_get(miner, "min_negatives_per_image", int, 0),
    )


def config_from_dict(data: dict[str, Any]) -> SSDPipelineConfig:
    """Rebuild an `SSDPipelineConfig` from `SSDPipelineConfig.to_dict` output (a ``config.json``)."""
    return _from_dict(SSDPipelineConfig, data, "config")


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise PipelineConfigError(f"{path}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value, f"{path}.{f.name}")
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise PipelineConfigError(f"{path}: unknown fields {sorted(unknown)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise PipelineConfigError(f"{path}: {exc}") from None
