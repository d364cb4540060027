"""The conv-norm-activation unit, TF "SAME" padding and the trunk builder, in one place.

TF "SAME" padding (DESIGN.md §2): per spatial dim with input n, stride s and effective kernel
k_eff = (k - 1) * d + 1, the total padding is max((ceil(n / s) - 1) * s + k_eff - n, 0), split with the
extra pixel after (bottom/right). For stride 1 and an odd kernel that is the symmetric padding
PyTorch's `Conv2d(padding=...)` does, so only strided convs pad explicitly, and they do it with
branch-free integer arithmetic on the input size, which `torch.fx`, TorchScript and `torch.export`
all follow (Hugging Face's version uses Python `if`/`max` on sizes, which fx cannot trace).
`tf_pad`, `tf_padded_conv2d` and `make_activation` are also what the OD-API detectors' units
(`detection.odapi_ssd.ConvUnit`, `detection.odapi_fpn`) build on, so TF's padding lives here once.
Module names (`convolution`, `normalization`, `activation`, `conv_stem`, `layer`) mirror Hugging
Face's so state-dict keys are identical without renaming code.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d

from .config import LayerPlan

__all__ = [
    "ConvNormActivation",
    "FrozenBatchNorm2d",
    "build_trunk",
    "make_activation",
    "tf_pad",
    "tf_padded_conv2d",
    "tf_same_padding",
]


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of TF's "SAME" for one spatial dim of `size` pixels.

    Works on ints, fx proxies and symbolic sizes alike, because it has no branch: when the effective
    kernel is at least the stride (true for every layer of MobileNetV1) the `max(..., 0)` of TF's
    formula never clips, so it is left out.
    """
    effective = (kernel - 1) * dilation + 1
    total = ((size + stride - 1) // stride - 1) * stride + effective - size
    before = total // 2
    return before, total - before


def tf_pad(x: Tensor, kernel_size: int, stride: int = 1, dilation: int = 1, explicit: bool = False) -> Tensor:
    """Pad `x` as TF pads a conv: "SAME" (depends on the input size, extra pixel after), or with `explicit`
    TF-slim's `fixed_padding` (symmetric, `(k_eff - 1) // 2` before, the rest after, whatever the size)."""
    if explicit:
        total = (kernel_size - 1) * dilation
        before = total // 2
        return F.pad(x, [before, total - before, before, total - before])
    top, bottom = tf_same_padding(x.shape[-2], kernel_size, stride, dilation)
    left, right = tf_same_padding(x.shape[-1], kernel_size, stride, dilation)
    return F.pad(x, [left, right, top, bottom])


def tf_padded_conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
    tf_same: bool = True,
) -> tuple[nn.Conv2d, bool]:
    """A Conv2d padded like TF ("SAME", or symmetric = `fixed_padding`), and whether `forward` must `tf_pad` first.

    Stride-1 "SAME" and symmetric padding are static (the conv's own `padding`); only a strided "SAME" conv
    depends on the input size, so it gets `padding=0` and `True`.
    """
    effective = (kernel_size - 1) * dilation + 1
    pad_at_runtime = tf_same and stride > 1
    if pad_at_runtime and effective < stride:
        raise ValueError(f"TF SAME padding needs kernel >= stride, got kernel {effective} and stride {stride}")
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=0 if pad_at_runtime else (effective - 1) // 2,
        dilation=dilation,
        groups=groups,
        bias=bias,
    )
    return conv, pad_at_runtime


_ACTIVATIONS: dict[str, Callable[[bool], nn.Module]] = {
    "relu6": lambda inplace: nn.ReLU6(inplace=inplace),
    "relu": lambda inplace: nn.ReLU(inplace=inplace),
    "silu": lambda inplace: nn.SiLU(),
    "swish": lambda inplace: nn.SiLU(),
    "gelu": lambda inplace: nn.GELU(),
    "hardswish": lambda inplace: nn.Hardswish(),
    "tanh": lambda inplace: nn.Tanh(),
    "sigmoid": lambda inplace: nn.Sigmoid(),
    "identity": lambda inplace: nn.Identity(),
}


def make_activation(name: str, inplace: bool = True) -> nn.Module:
    """The activation module for a Hugging Face `hidden_act` name (or "identity").

    `inplace` applies to ReLU and ReLU6 only; the OD-API units pass False (their modules always were).
    """
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name](inplace)


class ConvNormActivation(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation, with TF "SAME" or symmetric padding.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: of the convolution.
        stride: of the convolution.
        dilation: of the convolution (TF "SAME" accounts for it).
        groups: `groups=in_channels` makes it depthwise.
        tf_padding: TF "SAME" padding (needed by Google's weights) instead of symmetric padding.
            They differ only for strided convs on inputs whose size the stride divides.
        eps: BatchNorm epsilon.
        momentum: BatchNorm momentum (PyTorch's meaning).
        activation: activation name (`make_activation`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        tf_padding: bool = True,
        eps: float = 1e-3,
        momentum: float = 1.0 - 0.9997,
        activation: str = "relu6",
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.convolution, self.pad_at_runtime = tf_padded_conv2d(
            in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups, tf_same=tf_padding
        )
        self.normalization = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.activation = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad_at_runtime:
            x = tf_pad(x, self.kernel_size, self.stride, self.dilation)
        return self.activation(self.normalization(self.convolution(x)))


class FrozenBatchNorm2d(_TorchvisionFrozenBatchNorm2d):
    """BatchNorm with fixed statistics and affine parameters (buffers, not parameters).

    torchvision's version folds the statistics into `x * scale + shift`, which rounds differently
    from the BatchNorm it replaces; this one runs the same inference kernel as `BatchNorm2d.eval()`,
    so freezing a layer never changes its output, to the last bit.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        frozen = cls(bn.num_features, eps=bn.eps).to(bn.weight.device)
        frozen.weight.copy_(bn.weight.detach())
        frozen.bias.copy_(bn.bias.detach())
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        return frozen


def build_trunk(
    plans: list[LayerPlan],
    *,
    tf_padding: bool = True,
    eps: float = 1e-3,
    momentum: float = 1.0 - 0.9997,
    activation: str = "relu6",
) -> tuple[ConvNormActivation, nn.ModuleList]:
    """Build the stem and the flat list of depthwise/pointwise layers for `plans` (block 0 first).

    Block k >= 1 becomes `layer[2k-2]` (3x3 depthwise, strided or dilated) and `layer[2k-1]`
    (1x1 pointwise), exactly Hugging Face's layout.
    """
    common = {"tf_padding": tf_padding, "eps": eps, "momentum": momentum, "activation": activation}
    stem_plan = plans[0]
    stem = ConvNormActivation(stem_plan.in_channels, stem_plan.out_channels, 3, stride=stem_plan.stride, **common)
    layers = nn.ModuleList()
    for plan in plans[1:]:
        layers.append(
            ConvNormActivation(
                plan.in_channels,
                plan.in_channels,
                3,
                stride=plan.stride,
                dilation=plan.dilation,
                groups=plan.in_channels,
                **common,
            )
        )
        layers.append(ConvNormActivation(plan.in_channels, plan.out_channels, 1, **common))
    return stem, layers


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Hugging Face's initialisation: N(0, std) for conv and linear weights, zero biases, unit BN scale."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_input(x: Tensor, num_channels: int, min_size: int) -> Tensor:
    """Raise `ValueError` for anything but a (B, num_channels, H >= min_size, W >= min_size) tensor.

    Modules that call it register it with `torch.fx.wrap`, so a traced model keeps the check as one
    opaque call instead of failing on `if` over proxies.
    """
    if x.dim() != 4:
        raise ValueError("expected a 4-D (batch, channels, height, width) tensor, got shape " + str(list(x.shape)))
    if x.shape[1] != num_channels:
        raise ValueError(
            "expected " + str(num_channels) + " input channels, got " + str(x.shape[1]) + " (shape "
            + str(list(x.shape)) + ")"
        )
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            "input is " + str(x.shape[2]) + "x" + str(x.shape[3]) + " pixels; MobileNetV1 needs at least "
            + str(min_size) + "x" + str(min_size)
        )
    return x
