"""Hugging Face checkpoint files as `(config, state_dict)`: directories, our single-file safetensors, Hub ids.

`config.json` with `model.safetensors` or `pytorch_model.bin` (read only with `torch.load(weights_only=True)`,
zip format only), and our `.safetensors` files that carry their config in the metadata. Readers return and
writers take `(config, state_dict)`; no model is built here (a config is checked against the tensors with the
shapes it implies, `shapes.classifier_shapes`), so the models' `from_*` methods can use this module and the
converters can write through it. Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._io import atomic_write
from .config import MobileNetV1Config
from .errors import StateDictMismatchError, WeightsFormatError
from .shapes import classifier_shapes, num_elements

__all__ = [
    "CONFIG_NAME",
    "PYTORCH_NAME",
    "SAFETENSORS_NAME",
    "load_checkpoint",
    "load_state_dict_file",
    "save_hf_directory",
    "save_state_dict_safetensors",
    "torch_load_weights_only",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
# Key of the config JSON in the metadata of our single-file safetensors checkpoints.
_CONFIG_METADATA_KEY = "mnv1_backbone.config"
# What torch.serialization._is_zipfile looks for: the local file header signature of a zip archive.
_ZIP_MAGIC = b"PK\x03\x04"
# The line of torch.load's error that says what its weights-only unpickler refused.
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: (.*?)(?:\.\s+Please\b|\.?\n|\.?$)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a `.safetensors` or `.bin` state dict; a corrupt file raises `WeightsFormatError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsFormatError(f"{path} is not a readable safetensors file: {err}") from None
    state_dict = torch_load_weights_only(path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise WeightsFormatError(f"{path} does not hold a state dict of tensors")
    return state_dict


def torch_load_weights_only(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` for files from outside: zip format only, errors that name the file.

    Raises `WeightsFormatError` for the legacy format, corrupt files and pickles that ask to run code (without
    torch's advice to retry with weights_only=False, which for a hostile file means running it).
    """
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != _ZIP_MAGIC:
        # torch.load takes the zip reader exactly when the file starts with a zip local header. Its legacy (pre-1.6)
        # format allocates each storage at the size its pickle declares before reading the data
        # (torch.serialization._legacy_load), so a 1 KB file could reserve gigabytes; the zip reader checks every
        # declared size against its record first.
        raise WeightsFormatError(
            f"{path} could not be read as a weights-only PyTorch file: it is not in torch's zip format (torch.save "
            "since torch 1.6); the legacy format is refused because it allocates the sizes it declares before "
            "checking them. Re-save it with a current torch, or better, as safetensors"
        )
    try:
        # weights_only: never run code from a pickle; a malicious file is refused, not executed.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or hostile pickles
        raise WeightsFormatError(
            f"{path} could not be read as a weights-only PyTorch file: {_torch_load_reason(err)}"
        ) from None


def _torch_load_reason(error: Exception) -> str:
    """torch's reason, minus its advice: for a refused pickle torch suggests retrying with weights_only=False,
    which for a hostile file means running its code. Keep only what was refused."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch colours part of its message
    refused = _UNPICKLER_ERROR.search(text)
    if refused:
        return (
            f"its pickle was refused ({refused.group(1).strip()}); a weights file holds tensors and plain values, "
            "and asks to run no code"
        )
    return " ".join(text.split())


def _safetensors_config(path: Path) -> MobileNetV1Config | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise WeightsFormatError(f"{path} is not a readable safetensors file: {err}") from None
    if _CONFIG_METADATA_KEY not in metadata:
        return None
    try:
        return MobileNetV1Config.from_dict(json.loads(metadata[_CONFIG_METADATA_KEY]))
    except (json.JSONDecodeError, TypeError, ValueError, OverflowError) as err:
        raise WeightsFormatError(f"{path}: the config in its metadata is invalid: {err}") from None
    except RecursionError:
        raise WeightsFormatError(f"{path}: the config in its metadata is nested too deeply to be one") from None


def _resolve_hub(repo_id: str) -> Path:
    """Download a Hub repository's config and weights through huggingface_hub (never in tests)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path, and huggingface_hub is not installed to fetch it from the Hub; "
            "`pip install huggingface_hub` or pass a local directory"
        ) from None
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, PYTORCH_NAME, "*.json"])
        )
    except Exception as err:  # network, authentication or missing-repo errors from huggingface_hub
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}); "
            "download it elsewhere and pass the local directory"
        ) from None


# How many more numbers than its weights file holds a config's model may have. A bare-trunk file whose config still
# names a classifier head is legitimate (HF's MobileNetV1Model writes num_labels=2); a head of 10**9 labels is not.
_CONFIG_SLACK_ELEMENTS = 1 << 22


def _check_config_fits(config: MobileNetV1Config, state_dict: dict[str, Tensor], source: str) -> None:
    """Refuse a config that describes a much larger model than its weights file holds, before building it.

    Building the model allocates what `config.json` declares (num_labels x width floats for the classifier, widths
    from depth_multiplier), so a 500-byte config could ask for terabytes. The model's size comes from the shapes
    the config implies (nothing is built or allocated) and is compared with the file's; exact shapes are checked
    later by the strict loader, which lists every difference.
    """
    try:
        declared = num_elements(classifier_shapes(config))
    except (RuntimeError, TypeError, ValueError, OverflowError) as err:
        raise StateDictMismatchError(f"{source}: its config describes a model that cannot be built: {err}") from None
    held = sum(t.numel() for t in state_dict.values())
    if declared > held + _CONFIG_SLACK_ELEMENTS:
        raise StateDictMismatchError(
            f"{source}: its config describes a model of {declared:,} numbers, but the weights hold only {held:,}; "
            f"the config (num_labels={config.num_labels}, depth_multiplier={config.depth_multiplier}, "
            f"num_channels={config.num_channels}, min_depth={config.min_depth}) does not belong to these weights"
        )


def load_checkpoint(path: str | os.PathLike) -> tuple[MobileNetV1Config, dict[str, Tensor]]:
    """(config, state dict) from an HF directory, our `.safetensors` file, or a Hub id."""
    path = Path(path)
    if not path.exists():
        if _HUB_ID.match(str(path)) and not str(path).startswith((".", "/")):
            path = _resolve_hub(str(path))
        else:
            raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsFormatError(
                f"{path}: a single weights file must be one of ours (.safetensors with its config); "
                "for pytorch_model.bin pass its directory with config.json"
            )
        config = _safetensors_config(path)
        if config is None:
            raise WeightsFormatError(
                f"{path} has no MobileNetV1 config in its metadata; pass the directory holding it and config.json"
            )
        state_dict = load_state_dict_file(path)
        _check_config_fits(config, state_dict, str(path))
        return config, state_dict
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}")
    config = MobileNetV1Config.from_json_file(config_file)
    for name in (SAFETENSORS_NAME, PYTORCH_NAME):
        if (path / name).is_file():
            state_dict = load_state_dict_file(path / name)
            _check_config_fits(config, state_dict, f"{path / name} with {config_file}")
            return config, state_dict
    raise FileNotFoundError(f"{path} has neither {SAFETENSORS_NAME} nor {PYTORCH_NAME}")


def save_state_dict_safetensors(
    state_dict: dict[str, Tensor], path: str | os.PathLike, config: MobileNetV1Config | None = None
) -> None:
    """Write tensors as one `.safetensors` file, with `config` in the metadata if given (our single-file format)."""
    metadata = {"format": "pt"}  # transformers checks this key
    if config is not None:
        metadata[_CONFIG_METADATA_KEY] = json.dumps(config.to_dict(), sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_hf_directory(
    config: MobileNetV1Config,
    state_dict: dict[str, Tensor],
    directory: str | os.PathLike,
    *,
    safe_serialization: bool = True,
) -> None:
    """Write an HF-format directory: `config.json` plus `model.safetensors` (or `pytorch_model.bin`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if safe_serialization:
        save_state_dict_safetensors(state_dict, directory / SAFETENSORS_NAME)
    else:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        atomic_write(directory / PYTORCH_NAME, lambda tmp: torch.save(tensors, tmp))
    config.to_json_file(directory / CONFIG_NAME)
    logger.info("saved %d tensors to %s", len(state_dict), directory)
