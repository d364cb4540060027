"""Shared test helpers: random weights with non-trivial BatchNorm statistics, and HF twins."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mnv1_backbone import MobileNetV1Config, MobileNetV1ForImageClassification


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
