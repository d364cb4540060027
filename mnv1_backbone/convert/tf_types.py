"""What both TensorFlow weight readers (checkpoint and frozen graph) need to know about a stored tensor: which
DataType codes of TF's ``core/framework/types.proto`` hold no plain numbers, and the largest shape numpy can hold,
so that a file claiming more is refused with our `WeightsFormatError` instead of numpy's own error.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MAX_ARRAY_BYTES", "MAX_ARRAY_DIMS", "NON_NUMERIC_DTYPES", "array_span"]

# Valid TF dtypes that hold no plain numbers (strings, complex, quantized, resource, variant, float8, 4-bit ints).
# The readers skip them instead of rejecting the file: real checkpoints and graphs hold e.g. string tensors.
NON_NUMERIC_DTYPES: dict[int, str] = {
    7: "DT_STRING",
    8: "DT_COMPLEX64",
    11: "DT_QINT8",
    12: "DT_QUINT8",
    13: "DT_QINT32",
    15: "DT_QINT16",
    16: "DT_QUINT16",
    18: "DT_COMPLEX128",
    20: "DT_RESOURCE",
    21: "DT_VARIANT",
    24: "DT_FLOAT8_E5M2",
    25: "DT_FLOAT8_E4M3FN",
    26: "DT_FLOAT8_E4M3FNUZ",
    27: "DT_FLOAT8_E4M3B11FNUZ",
    28: "DT_FLOAT8_E5M2FNUZ",
    29: "DT_INT4",
    30: "DT_UINT4",
}

# numpy's limits (NPY_MAXDIMS, and a byte size that fits in a signed 64-bit intp): a shape beyond them would make
# numpy raise its own ValueError, even for an empty tensor such as [0, 2**62, 2**62].
MAX_ARRAY_DIMS = 64
MAX_ARRAY_BYTES = (1 << 63) - 1


def array_span(shape: Iterable[int], itemsize: int) -> int:
    """The byte size numpy bounds by `MAX_ARRAY_BYTES`: zero dims are skipped, since numpy bounds the product of
    the others even for an empty array. Python ints, so a lying shape cannot overflow."""
    span = itemsize
    for dim in shape:
        span *= max(dim, 1)
    return span
