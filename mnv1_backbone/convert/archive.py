"""Google's MobileNetV1 releases as a whole: open any release file, map it to our model, convert it to HF's format.

TF-slim's model zoo ships ``mobilenet_v1_<alpha>_<res>[_quant].tgz`` archives holding a name-based V2 checkpoint
(``<name>.ckpt.index`` + ``<name>.ckpt.data-00000-of-00001``), a frozen GraphDef (``<name>_frozen.pb``), a
``.tflite`` and text files (DESIGN.md section 5). `read_tf_weights` accepts the archive, a checkpoint prefix (or
its ``.index`` or a data file, or a directory holding one checkpoint) or a frozen ``.pb``, and returns the raw TF
tensors. From an archive it prefers the checkpoint (it has the EMA shadows the frozen graph was exported from, and
the raw weights besides) and falls back to the frozen graph; a ``.tflite`` alone is not supported. Archives are
read with `tarfile` into a temporary directory that is removed afterwards: only regular files that look like
weights are written, under their base name, and a member with an absolute path, a ``..`` component or a link
type, or an oversized one, makes the whole archive refused.

`load_tf_release` maps the tensors through `tf_slim_to_hf` (config inferred from shapes, EMA shadows preferred
unless ``prefer_ema=False``) and takes the input resolution from the file name (``..._<res>[_quant]...``).
`convert` writes an HF-format directory that transformers loads unchanged.

Quantization-aware ("_quant") releases keep float weights and unfolded BatchNorm variables beside FakeQuant ranges
(``<layer>/weights_quant/{min,max}``, ``<layer>/act_quant/{min,max}``): the float model loads from them, and
`fake_quant_ranges` / `read_fake_quant_ranges` return the ranges. Files whose BatchNorm was folded into the
convolutions (``BatchNorm_Fold`` / ``*_fold`` / ``correction`` tensors instead of the ``BatchNorm/*`` variables)
are refused with a `WeightsFormatError` saying so: un-folding them is not supported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import torch

from mnv1_backbone.convert.checkpoint import TFCheckpoint, checkpoint_prefix
from mnv1_backbone.convert.frozen_graph import read_frozen_graph
from mnv1_backbone.convert.tf_slim import _LAYERS, _LOGITS_SCOPE, tf_slim_to_hf
from mnv1_backbone.errors import StateDictMismatchError, WeightsFormatError

__all__ = [
    "ConversionReport",
    "FakeQuantRange",
    "TFRelease",
    "TFWeights",
    "convert",
    "convert_with_report",
    "extract_release_archive",
    "fake_quant_ranges",
    "image_size_from_name",
    "load_tf_release",
    "read_fake_quant_ranges",
    "read_tf_weights",
]

logger = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")
# Members worth extracting: checkpoint index and data shards, GraphDefs. Everything else (.tflite, .meta,
# .pbtxt, _info.txt) is skipped.
_WEIGHT_MEMBER = re.compile(r"(\.index|\.data-\d{5}-of-\d{5}|\.pb)$")
# A MobileNetV1 release's largest file is ~17 MB; anything far larger is not one (or is a decompression bomb).
_MAX_MEMBER_BYTES = 1 << 30
_MAX_ARCHIVE_BYTES = 4 << 30

# Tensors that only exist when BatchNorm was folded into the convolution (TF's contrib/quantize fold_batch_norms
# scopes and ops, and folded-constant exports).
_FOLDED_BN = re.compile(r"(BatchNorm_Fold|_Fold/|/(mul|add|bias|correction\w*)_fold\b|/correction\w*)", re.IGNORECASE)
_FAKE_QUANT = re.compile(r"^(?P<layer>.+)/(?P<kind>weights_quant|act_quant)/(?P<end>min|max)$")
_EMA_SUFFIX = "/ExponentialMovingAverage"
# Google's float releases' canonical resolution, and MobileNetV1Config's default.
_DEFAULT_IMAGE_SIZE = 224


class TFWeights(NamedTuple):
    """Raw TF tensors and where they came from.

    ``kind`` is ``"checkpoint"``, ``"frozen graph"``, ``"archive checkpoint"`` or ``"archive frozen graph"``;
    ``file`` is the checkpoint prefix or ``.pb`` read (inside the archive: the member's name); ``image_size`` the
    resolution in the file names, if any.
    """

    source: Path
    kind: str
    file: str
    tensors: dict[str, np.ndarray]
    image_size: int | None


class TFRelease(NamedTuple):
    """`TFWeights` mapped to our model: ``config`` (a `MobileNetV1Config`) and an HF-keyed ``state_dict``."""

    weights: TFWeights
    config: Any
    state_dict: dict[str, torch.Tensor]


class FakeQuantRange(NamedTuple):
    """A FakeQuant range; ``module`` is the HF module of its layer (e.g. ``"mobilenet_v1.layer.0"``,
    ``"classifier"``), None when the layer is not one of MobileNetV1's."""

    min: float
    max: float
    module: str | None


def image_size_from_name(name: str) -> int | None:
    """The resolution in a release file name, ``mobilenet_v1_<alpha>_<res>[_quant]`` with any of the release
    suffixes (``.tgz``, ``.ckpt``, ``.ckpt.index``, ``.ckpt.data-*``, ``_frozen.pb``); None when absent."""
    stem = re.sub(r"\.data-\d{5}-of-\d{5}$", "", PurePosixPath(name).name)
    for suffix in (".tar.gz", ".tgz", ".tar", ".index", ".pb", ".ckpt", "_frozen", "_quant"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    match = re.search(r"_(\d{2,4})$", stem)
    if match is None or not 32 <= int(match.group(1)) <= 4096:
        return None
    return int(match.group(1))


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def _check_member_name(archive: Path, name: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise WeightsFormatError(f"{archive}: refusing an archive with an unsafe member path {name!r}")


def _open_tar(archive: Path) -> tarfile.TarFile:
    """Open a plain, gzip- or bzip2-compressed tar. Not ``"r:*"``: that also accepts xz and lzma, whose header sets
    the decoder's dictionary size (up to 4 GiB, allocated up front), so a 60-byte file could claim gigabytes."""
    with open(archive, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\xfd7zXZ\x00"):
        raise WeightsFormatError(
            f"{archive}: xz-compressed archives are not supported (their header sizes the decoder's memory "
            "before any data is checked); Google's releases are gzip-compressed .tgz files"
        )
    mode = "r:gz" if magic.startswith(b"\x1f\x8b") else "r:bz2" if magic.startswith(b"BZh") else "r:"
    return tarfile.open(archive, mode)


def extract_release_archive(archive: str | os.PathLike[str], destination: str | os.PathLike[str]) -> list[Path]:
    """Extract the weight files (checkpoint index and shards, ``.pb``) of a release archive into ``destination``.

    Files are written flat, under their base names, and only regular files are written. An absolute or ``..``
    member path, a duplicate base name, or a member over 1 GiB raises `WeightsFormatError`; links and devices
    among the weight files are refused too. Returns the written paths.
    """
    archive = Path(archive)
    destination = Path(destination)
    written: list[Path] = []
    total = 0
    try:
        tar = _open_tar(archive)
    except FileNotFoundError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise WeightsFormatError(f"{archive}: not a readable tar archive: {err}") from None
    member_name = "<archive header>"
    try:
        with tar:
            for member in tar:
                member_name = member.name
                _check_member_name(archive, member.name)
                base = PurePosixPath(member.name.replace("\\", "/")).name
                if not _WEIGHT_MEMBER.search(base):
                    continue
                if not member.isfile():
                    raise WeightsFormatError(
                        f"{archive}: member {member.name!r} is a link or special file, not a regular file; refused"
                    )
                if member.size > _MAX_MEMBER_BYTES or total + member.size > _MAX_ARCHIVE_BYTES:
                    raise WeightsFormatError(
                        f"{archive}: member {member.name!r} is {member.size} bytes, too large for a MobileNetV1 "
                        "release; refused"
                    )
                target = destination / base
                if target.exists():
                    raise WeightsFormatError(f"{archive}: two members are named {base!r}; cannot tell which to use")
                stream = tar.extractfile(member)
                if stream is None:  # pragma: no cover - isfile() members always have data
                    continue
                with stream, open(target, "xb") as out:
                    shutil.copyfileobj(stream, out)
                if target.stat().st_size != member.size:
                    raise WeightsFormatError(f"{archive}: member {member.name!r} is truncated")
                total += member.size
                written.append(target)
    except WeightsFormatError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise WeightsFormatError(
            f"{archive}: the archive is corrupt or truncated (at member {member_name!r}): {err}"
        ) from None
    return written


def _read_directory(directory: Path, *, source: Path, archive_kind: str) -> tuple[str, str, dict[str, np.ndarray]]:
    """(kind, file, tensors) from a directory holding a release's files: the checkpoint if any, else the
    frozen graph."""
    indexes = sorted(directory.glob("*.index"))
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise WeightsFormatError(f"{source}: holds several checkpoints ({names}); pass one prefix")
    if indexes:
        prefix = indexes[0].with_suffix("")
        return f"{archive_kind}checkpoint", prefix.name, TFCheckpoint(prefix).read_all()
    graphs = sorted(directory.glob("*.pb"))
    frozen = [p for p in graphs if p.name.endswith("_frozen.pb")] or graphs
    if len(frozen) > 1:
        names = ", ".join(p.name for p in frozen)
        raise WeightsFormatError(f"{source}: holds several GraphDefs ({names}) and no checkpoint; pass one .pb")
    if frozen:
        return f"{archive_kind}frozen graph", frozen[0].name, read_frozen_graph(frozen[0])
    raise WeightsFormatError(
        f"{source}: holds neither a TF checkpoint (.index + .data-*) nor a frozen GraphDef (.pb); a .tflite "
        "file alone is not supported"
    )


def read_tf_weights(path: str | os.PathLike[str]) -> TFWeights:
    """Raw tensors ``{TF name: numpy array}`` of a release archive, checkpoint or frozen graph (see module doc)."""
    path = Path(path)
    if not path.exists() and (_is_archive(path) or path.suffix == ".pb"):
        raise FileNotFoundError(f"TF weights file not found: {path}")
    if path.is_file() and _is_archive(path):
        with tempfile.TemporaryDirectory(prefix="mnv1_tf_release_") as tmp:
            extract_release_archive(path, tmp)
            try:
                kind, file, tensors = _read_directory(Path(tmp), source=path, archive_kind="archive ")
            except WeightsFormatError as err:
                # The message names the extracted file, gone once this returns: name the archive and the member.
                message = str(err).replace(tmp + os.sep, "")
                raise type(err)(message if message.startswith(str(path)) else f"{path}: {message}") from None
        image_size = image_size_from_name(path.name) or image_size_from_name(file)
        return TFWeights(path, kind, file, tensors, image_size)
    if path.is_file() and path.suffix == ".pb":
        return TFWeights(path, "frozen graph", str(path), read_frozen_graph(path), image_size_from_name(path.name))
    if path.is_dir() and not any(path.glob("*.index")):
        kind, file, tensors = _read_directory(path, source=path, archive_kind="")
        return TFWeights(path, kind, str(path / file), tensors, image_size_from_name(file))
    if path.is_file() and not (path.name.endswith(".index") or re.search(r"\.data-\d{5}-of-\d{5}$", path.name)):
        raise WeightsFormatError(
            f"{path}: not a TF release file; expected a checkpoint prefix (or its .index), a frozen GraphDef "
            "(.pb) or a release archive (.tgz)"
        )
    prefix = checkpoint_prefix(path)  # FileNotFoundError when there is no <prefix>.index
    tensors = TFCheckpoint(prefix).read_all()
    return TFWeights(path, "checkpoint", str(prefix), tensors, image_size_from_name(prefix.name))


def _folded_names(tensors: Mapping[str, Any]) -> list[str]:
    return sorted(name for name in tensors if _FOLDED_BN.search(name))


def load_tf_release(
    path: str | os.PathLike[str], *, prefer_ema: bool = True, scope: str = "MobilenetV1", tf_padding: bool = True
) -> TFRelease:
    """Read any TF release file (`read_tf_weights`) and map it to a config and HF-keyed state dict.

    The config's ``image_size`` comes from the file name when it carries one; ``tf_padding=False`` for models
    trained with TF-slim's ``use_explicit_padding=True`` (a checkpoint does not record its padding). Raises
    `WeightsFormatError` naming the file for unreadable files, and `StateDictMismatchError` listing missing or
    misshapen tensors.
    """
    from mnv1_backbone.config import MobileNetV1Config

    weights = read_tf_weights(path)
    source = weights.source if weights.kind.startswith("archive") else weights.file
    try:
        state_dict, config_kwargs = tf_slim_to_hf(weights.tensors, prefer_ema=prefer_ema, scope=scope)
    except StateDictMismatchError as err:
        folded = _folded_names(weights.tensors)
        if folded:
            raise WeightsFormatError(
                f"{source}: the BatchNorm of this (quantization-aware) model is folded into its convolutions "
                f"({len(folded)} tensors such as {folded[:3]}) and the BatchNorm variables are missing; loading "
                "folded BatchNorm is not supported yet. Use the float release, or a checkpoint that keeps "
                f"<layer>/BatchNorm/{{gamma,beta,moving_mean,moving_variance}}. Details: {err}"
            ) from None
        raise StateDictMismatchError(f"{source}: {err}") from None
    except WeightsFormatError as err:
        raise WeightsFormatError(f"{source}: {err}") from None
    folded = _folded_names(weights.tensors)
    if folded:
        logger.info(
            "%s: ignored %d BatchNorm-folding tensors (the unfolded BatchNorm variables are used)", source, len(folded)
        )
    ranges = sum(1 for name in weights.tensors if _FAKE_QUANT.match(name))
    if ranges:
        logger.info(
            "%s: holds %d FakeQuant min/max tensors; the float model was loaded, read the ranges with "
            "read_fake_quant_ranges()",
            source,
            ranges,
        )
    if weights.image_size is not None:
        config_kwargs["image_size"] = weights.image_size
    config_kwargs["tf_padding"] = bool(tf_padding)
    return TFRelease(weights, MobileNetV1Config(**config_kwargs), state_dict)


def _hf_module(layer_scope: str) -> str | None:
    if layer_scope == _LOGITS_SCOPE:
        return "classifier"
    for layer in _LAYERS:
        if layer.tf_scope == layer_scope:
            return layer.hf_prefix
    return None


def _scalar(name: str, value: Any) -> float:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "fiu":
        raise WeightsFormatError(f"FakeQuant range {name!r} is not one number: {array.dtype} {list(array.shape)}")
    return float(array.reshape(()))


def fake_quant_ranges(
    tensors: Mapping[str, Any], *, prefer_ema: bool = True, scope: str = "MobilenetV1"
) -> dict[str, FakeQuantRange]:
    """The FakeQuant ranges among TF tensors, keyed by their scope (``"MobilenetV1/Conv2d_0/weights_quant"``,
    ``".../act_quant"``). ``<name>/ExponentialMovingAverage`` shadows are used when present and ``prefer_ema``.

    A ``min`` without its ``max`` (or the reverse), a non-scalar or ``min > max`` raises `WeightsFormatError`.
    """
    cleaned = {(k[:-2] if k.endswith(":0") else k): v for k, v in tensors.items()}
    prefix = scope.rstrip("/") + "/"
    found: dict[str, dict[str, float]] = {}
    for base in sorted({n[: -len(_EMA_SUFFIX)] if n.endswith(_EMA_SUFFIX) else n for n in cleaned}):
        match = _FAKE_QUANT.match(base)
        if match is None:
            continue
        order = (base + _EMA_SUFFIX, base) if prefer_ema else (base, base + _EMA_SUFFIX)
        chosen = next(n for n in order if n in cleaned)
        key = f"{match.group('layer')}/{match.group('kind')}"
        found.setdefault(key, {})[match.group("end")] = _scalar(chosen, cleaned[chosen])
    ranges: dict[str, FakeQuantRange] = {}
    for key in sorted(found):
        ends = found[key]
        if "min" not in ends or "max" not in ends:
            missing = "max" if "min" in ends else "min"
            raise WeightsFormatError(f"FakeQuant range {key!r} has no {missing!r} tensor")
        if ends["min"] > ends["max"]:
            raise WeightsFormatError(f"FakeQuant range {key!r} has min {ends['min']} > max {ends['max']}")
        layer = key.rsplit("/", 1)[0]
        module = _hf_module(layer[len(prefix) :]) if layer.startswith(prefix) else None
        ranges[key] = FakeQuantRange(ends["min"], ends["max"], module)
    return ranges


def read_fake_quant_ranges(path: str | os.PathLike[str], *, prefer_ema: bool = True) -> dict[str, FakeQuantRange]:
    """`fake_quant_ranges` of a release archive, checkpoint or frozen graph; empty for a float model."""
    weights = read_tf_weights(path)
    try:
        return fake_quant_ranges(weights.tensors, prefer_ema=prefer_ema)
    except WeightsFormatError as err:
        raise WeightsFormatError(f"{weights.source}: {err}") from None


class ConversionReport(NamedTuple):
    """What `convert_with_report` did: the source, what was read, the config written and where."""

    source: Path
    kind: str
    file: str
    num_tensors: int
    num_hf_tensors: int
    weights: str
    config: Any
    image_size: int
    destination: Path

    def summary(self) -> str:
        config = self.config
        return (
            f"converted {self.kind} {self.file} ({self.num_tensors} TF tensors read; {self.weights}; "
            f"{self.num_hf_tensors} HF tensors written): depth_multiplier={config.depth_multiplier}, "
            f"min_depth={config.min_depth}, num_labels={config.num_labels}, num_channels={config.num_channels}, "
            f"image_size={self.image_size} -> {self.destination}"
        )


def convert_with_report(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    prefer_ema: bool = True,
    tf_padding: bool = True,
) -> ConversionReport:
    """`convert`, returning a `ConversionReport`."""
    from mnv1_backbone.hf_checkpoint import save_hf_directory
    from mnv1_backbone.image_processing import MobileNetV1ImageProcessor
    from mnv1_backbone.shapes import check_shapes, classifier_shapes

    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32):
        raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")
    destination = Path(dst)
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"{destination} exists and is not a directory")
    release = load_tf_release(src, prefer_ema=prefer_ema, tf_padding=tf_padding)
    resolution = image_size if image_size is not None else release.weights.image_size
    if resolution is None:
        resolution = _DEFAULT_IMAGE_SIZE
        logger.warning(
            "the name of %s has no '_<res>' (as in mobilenet_v1_1.0_224.ckpt): assuming %d x %d inputs; pass "
            "image_size (--image-size) if the model was trained at another resolution",
            release.weights.source,
            resolution,
            resolution,
        )
    config = dataclasses.replace(release.config, image_size=resolution)
    # Checked against the shapes the config implies, and written as (config, state dict): no model is built here.
    expected = classifier_shapes(config)
    check_shapes(expected, release.state_dict, source=str(src), target="MobileNetV1ForImageClassification")
    save_hf_directory(config, _with_batch_counters(expected, release.state_dict), destination)
    # HF's recipe: resize the short side to res + 32 (256 for 224), center crop res.
    processor = MobileNetV1ImageProcessor(
        size={"shortest_edge": resolution + 32}, crop_size={"height": resolution, "width": resolution}
    )
    processor.save_pretrained(destination)
    has_ema = any(name.endswith(_EMA_SUFFIX) for name in release.weights.tensors)
    if not has_ema:
        used = "values as stored (the file has no EMA shadows)"
    else:
        used = "ExponentialMovingAverage shadows" if prefer_ema else "raw variables (EMA shadows ignored)"
    return ConversionReport(
        source=release.weights.source,
        kind=release.weights.kind,
        file=release.weights.file,
        num_tensors=len(release.weights.tensors),
        num_hf_tensors=len(release.state_dict),
        weights=used,
        config=config,
        image_size=resolution,
        destination=destination,
    )


def _with_batch_counters(expected: Mapping[str, tuple[int, ...]], state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict in the model's key order, with the BatchNorm step counters (zero) that a model's own
    `state_dict()` holds and TF files do not, so the files written equal what `save_pretrained` writes."""
    def as_model_holds(value: Any) -> Any:  # a model's parameters and statistics are float32 by default
        return value.to(torch.float32) if value.is_floating_point() else value

    return {
        key: as_model_holds(state_dict[key]) if key in state_dict else torch.zeros((), dtype=torch.long)
        for key in expected
        if key in state_dict or key.endswith("num_batches_tracked")
    }


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    prefer_ema: bool = True,
    tf_padding: bool = True,
) -> Path:
    """Convert a TF release (archive, checkpoint prefix or frozen ``.pb``) to an HF-format directory.

    Writes ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` (shortest edge
    ``image_size + 32``, center crop ``image_size``) into ``dst``, which transformers'
    ``MobileNetV1ForImageClassification.from_pretrained`` / ``AutoImageProcessor`` load unchanged.
    ``image_size`` defaults to the ``_<res>`` in the source's name, else 224 (with a warning);
    ``prefer_ema=False`` takes the raw variables instead of their EMA shadows; ``tf_padding=False`` records
    symmetric padding, for models trained with ``use_explicit_padding=True``. Returns ``dst``.
    """
    return convert_with_report(
        src, dst, image_size=image_size, prefer_ema=prefer_ema, tf_padding=tf_padding
    ).destination
