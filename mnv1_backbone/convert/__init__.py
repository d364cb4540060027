"""Converters from Google's TensorFlow MobileNetV1 releases to PyTorch, with no TensorFlow needed.

`read_frozen_graph` reads the weights (``Const`` nodes) of a frozen ``GraphDef`` (``.pb``) with our own
bounds-checked protobuf decoder; `tf_slim_to_hf` maps TF-slim variable names and layouts to a Hugging Face
``MobileNetV1ForImageClassification`` state dict (and `hf_to_tf_slim` back).
"""

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
    "GraphNode",
    "decode_frozen_graph",
    "decode_graph_nodes",
    "hf_to_tf_slim",
    "read_frozen_graph",
    "read_graph_nodes",
    "read_graph_ops",
    "tf_slim_to_hf",
]
