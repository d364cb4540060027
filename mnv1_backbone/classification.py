"""`MobileNetV1Model` and `MobileNetV1ForImageClassification`, with Hugging Face's module tree.

The module names, state-dict keys, outputs (`last_hidden_state`, `pooler_output`, the 26
`hidden_states`) and numerics follow transformers' `modeling_mobilenet_v1.py`, so its checkpoints
load with no renaming. Beyond it: TF-slim's original pooling (`pooling="tf_slim"`: a 7x7, stride 2,
VALID average pool, giving a spatial map of logits on large inputs) and the corrected TF constants
of `MobileNetV1Config`.
"""

import os
from typing import Any, List, NamedTuple, Optional  # noqa: UP035 (TorchScript reads NamedTuple fields only so)

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F

from .backbone import MIN_INPUT_SIZE
from .config import MobileNetV1Config, plan_layers
from .layers import build_trunk, check_input, init_weights

# fx patches wrapped functions per module: keep the input check one opaque call when traced.
torch.fx.wrap("check_input")

__all__ = [
    "ClassifierOutput",
    "MobileNetV1ForImageClassification",
    "MobileNetV1Model",
    "ModelOutput",
    "timm_image_processor",
]


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

    def __call__(self, *args: Any, return_dict: bool | None = None, **kwargs: Any) -> Any:
        """As `nn.Module.__call__`; `return_dict=False` gives transformers' plain tuple (last_hidden_state,
        pooler_output[, hidden_states]). Kept out of `forward` so that TorchScript and torch.export see one
        output type."""
        output = super().__call__(*args, **kwargs)
        return output if return_dict is None or return_dict else _hf_tuple(output[:3])


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

    def __call__(self, *args: Any, return_dict: bool | None = None, **kwargs: Any) -> Any:
        """As `nn.Module.__call__`; `return_dict=False` gives transformers' plain tuple in its order:
        ([loss,] logits[, hidden_states]). Kept out of `forward` so that TorchScript and torch.export see one
        output type."""
        output = super().__call__(*args, **kwargs)
        if return_dict is None or return_dict:
            return output
        return _hf_tuple((output.loss, output.logits, output.hidden_states))

    # --- weights ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **config_overrides) -> "MobileNetV1ForImageClassification":
        """Load an HF-format directory (`config.json` + `model.safetensors` or `pytorch_model.bin`), our
        `.safetensors` file, or a Hub id (through huggingface_hub, when installed). Strict: missing,
        unexpected or wrongly shaped tensors raise `StateDictMismatchError` listing them.

        Returns the model in eval mode, as transformers does (BatchNorm uses its running statistics, dropout is
        off); call `.train()` to fine-tune. A directory's `preprocessor_config.json`, when present, becomes
        `model.image_processor`."""
        from .image_processing import PREPROCESSOR_CONFIG_NAME, MobileNetV1ImageProcessor
        from .weights import load_checkpoint

        config, state_dict = load_checkpoint(path)
        model = cls.from_state_dict(_override(config, config_overrides), _with_prefix(state_dict), source=str(path))
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, PREPROCESSOR_CONFIG_NAME)):
            model.image_processor = MobileNetV1ImageProcessor.from_pretrained(path)
        return model

    @classmethod
    def from_tf(
        cls, path: str | os.PathLike, *, prefer_ema: bool = True, tf_padding: bool = True, **config_overrides
    ) -> "MobileNetV1ForImageClassification":
        """Load Google's TF release weights without TensorFlow, in eval mode (as `from_pretrained`).

        `path` is a checkpoint prefix (`dir/mobilenet_v1_1.0_224.ckpt`), a frozen `.pb` GraphDef, or a release
        archive `mobilenet_v1_<alpha>_<res>[_quant].tgz` (checkpoint preferred, frozen graph as fallback). The
        config is inferred from the tensor shapes. `prefer_ema=False` loads the raw variables instead of their
        ExponentialMovingAverage shadows. A checkpoint does not record its padding: Google's releases use TF's
        SAME padding (`tf_padding=True`); pass `tf_padding=False` for checkpoints trained with TF-slim's
        `use_explicit_padding=True` (symmetric padding, then VALID convolutions). Quantized (`_quant`) releases
        load as the float model; their FakeQuant ranges come from
        `mnv1_backbone.convert.read_fake_quant_ranges(path)`. Raises `WeightsFormatError` naming the file and
        tensor for corrupt, truncated or unsupported files.
        """
        from .weights import load_tf

        config, state_dict = load_tf(path, prefer_ema=prefer_ema, tf_padding=tf_padding)
        return cls.from_state_dict(_override(config, config_overrides), state_dict, source=str(path))

    @classmethod
    def from_timm(
        cls, source: "nn.Module | dict[str, Tensor] | str | os.PathLike", **config_overrides
    ) -> "MobileNetV1ForImageClassification":
        """Load timm's MobileNetV1 (`mobilenetv1_100`, `mobilenetv1_125`), in eval mode.

        `source` is a timm model (e.g. `timm.create_model("mobilenetv1_100", pretrained=True)`), its state dict,
        a file holding one (`.safetensors`, `.pth`), or a Hub id `"timm/mobilenetv1_100.ra4_e3600_r224_in1k"`
        (downloaded only then; a clear error offline). The config: symmetric padding, BatchNorm eps 1e-5, 1000
        ImageNet labels with names and no background class. `model.image_processor` holds timm's evaluation
        preprocessing (bicubic resize to input_size / crop_pct, center crop, mean = std = 0.5), which
        `save_pretrained` writes as `preprocessor_config.json`.
        """
        from .weights import load_timm

        pretrained_cfg = None
        if isinstance(source, nn.Module):
            pretrained_cfg = getattr(source, "pretrained_cfg", None)
            source = source.state_dict()
        weights = load_timm(source, pretrained_cfg=pretrained_cfg)
        name = "timm state dict" if isinstance(source, dict) else str(source)
        model = cls.from_state_dict(_override(weights.config, config_overrides), weights.state_dict, source=name)
        model.image_processor = timm_image_processor(weights.preprocessing)
        return model

    @classmethod
    def from_state_dict(
        cls, config: MobileNetV1Config, state_dict: dict[str, Tensor], *, source: str = "state dict"
    ) -> "MobileNetV1ForImageClassification":
        """The model of `config` with `state_dict` loaded strictly, in eval mode: what every loader returns."""
        from .weights import load_state_dict_strict

        model = cls(config)
        load_state_dict_strict(model, state_dict, source=source)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike, *, safe_serialization: bool = True) -> None:
        """Write `config.json` and `model.safetensors` (or `pytorch_model.bin`) that transformers loads, and
        `preprocessor_config.json` when the model carries an `image_processor` (as `from_timm` sets)."""
        from .weights import save_checkpoint

        save_checkpoint(self, directory, safe_serialization=safe_serialization)
        processor = getattr(self, "image_processor", None)
        if processor is not None:
            processor.save_pretrained(directory)


def _with_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accept a bare `MobileNetV1Model` checkpoint for the classifier too, as transformers does."""
    if any(key.startswith("mobilenet_v1.") for key in state_dict):
        return state_dict
    return {(k if k.startswith("classifier.") else f"mobilenet_v1.{k}"): v for k, v in state_dict.items()}


def _hf_tuple(values: tuple) -> tuple:
    """transformers' `return_dict=False` output: the values that are set, hidden states as a tuple."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in values if v is not None)


def timm_image_processor(settings: dict) -> Any:
    """`MobileNetV1ImageProcessor` with timm's evaluation settings: resize the short side to
    int(input_size / crop_pct) (timm's `scale_size`), center crop input_size, normalise with mean and std."""
    import math

    from .image_processing import MobileNetV1ImageProcessor

    size = int(settings["input_size"])
    resample = {"nearest": 0, "bilinear": 2, "bicubic": 3}.get(str(settings["interpolation"]), 3)
    return MobileNetV1ImageProcessor(
        size={"shortest_edge": math.floor(size / float(settings["crop_pct"]))},
        resample=resample,
        crop_size={"height": size, "width": size},
        image_mean=list(settings["mean"]),
        image_std=list(settings["std"]),
    )


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
