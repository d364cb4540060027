"""Shared test helpers: random weights with non-trivial BatchNorm statistics, HF twins, a writer for the
protobuf fields and SSTable blocks of TF checkpoints (the checkpoint tests and the fuzz tests build files with it),
and the demo tests' small synthetic dataset.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from mnv1_backbone import MobileNetV1Config, MobileNetV1ForImageClassification
from mnv1_backbone.convert.checkpoint import crc32c, mask_crc32c


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """The demo's `train` sets the thread count of the process (`threads`); give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic COCO-format shapes dataset: 8 train and 4 val images of 128 px (a module may define its own)."""
    from detection_demo.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, num_train=8, num_val=4, image_size=(128, 128), seed=0, workers=1)
    return root


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm buffer random values, so identity BN statistics hide nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 1.5 + 0.25)
            elif name.endswith("normalization.weight"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model.eval()


def hf_classifier(depth_multiplier: float = 1.0, tf_padding: bool = True, seed: int = 0, num_labels: int = 1001):
    """A transformers MobileNetV1ForImageClassification with random weights (the oracle)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileNetV1Config(
        depth_multiplier=depth_multiplier, tf_padding=tf_padding, num_labels=num_labels
    )
    return randomize(transformers.MobileNetV1ForImageClassification(config), seed)


def ours_like(hf_model) -> MobileNetV1ForImageClassification:
    """Our classifier with the same config and weights as `hf_model`."""
    config = MobileNetV1Config.from_dict(hf_model.config.to_dict())
    model = MobileNetV1ForImageClassification(config)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Protobuf wire format and TF's SSTable (checkpoint ``.index``), for building checkpoints without TensorFlow
# --------------------------------------------------------------------------------------------------------------
def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints go on the wire as 64-bit two's complement, as protobuf sends them
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<I", value & 0xFFFF_FFFF)


def encode_block(entries: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    """One LevelDB block: prefix-compressed entries, then the restart offsets and their count."""
    out = bytearray()
    restarts: list[int] = []
    previous = b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    for offset in restarts or [0]:
        out += struct.pack("<I", offset)
    return bytes(out + struct.pack("<I", len(restarts or [0])))


def encode_table(
    entries: list[tuple[bytes, bytes]],
    *,
    block_entries: int = 1000,
    restart_interval: int = 16,
    compression: int = 0,
    mutate_block: Callable[[int, bytes], bytes] | None = None,
) -> bytes:
    """A checkpoint ``.index`` (SSTable) holding ``entries``; ``mutate_block(i, contents)`` may corrupt block ``i``
    before its checksum is computed, so the corruption reaches the parser instead of failing the checksum."""
    data = bytearray()
    counter = 0

    def put(contents: bytes, block_type: int) -> bytes:
        nonlocal counter
        if mutate_block is not None:
            contents = mutate_block(counter, contents)
        counter += 1
        offset = len(data)
        typed = contents + bytes([block_type])
        data.extend(typed + struct.pack("<I", mask_crc32c(crc32c(typed))))
        return varint(offset) + varint(len(contents))

    index = []
    for start in range(0, len(entries), block_entries):
        chunk = entries[start : start + block_entries]
        index.append((chunk[-1][0], put(encode_block(chunk, restart_interval), compression)))
    metaindex = put(encode_block([]), 0)
    index_handle = put(encode_block(index, 1), 0)
    footer = (metaindex + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    return bytes(data) + footer
