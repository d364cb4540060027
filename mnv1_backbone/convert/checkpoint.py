"""Read TensorFlow's name-based V2 checkpoints (``<prefix>.index`` + ``<prefix>.data-NNNNN-of-MMMMM``) without TF.

This is the format ``tf.compat.v1.train.Saver`` (and every TF-slim release) writes, described by TensorFlow's
``core/util/tensor_bundle/tensor_bundle.{h,cc}`` and ``core/protobuf/tensor_bundle.proto``:

* The ``.index`` file is an immutable sorted string table in LevelDB's layout (``core/lib/io/format.h``,
  ``block.cc``, ``table_builder.cc``). Its last 48 bytes are the footer: two block handles (varint offset and
  size of the metaindex and index blocks) padded to 40 bytes, then the magic number ``0xdb4775248b80fb57``
  (little-endian). Every block is followed by a 5-byte trailer: a compression type (0 = none, 1 = snappy) and
  the masked CRC-32C of the block and the type byte. A block is a run of prefix-compressed entries (varint
  shared key length, varint unshared length, varint value length, the unshared key bytes, the value) followed
  by the restart offsets (uint32 each) and their count (uint32). Entries of the index block map a key to the
  handle of the data block holding it.
* The table maps ``""`` to a ``BundleHeaderProto`` (num_shards, endianness, version) and every tensor name to
  a ``BundleEntryProto`` (dtype, shape, shard_id, offset, size, masked CRC-32C of the tensor's bytes).
* Shard ``i`` of ``n`` is ``<prefix>.data-{i:05d}-of-{n:05d}``: the raw bytes of each numeric tensor, in the
  byte order the header names, at the entry's offset.

Everything is checked before it is used: every length and offset is bounded by the real file size, every
block and tensor checksum is verified (TF's masking: ``((crc >> 15) | (crc << 17)) + 0xa282ead8``), and each
problem raises `WeightsFormatError` naming the file and, where there is one, the tensor. Snappy-compressed
tables, partitioned (sliced) variables and string tensors are not supported: the first two raise, string
tensors (e.g. a TF2 object graph) are skipped with a log line when reading everything.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mnv1_backbone.convert.protobuf import (
    WIRE_FIXED32,
    WIRE_LEN,
    WIRE_VARINT,
    Field,
    as_int32,
    as_int64,
    iter_fields,
    read_varint,
)
from mnv1_backbone.convert.tf_types import MAX_ARRAY_BYTES, MAX_ARRAY_DIMS, NON_NUMERIC_DTYPES, array_span
from mnv1_backbone.errors import WeightsFormatError

__all__ = [
    "CheckpointEntry",
    "TFCheckpoint",
    "checkpoint_prefix",
    "crc32c",
    "mask_crc32c",
    "read_tf_checkpoint",
    "unmask_crc32c",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TF's crc32c.h: reflected polynomial 0x82F63B78, initial value and final xor ~0.
# --------------------------------------------------------------------------------------------------------------
_CRC_POLY = 0x82F63B78
_CRC_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFF_FFFF


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()
_CRC_TABLE_NP = np.array(_CRC_TABLE, dtype=np.uint32)
# Below this many bytes the plain loop beats the vectorized path's set-up.
_CRC_VECTOR_MIN = 1 << 14


def _crc_loop(register: int, data: Iterable[int]) -> int:
    """The raw CRC register after feeding ``data`` byte by byte (no pre- or post-inversion)."""
    table = _CRC_TABLE
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


@lru_cache(maxsize=8)
def _zeros_operator(length: int) -> tuple[tuple[int, ...], ...]:
    """Tables of the linear map "advance the register over ``length`` zero bytes", one per register byte.

    The register update is linear over GF(2) in (register, data), so the register after a chunk C started
    from r is ``advance(r, len(C)) ^ crc_from_zero(C)``; ``advance`` is applied byte-wise by table lookups.
    """
    basis = np.array([1 << bit for bit in range(32)], dtype=np.uint32)
    for _ in range(length):
        basis = _CRC_TABLE_NP[basis & 0xFF] ^ (basis >> 8)
    images = [int(v) for v in basis]
    tables = []
    for shift in range(0, 32, 8):
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value  # the lowest set bit: table[value] = table[value without it] ^ its image
            table[value] = table[value ^ low] ^ images[shift + low.bit_length() - 1]
        tables.append(tuple(table))
    return tuple(tables)


@lru_cache(maxsize=1)
def _crc_table16() -> np.ndarray:
    """The register after feeding two bytes into a register holding only those bytes: 65536 entries."""
    register = np.arange(1 << 16, dtype=np.uint32)
    for _ in range(16):
        register = np.where(register & 1, (register >> 1) ^ np.uint32(_CRC_POLY), register >> 1).astype(np.uint32)
    return register


def _crc_vectorized(register: int, data: np.ndarray) -> int:
    """Advance ``register`` over ``data`` (uint8): chunks are run in lockstep with numpy, two bytes a step, then
    combined with the zero-advance operator."""
    chunk = 1 << max(8, min(12, (data.size.bit_length() - 3) // 2))  # 256..4096 bytes: measured sweet spot
    count = data.size // chunk
    # Little-endian pairs: the low byte is the one fed first.
    columns = np.ascontiguousarray(data[: count * chunk].view("<u2").reshape(count, chunk // 2).T)
    table = _crc_table16()
    partial = np.zeros(count, dtype=np.uint32)
    index = np.empty(count, dtype=np.uint32)
    looked_up = np.empty(count, dtype=np.uint32)
    for column in columns:
        np.bitwise_xor(partial, column, out=index)
        np.bitwise_and(index, 0xFFFF, out=index)
        np.take(table, index, out=looked_up)
        partial >>= 16
        partial ^= looked_up
    t0, t1, t2, t3 = _zeros_operator(chunk)
    for value in partial.tolist():
        register = (
            t0[register & 0xFF] ^ t1[(register >> 8) & 0xFF] ^ t2[(register >> 16) & 0xFF] ^ t3[register >> 24]
        ) ^ value
    return _crc_loop(register, data[count * chunk :].tobytes())


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, value: int = 0) -> int:
    """CRC-32C of ``data``, continuing from the CRC ``value`` of preceding bytes (``crc32c(b"123456789")`` is
    ``0xE3069283``). Pure Python and numpy; a few tens of MB take well under a second."""
    if isinstance(data, np.ndarray):
        array = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        array = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    register = value ^ _U32
    if array.size < _CRC_VECTOR_MIN:
        register = _crc_loop(register, array.tobytes())
    else:
        register = _crc_vectorized(register, array)
    return register ^ _U32


def mask_crc32c(crc: int) -> int:
    """TF's (and LevelDB's) stored form of a CRC: rotated right by 15 bits plus a constant."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _CRC_MASK_DELTA) & _U32


def unmask_crc32c(masked: int) -> int:
    """Inverse of `mask_crc32c`."""
    rotated = (masked - _CRC_MASK_DELTA) & _U32
    return ((rotated >> 17) | (rotated << 15)) & _U32


# --------------------------------------------------------------------------------------------------------------
# The sorted string table of the .index file.
# --------------------------------------------------------------------------------------------------------------
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # 2 block handles of at most 20 bytes each, padded to 40, then the 8-byte magic
_BLOCK_TRAILER_SIZE = 5
_COMPRESSION_NAMES = {0: "none", 1: "snappy"}


class _BlockHandle(NamedTuple):
    offset: int
    size: int


def _read_handle(buf: bytes, pos: int, end: int, *, what: str) -> tuple[_BlockHandle, int]:
    offset, pos = read_varint(buf, pos, end, what=f"{what} offset")
    size, pos = read_varint(buf, pos, end, what=f"{what} size")
    return _BlockHandle(offset, size), pos


def _read_block(data: bytes, handle: _BlockHandle, limit: int, *, what: str) -> bytes:
    """The contents of one block, after checking its bounds, compression type and checksum."""
    end = handle.offset + handle.size + _BLOCK_TRAILER_SIZE
    if end > limit:
        raise WeightsFormatError(
            f"{what} at bytes {handle.offset}..{end} (with its trailer) runs past the end of the table data "
            f"at byte {limit}: the file is truncated or corrupt"
        )
    block_end = handle.offset + handle.size
    compression = data[block_end]
    stored = unmask_crc32c(int.from_bytes(data[block_end + 1 : end], "little"))
    actual = crc32c(memoryview(data)[handle.offset : block_end + 1])  # the checksum covers the type byte
    if stored != actual:
        raise WeightsFormatError(
            f"{what} at byte {handle.offset} fails its checksum (stored crc32c {stored:#010x}, computed "
            f"{actual:#010x}): the file is corrupt"
        )
    if compression != 0:
        name = _COMPRESSION_NAMES.get(compression, "unknown")
        raise WeightsFormatError(
            f"{what} at byte {handle.offset} is compressed ({name}, type {compression}); only uncompressed "
            "tables are supported (TensorFlow writes checkpoint indexes uncompressed)"
        )
    return data[handle.offset : block_end]


def _iter_block(block: bytes, *, what: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield the (key, value) entries of a block, undoing the prefix compression."""
    size = len(block)
    if size < 4:
        raise WeightsFormatError(f"{what}: {size} bytes is too short for a block")
    num_restarts = int.from_bytes(block[-4:], "little")
    if num_restarts < 1 or 4 * (num_restarts + 1) > size:
        raise WeightsFormatError(f"{what}: {num_restarts} restart points do not fit in {size} bytes")
    limit = size - 4 * (num_restarts + 1)
    restarts = np.frombuffer(block, dtype="<u4", count=num_restarts, offset=limit)
    if restarts[0] != 0 or np.any(np.diff(restarts.astype(np.int64)) <= 0) or restarts[-1] >= max(limit, 1):
        raise WeightsFormatError(f"{what}: the restart points are not increasing offsets into the entries")
    restart_set = set(restarts.tolist())
    key = b""
    pos = 0
    while pos < limit:
        start = pos
        shared, pos = read_varint(block, pos, limit, what=f"{what} entry")
        unshared, pos = read_varint(block, pos, limit, what=f"{what} entry")
        value_size, pos = read_varint(block, pos, limit, what=f"{what} entry")
        if shared > len(key) or (start in restart_set and shared != 0):
            raise WeightsFormatError(f"{what}: entry at byte {start} shares {shared} bytes with the previous key")
        if unshared + value_size > limit - pos:
            raise WeightsFormatError(
                f"{what}: entry at byte {start} claims {unshared + value_size} bytes, {limit - pos} remain"
            )
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_size]
        pos += value_size


def _read_table(data: bytes, *, source: str) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable held in ``data``, in key order."""
    if len(data) < _FOOTER_SIZE:
        raise WeightsFormatError(
            f"{source}: {len(data)} bytes is shorter than a table footer ({_FOOTER_SIZE} bytes); "
            "the checkpoint index is truncated or empty"
        )
    footer = len(data) - _FOOTER_SIZE
    magic = int.from_bytes(data[-8:], "little")
    if magic != _TABLE_MAGIC:
        raise WeightsFormatError(
            f"{source}: not a TensorFlow checkpoint index (no table magic number at its end; the file is "
            "truncated or of another format)"
        )
    try:
        metaindex, pos = _read_handle(data, footer, footer + 40, what="metaindex handle")
        index, _ = _read_handle(data, pos, footer + 40, what="index handle")
        # The metaindex (empty in TF's bundles) is still read, so its checksum is verified.
        _read_block(data, metaindex, footer, what="metaindex block")
        index_block = _read_block(data, index, footer, what="index block")
        entries: list[tuple[bytes, bytes]] = []
        for number, (separator, handle_bytes) in enumerate(_iter_block(index_block, what="index block")):
            handle, _ = _read_handle(handle_bytes, 0, len(handle_bytes), what=f"handle of data block {number}")
            block = _read_block(data, handle, footer, what=f"data block {number}")
            for key, value in _iter_block(block, what=f"data block {number}"):
                if entries and key <= entries[-1][0]:
                    raise WeightsFormatError(f"data block {number}: key {key!r} is out of order")
                if key > separator:
                    raise WeightsFormatError(f"data block {number}: key {key!r} lies beyond its index key")
                entries.append((key, value))
    except WeightsFormatError as err:
        raise WeightsFormatError(f"{source}: invalid checkpoint index: {err}") from None
    return entries


# --------------------------------------------------------------------------------------------------------------
# BundleHeaderProto / BundleEntryProto (tensor_bundle.proto) and tensor data.
# --------------------------------------------------------------------------------------------------------------
_HEADER_NUM_SHARDS, _HEADER_ENDIANNESS, _HEADER_VERSION = 1, 2, 3
_VERSION_PRODUCER, _VERSION_MIN_CONSUMER, _VERSION_BAD_CONSUMERS = 1, 2, 3
_ENTRY_DTYPE, _ENTRY_SHAPE, _ENTRY_SHARD, _ENTRY_OFFSET, _ENTRY_SIZE, _ENTRY_CRC, _ENTRY_SLICES = 1, 2, 3, 4, 5, 6, 7
_SHAPE_DIM, _SHAPE_UNKNOWN_RANK, _DIM_SIZE = 2, 3, 1
# The bundle format version this reader implements (kTensorBundleVersion).
_BUNDLE_VERSION = 1

# TF DataType (types.proto) -> numpy dtype of the stored bytes (little-endian; the header may say big).
_NUMERIC_DTYPES: dict[int, tuple[str, str]] = {
    1: ("DT_FLOAT", "f4"),
    2: ("DT_DOUBLE", "f8"),
    3: ("DT_INT32", "i4"),
    4: ("DT_UINT8", "u1"),
    5: ("DT_INT16", "i2"),
    6: ("DT_INT8", "i1"),
    9: ("DT_INT64", "i8"),
    10: ("DT_BOOL", "b1"),
    14: ("DT_BFLOAT16", "u2"),  # widened to float32 when read
    17: ("DT_UINT16", "u2"),
    19: ("DT_HALF", "f2"),
    22: ("DT_UINT32", "u4"),
    23: ("DT_UINT64", "u8"),
}


def _dtype_name(code: int) -> str:
    if code in _NUMERIC_DTYPES:
        return _NUMERIC_DTYPES[code][0]
    return NON_NUMERIC_DTYPES.get(code, f"unknown dtype {code}")


class CheckpointEntry(NamedTuple):
    """Where one tensor lives: ``dtype`` is TF's name (``"DT_FLOAT"``), ``crc32c`` the unmasked checksum of its
    ``size`` bytes at ``offset`` in data shard ``shard_id``; ``sliced`` marks a partitioned variable."""

    name: str
    dtype: str
    dtype_code: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int
    sliced: bool


def _last(fields: list[Field], number: int, wire_type: int, what: str) -> Field | None:
    """The last occurrence of a singular field (protobuf's rule), checking its wire type."""
    found = None
    for field in fields:
        if field.number == number:
            if field.wire_type != wire_type:
                raise WeightsFormatError(f"{what}: field {field.number} has wire type {field.wire_type}")
            found = field
    return found


def _decode_header(value: bytes) -> tuple[int, bool]:
    """(num_shards, big_endian) of a BundleHeaderProto, checking its version."""
    fields = list(iter_fields(value, what="BundleHeaderProto"))
    num_shards = _last(fields, _HEADER_NUM_SHARDS, WIRE_VARINT, "BundleHeaderProto")
    endianness = _last(fields, _HEADER_ENDIANNESS, WIRE_VARINT, "BundleHeaderProto")
    version = _last(fields, _HEADER_VERSION, WIRE_LEN, "BundleHeaderProto")
    shards = as_int32(num_shards.value) if num_shards is not None else 0
    if not 1 <= shards <= 99999:
        raise WeightsFormatError(f"the header gives {shards} data shards")
    endian = endianness.value if endianness is not None else 0
    if endian not in (0, 1):
        raise WeightsFormatError(f"the header gives an unknown byte order {endian}")
    if version is not None:
        vfields = list(iter_fields(value, version.value, version.end, what="VersionDef"))
        min_consumer = _last(vfields, _VERSION_MIN_CONSUMER, WIRE_VARINT, "VersionDef")
        if min_consumer is not None and as_int32(min_consumer.value) > _BUNDLE_VERSION:
            raise WeightsFormatError(
                f"written in bundle format version {as_int32(min_consumer.value)} or later; this reader knows "
                f"version {_BUNDLE_VERSION}"
            )
        bad: list[int] = []
        for f in vfields:
            if f.number == _VERSION_BAD_CONSUMERS:
                if f.wire_type == WIRE_VARINT:
                    bad.append(as_int32(f.value))
                elif f.wire_type == WIRE_LEN:  # packed
                    pos = f.value
                    while pos < f.end:
                        item, pos = read_varint(value, pos, f.end, what="bad_consumers")
                        bad.append(as_int32(item))
        if _BUNDLE_VERSION in bad:
            raise WeightsFormatError(f"the header marks bundle format version {_BUNDLE_VERSION} as unable to read it")
    return shards, endian == 1


def _decode_shape(value: bytes, field: Field, what: str) -> tuple[int, ...]:
    dims: list[int] = []
    for f in iter_fields(value, field.value, field.end, what=f"{what} shape"):
        if f.number == _SHAPE_UNKNOWN_RANK and f.wire_type == WIRE_VARINT and f.value:
            raise WeightsFormatError(f"{what}: the shape has unknown rank")
        if f.number != _SHAPE_DIM:
            continue
        if f.wire_type != WIRE_LEN:
            raise WeightsFormatError(f"{what}: a shape dimension is not a message")
        size = _last(list(iter_fields(value, f.value, f.end, what=f"{what} dim")), _DIM_SIZE, WIRE_VARINT, what)
        dim = 0 if size is None else as_int64(size.value)
        if dim < 0:
            raise WeightsFormatError(f"{what}: dimension {len(dims)} is {dim}")
        dims.append(dim)
    return tuple(dims)


def _decode_entry(name: str, value: bytes) -> CheckpointEntry:
    what = f"entry {name!r}"
    fields = list(iter_fields(value, what=f"BundleEntryProto of {name!r}"))
    dtype = _last(fields, _ENTRY_DTYPE, WIRE_VARINT, what)
    shape = _last(fields, _ENTRY_SHAPE, WIRE_LEN, what)
    shard = _last(fields, _ENTRY_SHARD, WIRE_VARINT, what)
    offset = _last(fields, _ENTRY_OFFSET, WIRE_VARINT, what)
    size = _last(fields, _ENTRY_SIZE, WIRE_VARINT, what)
    crc = _last(fields, _ENTRY_CRC, WIRE_FIXED32, what)
    code = dtype.value if dtype is not None else 0
    entry = CheckpointEntry(
        name=name,
        dtype=_dtype_name(code),
        dtype_code=code,
        shape=_decode_shape(value, shape, what) if shape is not None else (),
        shard_id=as_int32(shard.value) if shard is not None else 0,
        offset=as_int64(offset.value) if offset is not None else 0,
        size=as_int64(size.value) if size is not None else 0,
        crc32c=unmask_crc32c(crc.value) if crc is not None else unmask_crc32c(0),
        sliced=any(f.number == _ENTRY_SLICES for f in fields),
    )
    if entry.offset < 0 or entry.size < 0:
        raise WeightsFormatError(f"{what}: negative offset {entry.offset} or size {entry.size}")
    return entry


def checkpoint_prefix(path: str | os.PathLike[str]) -> Path:
    """The checkpoint prefix for a prefix, its ``.index`` or one of its data files, or a directory holding a
    single checkpoint. Raises `FileNotFoundError` when there is no ``<prefix>.index``."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            found = ", ".join(p.name for p in indexes) or "none"
            raise FileNotFoundError(
                f"{path}: expected exactly one checkpoint (*.index) in the directory, found {found}"
            )
        return indexes[0].with_suffix("")
    name = path.name
    if name.endswith(".index"):
        prefix = path.with_name(name[: -len(".index")])
    elif (match := re.fullmatch(r"(.+)\.data-\d{5}-of-\d{5}", name)) is not None:
        prefix = path.with_name(match.group(1))
    else:
        prefix = path
    if not prefix.with_name(prefix.name + ".index").is_file():
        raise FileNotFoundError(
            f"no TF checkpoint at {path}: there is no {prefix.name}.index in {prefix.parent} (pass the checkpoint "
            "prefix, e.g. dir/mobilenet_v1_1.0_224.ckpt)"
        )
    return prefix


class TFCheckpoint:
    """A name-based V2 checkpoint: its index is read and checked at construction, tensors on demand.

    ``TFCheckpoint(prefix).read_all()`` gives ``{name: numpy array}``; `entries` describes each tensor without
    reading it. ``prefix`` may also be the ``.index`` file, a data file or a directory (see `checkpoint_prefix`).
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = checkpoint_prefix(prefix)
        self.index_path = self.prefix.with_name(self.prefix.name + ".index")
        source = str(self.index_path)
        data = self.index_path.read_bytes()
        table = _read_table(data, source=source)
        if not table or table[0][0] != b"":
            raise WeightsFormatError(f"{source}: the checkpoint index has no bundle header (the entry with key '')")
        try:
            self.num_shards, self.big_endian = _decode_header(table[0][1])
        except WeightsFormatError as err:
            raise WeightsFormatError(f"{source}: invalid bundle header: {err}") from None
        self.entries: dict[str, CheckpointEntry] = {}
        for key, value in table[1:]:
            if key.startswith(b"\x00"):
                # Keys of partitioned-variable slices are ordered codes starting with a zero byte.
                continue
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise WeightsFormatError(f"{source}: tensor name {key!r} is not UTF-8") from None
            try:
                entry = _decode_entry(name, value)
            except WeightsFormatError as err:
                raise WeightsFormatError(f"{source}: {err}") from None
            if not 0 <= entry.shard_id < self.num_shards:
                raise WeightsFormatError(
                    f"{source}: tensor {name!r} is in shard {entry.shard_id}, but the checkpoint has "
                    f"{self.num_shards} shard(s)"
                )
            self.entries[name] = entry
        self._shard_sizes: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"TFCheckpoint({str(self.prefix)!r}, {len(self.entries)} tensors, {self.num_shards} shard(s))"

    def data_path(self, shard_id: int) -> Path:
        """``<prefix>.data-{shard_id:05d}-of-{num_shards:05d}``."""
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def _shard_size(self, shard_id: int) -> int:
        if shard_id not in self._shard_sizes:
            path = self.data_path(shard_id)
            try:
                self._shard_sizes[shard_id] = path.stat().st_size
            except FileNotFoundError:
                raise WeightsFormatError(
                    f"{path}: data shard {shard_id} of {self.num_shards} of checkpoint {self.prefix} is missing"
                ) from None
        return self._shard_sizes[shard_id]

    def read(self, name: str, *, verify: bool = True) -> np.ndarray:
        """Read one tensor (a new, writable array) after checking its bounds and, with ``verify``, its checksum."""
        if name not in self.entries:
            raise KeyError(f"{name!r} is not in checkpoint {self.prefix}")
        entry = self.entries[name]
        path = self.data_path(entry.shard_id)
        what = f"tensor {name!r}"
        if entry.sliced:
            raise WeightsFormatError(
                f"{self.index_path}: {what} is a partitioned variable (saved in slices), which is not supported"
            )
        if entry.dtype_code not in _NUMERIC_DTYPES:
            raise WeightsFormatError(
                f"{self.index_path}: {what} has {entry.dtype}, which this reader does not support (numeric dtypes only)"
            )
        dtype_name, storage = _NUMERIC_DTYPES[entry.dtype_code]
        dtype = np.dtype(storage).newbyteorder(">" if self.big_endian else "<")
        if len(entry.shape) > MAX_ARRAY_DIMS:
            raise WeightsFormatError(
                f"{self.index_path}: {what} has {len(entry.shape)} dimensions; at most {MAX_ARRAY_DIMS} are supported"
            )
        if array_span(entry.shape, dtype.itemsize) > MAX_ARRAY_BYTES:
            raise WeightsFormatError(f"{self.index_path}: {what} has shape {list(entry.shape)}, over 2**63 bytes")
        count = math.prod(entry.shape)
        if count * dtype.itemsize != entry.size:
            raise WeightsFormatError(
                f"{self.index_path}: {what} claims {entry.size} bytes, but {dtype_name} {list(entry.shape)} "
                f"needs {count * dtype.itemsize}"
            )
        file_size = self._shard_size(entry.shard_id)
        if entry.offset + entry.size > file_size:
            raise WeightsFormatError(
                f"{path}: {what} lies at bytes {entry.offset}..{entry.offset + entry.size}, past the end of the "
                f"{file_size}-byte file: the data file is truncated"
            )
        with open(path, "rb") as handle:
            handle.seek(entry.offset)
            raw = handle.read(entry.size)
        if len(raw) != entry.size:
            raise WeightsFormatError(f"{path}: {what}: short read, the data file is truncated")
        if verify:
            actual = crc32c(raw)
            if actual != entry.crc32c:
                raise WeightsFormatError(
                    f"{path}: {what} fails its checksum (stored crc32c {entry.crc32c:#010x}, computed "
                    f"{actual:#010x} over bytes {entry.offset}..{entry.offset + entry.size}): the file is corrupt"
                )
        array = np.frombuffer(raw, dtype=dtype).reshape(entry.shape)
        if dtype_name == "DT_BFLOAT16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(dtype.newbyteorder("="), copy=True)

    def read_all(self, *, verify: bool = True) -> dict[str, np.ndarray]:
        """Every numeric tensor by name; non-numeric ones (strings, ...) are skipped with a log line."""
        tensors: dict[str, np.ndarray] = {}
        skipped: list[str] = []
        for name, entry in self.entries.items():
            if entry.dtype_code in NON_NUMERIC_DTYPES and not entry.sliced:
                skipped.append(f"{name} ({entry.dtype})")
                continue
            tensors[name] = self.read(name, verify=verify)
        if skipped:
            logger.info("%s: skipped %d non-numeric tensor(s): %s", self.prefix, len(skipped), ", ".join(skipped))
        return tensors


def read_tf_checkpoint(prefix: str | os.PathLike[str], *, verify: bool = True) -> dict[str, np.ndarray]:
    """``{tensor name: numpy array}`` of a V2 checkpoint (see `TFCheckpoint`), every checksum verified."""
    return TFCheckpoint(prefix).read_all(verify=verify)
