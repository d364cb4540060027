"""Tests for the TensorFlow-free frozen-graph reader and the TF-slim -> Hugging Face name mapping.

Hand-built GraphDefs come from the tiny protobuf encoder below; the real-world check reads the frozen
``mobilenet_v1_1.0_224`` graph shipped in the ``nudity`` wheel (skipped when it is not installed).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mnv1_backbone.convert import (
    GraphNode,
    decode_frozen_graph,
    decode_graph_nodes,
    hf_to_tf_slim,
    read_frozen_graph,
    read_graph_nodes,
    read_graph_ops,
    tf_slim_to_hf,
)
from mnv1_backbone.convert.protobuf import (
    decode_packed_varints,
    iter_fields,
    read_varint,
    repeated_fixed,
    repeated_varints,
)
from mnv1_backbone.errors import WeightsFormatError

DATA = Path(__file__).parent / "data"

# ---------------------------------------------------------------------------------------------
# A minimal protobuf encoder (wire format only), enough to build GraphDefs by hand.
# ---------------------------------------------------------------------------------------------
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING, DT_INT64, DT_BOOL, DT_HALF = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    9,
    10,
    19,
)


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints are sent as 64-bit two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def f_varint(number: int, value: int) -> bytes:
    return key(number, 0) + varint(value)


def f_bytes(number: int, payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    return key(number, 2) + varint(len(payload)) + payload


def shape_proto(shape: tuple[int, ...]) -> bytes:
    return b"".join(f_bytes(2, f_varint(1, d)) for d in shape)


def tensor_proto(
    dtype: int,
    shape: tuple[int, ...] = (),
    *,
    content: bytes | None = None,
    float_val: list[float] | None = None,
    double_val: list[float] | None = None,
    int_val: list[int] | None = None,
    int64_val: list[int] | None = None,
    bool_val: list[bool] | None = None,
    half_val: list[int] | None = None,
    packed: bool = True,
) -> bytes:
    out = f_varint(1, dtype)
    if shape:
        out += f_bytes(2, shape_proto(shape))
    if content is not None:
        out += f_bytes(4, content)
    if float_val is not None:
        if packed:
            out += f_bytes(5, struct.pack(f"<{len(float_val)}f", *float_val))
        else:
            out += b"".join(key(5, 5) + struct.pack("<f", v) for v in float_val)
    if double_val is not None:
        out += f_bytes(6, struct.pack(f"<{len(double_val)}d", *double_val))
    for number, values in ((7, int_val), (10, int64_val), (11, bool_val), (13, half_val)):
        if values is not None:
            if packed:
                out += f_bytes(number, b"".join(varint(int(v)) for v in values))
            else:
                out += b"".join(f_varint(number, int(v)) for v in values)
    return out


def attr(name: str, value: bytes) -> bytes:
    return f_bytes(5, f_bytes(1, name) + f_bytes(2, value))


def node(name: str, op: str, inputs: tuple[str, ...] = (), attrs: bytes = b"") -> bytes:
    body = f_bytes(1, name) + f_bytes(2, op) + b"".join(f_bytes(3, i) for i in inputs) + attrs
    return f_bytes(1, body)


def const(name: str, tensor: bytes, dtype: int | None = None) -> bytes:
    if dtype is None:
        dtype = next(iter_fields(tensor)).value
    return node(name, "Const", attrs=attr("dtype", f_varint(6, dtype)) + attr("value", f_bytes(8, tensor)))


def array_const(name: str, array: np.ndarray) -> bytes:
    codes = {
        np.dtype("float32"): DT_FLOAT,
        np.dtype("float64"): DT_DOUBLE,
        np.dtype("int32"): DT_INT32,
        np.dtype("int64"): DT_INT64,
        np.dtype("uint8"): DT_UINT8,
    }
    return const(
        name,
        tensor_proto(codes[array.dtype], array.shape, content=array.astype(array.dtype.newbyteorder("<")).tobytes()),
    )


def small_graph() -> bytes:
    weights = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    return (
        node(
            "input",
            "Placeholder",
            attrs=attr("dtype", f_varint(6, DT_FLOAT)) + attr("shape", f_bytes(7, shape_proto((-1, 224, 224, 3)))),
        )
        + array_const("net/w", weights)
        + node("net/w/read", "Identity", inputs=("net/w",))
        + const("net/b", tensor_proto(DT_FLOAT, (5,), float_val=[0.25]))
        + const("net/label", tensor_proto(DT_STRING, (1,)))
        + node("net/out", "Conv2D", inputs=("input", "net/w/read"))
    )


# ---------------------------------------------------------------------------------------------
# (a) the wire decoder and the GraphDef reader on hand-built bytes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31 - 1, 2**63, 2**64 - 1])
def test_varint_round_trip(value: int) -> None:
    encoded = varint(value) + b"tail"
    assert read_varint(encoded, 0, len(encoded)) == (value, len(varint(value)))


def test_iter_fields_all_wire_types() -> None:
    message = f_varint(1, 150) + key(2, 1) + struct.pack("<d", 2.5) + f_bytes(3, b"abc") + key(4, 5) + b"\x01\0\0\0"
    fields = list(iter_fields(message))
    assert [(f.number, f.wire_type) for f in fields] == [(1, 0), (2, 1), (3, 2), (4, 5)]
    assert fields[0].value == 150
    assert struct.unpack("<d", fields[1].value.to_bytes(8, "little"))[0] == 2.5
    assert message[fields[2].value : fields[2].end] == b"abc"
    assert fields[3].value == 1


def test_packed_and_unpacked_repeated_fields_agree() -> None:
    packed = f_bytes(7, b"".join(varint(v) for v in (1, -2, 300)))
    unpacked = b"".join(f_varint(7, v) for v in (1, -2, 300))
    for message in (packed, unpacked, packed + unpacked):
        values = repeated_varints(message, iter_fields(message))
        assert [v - (1 << 64) if v >= 1 << 63 else v for v in values][:3] == [1, -2, 300]
    floats = f_bytes(5, struct.pack("<2f", 1.5, -2.0)) + key(5, 5) + struct.pack("<f", 4.0)
    np.testing.assert_array_equal(repeated_fixed(floats, iter_fields(floats), "<f4"), [1.5, -2.0, 4.0])
    assert decode_packed_varints(varint(5) + varint(2**40), 0, len(varint(5) + varint(2**40))) == [5, 2**40]


def test_graph_tensor_content_broadcast_and_ops() -> None:
    data = small_graph()
    tensors = decode_frozen_graph(data)
    assert set(tensors) == {"net/w", "net/b"}  # the string Const is skipped, non-Consts have no value
    np.testing.assert_array_equal(tensors["net/w"], np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7)
    assert tensors["net/w"].dtype == np.float32 and tensors["net/w"].flags.writeable
    np.testing.assert_array_equal(tensors["net/b"], np.full(5, 0.25, np.float32))  # one value broadcast
    nodes = {n.name: n for n in decode_graph_nodes(data)}
    assert nodes["input"].op == "Placeholder" and nodes["input"].shape == (-1, 224, 224, 3)
    assert nodes["input"].dtype_name == "DT_FLOAT"
    assert nodes["net/out"].inputs == ("input", "net/w/read")
    assert nodes["net/label"].value is None and nodes["net/label"].dtype_name == "DT_STRING"


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (tensor_proto(DT_INT32, (3,), int_val=[-5, 0, 2**31 - 1]), np.array([-5, 0, 2**31 - 1], np.int32)),
        (tensor_proto(DT_INT32, (2, 2), int_val=[7], packed=False), np.full((2, 2), 7, np.int32)),
        (tensor_proto(DT_INT8, (2,), int_val=[-128, 127]), np.array([-128, 127], np.int8)),
        (tensor_proto(DT_UINT8, (2,), int_val=[0, 255]), np.array([0, 255], np.uint8)),
        (tensor_proto(DT_INT16, (1,), int_val=[-300]), np.array([-300], np.int16)),
        (tensor_proto(DT_INT64, (2,), int64_val=[-(2**40), 2**62]), np.array([-(2**40), 2**62], np.int64)),
        (tensor_proto(DT_BOOL, (3,), bool_val=[True, False, True]), np.array([True, False, True])),
        (tensor_proto(DT_DOUBLE, (), double_val=[0.1]), np.array(0.1)),
        (tensor_proto(DT_HALF, (2,), half_val=[0x3C00, 0xC000]), np.array([1.0, -2.0], np.float16)),
        (tensor_proto(DT_FLOAT, (2, 2), float_val=[1.0, 2.0], packed=False), np.array([[1, 2], [2, 2]], np.float32)),
        (tensor_proto(DT_FLOAT, (3,)), np.zeros(3, np.float32)),  # no values: zeros, as Tensor::FromProto
        (tensor_proto(DT_FLOAT, (0, 4)), np.zeros((0, 4), np.float32)),
        (tensor_proto(DT_INT32, (2,), content=np.array([1, -1], "<i4").tobytes()), np.array([1, -1], np.int32)),
    ],
)
def test_numeric_dtypes(tensor: bytes, expected: np.ndarray) -> None:
    value = decode_frozen_graph(const("c", tensor))["c"]
    assert value.dtype == expected.dtype and value.shape == expected.shape
    np.testing.assert_array_equal(value, expected)


def test_read_from_file(tmp_path: Path) -> None:
    path = tmp_path / "g.pb"
    path.write_bytes(small_graph())
    assert set(read_frozen_graph(path)) == {"net/w", "net/b"}
    assert read_graph_ops(path) == {
        "input": "Placeholder",
        "net/w": "Const",
        "net/w/read": "Identity",
        "net/b": "Const",
        "net/label": "Const",
        "net/out": "Conv2D",
    }
    assert len(read_graph_nodes(str(path))) == 6


# ---------------------------------------------------------------------------------------------
# (b) malformed input: always WeightsFormatError, with file, node and offset named
# ---------------------------------------------------------------------------------------------
def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pb"
    path.write_bytes(b"")
    with pytest.raises(WeightsFormatError, match=r"empty\.pb.*empty"):
        read_frozen_graph(path)


def test_truncated_file(tmp_path: Path) -> None:
    data = small_graph()
    path = tmp_path / "cut.pb"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFormatError, match=r"cut\.pb: not a valid frozen GraphDef: .*(claims|truncated)"):
        read_frozen_graph(path)


def test_every_truncation_is_handled() -> None:
    data = small_graph()
    for cut in range(1, len(data)):
        try:
            decode_frozen_graph(data[:cut])
        except WeightsFormatError:
            pass  # a cut exactly between nodes is a valid, shorter graph; anything else must raise this


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(seed: int) -> None:
    data = random.Random(seed).randbytes(4096)
    with pytest.raises(WeightsFormatError, match="not a"):
        decode_frozen_graph(data, source="noise.bin")


def test_random_corruption_never_crashes() -> None:
    rng = random.Random(1234)
    data = bytearray(small_graph())
    for _ in range(300):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        try:
            decode_frozen_graph(bytes(corrupt))
        except WeightsFormatError:
            pass


def test_zip_file(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.pkl", b"not a graph")
    path = tmp_path / "model.pt"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(WeightsFormatError, match=r"model\.pt: .*zip"):
        read_frozen_graph(path)


def test_huge_length_claim() -> None:
    data = key(1, 2) + varint(2**40) + b"\0" * 16
    with pytest.raises(WeightsFormatError, match=r"field 1 in GraphDef at byte 0 claims 1099511627776 bytes"):
        decode_frozen_graph(data)
    nested = node("big", "Const", attrs=key(5, 2) + varint(2**40))
    with pytest.raises(WeightsFormatError, match=r"node #0 at byte 0: .*claims 1099511627776 bytes"):
        decode_frozen_graph(nested)


def test_huge_broadcast_is_refused() -> None:
    bomb = const("bomb", tensor_proto(DT_FLOAT, (2**20, 2**20), float_val=[1.0]))
    with pytest.raises(WeightsFormatError, match=r"node 'bomb'.*broadcasting 1 value"):
        decode_frozen_graph(bomb)


def test_overlong_varint() -> None:
    with pytest.raises(WeightsFormatError, match=r"longer than 10 bytes"):
        decode_frozen_graph(key(1, 0) + b"\xff" * 11 + b"\x01")


def test_group_wire_type() -> None:
    with pytest.raises(WeightsFormatError, match=r"wire type 3 \(start-group\) for field 1 in GraphDef at byte 0"):
        decode_frozen_graph(key(1, 3) + key(1, 4))


@pytest.mark.parametrize(
    ("graph", "pattern"),
    [
        # the Const's dtype attr disagrees with its tensor
        (
            const("w", tensor_proto(DT_FLOAT, (1,), float_val=[1.0]), dtype=DT_INT32),
            r"node 'w'.*dtype attr DT_INT32 but its value tensor is DT_FLOAT",
        ),
        (const("w", tensor_proto(999, (1,))), r"node 'w'.*invalid TensorProto dtype 999"),
        (const("w", tensor_proto(0, (1,))), r"node 'w'.*invalid TensorProto dtype 0"),
        # float values stored for an int tensor
        (const("w", tensor_proto(DT_INT32, (2,), float_val=[1.0, 2.0])), r"node 'w'.*DT_INT32.*float_val.*wrong dtype"),
        (const("w", tensor_proto(DT_FLOAT, (2, 2), content=b"\0" * 12)), r"node 'w'.*has 12 bytes.*needs 16"),
        (const("w", tensor_proto(DT_FLOAT, (2,), float_val=[1.0, 2.0, 3.0])), r"node 'w'.*3 values.*2 elements"),
        (const("w", tensor_proto(DT_UINT8, (1,), int_val=[256])), r"node 'w'.*out of range"),
        (const("w", tensor_proto(DT_FLOAT, (-1, 3))), r"node 'w'.*negative dimension"),
    ],
)
def test_wrong_dtype_or_shape(graph: bytes, pattern: str) -> None:
    with pytest.raises(WeightsFormatError, match=pattern):
        decode_frozen_graph(graph, source="bad.pb")


def test_node_errors_name_file_and_node(tmp_path: Path) -> None:
    path = tmp_path / "dup.pb"
    path.write_bytes(small_graph() + array_const("net/w", np.zeros(1, np.float32)))
    with pytest.raises(WeightsFormatError, match=r"dup\.pb: .*duplicate node name 'net/w'"):
        read_frozen_graph(path)
    with pytest.raises(WeightsFormatError, match=r"node #0 .*not valid UTF-8"):
        decode_frozen_graph(f_bytes(1, f_bytes(1, b"\xff\xfe") + f_bytes(2, "Const")))
    with pytest.raises(WeightsFormatError, match=r"node 'x'.*Const without a 'value'"):
        decode_frozen_graph(node("x", "Const"))
    with pytest.raises(WeightsFormatError, match=r"contains no nodes"):
        decode_frozen_graph(f_bytes(4, f_varint(1, 26)))  # only a VersionDef


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_frozen_graph(tmp_path / "absent.pb")


# ---------------------------------------------------------------------------------------------
# (c) TF-slim <-> HF mapping on synthetic weights
# ---------------------------------------------------------------------------------------------
# Output channels at alpha 1 of the stem, then depthwise/pointwise of blocks 1..13 (paper Table 1).
_BASES = [32, 32, 64, 64, 128, 128, 128, 128, 256, 256, 256, 256, 512] + [512] * 11 + [1024, 1024, 1024]


def slim_weights(
    alpha: float = 0.25, min_depth: int = 8, num_labels: int | None = 10, seed: int = 0, in_channels: int = 3
) -> dict[str, np.ndarray]:
    """Random TF-slim MobileNetV1 variables with the layouts of slim's mobilenet_v1.py."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    channels = [max(int(c * alpha), min_depth) for c in _BASES]
    scopes = ["Conv2d_0"] + [f"Conv2d_{k}_{kind}" for k in range(1, 14) for kind in ("depthwise", "pointwise")]
    prev = in_channels
    for scope, c in zip(scopes, channels, strict=True):
        if scope == "Conv2d_0":
            out[f"MobilenetV1/{scope}/weights"] = rng.standard_normal((3, 3, prev, c), np.float32)
        elif scope.endswith("depthwise"):
            out[f"MobilenetV1/{scope}/depthwise_weights"] = rng.standard_normal((3, 3, prev, 1), np.float32)
        else:
            out[f"MobilenetV1/{scope}/weights"] = rng.standard_normal((1, 1, prev, c), np.float32)
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            out[f"MobilenetV1/{scope}/BatchNorm/{name}"] = rng.random(c, np.float32)
        prev = c
    if num_labels:
        out["MobilenetV1/Logits/Conv2d_1c_1x1/weights"] = rng.standard_normal((1, 1, prev, num_labels), np.float32)
        out["MobilenetV1/Logits/Conv2d_1c_1x1/biases"] = rng.standard_normal(num_labels, np.float32)
    return out


def test_mapping_round_trip_and_layouts() -> None:
    slim = slim_weights()
    state, config = tf_slim_to_hf(slim)
    assert config == {"depth_multiplier": 0.25, "num_labels": 10}
    assert len(state) == 164
    stem = slim["MobilenetV1/Conv2d_0/weights"]
    assert torch.equal(state["mobilenet_v1.conv_stem.convolution.weight"], torch.from_numpy(stem).permute(3, 2, 0, 1))
    dw = slim["MobilenetV1/Conv2d_13_depthwise/depthwise_weights"]  # [3, 3, 256, 1]
    assert state["mobilenet_v1.layer.24.convolution.weight"].shape == (256, 1, 3, 3)
    assert state["mobilenet_v1.layer.24.convolution.weight"][5, 0, 1, 2] == dw[1, 2, 5, 0]
    pw = slim["MobilenetV1/Conv2d_2_pointwise/weights"]  # [1, 1, 16, 32]
    assert state["mobilenet_v1.layer.3.convolution.weight"][7, 3, 0, 0] == pw[0, 0, 3, 7]
    logits = slim["MobilenetV1/Logits/Conv2d_1c_1x1/weights"]
    assert torch.equal(state["classifier.weight"], torch.from_numpy(logits[0, 0].T))
    assert torch.equal(
        state["mobilenet_v1.layer.25.normalization.running_var"],
        torch.from_numpy(slim["MobilenetV1/Conv2d_13_pointwise/BatchNorm/moving_variance"]),
    )
    assert state["mobilenet_v1.layer.7.normalization.num_batches_tracked"].dtype == torch.int64
    back = hf_to_tf_slim(state)
    assert set(back) == set(slim)
    for name, value in slim.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    # the bare-model keys (no "mobilenet_v1." prefix) are accepted too
    bare = {k.removeprefix("mobilenet_v1."): v for k, v in state.items() if not k.startswith("classifier.")}
    assert len(hf_to_tf_slim(bare)) == len(slim) - 2


def test_hf_model_round_trip() -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.MobileNetV1ForImageClassification(
        transformers.MobileNetV1Config(depth_multiplier=0.25, num_labels=7)
    )
    original = model.state_dict()
    state, config = tf_slim_to_hf(hf_to_tf_slim(original))
    assert config == {"depth_multiplier": 0.25, "num_labels": 7}
    assert list(state) == list(original)
    for name, value in original.items():
        assert torch.equal(state[name], value), name


def test_torch_inputs_and_output_does_not_alias() -> None:
    slim = slim_weights()
    state, _ = tf_slim_to_hf({k: torch.from_numpy(v) for k, v in slim.items()})
    state["mobilenet_v1.layer.0.normalization.bias"].zero_()
    assert slim["MobilenetV1/Conv2d_1_depthwise/BatchNorm/beta"].any()


def test_ema_preference_and_ignored_names(caplog: pytest.LogCaptureFixture) -> None:
    slim = slim_weights()
    ema = {f"{k}/ExponentialMovingAverage": v + 100 for k, v in slim.items() if "moving_" not in k}
    extra = {
        "global_step": np.array(5),
        "MobilenetV1/Conv2d_0/weights/RMSProp": np.zeros(1, np.float32),
        "MobilenetV1/Conv2d_0/weights/RMSProp_1": np.zeros(1, np.float32),
        "MobilenetV1/Conv2d_0/weights/Momentum": np.zeros(1, np.float32),
        "MobilenetV1/Conv2d_0/BatchNorm/gamma/Adam": np.zeros(1, np.float32),
        "final_training_ops/weights/final_weights": np.zeros((10, 2), np.float32),
        "input": np.zeros(1, np.float32),
    }
    tensors = {**slim, **ema, **extra}
    with caplog.at_level(logging.INFO, logger="mnv1_backbone.convert.tf_slim"):
        preferred, _ = tf_slim_to_hf(tensors)
    expected = torch.from_numpy(slim["MobilenetV1/Conv2d_0/weights"] + 100).permute(3, 2, 0, 1)
    assert torch.equal(preferred["mobilenet_v1.conv_stem.convolution.weight"], expected)
    assert torch.equal(
        preferred["classifier.bias"], torch.from_numpy(slim["MobilenetV1/Logits/Conv2d_1c_1x1/biases"] + 100)
    )
    log = caplog.text
    assert "ignored 4 optimizer slots" in log and "ignored 1 global_step" in log
    assert "ignored 2 outside the scope" in log and "from EMA shadows" in log
    raw, _ = tf_slim_to_hf(tensors, prefer_ema=False)
    assert torch.equal(raw["classifier.bias"], torch.from_numpy(slim["MobilenetV1/Logits/Conv2d_1c_1x1/biases"]))
    # only the EMA shadow present: it is used even with prefer_ema=False
    only_ema = dict(slim)
    only_ema["MobilenetV1/Conv2d_0/weights/ExponentialMovingAverage"] = only_ema.pop("MobilenetV1/Conv2d_0/weights")
    state, _ = tf_slim_to_hf(only_ema, prefer_ema=False)
    assert torch.equal(
        state["mobilenet_v1.conv_stem.convolution.weight"],
        torch.from_numpy(slim["MobilenetV1/Conv2d_0/weights"]).permute(3, 2, 0, 1),
    )


def test_missing_tensors_are_listed() -> None:
    slim = slim_weights()
    del slim["MobilenetV1/Conv2d_5_depthwise/depthwise_weights"]
    del slim["MobilenetV1/Conv2d_7_pointwise/BatchNorm/moving_mean"]
    with pytest.raises(
        WeightsFormatError,
        match=r"2 required tensor\(s\) missing.*"
        r"MobilenetV1/Conv2d_5_depthwise/depthwise_weights.*"
        r"MobilenetV1/Conv2d_7_pointwise/BatchNorm/moving_mean",
    ):
        tf_slim_to_hf(slim)
    with pytest.raises(WeightsFormatError, match=r"no tensor name starts with 'FeatureExtractor/MobilenetV1/'"):
        tf_slim_to_hf(slim_weights(), scope="FeatureExtractor/MobilenetV1")
    folded = {k: v for k, v in slim_weights().items() if "BatchNorm" not in k}
    folded["MobilenetV1/Conv2d_0/biases"] = np.zeros(8, np.float32)
    with pytest.raises(WeightsFormatError, match=r"108 required tensor\(s\) missing.*batch norm was folded"):
        tf_slim_to_hf(folded)
    slim = slim_weights()
    del slim["MobilenetV1/Logits/Conv2d_1c_1x1/biases"]
    with pytest.raises(WeightsFormatError, match=r"Logits/Conv2d_1c_1x1/biases"):
        tf_slim_to_hf(slim)


def test_wrong_shapes_are_listed() -> None:
    slim = slim_weights()
    slim["MobilenetV1/Conv2d_3_pointwise/BatchNorm/beta"] = np.zeros(5, np.float32)
    slim["MobilenetV1/Conv2d_4_depthwise/depthwise_weights"] = np.zeros((3, 3, 32, 2), np.float32)
    slim["MobilenetV1/Conv2d_0/weights"] = np.zeros((3, 3, 8), np.float32)
    with pytest.raises(
        WeightsFormatError,
        match=r"Conv2d_0/weights: shape \[3, 3, 8\].*"
        r"Conv2d_3_pointwise/BatchNorm/beta: shape \[5\], expected \[32\].*channel multiplier 1",
    ):
        tf_slim_to_hf(slim)


def test_scale_false_scope_and_no_logits() -> None:
    slim = {f"FeatureExtractor/{k}:0": v for k, v in slim_weights(num_labels=None).items() if not k.endswith("gamma")}
    state, config = tf_slim_to_hf(slim, scope="FeatureExtractor/MobilenetV1")
    assert config == {"depth_multiplier": 0.25, "num_labels": 0}
    assert not any(k.startswith("classifier.") for k in state)
    assert torch.equal(state["mobilenet_v1.layer.3.normalization.weight"], torch.ones(32))


@pytest.mark.parametrize(
    ("alpha", "min_depth", "expected"),
    [
        (1.0, 8, {"depth_multiplier": 1.0}),
        (0.75, 8, {"depth_multiplier": 0.75}),
        (0.5, 8, {"depth_multiplier": 0.5}),
        (0.25, 8, {"depth_multiplier": 0.25}),
        (0.35, 8, {"depth_multiplier": 0.35}),  # not released, exact ratio, clamp never bites
        (0.2, 8, {"depth_multiplier": 0.2, "min_depth": 8}),  # stem int(6.4) clamped to 8: min_depth visible
        (0.25, 16, {"depth_multiplier": 0.25, "min_depth": 16}),
    ],
)
def test_width_inference(alpha: float, min_depth: int, expected: dict[str, float]) -> None:
    _, config = tf_slim_to_hf(slim_weights(alpha, min_depth, num_labels=None))
    assert config == {**expected, "num_labels": 0}
    got = [max(int(c * config["depth_multiplier"]), config.get("min_depth", 8)) for c in _BASES]
    assert got == [max(int(c * alpha), min_depth) for c in _BASES]


def test_inconsistent_channels_are_rejected() -> None:
    slim = slim_weights(0.5, num_labels=None)
    # make block 13 narrower than the width multiplier allows: consistent shapes, impossible channel plan
    slim["MobilenetV1/Conv2d_13_pointwise/weights"] = np.zeros((1, 1, 512, 500), np.float32)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        slim[f"MobilenetV1/Conv2d_13_pointwise/BatchNorm/{name}"] = np.zeros(500, np.float32)
    with pytest.raises(WeightsFormatError, match=r"match no depth_multiplier.*Conv2d_13_pointwise=500"):
        tf_slim_to_hf(slim)


def test_grayscale_input_is_reported() -> None:
    _, config = tf_slim_to_hf(slim_weights(in_channels=1, num_labels=None))
    assert config["num_channels"] == 1


# ---------------------------------------------------------------------------------------------
# (d) Google's real frozen mobilenet_v1_1.0_224 graph (from the nudity wheel)
# ---------------------------------------------------------------------------------------------
def _real_graph_path() -> Path:
    spec = importlib.util.find_spec("nudity")  # locates the package without importing it (needs TF)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nudity is not installed (pip install --no-deps nudity==0.2.3)")
    path = Path(next(iter(spec.submodule_search_locations))) / "files" / "retrained_graph.pb"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


RealGraph = tuple[list[GraphNode], dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def real_graph() -> RealGraph:
    nodes = read_graph_nodes(_real_graph_path())
    return nodes, {n.name: n.value for n in nodes if n.value is not None}


def test_real_graph_structure(real_graph: RealGraph) -> None:
    nodes, tensors = real_graph
    by_name = {n.name: n for n in nodes}
    assert by_name["input"].op == "Placeholder" and by_name["input"].shape == (1, 224, 224, 3)
    # BatchNorm is not folded: each layer keeps gamma/beta/mean/variance and an unfused batchnorm subgraph
    assert by_name["MobilenetV1/MobilenetV1/Conv2d_0/BatchNorm/batchnorm/Rsqrt"].op == "Rsqrt"
    assert not any(n.op.startswith("FusedBatchNorm") for n in nodes)
    assert float(tensors["MobilenetV1/MobilenetV1/Conv2d_0/BatchNorm/batchnorm/add/y"]) == pytest.approx(1e-3)
    mobilenet = [n for n in tensors if n.startswith("MobilenetV1/") and not n.startswith("MobilenetV1/MobilenetV1/")]
    assert len([n for n in mobilenet if "Logits" in n or "BatchNorm" in n or n.endswith("weights")]) == 27 * 5 + 2
    assert tensors["MobilenetV1/Conv2d_0/weights"].shape == (3, 3, 3, 32)
    assert tensors["MobilenetV1/Logits/Conv2d_1c_1x1/weights"].shape == (1, 1, 1024, 1001)


def test_real_graph_truncations_raise(real_graph: RealGraph) -> None:
    data = _real_graph_path().read_bytes()
    for cut in (7, len(data) // 3, len(data) - 5):
        with pytest.raises(WeightsFormatError, match=r"real\.pb: not a valid frozen GraphDef"):
            decode_frozen_graph(data[:cut], source="real.pb")


def test_real_graph_loads_into_hf(real_graph: RealGraph) -> None:
    transformers = pytest.importorskip("transformers")
    _, tensors = real_graph
    state, config = tf_slim_to_hf(tensors)
    assert config == {"depth_multiplier": 1.0, "num_labels": 1001}
    model = transformers.MobileNetV1ForImageClassification(transformers.MobileNetV1Config(num_labels=1001))
    model.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 4_233_001
    for name, value in hf_to_tf_slim(state).items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)

    # The mapped weights must classify real photos: index 0 is "background", ImageNet class j is j + 1.
    image_module = pytest.importorskip("PIL.Image")
    model.eval()
    for filename, allowed in (("chelsea.png", range(282, 287)), ("coffee.png", (968,))):  # cats; espresso
        if not (DATA / filename).is_file():
            continue
        image = image_module.open(DATA / filename).convert("RGB").resize((224, 224), image_module.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            top = int(model(pixels).logits.argmax())
        assert top in allowed, (filename, top)
