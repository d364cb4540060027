"""Reading and writing weights: Hugging Face directories, our single-file safetensors, Google's TF files.

The one entry point for every format: HF-format files are `hf_checkpoint`'s, TF's are `convert/`'s (pure name
tables, file IO separate). Readers return `(config, state_dict)` and never build a model; the models' `from_*`
methods do that, and `load_state_dict_strict` loads a state dict into a model they built: a missing, unexpected
or wrongly shaped tensor raises `StateDictMismatchError` that lists every one. `pytorch_model.bin` is only ever
read with `torch.load(weights_only=True)`; safetensors is preferred. Every file is written atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import Tensor, nn

from .config import MobileNetV1Config
from .hf_checkpoint import (
    CONFIG_NAME,
    PYTORCH_NAME,
    SAFETENSORS_NAME,
    load_checkpoint,
    load_state_dict_file,
    save_hf_directory,
    save_state_dict_safetensors,
    torch_load_weights_only,
)
from .shapes import check_shapes

__all__ = [
    "CONFIG_NAME",
    "PYTORCH_NAME",
    "SAFETENSORS_NAME",
    "load_any",
    "load_checkpoint",
    "load_state_dict_file",
    "load_state_dict_strict",
    "load_tf",
    "save_checkpoint",
    "save_safetensors",
    "torch_load_weights_only",
]

logger = logging.getLogger(__name__)


def load_tf(path: str | os.PathLike, *, prefer_ema: bool = True) -> tuple[MobileNetV1Config, dict[str, Tensor]]:
    """(config, HF-keyed state dict) from Google's TF release files, read without TensorFlow.

    `path` is a checkpoint prefix (`dir/mobilenet_v1_1.0_224.ckpt`, or its `.index`), a frozen GraphDef (`.pb`) or
    a whole release archive (`mobilenet_v1_<alpha>_<res>[_quant].tgz`; its checkpoint is preferred, its frozen
    graph the fallback). The config is inferred from the tensor shapes, `image_size` from the `_<res>` in the
    name. EMA shadows are used where present unless `prefer_ema=False`. Quantized releases load as the float
    model (see `mnv1_backbone.convert.read_fake_quant_ranges` for their ranges). Raises `FileNotFoundError`,
    `WeightsFormatError` (naming the file and tensor) or `StateDictMismatchError`.
    """
    from .convert.archive import load_tf_release

    release = load_tf_release(path, prefer_ema=prefer_ema)
    return release.config, release.state_dict


def load_any(path: str | os.PathLike, *, prefer_ema: bool = True) -> tuple[MobileNetV1Config, dict[str, Tensor]]:
    """(config, state dict) from any classifier weights we read: an HF directory, our `.safetensors`, a Hub id,
    or Google's TF files (checkpoint prefix, frozen `.pb`, release `.tgz`)."""
    path = Path(path)
    is_hf_dir = path.is_dir() and (path / CONFIG_NAME).is_file()
    if is_hf_dir or path.suffix == ".safetensors":
        return load_checkpoint(path)
    if path.exists() or Path(f"{path}.index").is_file():
        return load_tf(path, prefer_ema=prefer_ema)
    return load_checkpoint(path)  # a Hub id, or a clear "not found"


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Tensor], *, source: str = "state dict") -> None:
    """Load `state_dict` into `model`, raising one error that lists every missing, unexpected or misshapen key.

    `num_batches_tracked` is bookkeeping, not a weight: files without it load, and frozen BatchNorms
    (which have none) accept files with it.
    """
    expected = model.state_dict()
    check_shapes(
        {k: tuple(v.shape) for k, v in expected.items()}, state_dict, source=source, target=type(model).__name__
    )
    loadable = {k: v for k, v in state_dict.items() if k in expected}
    model.load_state_dict(loadable, strict=False)


def save_safetensors(model: nn.Module, path: str | os.PathLike, config: MobileNetV1Config | None = None) -> None:
    """Write `model`'s state dict as one `.safetensors` file, with its config in the metadata if given."""
    save_state_dict_safetensors(model.state_dict(), path, config)


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, *, safe_serialization: bool = True) -> None:
    """Write an HF-format directory of `model` (its `config` and state dict): `config.json` plus
    `model.safetensors` (or `pytorch_model.bin`)."""
    config: MobileNetV1Config = model.config  # type: ignore[assignment]
    save_hf_directory(config, model.state_dict(), directory, safe_serialization=safe_serialization)
