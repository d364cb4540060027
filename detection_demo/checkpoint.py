"""Training checkpoints: atomic writes, random-number-generator states, and the exported `model.safetensors`.

A checkpoint is one `torch.save` file (read back with `weights_only=True`: tensors and plain Python values only)
holding `model`, `optimizer`, `scheduler` and `scaler` state dicts, `epoch` (epochs completed), `global_step`,
`rng` (Python, NumPy and torch generators, CUDA's too when used), `args` (the run's settings), `history` (losses,
learning rates and evaluations so far) and `model_spec` (a `ModelSpec` dict: builder, kwargs, labels).
Runs since distributed training also record `world_size` (processes), `global_batch` (images per optimizer step,
all processes and accumulated micro-batches together), `samples_seen` and `rng_per_rank` (each process's
generators; `rng` is rank 0's); older checkpoints without them read as one process.
Every file is written to a temporary file beside its destination and renamed over it with `os.replace`
(`mnv1_backbone._io.atomic_write`), so an interrupted write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

# The package's writer: temporary file beside the destination, fsync, then os.replace.
from mnv1_backbone._io import atomic_write
from mnv1_backbone.errors import WeightsFormatError
from mnv1_backbone.weights import torch_load_weights_only

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "SAFETENSORS_NAME",
    "capture_rng_state",
    "export_safetensors",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint_last.pt"
SAFETENSORS_NAME = "model.safetensors"
#: Key of the `ModelSpec` JSON in the metadata of the exported safetensors file.
SPEC_METADATA_KEY = "detection_demo.model_spec"
_REQUIRED_KEYS = ("version", "model", "optimizer", "scheduler", "epoch", "global_step", "rng", "args", "history",
                  "model_spec")


def capture_rng_state() -> dict[str, Any]:
    """States of Python's, NumPy's and torch's global generators (and CUDA's), as weights-only-loadable values."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {**numpy_state["state"],
                                           "key": torch.from_numpy(numpy_state["state"]["key"].copy())}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo `capture_rng_state`: the global generators continue exactly where they were captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].numpy()}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write `checkpoint` (see the module docstring for its keys) atomically."""
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))
    logger.info("checkpoint: %s (epoch %d, step %d)", path, checkpoint["epoch"], checkpoint["global_step"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; raise `ValueError` naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only, zip format only: a checkpoint never needs to run code, nor to trust declared sizes.
        checkpoint = torch_load_weights_only(path)
    except WeightsFormatError as error:
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a detection_demo checkpoint (got {type(checkpoint).__name__})")
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a detection_demo checkpoint: it lacks {missing}")
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {checkpoint['version']}, this code reads {CHECKPOINT_VERSION}")
    return checkpoint


def export_safetensors(model: nn.Module, path: str | Path, model_spec: dict[str, Any]) -> None:
    """Write the model's state dict as `.safetensors` (loadable by the builders' `weights=`), spec in the metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", SPEC_METADATA_KEY: json.dumps(model_spec, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    logger.info("weights: %s", path)
