"""Map TF-slim MobileNetV1 variable names to Hugging Face ``MobileNetV1ForImageClassification`` keys.

The TF side follows TF-slim's ``nets/mobilenet_v1.py`` (scopes ``Conv2d_0``, ``Conv2d_<k>_depthwise``,
``Conv2d_<k>_pointwise``, ``Logits/Conv2d_1c_1x1``; slim ``batch_norm`` variables ``gamma``, ``beta``,
``moving_mean``, ``moving_variance``). The PyTorch side follows transformers' ``modeling_mobilenet_v1``
(``conv_stem``, ``layer.{0..25}``, ``classifier``), which is also what Hugging Face's own converter
(``convert_original_tf_checkpoint_to_pytorch.py``) produces. Layout changes: TF convolutions are HWIO
and depthwise kernels HW-C-multiplier, PyTorch convolutions are OIHW; the 1x1 logits conv becomes a
``Linear``. The name table is DESIGN.md section 5.

Everything here is a pure dict -> dict function: reading files is `frozen_graph`'s job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from mnv1_backbone.errors import StateDictMismatchError

__all__ = ["RELEASED_DEPTH_MULTIPLIERS", "hf_to_tf_slim", "tf_slim_to_hf"]

logger = logging.getLogger(__name__)


class _Layer(NamedTuple):
    tf_scope: str  # variable scope under the model scope
    hf_prefix: str  # module path in MobileNetV1ForImageClassification
    kind: str  # "conv" (full 3x3), "depthwise" (3x3, one filter per channel) or "pointwise" (1x1)
    base_channels: int  # output channels at depth_multiplier 1.0 (paper Table 1)


# The 27 conv+BN layers in forward order. Block k's depthwise conv is HF layer 2k-2, its pointwise 2k-1.
_LAYERS: tuple[_Layer, ...] = (
    _Layer("Conv2d_0", "mobilenet_v1.conv_stem", "conv", 32),
    _Layer("Conv2d_1_depthwise", "mobilenet_v1.layer.0", "depthwise", 32),
    _Layer("Conv2d_1_pointwise", "mobilenet_v1.layer.1", "pointwise", 64),
    _Layer("Conv2d_2_depthwise", "mobilenet_v1.layer.2", "depthwise", 64),
    _Layer("Conv2d_2_pointwise", "mobilenet_v1.layer.3", "pointwise", 128),
    _Layer("Conv2d_3_depthwise", "mobilenet_v1.layer.4", "depthwise", 128),
    _Layer("Conv2d_3_pointwise", "mobilenet_v1.layer.5", "pointwise", 128),
    _Layer("Conv2d_4_depthwise", "mobilenet_v1.layer.6", "depthwise", 128),
    _Layer("Conv2d_4_pointwise", "mobilenet_v1.layer.7", "pointwise", 256),
    _Layer("Conv2d_5_depthwise", "mobilenet_v1.layer.8", "depthwise", 256),
    _Layer("Conv2d_5_pointwise", "mobilenet_v1.layer.9", "pointwise", 256),
    _Layer("Conv2d_6_depthwise", "mobilenet_v1.layer.10", "depthwise", 256),
    _Layer("Conv2d_6_pointwise", "mobilenet_v1.layer.11", "pointwise", 512),
    _Layer("Conv2d_7_depthwise", "mobilenet_v1.layer.12", "depthwise", 512),
    _Layer("Conv2d_7_pointwise", "mobilenet_v1.layer.13", "pointwise", 512),
    _Layer("Conv2d_8_depthwise", "mobilenet_v1.layer.14", "depthwise", 512),
    _Layer("Conv2d_8_pointwise", "mobilenet_v1.layer.15", "pointwise", 512),
    _Layer("Conv2d_9_depthwise", "mobilenet_v1.layer.16", "depthwise", 512),
    _Layer("Conv2d_9_pointwise", "mobilenet_v1.layer.17", "pointwise", 512),
    _Layer("Conv2d_10_depthwise", "mobilenet_v1.layer.18", "depthwise", 512),
    _Layer("Conv2d_10_pointwise", "mobilenet_v1.layer.19", "pointwise", 512),
    _Layer("Conv2d_11_depthwise", "mobilenet_v1.layer.20", "depthwise", 512),
    _Layer("Conv2d_11_pointwise", "mobilenet_v1.layer.21", "pointwise", 512),
    _Layer("Conv2d_12_depthwise", "mobilenet_v1.layer.22", "depthwise", 512),
    _Layer("Conv2d_12_pointwise", "mobilenet_v1.layer.23", "pointwise", 1024),
    _Layer("Conv2d_13_depthwise", "mobilenet_v1.layer.24", "depthwise", 1024),
    _Layer("Conv2d_13_pointwise", "mobilenet_v1.layer.25", "pointwise", 1024),
)

# Kernel variable name per kind (slim names the depthwise kernel differently).
_KERNEL_NAME = {"conv": "weights", "depthwise": "depthwise_weights", "pointwise": "weights"}
_KERNEL_SIZE = {"conv": 3, "depthwise": 3, "pointwise": 1}

# slim batch_norm variable -> torch BatchNorm2d parameter/buffer.
_BATCH_NORM = (
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
)

_LOGITS_SCOPE = "Logits/Conv2d_1c_1x1"
_EMA_SUFFIX = "/ExponentialMovingAverage"

RELEASED_DEPTH_MULTIPLIERS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
_DEFAULT_MIN_DEPTH = 8  # TF-slim's and HF's default

# Training-only variables found in checkpoints: optimizer slots (e.g. "<var>/RMSProp_1") and the step.
_SLOT_RE = re.compile(r"/(RMSProp|Momentum|Adam|Adagrad|AdagradDA|Adadelta|Ftrl|Nadam|Adamax)(_\d+)?$")
# Quantization-aware training adds FakeQuant ranges that a float model does not need.
_QUANT_RE = re.compile(r"/(weights_quant|act_quant)/(min|max)$")


def _channels(base: int, depth_multiplier: float, min_depth: int) -> int:
    """TF-slim's ``depth()``: truncate, then clamp (no rounding to a multiple of 8 in V1)."""
    return max(int(base * depth_multiplier), min_depth)


def _as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns its memory, so the output never aliases the caller's arrays."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return torch.tensor(np.asarray(value))


def _clean_name(name: str) -> str:
    # Names copied from TF variables carry an output index (":0"); graph Const names do not.
    return name[:-2] if name.endswith(":0") else name


class _Lookup:
    """Resolves slim variable names, preferring EMA shadows, and records what was consumed."""

    def __init__(self, tensors: Mapping[str, np.ndarray | torch.Tensor], scope: str, prefer_ema: bool) -> None:
        self.tensors: dict[str, np.ndarray | torch.Tensor] = {}
        for key, value in tensors.items():
            self.tensors[_clean_name(key)] = value
        self.scope = scope.rstrip("/")
        self.prefer_ema = prefer_ema
        self.used: set[str] = set()
        self.superseded: set[str] = set()
        self.ema_used = 0

    def get(self, var: str) -> torch.Tensor | None:
        raw = f"{self.scope}/{var}"
        ema = raw + _EMA_SUFFIX
        order = (ema, raw) if self.prefer_ema else (raw, ema)
        found = [name for name in order if name in self.tensors]
        if not found:
            return None
        # The fallback (EMA when prefer_ema=False, raw otherwise) still beats "missing".
        chosen = found[0]
        self.used.add(chosen)
        self.superseded.update(found[1:])
        if chosen.endswith(_EMA_SUFFIX):
            self.ema_used += 1
        return _as_tensor(self.tensors[chosen])

    def has(self, var: str) -> bool:
        raw = f"{self.scope}/{var}"
        return raw in self.tensors or raw + _EMA_SUFFIX in self.tensors

    def log_leftovers(self) -> None:
        """Log, by category, what was not mapped (the brief: ignore these, but say so)."""
        categories: dict[str, list[str]] = {
            "superseded EMA/raw duplicates": [],
            "optimizer slots": [],
            "global_step": [],
            "quantization ranges": [],
            "'/read' names": [],
            "outside the scope": [],
            "unrecognised inside the scope": [],
        }
        prefix = self.scope + "/"
        for name in self.tensors:
            if name in self.used:
                continue
            if name in self.superseded:
                key = "superseded EMA/raw duplicates"
            elif _SLOT_RE.search(name):
                key = "optimizer slots"
            elif name == "global_step" or name.endswith("/global_step"):
                key = "global_step"
            elif _QUANT_RE.search(name):
                key = "quantization ranges"
            elif name.endswith("/read"):
                key = "'/read' names"
            elif not name.startswith(prefix):
                key = "outside the scope"
            else:
                # e.g. frozen-graph helper Consts such as ".../batchnorm/add/y" (the BN epsilon)
                key = "unrecognised inside the scope"
            categories[key].append(name)
        logger.info("TF-slim -> HF: mapped %d tensors (%d from EMA shadows)", len(self.used), self.ema_used)
        for key, names in categories.items():
            if names:
                logger.info("TF-slim -> HF: ignored %d %s, e.g. %s", len(names), key, sorted(names)[:5])
                logger.debug("TF-slim -> HF: all ignored %s: %s", key, sorted(names))


def _infer_width(observed: list[int]) -> tuple[float, int | None] | None:
    """Find (depth_multiplier, min_depth or None when it cannot be told) reproducing every layer's channels.

    Released multipliers are tried first. Otherwise the multiplier lies in [o / c, (o + 1) / c) for
    every unclamped layer (o observed, c table channels), so the largest such ratio reproduces them
    all; as the clamped layers are not known in advance, every ratio is tried, largest first, each
    first rounded to two decimals (0.2 rather than 0.19921875) and then exact.
    """
    bases = [layer.base_channels for layer in _LAYERS]
    ratios = sorted({o / b for o, b in zip(observed, bases, strict=True) if o > 0}, reverse=True)
    candidates: list[float] = []
    for alpha in (*RELEASED_DEPTH_MULTIPLIERS, *(round(r, 2) for r in ratios), *ratios):
        if alpha > 0 and alpha not in candidates:
            candidates.append(alpha)
    for alpha in candidates:
        raw = [int(b * alpha) for b in bases]
        clamped = {o for o, r in zip(observed, raw, strict=True) if o != r}
        if not clamped:
            # No layer shows the clamp: any min_depth <= the smallest layer reproduces the model.
            return alpha, (None if min(raw) >= _DEFAULT_MIN_DEPTH else min(raw))
        if len(clamped) == 1:
            min_depth = clamped.pop()
            if all(o == _channels(b, alpha, min_depth) for o, b in zip(observed, bases, strict=True)):
                return alpha, min_depth
    return None


def _check_kernel(name: str, kind: str, shape: tuple[int, ...]) -> str | None:
    """Return a problem description when a slim kernel has the wrong layout, else None."""
    k = _KERNEL_SIZE[kind]
    if len(shape) != 4 or shape[0] != k or shape[1] != k:
        return f"{name}: shape {list(shape)}, expected [{k}, {k}, in, out]"
    if kind == "depthwise" and shape[3] != 1:
        return f"{name}: shape {list(shape)}, expected a depthwise kernel [3, 3, C, 1] (channel multiplier 1)"
    return None


def tf_slim_to_hf(
    tensors: Mapping[str, np.ndarray | torch.Tensor],
    *,
    prefer_ema: bool = True,
    scope: str = "MobilenetV1",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Convert TF-slim MobileNetV1 variables to a ``MobileNetV1ForImageClassification`` state dict.

    ``tensors`` maps slim names (``"MobilenetV1/Conv2d_0/weights"``, from a frozen graph or a
    checkpoint; a trailing ``":0"`` is accepted) to arrays. ``<name>/ExponentialMovingAverage``
    shadows are used when present and ``prefer_ema`` is true. Names outside ``scope``, optimizer
    slots, ``global_step`` and quantization ranges are ignored (logged). A missing ``gamma``
    (slim ``scale=False``) becomes ones.

    Returns ``(state_dict, config_kwargs)``: ``config_kwargs`` holds ``depth_multiplier`` and
    ``num_labels`` (0, with no ``classifier.*`` keys, when the checkpoint has no logits layer),
    plus ``min_depth`` only when the channel counts reveal it and ``num_channels`` only when the
    input is not RGB. Raises `StateDictMismatchError` (a `WeightsFormatError`) listing every
    missing tensor and wrong shape.
    """
    lookup = _Lookup(tensors, scope, prefer_ema)
    missing: list[str] = []
    problems: list[str] = []
    state: dict[str, torch.Tensor] = {}
    observed: list[int] = []
    prev_out: int | None = None
    num_channels = 3

    for layer in _LAYERS:
        kernel_name = f"{layer.tf_scope}/{_KERNEL_NAME[layer.kind]}"
        kernel = lookup.get(kernel_name)
        out_channels: int | None = None
        if kernel is None:
            missing.append(f"{lookup.scope}/{kernel_name}")
        elif (problem := _check_kernel(f"{lookup.scope}/{kernel_name}", layer.kind, tuple(kernel.shape))) is not None:
            problems.append(problem)
        elif not kernel.is_floating_point():
            problems.append(f"{lookup.scope}/{kernel_name}: dtype {kernel.dtype}, expected floating point")
        else:
            in_channels = kernel.shape[2]
            out_channels = in_channels if layer.kind == "depthwise" else kernel.shape[3]
            if layer.kind == "conv":
                num_channels = in_channels
            elif prev_out is not None and in_channels != prev_out:
                problems.append(
                    f"{lookup.scope}/{kernel_name}: {in_channels} input channels, but the previous "
                    f"layer has {prev_out} outputs"
                )
            if layer.kind == "depthwise":
                # HWC1 -> C1HW: PyTorch's grouped conv keeps one 1-channel filter per group.
                weight = kernel.permute(2, 3, 0, 1)
            else:
                # HWIO -> OIHW
                weight = kernel.permute(3, 2, 0, 1)
            state[f"{layer.hf_prefix}.convolution.weight"] = weight.contiguous()
        prev_out = out_channels
        observed.append(out_channels if out_channels is not None else -1)

        for slim_name, torch_name in _BATCH_NORM:
            var = f"{layer.tf_scope}/BatchNorm/{slim_name}"
            value = lookup.get(var)
            if value is None:
                if slim_name == "gamma" and out_channels is not None and lookup.has(f"{layer.tf_scope}/BatchNorm/beta"):
                    # slim batch_norm(scale=False) creates no gamma; the layer then scales by 1.
                    value = torch.ones(out_channels, dtype=state[f"{layer.hf_prefix}.convolution.weight"].dtype)
                else:
                    missing.append(f"{lookup.scope}/{var}")
                    continue
            if out_channels is not None and tuple(value.shape) != (out_channels,):
                problems.append(f"{lookup.scope}/{var}: shape {list(value.shape)}, expected [{out_channels}]")
                continue
            state[f"{layer.hf_prefix}.normalization.{torch_name}"] = value.contiguous()
        state[f"{layer.hf_prefix}.normalization.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)

    num_labels = 0
    weights_var, biases_var = f"{_LOGITS_SCOPE}/weights", f"{_LOGITS_SCOPE}/biases"
    if lookup.has(weights_var) or lookup.has(biases_var):
        weights, biases = lookup.get(weights_var), lookup.get(biases_var)
        if weights is None:
            missing.append(f"{lookup.scope}/{weights_var}")
        if biases is None:
            missing.append(f"{lookup.scope}/{biases_var}")
        if weights is not None and biases is not None:
            shape = tuple(weights.shape)
            if len(shape) != 4 or shape[:2] != (1, 1) or (prev_out is not None and shape[2] != prev_out):
                problems.append(f"{lookup.scope}/{weights_var}: shape {list(shape)}, expected [1, 1, {prev_out}, N]")
            elif tuple(biases.shape) != (shape[3],):
                problems.append(f"{lookup.scope}/{biases_var}: shape {list(biases.shape)}, expected [{shape[3]}]")
            else:
                num_labels = int(shape[3])
                # A 1x1 conv over the pooled map is a Linear: [1, 1, C, N] -> [N, C].
                state["classifier.weight"] = weights[0, 0].t().contiguous()
                state["classifier.bias"] = biases.contiguous()

    if missing or problems:
        lines = []
        if missing:
            lines.append(
                f"{len(missing)} required tensor(s) missing under scope {lookup.scope!r}: {', '.join(missing)}"
            )
        lines.extend(problems)
        if any("/BatchNorm/" in m for m in missing) and lookup.has("Conv2d_0/biases"):
            lines.append(
                "the convolutions have biases instead of BatchNorm: batch norm was folded into them "
                "(e.g. by a TFLite/optimize_for_inference export), which this mapping does not undo"
            )
        present = sorted(n for n in lookup.tensors if n.startswith(lookup.scope + "/"))
        if not present:
            lines.append(
                f"no tensor name starts with {lookup.scope + '/'!r}; is the scope right? "
                f"Names seen: {sorted(lookup.tensors)[:5]}"
            )
        raise StateDictMismatchError("TF-slim MobileNetV1 weights do not fit: " + "; ".join(lines))

    width = _infer_width(observed)
    if width is None:
        table = ", ".join(f"{layer.tf_scope}={obs}" for layer, obs in zip(_LAYERS, observed, strict=True))
        raise StateDictMismatchError(
            "TF-slim MobileNetV1 channel counts match no depth_multiplier/min_depth (channels = "
            f"max(int(c * depth_multiplier), min_depth) for c in 32, 64, ..., 1024): {table}"
        )
    depth_multiplier, min_depth = width
    config: dict[str, Any] = {"depth_multiplier": float(depth_multiplier), "num_labels": num_labels}
    if min_depth is not None:
        config["min_depth"] = min_depth
    if num_channels != 3:
        config["num_channels"] = num_channels
    lookup.log_leftovers()
    return state, config


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        return value.numpy().copy()
    return np.array(value, copy=True)


def hf_to_tf_slim(
    state_dict: Mapping[str, torch.Tensor | np.ndarray], *, scope: str = "MobilenetV1"
) -> dict[str, np.ndarray]:
    """Inverse of `tf_slim_to_hf`: HF MobileNetV1 keys -> TF-slim names and layouts (numpy arrays).

    Accepts ``MobileNetV1ForImageClassification`` keys or the bare ``MobileNetV1Model`` keys (no
    ``mobilenet_v1.`` prefix). ``classifier.*`` becomes ``Logits/Conv2d_1c_1x1`` when present;
    ``num_batches_tracked`` has no slim counterpart and is dropped. Always writes ``gamma``.
    """
    scope = scope.rstrip("/")
    keys = dict(state_dict)
    if not any(k.startswith("mobilenet_v1.") for k in keys):
        keys = {(k if k.startswith("classifier.") else f"mobilenet_v1.{k}"): v for k, v in keys.items()}
    out: dict[str, np.ndarray] = {}
    missing: list[str] = []

    def take(key: str) -> np.ndarray | None:
        if key not in keys:
            missing.append(key)
            return None
        return _as_numpy(keys[key])

    for layer in _LAYERS:
        weight = take(f"{layer.hf_prefix}.convolution.weight")
        if weight is not None:
            # OIHW -> HWIO, and C1HW -> HWC1 for depthwise (the same axis order, read backwards).
            kernel = weight.transpose(2, 3, 0, 1) if layer.kind == "depthwise" else weight.transpose(2, 3, 1, 0)
            out[f"{scope}/{layer.tf_scope}/{_KERNEL_NAME[layer.kind]}"] = np.ascontiguousarray(kernel)
        for slim_name, torch_name in _BATCH_NORM:
            value = take(f"{layer.hf_prefix}.normalization.{torch_name}")
            if value is not None:
                out[f"{scope}/{layer.tf_scope}/BatchNorm/{slim_name}"] = value
    if "classifier.weight" in keys:
        weight = take("classifier.weight")
        bias = take("classifier.bias")
        if weight is not None:
            out[f"{scope}/{_LOGITS_SCOPE}/weights"] = np.ascontiguousarray(weight.T[np.newaxis, np.newaxis])
        if bias is not None:
            out[f"{scope}/{_LOGITS_SCOPE}/biases"] = bias
    if missing:
        raise StateDictMismatchError(f"HF MobileNetV1 state dict lacks {len(missing)} key(s): {', '.join(missing)}")
    return out
