"""Converters from Google's TensorFlow MobileNetV1 releases to PyTorch, with no TensorFlow needed.

`read_frozen_graph` reads the weights (``Const`` nodes) of a frozen ``GraphDef`` (``.pb``) with our own
bounds-checked protobuf decoder; `tf_slim_to_hf` maps TF-slim variable names and layouts to a Hugging Face
``MobileNetV1ForImageClassification`` state dict (and `hf_to_tf_slim` back). `read_tf_checkpoint` / `TFCheckpoint`
read name-based V2 checkpoints (``.index`` + ``.data-*``, checksums verified); `read_tf_weights` / `load_tf_release`
open any release file (checkpoint prefix, frozen ``.pb`` or ``.tgz`` archive) and `convert` writes an HF-format
directory from one (also ``python -m mnv1_backbone.convert SRC DST``). `read_fake_quant_ranges` returns the
FakeQuant ranges of quantized releases.
"""

from mnv1_backbone.convert.archive import (
    ConversionReport,
    FakeQuantRange,
    TFRelease,
    TFWeights,
    convert,
    convert_with_report,
    extract_release_archive,
    fake_quant_ranges,
    image_size_from_name,
    load_tf_release,
    read_fake_quant_ranges,
    read_tf_weights,
)
from mnv1_backbone.convert.checkpoint import (
    CheckpointEntry,
    TFCheckpoint,
    checkpoint_prefix,
    crc32c,
    mask_crc32c,
    read_tf_checkpoint,
    unmask_crc32c,
)
from mnv1_backbone.convert.frozen_graph import (
    GraphNode,
    decode_frozen_graph,
    decode_graph_nodes,
    read_frozen_graph,
    read_graph_nodes,
    read_graph_ops,
)
from mnv1_backbone.convert.tf_slim import RELEASED_DEPTH_MULTIPLIERS, hf_to_tf_slim, tf_slim_to_hf

__all__ = [
    "RELEASED_DEPTH_MULTIPLIERS",
    "CheckpointEntry",
    "ConversionReport",
    "FakeQuantRange",
    "GraphNode",
    "TFCheckpoint",
    "TFRelease",
    "TFWeights",
    "checkpoint_prefix",
    "convert",
    "convert_with_report",
    "crc32c",
    "decode_frozen_graph",
    "decode_graph_nodes",
    "extract_release_archive",
    "fake_quant_ranges",
    "hf_to_tf_slim",
    "image_size_from_name",
    "load_tf_release",
    "mask_crc32c",
    "read_fake_quant_ranges",
    "read_frozen_graph",
    "read_graph_nodes",
    "read_graph_ops",
    "read_tf_checkpoint",
    "read_tf_weights",
    "tf_slim_to_hf",
    "unmask_crc32c",
]
