"""Read the constants of a frozen TensorFlow ``GraphDef`` (``.pb``) without TensorFlow.

A "frozen" graph is a ``GraphDef`` in which every variable was replaced by a ``Const`` node of the
same name holding its value, so Google's released ``*_frozen.pb`` files carry the weights as
``TensorProto`` values. The message layout follows TensorFlow's own schema files
(``tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape,types}.proto``);
the value semantics (``tensor_content`` holds the raw little-endian array; otherwise the typed
``*_val`` field holds the values and, as ``Tensor::FromProto`` does, fewer values than elements
are padded with the last one, none meaning zeros) follow ``tensorflow/core/framework/tensor.cc``.

Decoding goes through the bounds-checked wire decoder in `mnv1_backbone.convert.protobuf`; every
malformed input raises `WeightsFormatError` naming the file, the node and the byte offset.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from mnv1_backbone.convert.protobuf import (
    WIRE_LEN,
    WIRE_VARINT,
    Field,
    as_int64,
    field_str,
    iter_fields,
    repeated_fixed,
    repeated_varints,
)
from mnv1_backbone.convert.tf_types import MAX_ARRAY_BYTES, MAX_ARRAY_DIMS, NON_NUMERIC_DTYPES, array_span
from mnv1_backbone.errors import WeightsFormatError

__all__ = [
    "DEFAULT_MAX_BROADCAST_BYTES",
    "GraphNode",
    "decode_frozen_graph",
    "decode_graph_nodes",
    "read_frozen_graph",
    "read_graph_nodes",
    "read_graph_ops",
]

logger = logging.getLogger(__name__)

# A Const may store one value and a huge shape (TF broadcasts it), so the output size is not bounded
# by the file size. Cap what such a broadcast may allocate; the largest MobileNet tensor is ~4 MB.
DEFAULT_MAX_BROADCAST_BYTES = 1 << 27
# Protobuf messages cannot exceed 2 GiB, so a larger file cannot be a GraphDef.
_MAX_PROTOBUF_BYTES = (1 << 31) - 1

# GraphDef / NodeDef / AttrValue / TensorProto / TensorShapeProto field numbers.
_GRAPH_NODE = 1
_NODE_NAME, _NODE_OP, _NODE_INPUT, _NODE_ATTR = 1, 2, 3, 5
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_ATTR_TYPE, _ATTR_SHAPE, _ATTR_TENSOR = 6, 7, 8
_TENSOR_DTYPE, _TENSOR_SHAPE, _TENSOR_CONTENT = 1, 2, 4
_SHAPE_DIM, _SHAPE_UNKNOWN_RANK = 2, 3
_DIM_SIZE = 1


class _DType(NamedTuple):
    """How one TF DataType is stored: numpy dtype of ``tensor_content`` and which ``*_val`` field."""

    name: str
    content: str  # little-endian numpy dtype of the raw bytes in tensor_content
    val_field: int  # TensorProto field number of the typed repeated values
    val_kind: str  # "float", "double" (fixed-width) or "int" (varint)


# TF DataType enum (types.proto) -> storage. bfloat16 has no numpy dtype; it is widened to float32.
_NUMERIC_DTYPES: dict[int, _DType] = {
    1: _DType("DT_FLOAT", "<f4", 5, "float"),
    2: _DType("DT_DOUBLE", "<f8", 6, "double"),
    3: _DType("DT_INT32", "<i4", 7, "int"),
    4: _DType("DT_UINT8", "u1", 7, "int"),
    5: _DType("DT_INT16", "<i2", 7, "int"),
    6: _DType("DT_INT8", "i1", 7, "int"),
    9: _DType("DT_INT64", "<i8", 10, "int"),
    10: _DType("DT_BOOL", "?", 11, "int"),
    14: _DType("DT_BFLOAT16", "<u2", 13, "int"),
    17: _DType("DT_UINT16", "<u2", 7, "int"),
    19: _DType("DT_HALF", "<f2", 13, "int"),
    22: _DType("DT_UINT32", "<u4", 16, "int"),
    23: _DType("DT_UINT64", "<u8", 17, "int"),
}
# The typed value fields of TensorProto, to tell "values stored under the wrong type" from "no values".
_VALUE_FIELDS = {
    5: "float_val",
    6: "double_val",
    7: "int_val",
    10: "int64_val",
    11: "bool_val",
    13: "half_val",
    16: "uint32_val",
    17: "uint64_val",
}


def _dtype_name(code: int) -> str:
    if code in _NUMERIC_DTYPES:
        return _NUMERIC_DTYPES[code].name
    return NON_NUMERIC_DTYPES.get(code, f"dtype {code}")


@dataclass(frozen=True)
class GraphNode:
    """One NodeDef of a graph, with what the weight readers need.

    ``dtype`` is the node's ``dtype`` attr (``T`` when there is none), ``shape`` the ``shape`` attr
    (``-1`` for unknown dims, ``None`` for unknown rank) or, for a Const, its tensor's shape.
    ``value`` is the decoded array of a Const with a numeric dtype, else None.
    """

    name: str
    op: str
    inputs: tuple[str, ...] = ()
    dtype: int | None = None
    shape: tuple[int, ...] | None = None
    value: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def dtype_name(self) -> str | None:
        """The TF name of ``dtype`` (e.g. ``"DT_FLOAT"``), or None."""
        return None if self.dtype is None else _dtype_name(self.dtype)


def _group(buf: bytes, start: int, end: int, what: str) -> dict[int, list[Field]]:
    """Parse one message into field number -> its records, in wire order."""
    fields: dict[int, list[Field]] = defaultdict(list)
    for f in iter_fields(buf, start, end, what=what):
        fields[f.number].append(f)
    return fields


def _last(fields: dict[int, list[Field]], number: int, wire_type: int, what: str) -> Field | None:
    """The effective value of a singular field: protobuf lets the last occurrence win."""
    records = fields.get(number)
    if not records:
        return None
    f = records[-1]
    if f.wire_type != wire_type:
        raise WeightsFormatError(
            f"field {number} of {what} at byte {f.offset} has wire type {f.wire_type}, expected {wire_type}"
        )
    return f


def _decode_shape(buf: bytes, start: int, end: int, *, what: str) -> tuple[int, ...] | None:
    fields = _group(buf, start, end, what)
    unknown = _last(fields, _SHAPE_UNKNOWN_RANK, WIRE_VARINT, what)
    if unknown is not None and unknown.value:
        return None
    dims: list[int] = []
    for dim_field in fields.get(_SHAPE_DIM, []):
        if dim_field.wire_type != WIRE_LEN:
            raise WeightsFormatError(f"{what}: dim at byte {dim_field.offset} is not a message")
        dim = _group(buf, dim_field.value, dim_field.end, f"{what} dim")
        size = _last(dim, _DIM_SIZE, WIRE_VARINT, f"{what} dim")
        dims.append(0 if size is None else as_int64(size.value))
    return tuple(dims)


def _int_values(raw: list[int], dt: _DType, *, what: str) -> np.ndarray:
    """Convert varint-coded values to the dtype, checking they fit (the wire form is 64-bit)."""
    if dt.name in ("DT_HALF", "DT_BFLOAT16"):
        # half_val holds the 16-bit patterns in int32 varints.
        target = np.dtype("<u2")
    else:
        target = np.dtype(dt.content)
    if target.kind == "u" or target.kind == "b":
        values = raw  # unsigned types are encoded as unsigned varints
    else:
        values = [as_int64(v) for v in raw]
    if values and target.kind != "b":
        info = np.iinfo(target)
        low, high = min(values), max(values)
        if low < info.min or high > info.max:
            raise WeightsFormatError(f"{what}: {dt.name} values out of range [{low}, {high}]")
    if target.kind == "b":
        return np.array([bool(v) for v in values], dtype=np.bool_)
    return np.array(values, dtype=target)


def _finish(array: np.ndarray, dt: _DType) -> np.ndarray:
    """Turn raw storage into the user-facing dtype (half patterns -> float16, bfloat16 -> float32)."""
    if dt.name == "DT_HALF":
        return array.view("<f2")
    if dt.name == "DT_BFLOAT16":
        return (array.astype("<u4") << 16).view("<f4")
    return array


def _check_array_shape(shape: tuple[int, ...], itemsize: int, *, what: str) -> None:
    if len(shape) > MAX_ARRAY_DIMS:
        raise WeightsFormatError(f"{what}: shape has {len(shape)} dimensions; at most {MAX_ARRAY_DIMS} are supported")
    if array_span(shape, itemsize) > MAX_ARRAY_BYTES:
        raise WeightsFormatError(f"{what}: shape {list(shape)} spans more than 2**63 bytes")


def _decode_tensor(
    buf: bytes, start: int, end: int, *, what: str, max_broadcast_bytes: int
) -> tuple[int, tuple[int, ...], np.ndarray | None]:
    """Decode a TensorProto into (dtype code, shape, array or None when the dtype is not numeric)."""
    fields = _group(buf, start, end, what)
    dtype_field = _last(fields, _TENSOR_DTYPE, WIRE_VARINT, what)
    code = 0 if dtype_field is None else dtype_field.value
    if code not in _NUMERIC_DTYPES and code not in NON_NUMERIC_DTYPES:
        raise WeightsFormatError(f"{what}: invalid TensorProto dtype {code} (not a TensorFlow DataType)")
    shape_field = _last(fields, _TENSOR_SHAPE, WIRE_LEN, what)
    shape = () if shape_field is None else _decode_shape(buf, shape_field.value, shape_field.end, what=what)
    if shape is None:
        raise WeightsFormatError(f"{what}: a constant tensor cannot have an unknown rank")
    if any(d < 0 for d in shape):
        raise WeightsFormatError(f"{what}: negative dimension in shape {list(shape)}")
    if code in NON_NUMERIC_DTYPES:
        return code, shape, None

    dt = _NUMERIC_DTYPES[code]
    storage = np.dtype(dt.content)
    _check_array_shape(shape, storage.itemsize, what=what)
    count = 1
    for d in shape:
        count *= d  # Python ints: a lying shape cannot overflow, it just fails the size checks below
    content = _last(fields, _TENSOR_CONTENT, WIRE_LEN, what)
    if content is not None and content.end > content.value:
        nbytes = content.end - content.value
        if nbytes != count * storage.itemsize:
            raise WeightsFormatError(
                f"{what}: tensor_content at byte {content.offset} has {nbytes} bytes, but {dt.name} "
                f"shape {list(shape)} needs {count * storage.itemsize}"
            )
        array = np.frombuffer(buf, dtype=storage, count=count, offset=content.value).copy()
        return code, shape, _finish(array, dt).reshape(shape)

    records = fields.get(dt.val_field, [])
    if dt.val_kind == "float":
        values = repeated_fixed(buf, records, "<f4", what=f"{what} float_val")
    elif dt.val_kind == "double":
        values = repeated_fixed(buf, records, "<f8", what=f"{what} double_val")
    else:
        values = _int_values(
            repeated_varints(buf, records, what=f"{what} {_VALUE_FIELDS[dt.val_field]}"), dt, what=what
        )
    if values.size == 0:
        misplaced = [name for num, name in _VALUE_FIELDS.items() if num != dt.val_field and fields.get(num)]
        if misplaced and count:
            raise WeightsFormatError(
                f"{what}: dtype {dt.name} keeps its values in {_VALUE_FIELDS[dt.val_field]}, "
                f"but this tensor stores them in {', '.join(misplaced)} (wrong dtype?)"
            )
    if values.size > count:
        raise WeightsFormatError(f"{what}: {values.size} values for {dt.name} shape {list(shape)} of {count} elements")
    if values.size < count:
        if count * storage.itemsize > max_broadcast_bytes:
            raise WeightsFormatError(
                f"{what}: broadcasting {values.size} value(s) to shape {list(shape)} would need "
                f"{count * storage.itemsize} bytes (limit {max_broadcast_bytes})"
            )
        # Tensor::FromProto pads with the last value given, or zeros when there is none.
        fill = values[-1] if values.size else np.zeros((), dtype=values.dtype)
        padded = np.empty(count, dtype=values.dtype)
        padded[: values.size] = values
        padded[values.size :] = fill
        values = padded
    return code, shape, _finish(values, dt).reshape(shape)


def _decode_node(buf: bytes, f: Field, index: int, *, max_broadcast_bytes: int) -> GraphNode:
    # Until the name is decoded, errors can only point at the node's position.
    label = f"node #{index} at byte {f.offset}"
    try:
        fields = _group(buf, f.value, f.end, "NodeDef")
        name_field = _last(fields, _NODE_NAME, WIRE_LEN, "NodeDef")
        name = "" if name_field is None else field_str(buf, name_field, what="NodeDef")
        if name:
            label = f"node {name!r} (byte {f.offset})"
        else:
            raise WeightsFormatError("has no name")
        op_field = _last(fields, _NODE_OP, WIRE_LEN, "NodeDef")
        op = "" if op_field is None else field_str(buf, op_field, what="NodeDef")
        if not op:
            raise WeightsFormatError("has no op")
        inputs = tuple(field_str(buf, i, what="NodeDef input") for i in fields.get(_NODE_INPUT, []))

        attrs: dict[str, dict[int, list[Field]]] = {}
        for entry in fields.get(_NODE_ATTR, []):
            if entry.wire_type != WIRE_LEN:
                raise WeightsFormatError(f"attr entry at byte {entry.offset} is not a message")
            kv = _group(buf, entry.value, entry.end, "attr entry")
            key_field = _last(kv, _ENTRY_KEY, WIRE_LEN, "attr entry")
            key = "" if key_field is None else field_str(buf, key_field, what="attr key")
            value_field = _last(kv, _ENTRY_VALUE, WIRE_LEN, "attr entry")
            attrs[key] = (
                {} if value_field is None else _group(buf, value_field.value, value_field.end, f"AttrValue {key!r}")
            )

        dtype: int | None = None
        for key in ("dtype", "T"):
            type_field = _last(attrs.get(key, {}), _ATTR_TYPE, WIRE_VARINT, f"attr {key!r}")
            if type_field is not None:
                dtype = type_field.value
                break
        shape: tuple[int, ...] | None = None
        shape_field = _last(attrs.get("shape", {}), _ATTR_SHAPE, WIRE_LEN, "attr 'shape'")
        if shape_field is not None:
            shape = _decode_shape(buf, shape_field.value, shape_field.end, what="attr 'shape'")

        value: np.ndarray | None = None
        if op == "Const":
            tensor_field = _last(attrs.get("value", {}), _ATTR_TENSOR, WIRE_LEN, "attr 'value'")
            if tensor_field is None:
                raise WeightsFormatError("is a Const without a 'value' tensor")
            code, shape, value = _decode_tensor(
                buf, tensor_field.value, tensor_field.end, what="value tensor", max_broadcast_bytes=max_broadcast_bytes
            )
            if dtype is not None and dtype != code:
                raise WeightsFormatError(
                    f"has dtype attr {_dtype_name(dtype)} but its value tensor is {_dtype_name(code)}"
                )
            dtype = code
    except WeightsFormatError as exc:
        raise WeightsFormatError(f"{label}: {exc}") from exc
    return GraphNode(name=name, op=op, inputs=inputs, dtype=dtype, shape=shape, value=value)


def _sniff(data: bytes) -> str | None:
    """Name common non-GraphDef files so the error says what was given instead."""
    if not data:
        return "the file is empty"
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        return "it is a zip archive (a PyTorch/Keras file?), not a GraphDef"
    if data.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed (a .tgz release archive? extract the *_frozen.pb from it)"
    if data.lstrip()[:5] in (b"node ", b"node{"):
        return "it looks like a text-format GraphDef (.pbtxt); only the binary format is supported"
    return None


def decode_graph_nodes(
    data: bytes | bytearray | memoryview,
    *,
    source: str = "<bytes>",
    max_broadcast_bytes: int = DEFAULT_MAX_BROADCAST_BYTES,
) -> list[GraphNode]:
    """Decode a binary ``GraphDef`` into its nodes, with the values of numeric Consts.

    ``source`` names the data in error messages. Raises `WeightsFormatError` for anything that is
    not a well-formed GraphDef with at least one node.
    """
    buf = bytes(data)
    hint = _sniff(buf)
    if hint is not None:
        raise WeightsFormatError(f"{source}: not a frozen TensorFlow GraphDef: {hint}")
    if len(buf) > _MAX_PROTOBUF_BYTES:
        raise WeightsFormatError(f"{source}: {len(buf)} bytes exceeds protobuf's 2 GiB message limit")
    nodes: list[GraphNode] = []
    seen: set[str] = set()
    skipped: list[str] = []
    try:
        for f in iter_fields(buf, 0, len(buf), what="GraphDef"):
            if f.number != _GRAPH_NODE:
                continue  # library, versions, ...: not needed for weights
            if f.wire_type != WIRE_LEN:
                raise WeightsFormatError(f"field 1 (node) at byte {f.offset} is not a message")
            node = _decode_node(buf, f, len(nodes), max_broadcast_bytes=max_broadcast_bytes)
            if node.name in seen:
                raise WeightsFormatError(f"duplicate node name {node.name!r} at byte {f.offset}")
            seen.add(node.name)
            if node.op == "Const" and node.value is None:
                skipped.append(node.name)
            nodes.append(node)
    except WeightsFormatError as exc:
        raise WeightsFormatError(f"{source}: not a valid frozen GraphDef: {exc}") from exc
    if not nodes:
        raise WeightsFormatError(f"{source}: not a frozen TensorFlow GraphDef: it contains no nodes")
    if skipped:
        logger.debug("%s: skipped %d Const node(s) with non-numeric dtypes: %s", source, len(skipped), skipped[:10])
    return nodes


def decode_frozen_graph(
    data: bytes | bytearray | memoryview,
    *,
    source: str = "<bytes>",
    max_broadcast_bytes: int = DEFAULT_MAX_BROADCAST_BYTES,
) -> dict[str, np.ndarray]:
    """Decode a binary ``GraphDef`` and return ``{Const node name: value}`` for every numeric Const."""
    nodes = decode_graph_nodes(data, source=source, max_broadcast_bytes=max_broadcast_bytes)
    return {node.name: node.value for node in nodes if node.value is not None}


def _read(path: str | os.PathLike[str]) -> bytes:
    # A missing or unreadable file is an OSError, not a format error: let it propagate unchanged.
    size = os.stat(path).st_size
    if size > _MAX_PROTOBUF_BYTES:
        raise WeightsFormatError(f"{os.fspath(path)}: {size} bytes exceeds protobuf's 2 GiB message limit")
    with open(path, "rb") as fh:
        return fh.read()


def read_graph_nodes(
    path: str | os.PathLike[str], *, max_broadcast_bytes: int = DEFAULT_MAX_BROADCAST_BYTES
) -> list[GraphNode]:
    """Read a binary ``GraphDef`` file and return its nodes (see `decode_graph_nodes`)."""
    return decode_graph_nodes(_read(path), source=os.fspath(path), max_broadcast_bytes=max_broadcast_bytes)


def read_graph_ops(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a binary ``GraphDef`` file and return ``{node name: op}`` in graph order."""
    return {node.name: node.op for node in read_graph_nodes(path)}


def read_frozen_graph(
    path: str | os.PathLike[str], *, max_broadcast_bytes: int = DEFAULT_MAX_BROADCAST_BYTES
) -> dict[str, np.ndarray]:
    """Read a frozen ``GraphDef`` (``.pb``) and return ``{Const node name: numpy array}``.

    Every Const with a numeric dtype is returned (float, double, half, bfloat16 as float32, signed
    and unsigned ints, bool); string and other non-numeric Consts are skipped. Raises
    `WeightsFormatError` naming the file and node when the file is not a well-formed GraphDef.
    """
    return decode_frozen_graph(_read(path), source=os.fspath(path), max_broadcast_bytes=max_broadcast_bytes)
