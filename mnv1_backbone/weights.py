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
from typing import Any, NamedTuple

from torch import Tensor, nn

from .config import MobileNetV1Config
from .errors import StateDictMismatchError
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
    "load_timm",
    "TimmWeights",
    "is_timm_file",
    "is_timm_hub_id",
    "save_checkpoint",
    "save_safetensors",
    "torch_load_weights_only",
]

logger = logging.getLogger(__name__)


def load_tf(
    path: str | os.PathLike, *, prefer_ema: bool = True, tf_padding: bool = True
) -> tuple[MobileNetV1Config, dict[str, Tensor]]:
    """(config, HF-keyed state dict) from Google's TF release files, read without TensorFlow.

    `path` is a checkpoint prefix (`dir/mobilenet_v1_1.0_224.ckpt`, or its `.index`), a frozen GraphDef (`.pb`) or
    a whole release archive (`mobilenet_v1_<alpha>_<res>[_quant].tgz`; its checkpoint is preferred, its frozen
    graph the fallback). The config is inferred from the tensor shapes, `image_size` from the `_<res>` in the
    name. EMA shadows are used where present unless `prefer_ema=False`. Quantized releases load as the float
    model (see `mnv1_backbone.convert.read_fake_quant_ranges` for their ranges). Raises `FileNotFoundError`,
    `WeightsFormatError` (naming the file and tensor) or `StateDictMismatchError`.

    A checkpoint does not record its padding: pass `tf_padding=False` for models trained with TF-slim's
    `use_explicit_padding=True` (symmetric padding, then VALID convolutions); Google's releases use SAME (True).
    """
    from .convert.archive import load_tf_release

    release = load_tf_release(path, prefer_ema=prefer_ema, tf_padding=tf_padding)
    return release.config, release.state_dict


class TimmWeights(NamedTuple):
    """What `load_timm` returns: the config, the HF-keyed state dict and timm's evaluation preprocessing
    (`input_size`, `crop_pct`, `interpolation`, `mean`, `std`, as in timm's `pretrained_cfg`)."""

    config: MobileNetV1Config
    state_dict: dict[str, Tensor]
    preprocessing: dict[str, Any]


# timm's Hub repositories carry the weights' tag in their name; a bare architecture name means its only weights.
_TIMM_DEFAULT_TAGS = {"mobilenetv1_100": "ra4_e3600_r224_in1k", "mobilenetv1_125": "ra4_e3600_r224_in1k"}
_TIMM_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def is_timm_hub_id(source: Any) -> bool:
    """`"timm/<name>"` or `"hf-hub:timm/<name>"` (and not a local path)."""
    text = str(source)
    return text.startswith(("timm/", "hf-hub:timm/")) and not Path(text).exists()


def is_timm_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a weights file holding a timm MobileNetV1 state dict (keys are read, tensors are not)."""
    from .convert.timm import is_timm_state_dict

    path = Path(path)
    if not path.is_file() or path.suffix not in _TIMM_SUFFIXES:
        return False
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return is_timm_state_dict(handle.keys())
        except (SafetensorError, OSError):
            return False
    try:
        return is_timm_state_dict(load_state_dict_file(path).keys())
    except (OSError, ValueError):
        return False


def _fetch_timm_hub(source: str) -> tuple[Path, dict[str, Any] | None]:
    """Download a timm Hub repository's weights (and its pretrained_cfg); a clear error when offline."""
    import json

    repo = source.removeprefix("hf-hub:")
    name = repo.split("/", 1)[1]
    if "." not in name and name in _TIMM_DEFAULT_TAGS:
        repo = f"{repo}.{_TIMM_DEFAULT_TAGS[name]}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(
            f"{source!r} is a Hub id and HF_HUB_OFFLINE is set: download {repo}'s model.safetensors elsewhere and "
            "pass the file"
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FileNotFoundError(
            f"{source!r} is a Hub id, and huggingface_hub is not installed to fetch it; `pip install huggingface_hub` "
            "or pass a downloaded model.safetensors"
        ) from None
    try:
        weights = Path(hf_hub_download(repo, "model.safetensors"))
    except Exception as err:  # network, authentication or missing-repo errors from huggingface_hub
        raise FileNotFoundError(
            f"could not fetch {repo!r} from the Hugging Face Hub ({type(err).__name__}: {' '.join(str(err).split())})"
            "; download its model.safetensors elsewhere and pass the file"
        ) from None
    try:
        cfg = json.loads(Path(hf_hub_download(repo, "config.json")).read_text(encoding="utf-8"))
        pretrained_cfg = cfg.get("pretrained_cfg") if isinstance(cfg, dict) else None
    except Exception:  # the preprocessing then falls back to the published weights' settings
        pretrained_cfg = None
    return weights, pretrained_cfg


def load_timm(
    source: str | os.PathLike | dict[str, Tensor], *, pretrained_cfg: dict[str, Any] | None = None
) -> TimmWeights:
    """timm's MobileNetV1 weights (`mobilenetv1_100`, `mobilenetv1_125`) as a config and HF-keyed state dict.

    `source` is a timm state dict, a file holding one (`.safetensors`, or `.pth`/`.bin` read weights-only), or a
    Hub id `"timm/<name>"` (fetched through huggingface_hub only then: offline, a clear error). The config has
    symmetric padding, BatchNorm eps 1e-5, 1000 ImageNet labels (no background class) and timm's input size;
    `preprocessing` holds timm's evaluation settings, from `pretrained_cfg` (a timm model's) when given.
    Raises `StateDictMismatchError` listing the keys or shapes that are not timm's MobileNetV1.
    """
    from .convert.timm import timm_preprocessing, timm_to_hf
    from .labels import imagenet_labels
    from .shapes import classifier_shapes

    if isinstance(source, dict):
        name, state_dict = "timm state dict", source
    elif is_timm_hub_id(source):
        path, hub_cfg = _fetch_timm_hub(str(source))
        name, state_dict = str(source), load_state_dict_file(path)
        pretrained_cfg = pretrained_cfg or hub_cfg
    else:
        name, state_dict = str(source), load_state_dict_file(source)
    try:
        converted, config_kwargs = timm_to_hf(state_dict)
    except StateDictMismatchError as err:
        raise StateDictMismatchError(f"{name}: {err}") from None
    preprocessing = timm_preprocessing(config_kwargs["depth_multiplier"], pretrained_cfg)
    if config_kwargs["num_labels"] == 1000:  # ImageNet-1k, class j at index j: no background class
        config_kwargs["id2label"] = dict(enumerate(imagenet_labels()[1:]))
    config = MobileNetV1Config(**config_kwargs, image_size=int(preprocessing["input_size"]))
    check_shapes(classifier_shapes(config), converted, source=name, target="MobileNetV1ForImageClassification")
    return TimmWeights(config, converted, preprocessing)


def load_any(
    path: str | os.PathLike, *, prefer_ema: bool = True, tf_padding: bool = True
) -> tuple[MobileNetV1Config, dict[str, Tensor]]:
    """(config, state dict) from any classifier weights we read: an HF directory, our `.safetensors`, a Hub id,
    Google's TF files (checkpoint prefix, frozen `.pb`, release `.tgz`; `tf_padding` as in `load_tf`), or timm's
    MobileNetV1 weights (a state-dict file or a `"timm/<name>"` Hub id, see `load_timm`)."""
    if is_timm_hub_id(path) or is_timm_file(path):
        timm = load_timm(path)
        return timm.config, timm.state_dict
    path = Path(path)
    is_hf_dir = path.is_dir() and (path / CONFIG_NAME).is_file()
    if is_hf_dir or path.suffix == ".safetensors":
        return load_checkpoint(path)
    if path.exists() or Path(f"{path}.index").is_file():
        return load_tf(path, prefer_ema=prefer_ema, tf_padding=tf_padding)
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
