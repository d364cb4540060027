"""Tests for the TensorFlow-free V2 checkpoint reader, release archives and the conversion CLI.

The fixtures in ``tests/fixtures/tf_slim/`` were written by real TensorFlow (2.21.0) with
``tools/make_tf_fixtures.py``: a two-shard checkpoint of a width-0.25 MobileNetV1 (EMA shadows, RMSProp slots,
global_step), a small quantization-aware-style checkpoint and frozen graph, and TensorFlow's own forward outputs.
Damaged and unusual checkpoints (missing tensors, compressed blocks, unknown dtypes, big-endian data) are built
from those files, or from scratch, with conftest's table writer.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import encode_table, field_bytes, field_fixed32, field_varint

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1ForImageClassification, StateDictMismatchError
from mnv1_backbone.convert import (
    TFCheckpoint,
    checkpoint_prefix,
    convert,
    crc32c,
    extract_release_archive,
    fake_quant_ranges,
    image_size_from_name,
    load_tf_release,
    mask_crc32c,
    read_fake_quant_ranges,
    read_tf_checkpoint,
    read_tf_weights,
    unmask_crc32c,
)
from mnv1_backbone.convert.__main__ import main as cli_main
from mnv1_backbone.convert.checkpoint import _crc_loop, _read_table
from mnv1_backbone.errors import WeightsFormatError

FIXTURES = Path(__file__).parent / "fixtures" / "tf_slim"
NAME = "mobilenet_v1_0.25_128"
PREFIX = FIXTURES / f"{NAME}.ckpt"
QUANT_NAME = "mobilenet_v1_0.125_128_quant"
QUANT_PREFIX = FIXTURES / f"{QUANT_NAME}.ckpt"
QUANT_GRAPH = FIXTURES / f"{QUANT_NAME}_frozen.pb"
REFERENCE = np.load(FIXTURES / f"{NAME}_reference.npz")
QUANT_REFERENCE = np.load(FIXTURES / f"{QUANT_NAME}_reference.npz")
TOLERANCE = 1e-4
# HF hidden_states index of TF-slim's end points: block k's pointwise conv is layer 2k - 1.
END_POINTS = {"Conv2d_5_pointwise": 9, "Conv2d_13_pointwise": 25}


def pixels(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 -> NCHW float in [-1, 1], with the same float32 arithmetic as the fixture script."""
    values = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(values.transpose(0, 3, 1, 2)))


def nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(0, 2, 3, 1).numpy()


def max_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max())


@pytest.fixture(scope="module")
def ema_model() -> MobileNetV1ForImageClassification:
    return MobileNetV1ForImageClassification.from_tf(PREFIX).eval()


@pytest.fixture(scope="module")
def raw_model() -> MobileNetV1ForImageClassification:
    return MobileNetV1ForImageClassification.from_tf(PREFIX, prefer_ema=False).eval()


# ---------------------------------------------------------------------------------------------
# A small writer for the same format (BundleHeaderProto, BundleEntryProto; the tables are conftest's).
# ---------------------------------------------------------------------------------------------
_DTYPE_CODES = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("int32"): 3, np.dtype("int64"): 9}


def encode_entry(dtype: int, shape: tuple[int, ...], shard: int, offset: int, raw: bytes, *, sliced=False) -> bytes:
    shape_proto = b"".join(field_bytes(2, field_varint(1, dim)) for dim in shape)
    entry = field_varint(1, dtype) + field_bytes(2, shape_proto) + field_varint(3, shard) + field_varint(4, offset)
    entry += field_varint(5, len(raw)) + field_fixed32(6, mask_crc32c(crc32c(raw)))
    if sliced:
        entry += field_bytes(7, b"")
    return entry


def write_checkpoint(
    prefix: Path,
    tensors: dict[str, np.ndarray],
    *,
    num_shards: int = 1,
    big_endian: bool = False,
    extra: list[tuple[bytes, bytes]] = (),
    **table_options,
) -> None:
    """A V2 checkpoint of ``tensors`` (float32/64, int32/64), spread round-robin over ``num_shards``."""
    shards = [bytearray() for _ in range(num_shards)]
    entries = list(extra)
    for i, (name, array) in enumerate(sorted(tensors.items())):
        array = np.asarray(array)
        raw = array.astype(array.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
        shard = i % num_shards
        entries.append(
            (name.encode(), encode_entry(_DTYPE_CODES[array.dtype], array.shape, shard, len(shards[shard]), raw))
        )
        shards[shard] += raw
    header = field_varint(1, num_shards) + field_varint(2, int(big_endian)) + field_bytes(3, field_varint(1, 1))
    index = encode_table([(b"", header), *sorted(entries)], **table_options)
    prefix.with_name(prefix.name + ".index").write_bytes(index)
    for shard, data in enumerate(shards):
        prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}").write_bytes(bytes(data))


def copy_checkpoint(prefix: Path, directory: Path) -> Path:
    for file in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(file, directory / file.name)
    return directory / prefix.name


# ---------------------------------------------------------------------------------------------
# CRC-32C
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 test vectors
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
    ],
)
def test_crc32c_known_values(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert unmask_crc32c(mask_crc32c(expected)) == expected


@pytest.mark.parametrize("size", [16_384, 16_385, 100_003, 1 << 20])
def test_crc32c_vectorized_path_equals_the_byte_loop(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    expected = _crc_loop(0xFFFF_FFFF, data) ^ 0xFFFF_FFFF
    assert crc32c(data) == expected
    assert crc32c(data[size // 3 :], crc32c(data[: size // 3])) == expected  # continuing a CRC


# ---------------------------------------------------------------------------------------------
# Reading TensorFlow's files
# ---------------------------------------------------------------------------------------------
def test_reads_the_two_shard_checkpoint_tensorflow_wrote() -> None:
    checkpoint = TFCheckpoint(PREFIX)
    assert checkpoint.num_shards == 2 and not checkpoint.big_endian
    assert {entry.shard_id for entry in checkpoint.entries.values()} == {0, 1}
    tensors = checkpoint.read_all()
    assert set(tensors) == set(checkpoint.entries)
    assert tensors["global_step"].dtype == np.int64 and tensors["global_step"] == 1
    kernel = tensors["MobilenetV1/Conv2d_0/weights"]
    assert kernel.dtype == np.float32 and kernel.shape == (3, 3, 3, 8)
    assert tensors["MobilenetV1/Logits/Conv2d_1c_1x1/weights"].shape == (1, 1, 256, 1001)
    assert "MobilenetV1/Conv2d_0/weights/RMSProp_1" in tensors
    ema = tensors["MobilenetV1/Conv2d_0/weights/ExponentialMovingAverage"]
    assert not np.allclose(ema, kernel)
    # Every spelling of the checkpoint names the same prefix.
    for spelling in (PREFIX, f"{PREFIX}.index", f"{PREFIX}.data-00001-of-00002"):
        assert checkpoint_prefix(spelling) == PREFIX


@pytest.mark.parametrize("prefer_ema", [True, False])
def test_logits_and_end_points_match_tensorflow(prefer_ema: bool, ema_model, raw_model) -> None:
    tag = "ema" if prefer_ema else "raw"
    model = ema_model if prefer_ema else raw_model
    assert model.config.depth_multiplier == 0.25 and model.config.num_labels == 1001
    assert model.config.image_size == 128
    with torch.no_grad():
        output = model(pixels(REFERENCE["input_128"]), output_hidden_states=True)
    assert max_diff(output.logits.numpy(), REFERENCE[f"{tag}_logits_128"]) <= TOLERANCE
    compared = 0
    for name, index in END_POINTS.items():
        key = f"{tag}_{name}_128"
        if key in REFERENCE:
            assert max_diff(nhwc(output.hidden_states[index]), REFERENCE[key]) <= TOLERANCE, name
            compared += 1
    assert compared == (2 if prefer_ema else 1)


def test_full_7x7_pool_at_224_matches_tensorflow(ema_model) -> None:
    with torch.no_grad():
        output = ema_model(pixels(REFERENCE["input_224"]), output_hidden_states=True)
    assert output.hidden_states[25].shape[-2:] == (7, 7)
    assert max_diff(output.logits.numpy(), REFERENCE["ema_logits_224"]) <= TOLERANCE
    assert max_diff(nhwc(output.hidden_states[25]), REFERENCE["ema_Conv2d_13_pointwise_224"]) <= TOLERANCE


def test_ema_shadows_are_preferred_and_raw_is_a_switch(ema_model, raw_model) -> None:
    tensors = read_tf_checkpoint(PREFIX)
    stem = "MobilenetV1/Conv2d_0/BatchNorm/moving_variance"
    ema_state, raw_state = ema_model.state_dict(), raw_model.state_dict()
    key = "mobilenet_v1.conv_stem.normalization.running_var"
    np.testing.assert_array_equal(ema_state[key].numpy(), tensors[stem + "/ExponentialMovingAverage"])
    np.testing.assert_array_equal(raw_state[key].numpy(), tensors[stem])
    assert not torch.equal(ema_state["classifier.weight"], raw_state["classifier.weight"])


def test_backbone_from_tf_checkpoint_matches_tensorflow() -> None:
    backbone = MobileNetV1Backbone.from_tf(PREFIX, out_indices=(5, 13), prefer_ema=False).eval()
    with torch.no_grad():
        features = backbone(pixels(REFERENCE["input_128"]))
    assert max_diff(nhwc(features["Conv2d_13_pointwise"]), REFERENCE["raw_Conv2d_13_pointwise_128"]) <= TOLERANCE


def test_slots_and_global_step_are_ignored_with_a_log_line(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mnv1_backbone"):
        load_tf_release(PREFIX)
    text = caplog.text
    assert "6 optimizer slots" in text and "global_step" in text and "137 from EMA shadows" in text


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------
def test_checkpoint_missing_a_tensor(tmp_path: Path) -> None:
    prefix = copy_checkpoint(PREFIX, tmp_path)
    index = prefix.with_name(prefix.name + ".index")
    dropped = "MobilenetV1/Conv2d_3_pointwise/weights"
    entries = [(k, v) for k, v in _read_table(index.read_bytes(), source="x") if not k.decode().startswith(dropped)]
    index.write_bytes(encode_table(entries))
    with pytest.raises(StateDictMismatchError, match=dropped):
        MobileNetV1ForImageClassification.from_tf(prefix)


def test_flipped_byte_in_a_data_file_fails_the_checksum(tmp_path: Path) -> None:
    prefix = copy_checkpoint(PREFIX, tmp_path)
    name = "MobilenetV1/Logits/Conv2d_1c_1x1/weights"
    entry = TFCheckpoint(prefix).entries[name]
    data_file = prefix.with_name(f"{prefix.name}.data-{entry.shard_id:05d}-of-00002")
    data = bytearray(data_file.read_bytes())
    data[entry.offset + entry.size // 2] ^= 0x10
    data_file.write_bytes(bytes(data))
    with pytest.raises(WeightsFormatError, match=rf"{data_file.name}: tensor '{name}' fails its checksum"):
        MobileNetV1ForImageClassification.from_tf(prefix)


def test_flipped_byte_in_the_index_fails_the_block_checksum(tmp_path: Path) -> None:
    prefix = copy_checkpoint(PREFIX, tmp_path)
    index = prefix.with_name(prefix.name + ".index")
    data = bytearray(index.read_bytes())
    data[100] ^= 0x01
    index.write_bytes(bytes(data))
    with pytest.raises(WeightsFormatError, match=r"\.ckpt\.index: invalid checkpoint index: data block 0 .*checksum"):
        TFCheckpoint(prefix)


@pytest.mark.parametrize("keep", [0, 20, 47, 5000, -1])
def test_truncated_index(tmp_path: Path, keep: int) -> None:
    prefix = copy_checkpoint(PREFIX, tmp_path)
    index = prefix.with_name(prefix.name + ".index")
    data = index.read_bytes()
    index.write_bytes(data[:keep])
    with pytest.raises(WeightsFormatError, match=r"\.ckpt\.index: .*(truncated|magic)"):
        MobileNetV1ForImageClassification.from_tf(prefix)


def test_truncated_data_file(tmp_path: Path) -> None:
    prefix = copy_checkpoint(PREFIX, tmp_path)
    data_file = prefix.with_name(prefix.name + ".data-00001-of-00002")
    data_file.write_bytes(data_file.read_bytes()[:100_000])
    with pytest.raises(WeightsFormatError, match=r"data-00001-of-00002: tensor 'MobilenetV1/.*' .*truncated"):
        read_tf_checkpoint(prefix)


def test_missing_shard(tmp_path: Path) -> None:
    prefix = copy_checkpoint(PREFIX, tmp_path)
    prefix.with_name(prefix.name + ".data-00000-of-00002").unlink()
    with pytest.raises(WeightsFormatError, match=r"data-00000-of-00002: data shard 0 of 2 .* is missing"):
        read_tf_checkpoint(prefix)


def test_no_checkpoint_at_all(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.ckpt.index"):
        MobileNetV1ForImageClassification.from_tf(tmp_path / "nothing.ckpt")


# ---------------------------------------------------------------------------------------------
# Hand-written checkpoints: format corners
# ---------------------------------------------------------------------------------------------
def test_own_writer_round_trip_with_many_blocks_shards_and_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"scope/var_{i:03d}": rng.normal(size=(i % 5 + 1, 3)).astype(np.float32) for i in range(60)}
    tensors["f64"] = np.arange(6, dtype=np.float64).reshape(2, 3)
    tensors["i32"] = np.array([-1, 2**31 - 1], dtype=np.int32)
    tensors["i64"] = np.array(-(2**40), dtype=np.int64)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float32)
    write_checkpoint(tmp_path / "model.ckpt", tensors, num_shards=3, block_entries=7, restart_interval=3)
    read = read_tf_checkpoint(tmp_path / "model.ckpt")
    assert set(read) == set(tensors)
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype
        np.testing.assert_array_equal(read[name], value)


def test_big_endian_checkpoint(tmp_path: Path) -> None:
    values = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    write_checkpoint(tmp_path / "be.ckpt", {"w": values}, big_endian=True)
    read = read_tf_checkpoint(tmp_path / "be.ckpt")["w"]
    np.testing.assert_array_equal(read, values)
    assert read.dtype == np.float32 and read.dtype.isnative


def test_snappy_compressed_table_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "s.ckpt", {"w": np.ones(3, np.float32)}, compression=1)
    with pytest.raises(WeightsFormatError, match=r"s\.ckpt\.index: .*data block 0 .*compressed \(snappy"):
        TFCheckpoint(tmp_path / "s.ckpt")


def test_unknown_dtype_is_an_error_naming_file_and_entry(tmp_path: Path) -> None:
    raw = b"\0" * 8
    extra = [(b"odd", encode_entry(99, (8,), 0, 0, raw))]
    write_checkpoint(tmp_path / "u.ckpt", {}, extra=extra)
    tmp_path.joinpath("u.ckpt.data-00000-of-00001").write_bytes(raw)
    with pytest.raises(WeightsFormatError, match=r"u\.ckpt\.index: tensor 'odd' has unknown dtype 99"):
        read_tf_checkpoint(tmp_path / "u.ckpt")


def test_string_tensors_are_skipped_with_a_log_line(tmp_path: Path, caplog) -> None:
    extra = [(b"_CHECKPOINTABLE_OBJECT_GRAPH", encode_entry(7, (), 0, 0, b"\x03abc"))]
    write_checkpoint(tmp_path / "s.ckpt", {"w": np.ones(2, np.float32)}, extra=extra)
    with caplog.at_level(logging.INFO, logger="mnv1_backbone"):
        read = read_tf_checkpoint(tmp_path / "s.ckpt")
    assert list(read) == ["w"]
    assert "_CHECKPOINTABLE_OBJECT_GRAPH (DT_STRING)" in caplog.text
    with pytest.raises(WeightsFormatError, match="DT_STRING"):
        TFCheckpoint(tmp_path / "s.ckpt").read("_CHECKPOINTABLE_OBJECT_GRAPH")


def test_partitioned_variable_is_refused(tmp_path: Path) -> None:
    extra = [(b"part", encode_entry(1, (4,), 0, 0, b"", sliced=True))]
    write_checkpoint(tmp_path / "p.ckpt", {"w": np.ones(2, np.float32)}, extra=extra)
    with pytest.raises(WeightsFormatError, match="'part' is a partitioned variable"):
        read_tf_checkpoint(tmp_path / "p.ckpt")


def test_entry_whose_size_disagrees_with_its_shape(tmp_path: Path) -> None:
    # A lying entry never drives an allocation: the size must match the shape and lie inside the file.
    extra = [(b"huge", encode_entry(1, (1 << 40, 1 << 20), 0, 0, b"\0" * 16))]
    write_checkpoint(tmp_path / "h.ckpt", {"w": np.ones(2, np.float32)}, extra=extra)
    with pytest.raises(WeightsFormatError, match="'huge' claims 16 bytes"):
        read_tf_checkpoint(tmp_path / "h.ckpt")


# ---------------------------------------------------------------------------------------------
# Release archives
# ---------------------------------------------------------------------------------------------
def make_archive(path: Path, files: dict[str, Path | bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def release_files(name: str, prefix: Path, graph: Path | None) -> dict[str, Path | bytes]:
    files: dict[str, Path | bytes] = {
        f"./{name}.ckpt.{p.name.split('.ckpt.')[1]}": p for p in prefix.parent.glob(prefix.name + ".*")
    }
    if graph is not None:
        files[f"./{name}_frozen.pb"] = graph
    files[f"./{name}.tflite"] = b"TFL3 placeholder, not a real model"
    files[f"./{name}_info.txt"] = b"Model: test fixture"
    return files


def test_release_archive_prefers_the_checkpoint(tmp_path: Path, ema_model) -> None:
    archive = make_archive(tmp_path / f"{NAME}.tgz", release_files(NAME, PREFIX, QUANT_GRAPH))
    weights = read_tf_weights(archive)
    assert weights.kind == "archive checkpoint" and weights.file == f"{NAME}.ckpt" and weights.image_size == 128
    model = MobileNetV1ForImageClassification.from_tf(archive)
    for key, value in ema_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_release_archive_falls_back_to_the_frozen_graph(tmp_path: Path) -> None:
    files = {f"./{QUANT_NAME}_frozen.pb": QUANT_GRAPH, f"./{QUANT_NAME}.tflite": b"TFL3"}
    archive = make_archive(tmp_path / f"{QUANT_NAME}.tgz", files)
    assert read_tf_weights(archive).kind == "archive frozen graph"
    model = MobileNetV1ForImageClassification.from_tf(archive).eval()
    with torch.no_grad():
        logits = model(pixels(QUANT_REFERENCE["input_128"])).logits.numpy()
    assert max_diff(logits, QUANT_REFERENCE["float_logits_128"]) <= TOLERANCE


@pytest.mark.parametrize("member", ["../evil.pb", "/abs/model.ckpt.index", "a/../../evil.index"])
def test_archive_with_unsafe_paths_is_refused(tmp_path: Path, member: str) -> None:
    archive = make_archive(tmp_path / "bad.tgz", {member: b"x"})
    destination = tmp_path / "out"
    destination.mkdir()
    with pytest.raises(WeightsFormatError, match="unsafe member path"):
        extract_release_archive(archive, destination)
    assert not any(destination.iterdir()) and not (tmp_path / "evil.pb").exists()


def test_archive_with_a_link_is_refused(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "link.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("model_frozen.pb")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(WeightsFormatError, match="link or special file"):
        read_tf_weights(tmp_path / "link.tgz")


def test_truncated_or_empty_archive(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / f"{NAME}.tgz", release_files(NAME, PREFIX, None))
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFormatError, match=rf"{NAME}\.tgz: "):
        MobileNetV1ForImageClassification.from_tf(archive)
    only_tflite = make_archive(tmp_path / "m_224.tgz", {"m.tflite": b"TFL3"})
    with pytest.raises(WeightsFormatError, match=r"\.tflite file alone is not supported"):
        MobileNetV1ForImageClassification.from_tf(only_tflite)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("mobilenet_v1_1.0_224.tgz", 224),
        ("mobilenet_v1_0.25_128_quant.tgz", 128),
        ("mobilenet_v1_0.5_160.ckpt", 160),
        ("mobilenet_v1_0.5_160.ckpt.index", 160),
        ("mobilenet_v1_0.75_192.ckpt.data-00000-of-00001", 192),
        ("mobilenet_v1_1.0_224_quant_frozen.pb", 224),
        ("retrained_graph.pb", None),
        ("model.ckpt-12345", None),
    ],
)
def test_image_size_from_name(name: str, size: int | None) -> None:
    assert image_size_from_name(name) == size


# ---------------------------------------------------------------------------------------------
# Quantization-aware ("_quant") files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [QUANT_PREFIX, QUANT_GRAPH])
def test_quantized_release_loads_the_float_model(source: Path) -> None:
    model = MobileNetV1ForImageClassification.from_tf(source).eval()
    assert model.config.depth_multiplier == 0.125 and model.config.num_labels == 16
    with torch.no_grad():
        logits = model(pixels(QUANT_REFERENCE["input_128"])).logits.numpy()
    assert max_diff(logits, QUANT_REFERENCE["float_logits_128"]) <= TOLERANCE


def test_fake_quant_ranges_from_checkpoint_and_graph_agree() -> None:
    ranges = read_fake_quant_ranges(QUANT_PREFIX)
    assert ranges == read_fake_quant_ranges(QUANT_GRAPH)
    assert len(ranges) == 27 * 2 + 1  # weights and activations of every conv layer, the logits' weights
    tensors = read_tf_checkpoint(QUANT_PREFIX)
    stem = ranges["MobilenetV1/Conv2d_0/weights_quant"]
    assert stem.module == "mobilenet_v1.conv_stem"
    assert stem.min == tensors["MobilenetV1/Conv2d_0/weights_quant/min"]
    assert stem.max == tensors["MobilenetV1/Conv2d_0/weights_quant/max"]
    assert ranges["MobilenetV1/Conv2d_1_depthwise/act_quant"].module == "mobilenet_v1.layer.0"
    assert ranges["MobilenetV1/Logits/Conv2d_1c_1x1/weights_quant"].module == "classifier"
    assert read_fake_quant_ranges(PREFIX) == {}


def test_fake_quant_ranges_prefer_ema_and_check_pairs() -> None:
    tensors = {
        "MobilenetV1/Conv2d_0/act_quant/min": np.float32(0),
        "MobilenetV1/Conv2d_0/act_quant/max": np.float32(6),
        "MobilenetV1/Conv2d_0/act_quant/max/ExponentialMovingAverage": np.float32(5),
    }
    assert fake_quant_ranges(tensors)["MobilenetV1/Conv2d_0/act_quant"].max == 5
    assert fake_quant_ranges(tensors, prefer_ema=False)["MobilenetV1/Conv2d_0/act_quant"].max == 6
    del tensors["MobilenetV1/Conv2d_0/act_quant/min"]
    with pytest.raises(WeightsFormatError, match="has no 'min'"):
        fake_quant_ranges(tensors)


def test_folded_batch_norm_is_refused_with_an_explanation(tmp_path: Path) -> None:
    tensors = {k: v for k, v in read_tf_checkpoint(QUANT_PREFIX).items() if "/BatchNorm/" not in k}
    tensors["MobilenetV1/Conv2d_0/BatchNorm_Fold/bias"] = np.zeros(8, np.float32)
    write_checkpoint(tmp_path / f"{QUANT_NAME}.ckpt", tensors)
    with pytest.raises(WeightsFormatError, match="folded into its convolutions.*not supported yet"):
        MobileNetV1ForImageClassification.from_tf(tmp_path / f"{QUANT_NAME}.ckpt")


# ---------------------------------------------------------------------------------------------
# Conversion to an HF directory
# ---------------------------------------------------------------------------------------------
def test_cli_round_trip_through_transformers(tmp_path: Path, ema_model) -> None:
    archive = make_archive(tmp_path / f"{NAME}.tgz", release_files(NAME, PREFIX, None))
    destination = tmp_path / "hf"
    # Start the CLI first: its interpreter start-up overlaps with importing transformers here.
    process = subprocess.Popen(
        [sys.executable, "-m", "mnv1_backbone.convert", str(archive), str(destination)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        transformers = pytest.importorskip("transformers")
    finally:
        stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr
    assert "archive checkpoint" in result.stdout and "depth_multiplier=0.25" in result.stdout
    assert {p.name for p in destination.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    theirs = transformers.MobileNetV1ForImageClassification.from_pretrained(destination).eval()
    x = pixels(REFERENCE["input_128"])
    with torch.no_grad():
        their_logits = theirs(x).logits.numpy()
        our_logits = ema_model(x).logits.numpy()
    assert max_diff(their_logits, our_logits) <= 1e-5
    assert max_diff(their_logits, REFERENCE["ema_logits_128"]) <= TOLERANCE
    processor = transformers.AutoImageProcessor.from_pretrained(destination)
    assert processor.crop_size == {"height": 128, "width": 128}
    assert processor.size == {"shortest_edge": 160}
    assert json.loads((destination / "config.json").read_text())["image_size"] == 128


def test_convert_raw_with_an_explicit_image_size(tmp_path: Path) -> None:
    destination = convert(PREFIX, tmp_path / "raw", image_size=160, prefer_ema=False)
    model = MobileNetV1ForImageClassification.from_pretrained(destination).eval()
    assert model.config.image_size == 160
    with torch.no_grad():
        logits = model(pixels(REFERENCE["input_128"])).logits.numpy()
    assert max_diff(logits, REFERENCE["raw_logits_128"]) <= TOLERANCE
    assert json.loads((destination / "preprocessor_config.json").read_text())["crop_size"]["height"] == 160


def test_cli_flags_and_unknown_resolution(tmp_path: Path, capsys, caplog) -> None:
    assert cli_main([str(PREFIX), str(tmp_path / "a"), "--raw", "--image-size", "192"]) == 0
    out = capsys.readouterr().out
    assert "converted checkpoint" in out and "raw variables (EMA shadows ignored)" in out and "image_size=192" in out
    assert json.loads((tmp_path / "a" / "config.json").read_text())["image_size"] == 192
    # A name without "_<res>": Google's canonical 224, with a warning.
    renamed = copy_checkpoint(PREFIX, tmp_path)
    for file in tmp_path.glob(renamed.name + ".*"):
        file.rename(tmp_path / file.name.replace(NAME, "model"))
    with caplog.at_level(logging.WARNING, logger="mnv1_backbone"):
        assert cli_main([str(tmp_path / "model.ckpt"), str(tmp_path / "b")]) == 0
    assert "assuming 224 x 224 inputs" in caplog.text
    assert json.loads((tmp_path / "b" / "preprocessor_config.json").read_text())["size"] == {"shortest_edge": 256}


def test_cli_error_is_one_line_without_traceback(tmp_path: Path, capsys) -> None:
    prefix = copy_checkpoint(PREFIX, tmp_path)
    data_file = prefix.with_name(prefix.name + ".data-00001-of-00002")
    data_file.write_bytes(data_file.read_bytes()[:1000])
    # In-process: an uncaught exception would fail the test instead of printing a traceback.
    assert cli_main([str(prefix), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "data-00001-of-00002" in err and "truncated" in err
    assert not (tmp_path / "out").exists()
    assert cli_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith("error: no TF checkpoint")


def test_module_cli_no_tf_padding_records_symmetric_padding(tmp_path: Path) -> None:
    """`python -m mnv1_backbone.convert --no-tf-padding`, as `mnv1 convert --no-tf-padding`."""
    assert cli_main([str(PREFIX), str(tmp_path / "same")]) == 0
    assert cli_main([str(PREFIX), str(tmp_path / "explicit"), "--no-tf-padding"]) == 0
    assert json.loads((tmp_path / "same" / "config.json").read_text())["tf_padding"] is True
    assert json.loads((tmp_path / "explicit" / "config.json").read_text())["tf_padding"] is False
