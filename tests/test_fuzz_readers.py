"""Every file reader under attack: hypothesis fuzzing, a replayed regression corpus, lying size headers.

The readers (frozen GraphDef, TF checkpoint index + data shards, TF release archive, HF ``config.json``,
``model.safetensors``, ``pytorch_model.bin``, an HF directory as a whole, ``preprocessor_config.json``, COCO
instances JSON) get inputs that are truncated, bit-flipped, random, or built to be well-formed except for one lie
(absurd dims and sizes, wrong dtypes, offsets past the end, deep nesting, invalid UTF-8, huge integers). The one
property checked (`check_input`): only the reader's documented exception comes out, its message is not empty and
names the file, the call returns within `TIME_LIMIT_S` (a SIGALRM bound on top of hypothesis' deadline) and, for
the readers whose arrays numpy allocates, the peak traced memory stays within ``64 x input size + 8 MiB``: a
header may not size an allocation by what it claims instead of what the file holds.

Inputs that once broke a reader, and hand-made hostile ones, live in ``tests/fuzz_corpus/<reader>/*.bin`` and are
replayed by `test_corpus_input`. Multi-file inputs (checkpoint, HF directory) are packed into one ``.bin`` by
`pack_files`. ``tools/fuzz.py`` runs the same strategies with a large budget and writes new failures there.
Every hypothesis test here is derandomized, so CI sees the same inputs on every run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import signal
import struct
import tarfile
import tempfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import encode_table, varint
from conftest import field_bytes as f_bytes
from conftest import field_fixed32 as f_fixed32
from conftest import field_varint as f_varint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnv1_backbone.config import MobileNetV1Config
from mnv1_backbone.convert.archive import read_tf_weights
from mnv1_backbone.convert.checkpoint import TFCheckpoint, crc32c, mask_crc32c
from mnv1_backbone.convert.frozen_graph import decode_frozen_graph
from mnv1_backbone.errors import WeightsFormatError
from mnv1_backbone.image_processing import MobileNetV1ImageProcessor
from mnv1_backbone.weights import load_checkpoint, load_state_dict_file

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "fuzz_corpus"
FIXTURES = Path(__file__).parent / "fixtures" / "tf_slim"

#: Seconds one input may take before it counts as a hang (generous: CI machines are shared and slow).
TIME_LIMIT_S = 20.0
#: Peak traced allocation allowed per input byte, plus a constant, for the numpy-based readers.
MEMORY_PER_INPUT_BYTE = 64
MEMORY_SLACK_BYTES = 8 << 20
#: The frozen-graph reader's broadcast cap during fuzzing (its default is 128 MiB, tested on its own below).
FUZZ_MAX_BROADCAST_BYTES = 1 << 20


# =============================================================================================================
# Multi-file inputs packed into one byte string
# =============================================================================================================
_PACK_MAGIC = b"MNV1FUZZ"


def pack_files(files: dict[str, bytes]) -> bytes:
    """One byte string holding named files: magic, then per file a 1-byte name length, name, 4-byte size, data."""
    out = bytearray(_PACK_MAGIC)
    for name, data in files.items():
        encoded = name.encode()
        out += bytes([len(encoded)]) + encoded + struct.pack("<I", len(data)) + data
    return bytes(out)


def unpack_files(data: bytes) -> dict[str, bytes]:
    """Undo `pack_files`; a malformed pack is a bug in the fuzzer, not in a reader."""
    if not data.startswith(_PACK_MAGIC):
        raise AssertionError("not a packed multi-file input")
    files: dict[str, bytes] = {}
    pos = len(_PACK_MAGIC)
    while pos < len(data):
        length = data[pos]
        name = data[pos + 1 : pos + 1 + length].decode()
        (size,) = struct.unpack_from("<I", data, pos + 1 + length)
        start = pos + 5 + length
        files[name] = data[start : start + size]
        pos = start + size
    return files


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        if "/" in name or name.startswith("."):
            raise AssertionError(f"unsafe packed file name {name!r}")
        (directory / name).write_bytes(data)


# =============================================================================================================
# Encoders: GraphDef and BundleEntryProto, on conftest's protobuf and SSTable writers (imported as short f_* names
# so the hand-built protos below stay on one line)
# =============================================================================================================
def shape_proto(dims: list[int], unknown_rank: bool = False) -> bytes:
    out = b"".join(f_bytes(2, f_varint(1, d)) for d in dims)
    return out + (f_varint(3, 1) if unknown_rank else b"")


def graph_node(name: bytes, op: bytes, attrs: dict[bytes, bytes], inputs: tuple[bytes, ...] = ()) -> bytes:
    body = f_bytes(1, name) + f_bytes(2, op) + b"".join(f_bytes(3, i) for i in inputs)
    body += b"".join(f_bytes(5, f_bytes(1, k) + f_bytes(2, v)) for k, v in attrs.items())
    return f_bytes(1, body)


def const_node(name: bytes, tensor: bytes, dtype: int | None) -> bytes:
    attrs = {b"value": f_bytes(8, tensor)}
    if dtype is not None:
        attrs[b"dtype"] = f_varint(6, dtype)
    return graph_node(name, b"Const", attrs)


def bundle_entry(
    dtype: int, dims: list[int], shard: int, offset: int, size: int, crc: int, *, sliced: bool = False
) -> bytes:
    entry = f_varint(1, dtype) + f_bytes(2, shape_proto(dims)) + f_varint(3, shard) + f_varint(4, offset)
    entry += f_varint(5, size) + f_fixed32(6, crc)
    return entry + (f_bytes(7, b"") if sliced else b"")


def bundle_header(num_shards: int, endianness: int = 0, min_consumer: int | None = None) -> bytes:
    version = f_varint(1, 1) + (f_varint(2, min_consumer) if min_consumer is not None else b"")
    return f_varint(1, num_shards) + f_varint(2, endianness) + f_bytes(3, version)


PREFIX = "model.ckpt"


def shard_name(shard: int, num_shards: int) -> str:
    return f"{PREFIX}.data-{shard:05d}-of-{num_shards:05d}"


def checkpoint_files(tensors: dict[str, np.ndarray], num_shards: int = 1) -> dict[str, bytes]:
    """A valid little-endian V2 checkpoint of float32/int32/int64/float64 arrays, as packed files."""
    codes = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("int32"): 3, np.dtype("int64"): 9}
    shards = [bytearray() for _ in range(num_shards)]
    entries = []
    for i, (name, array) in enumerate(sorted(tensors.items())):
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        shard = i % num_shards
        entry = bundle_entry(codes[array.dtype], list(array.shape), shard, len(shards[shard]), len(raw),
                             mask_crc32c(crc32c(raw)))
        entries.append((name.encode(), entry))
        shards[shard] += raw
    files = {f"{PREFIX}.index": encode_table([(b"", bundle_header(num_shards)), *sorted(entries)])}
    files.update({shard_name(i, num_shards): bytes(data) for i, data in enumerate(shards)})
    return files


def small_graph() -> bytes:
    """A GraphDef with a float tensor_content Const, a broadcast Const, an int Const, a string Const and ops."""
    weights = (np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7).tobytes()
    return (
        graph_node(b"input", b"Placeholder", {b"dtype": f_varint(6, 1), b"shape": f_bytes(7, shape_proto([-1, 8]))})
        + const_node(b"net/w", f_varint(1, 1) + f_bytes(2, shape_proto([2, 3, 4])) + f_bytes(4, weights), 1)
        + const_node(b"net/b", f_varint(1, 1) + f_bytes(2, shape_proto([5])) + f_bytes(5, struct.pack("<f", 0.25)), 1)
        + const_node(b"net/i", f_varint(1, 3) + f_bytes(2, shape_proto([3])) + f_bytes(7, varint(1) + varint(-2)), 3)
        + const_node(b"net/s", f_varint(1, 7) + f_bytes(2, shape_proto([1])), 7)
        + graph_node(b"net/out", b"Conv2D", {b"T": f_varint(6, 1)}, (b"input", b"net/w"))
    )


def small_checkpoint() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return checkpoint_files(
        {
            "MobilenetV1/Conv2d_0/weights": rng.standard_normal((3, 3, 3, 2)).astype(np.float32),
            "MobilenetV1/Conv2d_0/BatchNorm/beta": rng.standard_normal(2).astype(np.float32),
            "global_step": np.array(7, dtype=np.int64),
            "scale": np.array([0.5, 2.0]),
        },
        num_shards=2,
    )


def small_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "mobilenet_v1.conv_stem.convolution.weight": torch.randn(8, 3, 3, 3, generator=generator),
        "classifier.bias": torch.randn(4, generator=generator),
        "step": torch.tensor([3], dtype=torch.int64),
    }


def small_config_dict() -> dict[str, Any]:
    return MobileNetV1Config(depth_multiplier=0.25, num_labels=4, image_size=64).to_dict()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def torch_save_bytes(obj: Any, *, zip_format: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def small_coco() -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 32, "height": 32},
        ],
        "categories": [{"id": 3, "name": "square"}, {"id": 5, "name": "disc"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 12], "area": 120.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [50.5, 40, 30, 20], "iscrowd": 1},
            {"id": 7, "image_id": 2, "category_id": 3, "bbox": [0, 0, 0.5, 8]},
        ],
    }


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def small_release(mode: str = "w:gz") -> bytes:
    files = small_checkpoint()
    members = {f"mobilenet_v1_0.25_128/{name}": data for name, data in files.items()}
    members["mobilenet_v1_0.25_128/mobilenet_v1_0.25_128_frozen.pb"] = small_graph()
    members["mobilenet_v1_0.25_128/mobilenet_v1_0.25_128_info.txt"] = b"info\n"
    return tar_bytes(members, mode)


# =============================================================================================================
# The readers and the property every input must satisfy
# =============================================================================================================
@dataclass(frozen=True)
class Reader:
    """How to feed bytes to one reader, and what it may raise.

    ``run(data, workdir)`` writes ``data`` where the reader expects it and calls it; ``allowed`` are the documented
    exceptions; ``file_name`` must appear in their message (None: no file, e.g. `decode_frozen_graph`); ``traced``
    says whether the reader's allocations go through Python/numpy, which tracemalloc sees (torch, safetensors and
    pycocotools' C parts do not)."""

    name: str
    run: Callable[[bytes, Path], Any]
    allowed: tuple[type[BaseException], ...]
    file_name: str | None
    traced: bool


def _run_frozen_graph(data: bytes, workdir: Path) -> Any:
    return decode_frozen_graph(data, source="fuzz.pb", max_broadcast_bytes=FUZZ_MAX_BROADCAST_BYTES)


def _run_tf_checkpoint(data: bytes, workdir: Path) -> Any:
    _write_files(workdir, unpack_files(data))
    return TFCheckpoint(workdir / PREFIX).read_all()


def _run_release_archive(data: bytes, workdir: Path) -> Any:
    path = workdir / "mobilenet_v1_0.25_128.tgz"
    path.write_bytes(data)
    return read_tf_weights(path)


def _run_hf_config(data: bytes, workdir: Path) -> Any:
    path = workdir / "config.json"
    path.write_bytes(data)
    return MobileNetV1Config.from_json_file(path)


def _run_safetensors(data: bytes, workdir: Path) -> Any:
    path = workdir / "model.safetensors"
    path.write_bytes(data)
    state_dict = load_state_dict_file(path)
    with contextlib.suppress(WeightsFormatError):  # "no config in its metadata" is a documented outcome too
        load_checkpoint(path)
    return state_dict


def _run_pytorch_bin(data: bytes, workdir: Path) -> Any:
    path = workdir / "pytorch_model.bin"
    path.write_bytes(data)
    return load_state_dict_file(path)


def _run_hf_directory(data: bytes, workdir: Path) -> Any:
    from mnv1_backbone import MobileNetV1ForImageClassification

    _write_files(workdir, unpack_files(data))
    config, state_dict = load_checkpoint(workdir)
    # Files whose config fits their tensors get this far; from_pretrained builds the model and loads it strictly.
    return MobileNetV1ForImageClassification.from_pretrained(workdir)


def _run_preprocessor_config(data: bytes, workdir: Path) -> Any:
    import warnings

    path = workdir / "preprocessor_config.json"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys warn, by design
        return MobileNetV1ImageProcessor.from_pretrained(path)


def _run_coco(data: bytes, workdir: Path) -> Any:
    from detection_demo.data import CocoDetectionDataset

    path = workdir / "instances.json"
    path.write_bytes(data)
    dataset = CocoDetectionDataset(workdir, path)  # validates with load_coco_annotations, then indexes the boxes
    return dataset.summary()


READERS: dict[str, Reader] = {
    reader.name: reader
    for reader in (
        Reader("frozen_graph", _run_frozen_graph, (WeightsFormatError,), "fuzz.pb", True),
        # A packed input may lack a file: a missing .index (or config.json) is a documented FileNotFoundError.
        Reader("tf_checkpoint", _run_tf_checkpoint, (WeightsFormatError, FileNotFoundError), PREFIX, True),
        Reader("release_archive", _run_release_archive, (WeightsFormatError,), "mobilenet_v1_0.25_128.tgz", True),
        Reader("hf_config", _run_hf_config, (ValueError,), "config.json", True),
        Reader("safetensors", _run_safetensors, (WeightsFormatError,), "model.safetensors", False),
        Reader("pytorch_bin", _run_pytorch_bin, (WeightsFormatError,), "pytorch_model.bin", False),
        Reader("hf_directory", _run_hf_directory, (ValueError, FileNotFoundError), None, False),
        Reader("preprocessor_config", _run_preprocessor_config, (ValueError,), "preprocessor_config.json", True),
        Reader("coco_json", _run_coco, (ValueError,), "instances.json", False),
    )
}


class ReaderHang(AssertionError):
    """An input took longer than `TIME_LIMIT_S`."""


class UndocumentedError(AssertionError):
    """A reader let an exception out that is not among its documented ones (or one with an unhelpful message)."""


class MemoryBoundExceeded(AssertionError):
    """A reader allocated more than the input's size justifies."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `ReaderHang` in the main thread after ``seconds`` (a no-op elsewhere: signals need the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise ReaderHang(f"no result after {seconds} s: the reader hangs on this input")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Exceptions that are ValueErrors but must never reach a caller raw: they name neither the file nor the problem.
_RAW_VALUE_ERRORS = (UnicodeError, json.JSONDecodeError)


def check_input(name: str, data: bytes, *, time_limit_s: float = TIME_LIMIT_S, trace_memory: bool = True) -> str:
    """Feed ``data`` to reader ``name``; return "ok" or the documented exception's type name. Raise an
    `AssertionError` subclass on a hang, an undocumented exception or an allocation the input does not justify."""
    reader = READERS[name]
    with tempfile.TemporaryDirectory(prefix=f"fuzz_{name}_") as tmp:
        workdir = Path(tmp)
        trace = trace_memory and reader.traced and not tracemalloc.is_tracing()
        if trace:
            tracemalloc.start()
        outcome = "ok"
        try:
            with time_limit(time_limit_s):
                try:
                    reader.run(data, workdir)
                except reader.allowed as error:
                    if isinstance(error, _RAW_VALUE_ERRORS):
                        raise UndocumentedError(f"{name}: raw {type(error).__name__} leaked: {error}") from error
                    message = str(error)
                    if not message.strip():
                        raise UndocumentedError(f"{name}: {type(error).__name__} with an empty message") from error
                    if reader.file_name is not None and reader.file_name not in message:
                        raise UndocumentedError(
                            f"{name}: the message does not name the file {reader.file_name!r}: {message}"
                        ) from error
                    outcome = type(error).__name__
        except (ReaderHang, UndocumentedError):
            raise
        except AssertionError:
            raise
        except BaseException as error:  # noqa: B036 - anything else is exactly what this test is looking for
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise UndocumentedError(f"{name}: undocumented {type(error).__name__}: {error}") from error
        finally:
            if trace:
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
        if trace:
            bound = MEMORY_PER_INPUT_BYTE * len(data) + MEMORY_SLACK_BYTES
            if peak > bound:
                raise MemoryBoundExceeded(
                    f"{name}: a {len(data)}-byte input made the reader allocate {peak} bytes (bound {bound})"
                )
    return outcome


# =============================================================================================================
# Strategies: byte-level mutation of valid seeds, and well-formed inputs with one lie
# =============================================================================================================
INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 64, 65, 127, 128, 255, 256, 4096, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                    2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -2, -(2**31), -(2**63)]
interesting_ints = st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-(2**64), 2**64))


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` after 1-4 mutations: truncation, bit flips, overwrites, insertions, deletions, duplicated spans,
    and little-endian "interesting" integers written over 1, 2, 4 or 8 bytes (AFL's classic operators)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "duplicate", "int"]))
        size = len(data)
        if op == "truncate":
            del data[draw(st.integers(0, size)) :]
        elif op == "flip" and size:
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, size - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite" and size:
            pos = draw(st.integers(0, size - 1))
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            pos = draw(st.integers(0, size))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete" and size:
            pos = draw(st.integers(0, size - 1))
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "duplicate" and size:
            pos = draw(st.integers(0, size - 1))
            chunk = data[pos : pos + draw(st.integers(1, 256))]
            at = draw(st.integers(0, size))
            data[at:at] = chunk
        elif op == "int" and size:
            width = draw(st.sampled_from([1, 2, 4, 8]))
            pos = draw(st.integers(0, max(size - width, 0)))
            value = draw(interesting_ints) % (1 << (8 * width))
            data[pos : pos + width] = value.to_bytes(width, "little")
    return bytes(data)


@st.composite
def mutated_files(draw: st.DrawFn, files: dict[str, bytes]) -> bytes:
    """A packed multi-file input with 1-2 of its files mutated, or one of them missing."""
    files = dict(files)
    names = sorted(files)
    if draw(st.integers(0, 9)) == 0:
        del files[draw(st.sampled_from(names))]
    else:
        for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)):
            files[name] = draw(mutated(files[name]))
    return pack_files(files)


# --- GraphDef ------------------------------------------------------------------------------------------------
DTYPE_CODES = st.one_of(st.integers(0, 31), st.sampled_from([99, 2**31, 2**64 - 1]))
dims_lists = st.one_of(
    st.lists(st.integers(0, 6), max_size=4),
    st.lists(st.sampled_from([0, 1, 3, -1, -5, 2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]),
             max_size=5),
    st.integers(60, 70).map(lambda n: [1] * n),  # more dims than numpy supports
)


@st.composite
def tensor_protos(draw: st.DrawFn) -> tuple[int, bytes]:
    dtype = draw(DTYPE_CODES)
    out = f_varint(1, dtype) if draw(st.booleans()) or dtype else b""
    if draw(st.integers(0, 5)):
        out += f_bytes(2, shape_proto(draw(dims_lists), unknown_rank=draw(st.integers(0, 9)) == 0))
    kind = draw(st.sampled_from(["content", "float_val", "int_val", "double_val", "half_val", "none", "junk"]))
    if kind == "content":
        out += f_bytes(4, draw(st.binary(max_size=96)))
    elif kind == "float_val":
        values = draw(st.lists(st.floats(width=32, allow_nan=True), max_size=8))
        if draw(st.booleans()):
            out += f_bytes(5, struct.pack(f"<{len(values)}f", *values) + draw(st.binary(max_size=3)))
        else:
            out += b"".join(f_fixed32(5, struct.unpack("<I", struct.pack("<f", v))[0]) for v in values)
    elif kind == "double_val":
        out += f_bytes(6, draw(st.binary(max_size=40)))
    elif kind in ("int_val", "half_val"):
        number = {"int_val": draw(st.sampled_from([7, 10, 11, 16, 17])), "half_val": 13}[kind]
        values = draw(st.lists(interesting_ints, max_size=8))
        if draw(st.booleans()):
            out += f_bytes(number, b"".join(varint(v) for v in values))
        else:
            out += b"".join(f_varint(number, v) for v in values)
    elif kind == "junk":
        out += draw(st.binary(max_size=32))
    return dtype, out


@st.composite
def graph_defs(draw: st.DrawFn) -> bytes:
    """Well-formed GraphDefs whose Consts carry absurd shapes, dtypes, sizes and value encodings."""
    out = b""
    names = st.one_of(st.sampled_from([b"w", b"net/w", b"MobilenetV1/Conv2d_0/weights", b""]), st.binary(max_size=6))
    for _ in range(draw(st.integers(1, 4))):
        name = draw(names)
        if draw(st.integers(0, 3)):
            dtype, tensor = draw(tensor_protos())
            attr_dtype = draw(st.one_of(st.just(dtype), st.none(), DTYPE_CODES))
            out += const_node(name, tensor, attr_dtype)
        else:
            op = draw(st.sampled_from([b"Placeholder", b"Identity", b"Const", b""]))
            attrs = {}
            if draw(st.booleans()):
                attrs[b"shape"] = f_bytes(7, shape_proto(draw(dims_lists), unknown_rank=draw(st.booleans())))
            if draw(st.booleans()):
                attrs[b"dtype"] = f_varint(6, draw(DTYPE_CODES))
            out += graph_node(name, op, attrs, tuple(draw(st.lists(st.binary(max_size=4), max_size=2))))
    if draw(st.integers(0, 4)) == 0:
        out += draw(st.binary(max_size=16))  # trailing garbage
    return out


frozen_graph_inputs = st.one_of(graph_defs(), mutated(small_graph()), st.binary(max_size=256))


# --- TF checkpoint ---------------------------------------------------------------------------------------------
@st.composite
def tf_checkpoints(draw: st.DrawFn) -> bytes:
    """A checkpoint with consistent checksums whose header or entries lie: shard counts, dtypes, shapes, offsets,
    sizes, byte order, versions; or whose blocks are corrupted *before* their checksums are computed."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    count = draw(st.integers(0, 4))
    arrays = {f"t{i}": rng.standard_normal(draw(st.integers(0, 6))).astype(np.float32) for i in range(count)}
    num_shards = draw(st.integers(1, 2))
    shards = [bytearray() for _ in range(num_shards)]
    entries: list[tuple[bytes, bytes]] = []
    for i, (name, array) in enumerate(sorted(arrays.items())):
        raw = array.tobytes()
        fields = {"dtype": 1, "dims": list(array.shape), "shard": i % num_shards, "offset": len(shards[i % num_shards]),
                  "size": len(raw), "crc": mask_crc32c(crc32c(raw)), "sliced": False}
        shards[i % num_shards] += raw
        for lie in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2)):
            fields[lie] = {
                "dtype": draw(DTYPE_CODES),
                "dims": draw(dims_lists),
                "shard": draw(interesting_ints),
                "offset": draw(interesting_ints),
                "size": draw(interesting_ints),
                "crc": draw(interesting_ints),
                "sliced": True,
            }[lie]
        value = bundle_entry(fields["dtype"], fields["dims"], fields["shard"], fields["offset"], fields["size"],
                             fields["crc"], sliced=fields["sliced"])
        if draw(st.integers(0, 5)) == 0:
            value = draw(mutated(value))
        key = name.encode() if draw(st.integers(0, 7)) else draw(st.binary(max_size=4))
        entries.append((key, value))
    header_shards = draw(st.one_of(st.just(num_shards), interesting_ints)) if draw(st.booleans()) else num_shards
    header = bundle_header(header_shards, draw(st.sampled_from([0, 0, 0, 1, 2])),
                           draw(st.sampled_from([None, None, 1, 2, -1])))
    if draw(st.integers(0, 5)) == 0:
        header = draw(mutated(header))
    table = [(b"", header), *entries]
    if draw(st.integers(0, 5)):
        table = [table[0], *sorted(table[1:])]
    corrupt = draw(st.integers(0, 3)) == 0
    block_seed = draw(st.integers(0, 2**16))

    def mutate_block(index: int, contents: bytes) -> bytes:
        if not corrupt or (block_seed + index) % 3:
            return contents
        data = bytearray(contents)
        generator = np.random.default_rng(block_seed + index)
        for _ in range(int(generator.integers(1, 4))):
            if data:
                data[int(generator.integers(0, len(data)))] = int(generator.integers(0, 256))
        return bytes(data)

    index = encode_table(table, block_entries=draw(st.integers(1, 4)), restart_interval=draw(st.integers(1, 3)),
                         compression=draw(st.sampled_from([0, 0, 0, 0, 1, 7])), mutate_block=mutate_block)
    files = {f"{PREFIX}.index": index}
    files.update({shard_name(i, num_shards): bytes(data) for i, data in enumerate(shards)})
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(sorted(files)))
        files[name] = draw(mutated(files[name]))
    return pack_files(files)


tf_checkpoint_inputs = st.one_of(tf_checkpoints(), mutated_files(small_checkpoint()))


# --- release archives ------------------------------------------------------------------------------------------
@st.composite
def release_archives(draw: st.DrawFn) -> bytes:
    """Archives with hostile members (escaping paths, links, devices, duplicates, lying sizes) or bad compression."""
    mode = draw(st.sampled_from(["w:gz", "w:", "w:bz2", "w:xz"]))
    buffer = io.BytesIO()
    files = small_checkpoint()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(draw(st.sampled_from([name, f"d/{name}", f"../{name}", f"/abs/{name}",
                                                         f"a/../../{name}", f"C:\\{name}"])))
            info.size = len(data)
            kind = draw(st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                                                tarfile.DIRTYPE, tarfile.FIFOTYPE]))
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = draw(st.sampled_from(["/etc/passwd", "../x", name]))
                info.size = 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
        if draw(st.booleans()):
            info = tarfile.TarInfo(f"{PREFIX}.index")  # a duplicate base name
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    data = buffer.getvalue()
    if draw(st.booleans()):
        data = draw(mutated(data))
    return data


release_archive_inputs = st.one_of(
    release_archives(), mutated(small_release("w:gz")), mutated(small_release("w:")), st.binary(max_size=128)
)


# --- JSON --------------------------------------------------------------------------------------------------------
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    interesting_ints,
    st.sampled_from([10**400, -(10**400), 1e308, 1e-320, 0.5, -0.0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children,
                                                                              max_size=4)),
    max_leaves=12,
)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def hostile_json(draw: st.DrawFn, base: dict[str, Any], paths: list[tuple[Any, ...]]) -> bytes:
    """``base`` with 1-3 values at ``paths`` (or new keys) replaced by hostile JSON values, or deleted; sometimes
    re-encoded (deep nesting, invalid UTF-8, a BOM, UTF-16) or byte-mutated."""
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        container = data
        for step in path[:-1]:
            if isinstance(container, dict) and step in container:
                container = container[step]
            elif isinstance(container, list) and isinstance(step, int) and step < len(container):
                container = container[step]
            else:
                break
        else:
            last = path[-1]
            if isinstance(container, dict) or (isinstance(container, list) and isinstance(last, int)
                                               and last < len(container)):
                if draw(st.integers(0, 5)) == 0 and isinstance(container, dict):
                    container.pop(last, None)
                else:
                    container[last] = draw(json_values)
    encoded = json_bytes(data)
    how = draw(st.integers(0, 11))
    if how == 0:
        depth = draw(st.sampled_from([50, 2000, 200_000]))
        encoded = b"[" * depth + b"]" * depth * draw(st.integers(0, 1))
    elif how == 1:
        encoded = encoded[:-1] + b', "x": "\xff\xfe"}'
    elif how == 2:
        encoded = b"\xef\xbb\xbf" + encoded
    elif how == 3:
        encoded = encoded.decode().encode("utf-16")
    elif how in (4, 5):
        encoded = draw(mutated(encoded))
    return encoded


CONFIG_PATHS = [(key,) for key in small_config_dict()] + [("id2label", "0"), ("label2id",), ("extra_key",)]
hf_config_inputs = st.one_of(hostile_json(small_config_dict(), CONFIG_PATHS), st.binary(max_size=64))

PREPROCESSOR = MobileNetV1ImageProcessor().to_dict()
PREPROCESSOR_PATHS = [(key,) for key in PREPROCESSOR] + [("size", "shortest_edge"), ("crop_size", "height"),
                                                         ("image_mean", 0), ("do_convert_rgb",)]
preprocessor_inputs = hostile_json(PREPROCESSOR, PREPROCESSOR_PATHS)

COCO_PATHS = [("images",), ("annotations",), ("categories",)]
for _section, _entries in small_coco().items():
    for _index, _entry in enumerate(_entries):
        COCO_PATHS += [(_section, _index, key) for key in _entry] + [(_section, _index)]
COCO_PATHS += [("annotations", 0, "bbox", 2), ("annotations", 0, "bbox", 0)]
coco_inputs = st.one_of(hostile_json(small_coco(), COCO_PATHS), mutated(json_bytes(small_coco())))


# --- safetensors and pickles --------------------------------------------------------------------------------------
@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A safetensors file whose JSON header lies: dtypes, shapes, offsets, header length; hostile config metadata."""
    entries: dict[str, Any] = {}
    offset = 0
    for i in range(draw(st.integers(0, 3))):
        dims = draw(st.lists(st.integers(0, 4), max_size=3))
        size = 4 * math.prod(dims)
        entry: dict[str, Any] = {"dtype": "F32", "shape": dims, "data_offsets": [offset, offset + size]}
        offset += size
        for lie in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets", "drop"]), max_size=2)):
            if lie == "dtype":
                entry["dtype"] = draw(st.one_of(st.sampled_from(["F16", "BF16", "I64", "BOOL", "U8", "F64", "F8_E4M3",
                                                                 "X", ""]), json_values))
            elif lie == "shape":
                entry["shape"] = draw(st.one_of(st.lists(interesting_ints, max_size=4), json_values))
            elif lie == "data_offsets":
                entry["data_offsets"] = draw(st.one_of(st.lists(interesting_ints, max_size=3), json_values))
            else:
                entry.pop(draw(st.sampled_from(sorted(entry))), None)
        entries[f"t{i}" if draw(st.integers(0, 5)) else draw(st.text(max_size=3))] = entry
    config = small_config_dict()
    if draw(st.booleans()):
        config[draw(st.sampled_from(sorted(config)))] = draw(json_values)
    metadata: Any = {"format": "pt", "mnv1_backbone.config": json.dumps(config)}
    if draw(st.integers(0, 4)) == 0:
        metadata = draw(json_values)
    if draw(st.integers(0, 5)) == 0:
        metadata = {"format": "pt", "mnv1_backbone.config": "[" * 100_000}
    entries["__metadata__"] = metadata
    header = json.dumps(entries).encode()
    length = len(header)
    if draw(st.integers(0, 3)) == 0:
        length = draw(interesting_ints) % (1 << 64)
    body = draw(st.binary(min_size=0, max_size=offset + 8)) if draw(st.booleans()) else bytes(offset)
    return struct.pack("<Q", length) + header + body


class _Payload:
    """Pickles as a call of ``callable_(*args)``: what a hostile ``pytorch_model.bin`` would run."""

    def __init__(self, callable_: Any, *args: Any) -> None:
        self.callable_, self.args = callable_, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.callable_, self.args


def hostile_pickles() -> list[bytes]:
    """Pickles that would run code if unpickled without weights_only (they only name harmless targets here)."""
    payloads = [
        _Payload(eval, "1 + 1"),
        _Payload(os.getcwd),
        _Payload(os.system, "true"),
        _Payload(exec, "pass"),
        _Payload(torch.ones, 2),  # a torch function that weights_only does not allow as a global
    ]
    out = [pickle.dumps({"w": payload}, protocol=protocol) for payload in payloads for protocol in (2, 4)]
    out.append(b"\x80\x02csubprocess\ncheck_output\n(X\x02\x00\x00\x00idtR.")  # GLOBAL + REDUCE by hand
    return out


def _legacy_with_storage_size(numel: int) -> bytes:
    """A legacy (non-zip) torch file whose pickle claims a storage of ``numel`` floats; its data has 4."""
    data = torch_save_bytes({"w": torch.zeros(4)}, zip_format=False)
    claim = b"J" + struct.pack("<i", numel)
    return data.replace(b"K\x04Ntq", claim + b"Ntq").replace(b"K\x04\x85", claim + b"\x85")


pytorch_bin_inputs = st.one_of(
    mutated(torch_save_bytes(small_state_dict())),
    mutated(torch_save_bytes(small_state_dict(), zip_format=False)),
    st.sampled_from(hostile_pickles()),
    st.integers(5, 2**31 - 1).map(_legacy_with_storage_size),
    st.binary(max_size=128),
)
safetensors_inputs = st.one_of(
    safetensors_files(),
    mutated(safetensors_bytes(small_state_dict(), {"format": "pt", "mnv1_backbone.config":
                                                    json.dumps(small_config_dict())})),
)


@st.composite
def hf_directories(draw: st.DrawFn) -> bytes:
    """``config.json`` + weights where either or both may be hostile, or where they disagree about sizes."""
    config = small_config_dict()
    if draw(st.booleans()):
        key = draw(st.sampled_from(["num_labels", "depth_multiplier", "num_channels", "min_depth", "image_size"]))
        config[key] = draw(st.sampled_from([10**9, 10**12, 4096, 1000.0, 1e300, 0, -1, 7]))
        config.pop("id2label", None)
        config.pop("label2id", None)
    files = {"config.json": json_bytes(config)}
    if draw(st.integers(0, 9)) == 0:
        files["config.json"] = draw(hf_config_inputs)
    state_dict = _tiny_model_state()
    kind = draw(st.sampled_from(["safetensors", "bin", "hostile safetensors", "hostile bin"]))
    if kind == "safetensors":
        files["model.safetensors"] = safetensors_bytes(state_dict)
    elif kind == "bin":
        files["pytorch_model.bin"] = torch_save_bytes(state_dict)
    elif kind == "hostile safetensors":
        files["model.safetensors"] = draw(safetensors_inputs)
    else:
        files["pytorch_model.bin"] = draw(pytorch_bin_inputs)
    return pack_files(files)


_TINY_STATE: dict[str, torch.Tensor] = {}


def _tiny_model_state() -> dict[str, torch.Tensor]:
    """The state dict of the tiny classifier `small_config_dict` describes (built once)."""
    if not _TINY_STATE:
        from mnv1_backbone import MobileNetV1ForImageClassification

        model = MobileNetV1ForImageClassification(MobileNetV1Config.from_dict(small_config_dict()))
        _TINY_STATE.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    return dict(_TINY_STATE)


STRATEGIES: dict[str, st.SearchStrategy[bytes]] = {
    "frozen_graph": frozen_graph_inputs,
    "tf_checkpoint": tf_checkpoint_inputs,
    "release_archive": release_archive_inputs,
    "hf_config": hf_config_inputs,
    "safetensors": safetensors_inputs,
    "pytorch_bin": pytorch_bin_inputs,
    "hf_directory": hf_directories(),
    "preprocessor_config": preprocessor_inputs,
    "coco_json": coco_inputs,
}
assert set(STRATEGIES) == set(READERS)


def real_file_strategies() -> dict[str, st.SearchStrategy[bytes]]:
    """Mutations of the real TF-written fixtures (a 350 KB frozen graph, a quantized checkpoint): slower per input,
    so only the long run (tools/fuzz.py) mixes them in."""
    graph = (FIXTURES / "mobilenet_v1_0.125_128_quant_frozen.pb").read_bytes()
    prefix = "mobilenet_v1_0.125_128_quant.ckpt"
    checkpoint = {
        f"{PREFIX}.index": (FIXTURES / f"{prefix}.index").read_bytes(),
        shard_name(0, 1): (FIXTURES / f"{prefix}.data-00000-of-00001").read_bytes(),
    }
    return {"frozen_graph": mutated(graph), "tf_checkpoint": mutated_files(checkpoint)}

#: Examples per reader in CI: small, so the whole file runs in well under a minute; tools/fuzz.py runs thousands.
CI_EXAMPLES = {
    "frozen_graph": 150,
    "tf_checkpoint": 120,
    "release_archive": 40,
    "hf_config": 80,
    "safetensors": 80,
    "pytorch_bin": 60,
    "hf_directory": 30,
    "preprocessor_config": 60,
    "coco_json": 60,
}


def fuzz_test(name: str) -> Callable[[bytes], None]:
    """The hypothesis test of reader ``name`` (also run by tools/fuzz.py with other settings)."""

    @given(data=STRATEGIES[name])
    def test(data: bytes) -> None:
        check_input(name, data)

    test.__name__ = f"fuzz_{name}"
    return test


def ci_settings(name: str) -> settings:
    return settings(
        max_examples=CI_EXAMPLES[name],
        derandomize=True,
        database=None,
        deadline=timedelta(seconds=10),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                               HealthCheck.filter_too_much],
        print_blob=True,
    )


@pytest.mark.parametrize("name", sorted(READERS))
def test_fuzz_reader(name: str) -> None:
    ci_settings(name)(fuzz_test(name))()


# =============================================================================================================
# The regression corpus
# =============================================================================================================
def _lying_zip_record() -> bytes:
    """A torch zip file whose pickle and zip headers both claim a 2 GB storage; the file holds 16 bytes of it."""
    data = torch_save_bytes({"w": torch.zeros(4)})
    claim = 2_000_000_000
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
            for info in source.infolist():
                content = source.read(info.filename)
                if info.filename.endswith("data.pkl"):
                    numel = b"J" + struct.pack("<i", claim // 4)
                    content = content.replace(b"K\x04tq", numel + b"tq").replace(b"K\x04\x85", numel + b"\x85")
                target.writestr(info, content)
    patched = bytearray(out.getvalue())
    name = b"archive/data/0"
    for pos in [m.start() for m in re.finditer(re.escape(name), bytes(patched))]:
        if patched[pos - 30 : pos - 26] == b"PK\x03\x04":
            struct.pack_into("<II", patched, pos - 30 + 18, claim, claim)
        elif patched[pos - 46 : pos - 42] == b"PK\x01\x02":
            struct.pack_into("<II", patched, pos - 46 + 20, claim, claim)
    return bytes(patched)


def _one_tensor_checkpoint(dims: list[int], size: int, raw: bytes, *, dtype: int = 1, offset: int = 0,
                           header: bytes | None = None, **table: Any) -> bytes:
    entry = bundle_entry(dtype, dims, 0, offset, size, mask_crc32c(crc32c(raw)))
    index = encode_table([(b"", header if header is not None else bundle_header(1)), (b"w", entry)], **table)
    return pack_files({f"{PREFIX}.index": index, shard_name(0, 1): raw})


def _safetensors_raw(header: Any, body: bytes = b"", length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + body


def _tar_member(name: str, data: bytes, *, kind: bytes = tarfile.REGTYPE, linkname: str = "",
                claimed_size: int | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime = len(data), kind, linkname, 0
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    if claimed_size is not None:  # rewrite the octal size field and fix the header checksum
        header[124:136] = f"{claimed_size:011o}\0".encode()
        header[148:156] = b" " * 8
        header[148:156] = f"{sum(header[:512]):06o}\0 ".encode()
    padding = bytes(-len(data) % 512) if kind == tarfile.REGTYPE else b""
    return bytes(header) + (data + padding if kind == tarfile.REGTYPE else b"")


def torch_zip_with_pickle(data_pkl: bytes) -> bytes:
    """A torch zip file (the layout torch.save writes) whose ``data.pkl`` is ``data_pkl``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def hand_made_inputs() -> dict[str, dict[str, bytes]]:
    """Representative hostile inputs per reader, written by hand (``tools/fuzz.py --write-hand-made`` stores them
    as ``tests/fuzz_corpus/<reader>/hand_<name>.bin``)."""
    import gzip
    import lzma

    f32 = struct.pack("<f", 1.0)
    float_const = lambda dims, body: const_node(b"w", f_varint(1, 1) + f_bytes(2, shape_proto(dims)) + body, 1)  # noqa: E731
    config = small_config_dict()
    bare = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    tiny_weights = safetensors_bytes({"mobilenet_v1.conv_stem.convolution.weight": torch.zeros(8, 3, 3, 3)})
    return {
        "frozen_graph": {
            "65_dims": float_const([1] * 65, f_bytes(5, f32)),
            "empty_tensor_with_2e62_dims": float_const([0, 2**62, 2**62], b""),
            "10gb_tensor_content_of_16_bytes": float_const([50_000, 50_000], f_bytes(4, bytes(16))),
            "10gb_broadcast_of_one_value": float_const([50_000, 50_000], f_bytes(5, f32)),
            "overlong_varint": f_bytes(1, b"\x0a" + b"\xff" * 11),
            "length_past_the_end": b"\x0a\xff\xff\x03" + b"x" * 10,
            "group_wire_type": b"\x0b\x0c",
            "int8_value_300": const_node(b"w", f_varint(1, 6) + f_bytes(7, varint(300)), 6),
            "float_stored_as_int_val": const_node(b"w", f_varint(1, 1) + f_bytes(2, shape_proto([2])) + f_bytes(
                7, varint(1)), 1),
            "zip_file": b"PK\x03\x04" + bytes(40),
            "gzip_file": gzip.compress(small_graph(), mtime=0),
            "dtype_attr_disagrees": const_node(b"w", f_varint(1, 1) + f_bytes(5, f32), 3),
        },
        "tf_checkpoint": {
            "65_dims": _one_tensor_checkpoint([1] * 65, 4, f32),
            "empty_tensor_with_2e62_dims": _one_tensor_checkpoint([0, 2**62, 2**62], 0, b""),
            "10gb_tensor_in_1000_byte_shard": _one_tensor_checkpoint([2**17, 20480], TEN_GB, bytes(1000)),
            "offset_past_the_end": _one_tensor_checkpoint([1], 4, f32, offset=2**63 - 8),
            "size_disagrees_with_shape": _one_tensor_checkpoint([3], 4, f32),
            "unknown_dtype_99": _one_tensor_checkpoint([1], 4, f32, dtype=99),
            "zero_shards": _one_tensor_checkpoint([1], 4, f32, header=bundle_header(0)),
            "2e31_shards": _one_tensor_checkpoint([1], 4, f32, header=bundle_header(2**31)),
            "unknown_byte_order": _one_tensor_checkpoint([1], 4, f32, header=bundle_header(1, 2)),
            "future_version": _one_tensor_checkpoint([1], 4, f32, header=bundle_header(1, 0, min_consumer=2)),
            "snappy_blocks": _one_tensor_checkpoint([1], 4, f32, compression=1),
            "restart_count_2e32": _one_tensor_checkpoint(
                [1], 4, f32, mutate_block=lambda i, b: b[:-4] + b"\xff\xff\xff\xff" if i == 0 else b),
            "shared_prefix_longer_than_key": _one_tensor_checkpoint(
                [1], 4, f32, mutate_block=lambda i, b: b"\x05" + b[1:] if i == 0 else b),
            "index_only_footer": pack_files({f"{PREFIX}.index": bytes(40) + struct.pack("<Q", 0xDB4775248B80FB57)}),
        },
        "release_archive": {
            "xz_header_claiming_1536_mib_dictionary": lzma.compress(
                b"x" * 10, format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1536 << 20}]),
            "path_traversal": tar_bytes({"../../model.ckpt.index": b"x"}),
            "absolute_path": tar_bytes({"/tmp/model.pb": b"x"}),
            "symlink_to_etc_passwd": gzip.compress(
                _tar_member("model.pb", b"", kind=tarfile.SYMTYPE, linkname="/etc/passwd") + bytes(1024), mtime=0),
            "member_claiming_8_gib": _tar_member("model.pb", b"abc", claimed_size=(8 << 30) - 1) + bytes(1024),
            "two_members_one_name": tar_bytes({"a/model.pb": small_graph(), "b/model.pb": small_graph()}),
            "empty_gzip": gzip.compress(b"", mtime=0),
            "only_a_tflite": tar_bytes({"model.tflite": b"TFL3"}),
        },
        "hf_config": {
            "image_size_empty_list": json_bytes({**bare, "image_size": []}),
            "image_size_1e400": b'{"image_size": [1e400]}',
            "depth_multiplier_10_pow_400": json_bytes({**bare, "depth_multiplier": 10**400}),
            "layer_norm_eps_10_pow_400": json_bytes({**bare, "layer_norm_eps": 10**400}),
            "invalid_utf8": b'{"model_type": "mobilenet_v1", "x": "\xff\xfe"}',
            "utf16": json_bytes(bare).decode().encode("utf-16"),
            "nested_5000_deep": b"[" * 5000 + b"]" * 5000,
            "id2label_list": json_bytes({**bare, "id2label": ["a"]}),
            "model_type_bert": json_bytes({**bare, "model_type": "bert"}),
        },
        "safetensors": {
            "10gb_tensor_in_64_bytes": _safetensors_raw(
                {"w": {"dtype": "F32", "shape": [50_000, 50_000], "data_offsets": [0, TEN_GB]}}, bytes(64)),
            "header_length_2e64": _safetensors_raw({}, length=2**64 - 1),
            "offsets_reversed": _safetensors_raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
                                                 bytes(8)),
            "unknown_dtype": _safetensors_raw({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, f32),
            "config_metadata_nested_5000_deep": _safetensors_raw(
                {"__metadata__": {"format": "pt", "mnv1_backbone.config": "[" * 5000}}),
            "config_metadata_num_labels_1e12": _safetensors_raw(
                {"__metadata__": {"format": "pt", "mnv1_backbone.config": json.dumps({**bare, "num_labels": 10**12})},
                 "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, f32),
        },
        "pytorch_bin": {
            "legacy_format_claiming_8_gb": _legacy_with_storage_size(2**31 - 1),
            "zip_record_claiming_2_gb": _lying_zip_record(),
            "pickle_calling_eval": pickle.dumps({"w": _Payload(eval, "1 + 1")}, protocol=2),
            "pickle_calling_subprocess": b"\x80\x02csubprocess\ncheck_output\n(X\x02\x00\x00\x00idtR.",
            "zip_pickle_calling_eval": torch_zip_with_pickle(pickle.dumps({"w": _Payload(eval, "1 + 1")}, protocol=2)),
            "zip_pickle_calling_subprocess": torch_zip_with_pickle(
                b"\x80\x02csubprocess\ncheck_output\n(X\x02\x00\x00\x00idtR."),
            "empty": b"",
            "list_of_ints": torch_save_bytes([1, 2, 3]),
        },
        "hf_directory": {
            "num_labels_1e12": pack_files({"config.json": json_bytes({**bare, "num_labels": 10**12}),
                                           "model.safetensors": tiny_weights}),
            "depth_multiplier_1e300": pack_files({"config.json": json_bytes({**bare, "depth_multiplier": 1e300}),
                                                  "model.safetensors": tiny_weights}),
            "num_channels_1e9": pack_files({"config.json": json_bytes({**bare, "num_channels": 10**9}),
                                            "model.safetensors": tiny_weights}),
            "legacy_bin_claiming_8_gb": pack_files({"config.json": json_bytes(bare),
                                                    "pytorch_model.bin": _legacy_with_storage_size(2**31 - 1)}),
            "weights_without_config": pack_files({"model.safetensors": tiny_weights}),
        },
        "preprocessor_config": {
            "size_1e400": json_bytes({**PREPROCESSOR, "size": {"shortest_edge": 10**400}}),
            "image_mean_10_pow_400": json_bytes({**PREPROCESSOR, "image_mean": [0.5, 10**400, 0.5]}),
            "image_std_zero": json_bytes({**PREPROCESSOR, "image_std": 0}),
            "image_mean_nan": json_bytes({**PREPROCESSOR, "image_mean": float("nan")}),
            "resample_lanczos": json_bytes({**PREPROCESSOR, "resample": 1}),
            "top_level_list": b"[1, 2]",
        },
        "coco_json": {
            "bbox_width_10_pow_400": json_bytes({**small_coco(), "annotations": [
                {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10**400, 1]}]}),
            "area_overflowing_a_float": json_bytes({**small_coco(), "annotations": [
                {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10**300, 10**300]}]}),
            "annotation_id_0": json_bytes({**small_coco(), "annotations": [
                {"id": 0, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}]}),
            "duplicate_image_ids": json_bytes({**small_coco(), "images": [
                {"id": 1, "file_name": "a.png", "width": 4, "height": 4}] * 2}),
            "unknown_category": json_bytes({**small_coco(), "annotations": [
                {"id": 1, "image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1]}]}),
            "bbox_nan": b'{"images": [{"id": 1, "file_name": "a", "width": 4, "height": 4}], "categories": [{"id": 1, '
                        b'"name": "c"}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, '
                        b'"bbox": [NaN, 0, 1, 1]}]}',
            "nested_5000_deep": b"[" * 5000 + b"]" * 5000,
        },
    }


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*/*.bin"))


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_input(path: Path) -> None:
    reader = path.parent.name
    assert reader in READERS, f"{path}: no reader named {reader!r}"
    check_input(reader, path.read_bytes())


def test_corpus_covers_every_reader() -> None:
    assert {path.parent.name for path in corpus_files()} == set(READERS)


# =============================================================================================================
# The seeds themselves are read correctly (otherwise the mutations test nothing but the first check)
# =============================================================================================================
def test_seeds_are_valid_inputs(tmp_path: Path) -> None:
    graph = decode_frozen_graph(small_graph())
    assert graph["net/w"].shape == (2, 3, 4) and graph["net/b"].tolist() == [0.25] * 5
    assert graph["net/i"].tolist() == [1, -2, -2]
    for name, data in {
        "frozen_graph": small_graph(),
        "tf_checkpoint": pack_files(small_checkpoint()),
        "release_archive": small_release(),
        "hf_config": json_bytes(small_config_dict()),
        "safetensors": safetensors_bytes(small_state_dict(), {"format": "pt", "mnv1_backbone.config":
                                                                json.dumps(small_config_dict())}),
        "pytorch_bin": torch_save_bytes(small_state_dict()),
        "hf_directory": pack_files({"config.json": json_bytes(small_config_dict()),
                                    "model.safetensors": safetensors_bytes(_tiny_model_state())}),
        "preprocessor_config": json_bytes(PREPROCESSOR),
        "coco_json": json_bytes(small_coco()),
    }.items():
        assert check_input(name, data) == "ok", name


# =============================================================================================================
# Lying size headers: a tiny file claiming a huge tensor allocates nothing of that size
# =============================================================================================================
TEN_GB = 10 * 2**30


@contextlib.contextmanager
def traced_peak() -> Iterator[list[int]]:
    """Yield a list that holds the peak traced allocation (bytes) once the block ends."""
    result: list[int] = []
    tracemalloc.start()
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def test_frozen_graph_claiming_10_gb_allocates_nothing_of_the_kind() -> None:
    dims = [50_000, 50_000]  # 2.5e9 floats = 10 GB
    content = const_node(b"w", f_varint(1, 1) + f_bytes(2, shape_proto(dims)) + f_bytes(4, b"\0" * 16), 1)
    broadcast = const_node(b"w", f_varint(1, 1) + f_bytes(2, shape_proto(dims)) + f_bytes(5, b"\0" * 4), 1)
    cases = ((content, "tensor_content .* has 16 bytes"), (broadcast, r"broadcasting .* \(limit 134217728\)"))
    for data, match in cases:
        assert len(data) < 1024
        with traced_peak() as peak, pytest.raises(WeightsFormatError, match=match):
            decode_frozen_graph(data)  # the default broadcast cap (128 MiB) applies
        assert peak[0] < 1 << 20


def test_checkpoint_claiming_10_gb_allocates_nothing_of_the_kind(tmp_path: Path) -> None:
    dims = [2**17, 20480]  # 10 GiB of float32
    entry = bundle_entry(1, dims, 0, 0, TEN_GB, 0)
    files = {f"{PREFIX}.index": encode_table([(b"", bundle_header(1)), (b"w", entry)]),
             shard_name(0, 1): bytes(1000)}
    _write_files(tmp_path, files)
    checkpoint = TFCheckpoint(tmp_path / PREFIX)
    with traced_peak() as peak, pytest.raises(WeightsFormatError, match="past the end of the 1000-byte file"):
        checkpoint.read("w")
    assert peak[0] < 1 << 20


def _address_space_kb() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmPeak:"):
                return int(line.split()[1])
    raise AssertionError("no VmPeak in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_safetensors_claiming_10_gb_allocates_nothing_of_the_kind(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [50_000, 50_000], "data_offsets": [0, TEN_GB]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    before = _address_space_kb()
    with pytest.raises(WeightsFormatError, match="model.safetensors"):
        load_state_dict_file(path)
    # VmPeak is the high-water mark of the address space: a 10 GB reservation, even untouched, would raise it.
    assert _address_space_kb() - before < 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_legacy_pytorch_bin_claiming_8_gb_is_refused_before_allocating(tmp_path: Path) -> None:
    # torch's legacy (pre-1.6, non-zip) format allocates every storage at the size its pickle declares before
    # reading the data (torch/serialization.py `_legacy_load`), so such files are refused up front.
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(_legacy_with_storage_size(2**31 - 1))
    assert path.stat().st_size < 1024
    before = _address_space_kb()
    with pytest.raises(WeightsFormatError, match="legacy"):
        load_state_dict_file(path)
    assert _address_space_kb() - before < 2**20


def test_config_claiming_a_huge_model_is_refused_before_building_it(tmp_path: Path) -> None:
    from mnv1_backbone import MobileNetV1ForImageClassification, StateDictMismatchError

    config = small_config_dict()
    config.update(num_labels=10**9)  # 1e9 x 256 floats: 1 TB of classifier for a file of a few hundred KB
    config.pop("id2label")
    config.pop("label2id")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(_tiny_model_state()))
    match = r"config describes a model of 257,000,218,571 numbers, but the weights hold only 219,599"
    with pytest.raises(StateDictMismatchError, match=match):
        load_checkpoint(tmp_path)
    with pytest.raises(StateDictMismatchError, match=match):
        MobileNetV1ForImageClassification.from_pretrained(tmp_path)


# =============================================================================================================
# No unpickling of untrusted data
# =============================================================================================================
def test_the_only_torch_load_calls_use_weights_only() -> None:
    """Scan every Python file of the repository: each ``torch.load(`` call passes ``weights_only=True``."""
    calls = []
    for path in sorted(ROOT.rglob("*.py")):
        if any(part.startswith(".") or part in ("build", "dist", "node_modules") for part in path.parts):
            continue
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\btorch\.load\s*\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start() : end + 1]
            if path == Path(__file__).resolve() and "weights_only" not in call:
                continue  # this test's own pattern text
            calls.append((path.relative_to(ROOT), call))
    assert calls, "expected the library's torch.load calls to be found"
    unsafe = [(str(path), call) for path, call in calls if "weights_only=True" not in call.replace(" ", "")]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    # Nor may anything unpickle through the pickle module or its relatives directly.
    for path in sorted((ROOT / "mnv1_backbone").rglob("*.py")) + sorted((ROOT / "detection_demo").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\b(pickle|dill|cloudpickle|joblib|marshal)\.loads?\s*\(", text), path
        assert "import pickle" not in text and "import dill" not in text, path


class _RunsShell:
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        import subprocess

        return subprocess.check_call, (["sh", "-c", "touch pwned_by_subprocess"],)


class _RunsEval:
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        import builtins

        return builtins.eval, ("__import__('pathlib').Path('pwned_by_eval').touch()",)


@pytest.mark.parametrize("payload", [_RunsShell, _RunsEval], ids=["subprocess", "eval"])
@pytest.mark.parametrize("container", ["pickle", "torch zip"])
def test_malicious_pytorch_bin_is_refused_and_not_run(tmp_path: Path, monkeypatch, payload, container) -> None:
    from mnv1_backbone import MobileNetV1ForImageClassification

    monkeypatch.chdir(tmp_path)
    MobileNetV1Config(depth_multiplier=0.25).to_json_file(tmp_path / "config.json")
    state = {"classifier.weight": payload()}
    if container == "pickle":
        data = pickle.dumps(state, protocol=2)
    else:
        # A torch zip file (the layout torch.save writes), with the hostile object inside its data.pkl.
        data = torch_zip_with_pickle(pickle.dumps(state, protocol=2))
    (tmp_path / "pytorch_model.bin").write_bytes(data)
    with pytest.raises(WeightsFormatError, match="pytorch_model.bin") as refused:
        MobileNetV1ForImageClassification.from_pretrained(tmp_path)
    assert not list(tmp_path.glob("pwned*"))
    if container == "torch zip":  # refused by torch's weights-only unpickler, whose advice is not passed on
        assert "its pickle was refused (Unsupported global: GLOBAL" in str(refused.value)
        assert "weights_only" not in str(refused.value).replace("weights-only", "")
    # The payload is real: unpickled without weights_only it would have run.
    pickle.loads(pickle.dumps(payload(), protocol=2))
    assert list(tmp_path.glob("pwned*"))


def test_readers_prefer_safetensors_over_pickle(tmp_path: Path, monkeypatch) -> None:
    from mnv1_backbone import MobileNetV1ForImageClassification

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(small_config_dict()))
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(_tiny_model_state()))
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsEval()}, protocol=2))
    MobileNetV1ForImageClassification.from_pretrained(tmp_path)  # never opens the .bin
    assert not list(tmp_path.glob("pwned*"))


def test_time_limit_catches_a_hang() -> None:
    start = time.monotonic()
    with pytest.raises(ReaderHang), time_limit(0.2):
        while True:
            pass
    assert time.monotonic() - start < 5
