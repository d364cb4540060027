"""A small, bounds-checked decoder for the protobuf wire format.

It follows the encoding described in the Protocol Buffers documentation ("Encoding",
https://protobuf.dev/programming-guides/encoding/): a message is a sequence of (tag, value)
records, the tag being the varint ``field_number << 3 | wire_type``; wire type 0 is a varint,
1 a little-endian 64-bit value, 2 a length-delimited byte string (strings, bytes, sub-messages,
packed repeated scalars) and 5 a little-endian 32-bit value. Wire types 3 and 4 (groups) are
deprecated and unused by TensorFlow, so they are rejected.

Only what is needed to read TensorFlow's ``GraphDef`` is here; there is no schema machinery.
Fields are yielded lazily and length-delimited values are returned as ``(start, end)`` offsets
into the one shared buffer, so a 17 MB graph is never copied piecewise and every error can name
an absolute byte offset. Every length is checked against the real end of the enclosing message
before it is used: a lying header raises `WeightsFormatError` instead of allocating, indexing
out of range or looping. Every step consumes at least one byte, so decoding always terminates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from mnv1_backbone.errors import WeightsFormatError

__all__ = [
    "WIRE_FIXED32",
    "WIRE_FIXED64",
    "WIRE_LEN",
    "WIRE_VARINT",
    "Field",
    "as_int32",
    "as_int64",
    "decode_packed_fixed",
    "decode_packed_varints",
    "field_bytes",
    "field_str",
    "iter_fields",
    "read_varint",
    "repeated_fixed",
    "repeated_varints",
]

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5

_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "start-group", 4: "end-group", 5: "32-bit"}

# A varint encodes at most 64 bits in 7-bit groups, so a valid one is at most 10 bytes long.
_MAX_VARINT_BYTES = 10
# The protobuf spec caps field numbers at 2**29 - 1.
_MAX_FIELD_NUMBER = (1 << 29) - 1


class Field(NamedTuple):
    """One decoded (tag, value) record of a message.

    ``offset`` is the byte offset of the tag. For varint and fixed-width fields ``value`` is the
    unsigned integer read (fixed-width values are the raw little-endian bits) and ``end`` is the
    offset just past it. For length-delimited fields ``value`` is the offset of the first payload
    byte and ``end`` the offset just past the payload.
    """

    number: int
    wire_type: int
    offset: int
    value: int
    end: int


def read_varint(buf: bytes, pos: int, end: int, *, what: str = "varint") -> tuple[int, int]:
    """Decode one base-128 varint starting at ``pos``; return ``(value, next_pos)``.

    Raises `WeightsFormatError` when the varint runs past ``end`` or is longer than 10 bytes.
    """
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WeightsFormatError(f"truncated {what} at byte {start}: the data ends at byte {end}")
        if pos - start >= _MAX_VARINT_BYTES:
            raise WeightsFormatError(f"malformed {what} at byte {start}: longer than {_MAX_VARINT_BYTES} bytes")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            # Bits beyond 64 can only come from a corrupt 10th byte; protobuf parsers drop them.
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7


def iter_fields(buf: bytes, start: int = 0, end: int | None = None, *, what: str = "message") -> Iterator[Field]:
    """Yield the fields of the message occupying ``buf[start:end]`` in wire order.

    ``what`` names the message in error messages (e.g. ``"NodeDef"``). Unknown field numbers are
    yielded like any other (callers skip what they do not know, as protobuf parsers do); invalid
    tags, group wire types and values that run past ``end`` raise `WeightsFormatError`.
    """
    if end is None:
        end = len(buf)
    if not 0 <= start <= end <= len(buf):
        raise WeightsFormatError(f"{what}: bad bounds [{start}, {end}) for a buffer of {len(buf)} bytes")
    pos = start
    while pos < end:
        tag_offset = pos
        tag, pos = read_varint(buf, pos, end, what=f"field tag in {what}")
        number = tag >> 3
        wire_type = tag & 7
        if number == 0 or number > _MAX_FIELD_NUMBER:
            raise WeightsFormatError(f"invalid field number {number} in {what} at byte {tag_offset}")
        if wire_type == WIRE_VARINT:
            value, pos = read_varint(buf, pos, end, what=f"varint field {number} in {what}")
            yield Field(number, wire_type, tag_offset, value, pos)
        elif wire_type == WIRE_FIXED64 or wire_type == WIRE_FIXED32:
            size = 8 if wire_type == WIRE_FIXED64 else 4
            if pos + size > end:
                raise WeightsFormatError(
                    f"truncated {size * 8}-bit field {number} in {what} at byte {tag_offset}: "
                    f"needs {size} bytes, {end - pos} left"
                )
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
            yield Field(number, wire_type, tag_offset, value, pos)
        elif wire_type == WIRE_LEN:
            length, pos = read_varint(buf, pos, end, what=f"length of field {number} in {what}")
            if length > end - pos:
                raise WeightsFormatError(
                    f"length-delimited field {number} in {what} at byte {tag_offset} claims {length} bytes "
                    f"but only {end - pos} remain (truncated or not a protobuf)"
                )
            yield Field(number, wire_type, tag_offset, pos, pos + length)
            pos += length
        else:
            name = _WIRE_NAMES.get(wire_type, "unknown")
            raise WeightsFormatError(
                f"unsupported wire type {wire_type} ({name}) for field {number} in {what} at byte {tag_offset}"
            )


def _expect(field: Field, wire_type: int, what: str) -> None:
    if field.wire_type != wire_type:
        raise WeightsFormatError(
            f"field {field.number} of {what} at byte {field.offset} has wire type {field.wire_type} "
            f"({_WIRE_NAMES.get(field.wire_type, 'unknown')}), expected {_WIRE_NAMES[wire_type]}"
        )


def field_bytes(buf: bytes, field: Field, *, what: str = "message") -> bytes:
    """Return the payload of a length-delimited field (a copy)."""
    _expect(field, WIRE_LEN, what)
    return bytes(buf[field.value : field.end])


def field_str(buf: bytes, field: Field, *, what: str = "message") -> str:
    """Return the payload of a length-delimited field decoded as UTF-8 (proto3 ``string``)."""
    raw = field_bytes(buf, field, what=what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightsFormatError(
            f"field {field.number} of {what} at byte {field.offset} is not valid UTF-8 text"
        ) from exc


def as_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit varint as the two's-complement ``int64``/``int32`` it encodes.

    Negative ``int32`` values are also sign-extended to 64 bits on the wire, so this serves both.
    """
    return value - (1 << 64) if value >= (1 << 63) else value


def as_int32(value: int) -> int:
    """Reinterpret a varint as an ``int32`` (the low 32 bits, two's complement)."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def decode_packed_varints(buf: bytes, start: int, end: int, *, what: str = "packed varints") -> list[int]:
    """Decode the payload ``buf[start:end]`` of a packed repeated varint field (unsigned values)."""
    values: list[int] = []
    pos = start
    while pos < end:
        # Each varint consumes at least one byte, so the list can never outgrow the payload.
        value, pos = read_varint(buf, pos, end, what=what)
        values.append(value)
    return values


def decode_packed_fixed(buf: bytes, start: int, end: int, dtype: str, *, what: str = "packed values") -> np.ndarray:
    """Decode a packed repeated fixed-width field as a writable numpy array of ``dtype`` (e.g. ``"<f4"``)."""
    itemsize = np.dtype(dtype).itemsize
    length = end - start
    if length % itemsize:
        raise WeightsFormatError(
            f"{what} at byte {start}: {length} bytes is not a multiple of the {itemsize}-byte element size"
        )
    return np.frombuffer(buf, dtype=dtype, count=length // itemsize, offset=start).copy()


def repeated_varints(buf: bytes, fields: Iterable[Field], *, what: str = "repeated field") -> list[int]:
    """Collect a repeated varint field from its records, accepting both packed and unpacked encodings.

    Parsers must accept either form (the protobuf spec), and writers may mix them.
    """
    values: list[int] = []
    for field in fields:
        if field.wire_type == WIRE_LEN:
            values.extend(decode_packed_varints(buf, field.value, field.end, what=what))
        elif field.wire_type == WIRE_VARINT:
            values.append(field.value)
        else:
            _expect(field, WIRE_VARINT, what)
    return values


def repeated_fixed(buf: bytes, fields: Iterable[Field], dtype: str, *, what: str = "repeated field") -> np.ndarray:
    """Collect a repeated fixed-width field (float, double, fixed32/64), packed or unpacked, as an array."""
    np_dtype = np.dtype(dtype)
    if np_dtype.itemsize not in (4, 8):
        raise ValueError(f"fixed-width protobuf fields are 4 or 8 bytes, not {np_dtype.itemsize} ({dtype})")
    wire = WIRE_FIXED32 if np_dtype.itemsize == 4 else WIRE_FIXED64
    parts: list[np.ndarray] = []
    singles: list[int] = []
    for field in fields:
        if field.wire_type == WIRE_LEN:
            if singles:
                parts.append(np.array(singles, dtype=f"<u{np_dtype.itemsize}").view(np_dtype))
                singles = []
            parts.append(decode_packed_fixed(buf, field.value, field.end, dtype, what=what))
        elif field.wire_type == wire:
            singles.append(field.value)
        else:
            _expect(field, wire, what)
    if singles:
        parts.append(np.array(singles, dtype=f"<u{np_dtype.itemsize}").view(np_dtype))
    if not parts:
        return np.empty(0, dtype=np_dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
