"""`MobileNetV1Model` and `MobileNetV1ForImageClassification`, with Hugging Face's module tree.

The module names, state-dict keys, outputs (`last_hidden_state`, `pooler_output`, the 26
`hidden_states`) and numerics follow transformers' `modeling_mobilenet_v1.py`, so its checkpoints
load with no renaming. Beyond it: TF-slim's original pooling (`pooling="tf_slim"`: a 7x7, stride 2,
VALID average pool, giving a spatial map of logits on large inputs) and the corrected TF constants
of `MobileNetV1Config`.
"""

import os
from typing import List, NamedTuple, Optional  # noqa: UP035 (TorchScript reads NamedTuple fields only so)

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F

from .backbone import MIN_INPUT_SIZE
from .config import MobileNetV1Config, plan_layers
from .layers import build_trunk, check_input, init_weights

# fx patches wrapped functions per module: keep the input check one opaque call when traced.
torch.fx.wrap("check_input")

__all__ = ["MobileNetV1ForImageClassification", "MobileNetV1Model", "ModelOutput", "ClassifierOutput"]


class ModelOutput(NamedTuple):
    """What `MobileNetV1Model` returns (HF's `BaseModelOutputWithPoolingAndNoAttention` fields)."""

    last_hidden_state: Tensor
    pooler_output: Optional[Tensor]  # noqa: UP045
    hidden_states: Optional[List[Tensor]]  # noqa: UP006, UP045


class ClassifierOutput(NamedTuple):
    """What `MobileNetV1ForImageClassification` returns.

    `logits` is (B, num_labels), or (B, num_labels, h, w) with TF-slim pooling on inputs larger than
    the 7x7 pooling window covers; `loss` is set when labels are given.
    """

    logits: Tensor
    pooler_output: Tensor
    last_hidden_state: Tensor
    hidden_states: Optional[List[Tensor]]  # noqa: UP006, UP045
    loss: Optional[Tensor]  # noqa: UP045


class TFSlimAvgPool(nn.Module):
    """TF-slim's classifier pooling: average over min(H, 7) x min(W, 7) windows, stride 2, VALID.

    At 224x224 the 7x7 map is pooled to 1x1, the same as global pooling; at 320x320 the 10x10 map
    gives 2x2. (TF-slim `mobilenet_v1`, `global_pool=False`, `_reduced_kernel_size_for_small_input`.)
    """

    def forward(self, x: Tensor) -> Tensor:
        kernel = [min(x.shape[-2], 7), min(x.shape[-1], 7)]
        return F.avg_pool2d(x, kernel, stride=2)


class MobileNetV1Model(nn.Module):
    """The bare MobileNetV1 (stem + 26 layers + pooling), as Hugging Face's `MobileNetV1Model`.

    Args:
        config: architecture; `config.pooling` picks global (HF) or TF-slim pooling.
        add_pooling_layer: compute `pooler_output`.
    """

    def __init__(self, config: MobileNetV1Config | None = None, add_pooling_layer: bool = True) -> None:
        super().__init__()
        config = config if config is not None else MobileNetV1Config()
        self.config = config
        self.num_channels = config.num_channels
        self.min_input_size = MIN_INPUT_SIZE
        plans = plan_layers(config.depth_multiplier, config.min_depth, 32, config.num_channels)
        self.conv_stem, self.layer = build_trunk(
            plans,
            tf_padding=config.tf_padding,
            eps=config.layer_norm_eps,
            momentum=config.batch_norm_momentum,
            activation=config.hidden_act,
        )
        self.num_features = plans[-1].out_channels
        self.global_pool = config.pooling == "global"
        self.pooler: nn.Module | None = None
        if add_pooling_layer:
            self.pooler = nn.AdaptiveAvgPool2d((1, 1)) if self.global_pool else TFSlimAvgPool()
        init_weights(self, config.initializer_range)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> ModelOutput:
        """Args: pixel_values (B, C, H, W), H, W >= 32. Returns `ModelOutput`; pooler_output is (B, C')
        with global pooling, (B, C', h, w) with TF-slim pooling on large inputs."""
        x = check_input(pixel_values, self.num_channels, self.min_input_size)
        x = self.conv_stem(x)
        hidden_states: list[Tensor] = []
        for layer in self.layer:
            x = layer(x)
            if output_hidden_states:
                hidden_states.append(x)
        pooled: Tensor | None = None
        if self.pooler is not None:
            pooled = self.pooler(x)
            if self.global_pool or (pooled.shape[-1] == 1 and pooled.shape[-2] == 1):
                pooled = torch.flatten(pooled, 1)
        return ModelOutput(x, pooled, hidden_states if output_hidden_states else None)


class MobileNetV1ForImageClassification(nn.Module):
    """MobileNetV1 with a dropout + linear classifier, as Hugging Face's model of the same name.

    Google's checkpoints have 1001 classes: index 0 is "background", ImageNet class j is index j + 1.
    """

    def __init__(self, config: MobileNetV1Config | None = None) -> None:
        super().__init__()
        config = config if config is not None else MobileNetV1Config()
        self.config = config
        self.num_labels = config.num_labels
        self.mobilenet_v1 = MobileNetV1Model(config)
        self.dropout = nn.Dropout(config.classifier_dropout_rate)
        num_features = self.mobilenet_v1.num_features
        self.classifier: nn.Module = (
            nn.Linear(num_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        init_weights(self.classifier, config.initializer_range)

    def forward(
        self, pixel_values: Tensor, output_hidden_states: bool = False, labels: Tensor | None = None
    ) -> ClassifierOutput:
        """Args: pixel_values (B, C, H, W) in [-1, 1] for Google's weights; labels (B,) class indices."""
        outputs = self.mobilenet_v1(pixel_values, output_hidden_states)
        pooled = outputs.pooler_output
        assert pooled is not None  # the classifier's model always pools
        features = self.dropout(pooled)
        # Global pooling always gives (B, C); asking for the rank only otherwise keeps torch.fx tracing simple.
        if not self.mobilenet_v1.global_pool and features.dim() == 4:
            # TF-slim applies its 1x1 logits conv at every pooled position; a Linear over channels is the same.
            logits = self.classifier(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            logits = self.classifier(features)
        loss: Tensor | None = None
        if labels is not None:
            if logits.dim() != 2:
                raise ValueError("labels need (B, num_labels) logits; use global pooling or a smaller input")
            loss = F.cross_entropy(logits, labels)
        return ClassifierOutput(logits, pooled, outputs.last_hidden_state, outputs.hidden_states, loss)

    # --- weights ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **config_overrides) -> "MobileNetV1ForImageClassification":
        """Load an HF-format directory (`config.json` + `model.safetensors` or `pytorch_model.bin`), our
        `.safetensors` file, or a Hub id (through huggingface_hub, when installed). Strict: missing,
        unexpected or wrongly shaped tensors raise `StateDictMismatchError` listing them."""
        from .weights import load_checkpoint, load_state_dict_strict

        config, state_dict = load_checkpoint(path)
        config = _override(config, config_overrides)
        model = cls(config)
        load_state_dict_strict(model, _with_prefix(state_dict), source=str(path))
        return model

    @classmethod
    def from_tf(
        cls, path: str | os.PathLike, *, prefer_ema: bool = True, **config_overrides
    ) -> "MobileNetV1ForImageClassification":
        """Load Google's TF release weights without TensorFlow.

        `path` is a checkpoint prefix (`dir/mobilenet_v1_1.0_224.ckpt`), a frozen `.pb` GraphDef, or a release
        archive `mobilenet_v1_<alpha>_<res>[_quant].tgz` (checkpoint preferred, frozen graph as fallback). The
        config is inferred from the tensor shapes. `prefer_ema=False` loads the raw variables instead of their
        ExponentialMovingAverage shadows. Quantized (`_quant`) releases load as the float model; their FakeQuant
        ranges come from `mnv1_backbone.convert.read_fake_quant_ranges(path)`. Raises `WeightsFormatError` naming
        the file and tensor for corrupt, truncated or unsupported files.
        """
        from .weights import load_state_dict_strict, load_tf

        config, state_dict = load_tf(path, prefer_ema=prefer_ema)
        config = _override(config, config_overrides)
        model = cls(config)
        load_state_dict_strict(model, state_dict, source=str(path))
        return model

    def save_pretrained(self, directory: str | os.PathLike, *, safe_serialization: bool = True) -> None:
        """Write `config.json` and `model.safetensors` (or `pytorch_model.bin`) that transformers loads."""
        from .weights import save_checkpoint

        save_checkpoint(self, directory, safe_serialization=safe_serialization)


def _with_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accept a bare `MobileNetV1Model` checkpoint for the classifier too, as transformers does."""
    if any(key.startswith("mobilenet_v1.") for key in state_dict):
        return state_dict
    return {(k if k.startswith("classifier.") else f"mobilenet_v1.{k}"): v for k, v in state_dict.items()}


def _override(config: MobileNetV1Config, overrides: dict) -> MobileNetV1Config:
    if not overrides:
        return config
    data = config.to_dict()
    allowed = {"pooling", "classifier_dropout_prob", "batch_norm_momentum"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"cannot override {unknown} when loading weights; allowed: {sorted(allowed)}")
    data.update(overrides)
    return MobileNetV1Config.from_dict(data)
