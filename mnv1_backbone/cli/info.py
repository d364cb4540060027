"""`mnv1 info`: MobileNetV1's analytic layer table (parameters, multiply-adds) from `config.plan_layers`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

from ._common import (
    add_command,
    add_output_stride_option,
    image_side,
    nonnegative_int,
    positive_float,
    positive_int,
    print_table,
)

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the command's parser to the `mnv1` subcommands."""
    sub = add_command(
        commands,
        "info",
        "Print MobileNetV1's layer table with parameters and multiply-adds, computed from the architecture.",
        "Per layer: type, stride, dilation, channels in and out, output size, parameters (conv weights and\n"
        "BatchNorm scale and shift) and multiply-adds (convolutions and the classifier; pooling, BatchNorm and\n"
        "activations are not counted, as in the paper). Alpha 1.0 at 224: 4,233,001 parameters, 568.7 M\n"
        "multiply-adds (paper: 569 M). No weights are loaded.",
        "  mnv1 info\n"
        "  mnv1 info --depth-multiplier 0.5 --resolution 160 --json",
    )
    sub.add_argument("--depth-multiplier", "--alpha", type=positive_float, default=1.0, metavar="A",
                     help="width multiplier alpha: channels are max(int(c * A), min_depth)")
    sub.add_argument("--resolution", type=image_side, default=224, metavar="R", help="side of the square input")
    add_output_stride_option(sub, "total stride of the last block (dilation as TF-slim)")
    sub.add_argument("--min-depth", type=positive_int, default=8, metavar="D", help="fewest channels of any layer")
    sub.add_argument("--num-labels", type=nonnegative_int, default=1001, metavar="N",
                     help="classifier outputs (Google's checkpoints: 1001); 0 for the bare network without "
                     "pooling and classifier")
    sub.add_argument("--json", action="store_true", help="print JSON (rows and totals) instead of a table")
    sub.set_defaults(handler=run)
    return sub


@dataclass(frozen=True)
class LayerRow:
    """One row of the layer table: a conv (with its BatchNorm), the pooling or the classifier."""

    name: str
    type: str
    stride: int
    dilation: int
    in_channels: int
    out_channels: int
    output_size: tuple[int, int]
    parameters: int
    macs: int


def layer_table(
    depth_multiplier: float = 1.0,
    resolution: int = 224,
    *,
    output_stride: int = 32,
    min_depth: int = 8,
    num_labels: int = 1001,
    num_channels: int = 3,
) -> list[LayerRow]:
    """Analytic layer table of MobileNetV1 from `plan_layers`: output sizes, parameters, multiply-adds.

    Output sizes are ceil(n / stride), true of both TF "SAME" and symmetric padding. Parameters count conv
    weights plus BatchNorm scale and shift (running statistics are buffers); multiply-adds count the
    convolutions and the classifier, as the paper does. `num_labels=0` leaves out pooling and classifier.
    """
    from ..config import MobileNetV1Config, plan_layers

    MobileNetV1Config(depth_multiplier=depth_multiplier, min_depth=min_depth, num_labels=num_labels,
                      image_size=resolution, num_channels=num_channels)  # validates, with the config's messages
    rows: list[LayerRow] = []
    height = width = resolution
    for plan in plan_layers(depth_multiplier, min_depth, output_stride, num_channels):
        height, width = -(-height // plan.stride), -(-width // plan.stride)
        area = height * width
        if plan.index == 0:
            weights = 9 * plan.in_channels * plan.out_channels
            rows.append(LayerRow(plan.name, "conv 3x3", plan.stride, 1, plan.in_channels, plan.out_channels,
                                 (height, width), weights + 2 * plan.out_channels, area * weights))
            continue
        depthwise = 9 * plan.in_channels
        rows.append(LayerRow(f"{plan.name}_depthwise", "depthwise 3x3", plan.stride, plan.dilation, plan.in_channels,
                             plan.in_channels, (height, width), depthwise + 2 * plan.in_channels, area * depthwise))
        pointwise = plan.in_channels * plan.out_channels
        rows.append(LayerRow(f"{plan.name}_pointwise", "pointwise 1x1", 1, 1, plan.in_channels, plan.out_channels,
                             (height, width), pointwise + 2 * plan.out_channels, area * pointwise))
    if num_labels > 0:
        channels = rows[-1].out_channels
        rows.append(LayerRow("AvgPool", "global avg pool", 1, 1, channels, channels, (1, 1), 0, 0))
        rows.append(LayerRow("Logits", "linear", 1, 1, channels, num_labels, (1, 1),
                             channels * num_labels + num_labels, channels * num_labels))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = layer_table(args.depth_multiplier, args.resolution, output_stride=args.output_stride,
                       min_depth=args.min_depth, num_labels=args.num_labels)
    parameters = sum(row.parameters for row in rows)
    macs = sum(row.macs for row in rows)
    if args.json:
        report = {
            "depth_multiplier": args.depth_multiplier,
            "resolution": args.resolution,
            "output_stride": args.output_stride,
            "num_labels": args.num_labels,
            "layers": [{**asdict(row), "output_size": list(row.output_size)} for row in rows],
            "parameters": parameters,
            "macs": macs,
        }
        print(json.dumps(report, indent=2))
        return 0
    table = [
        (row.name, row.type, row.stride, row.dilation, row.in_channels, row.out_channels,
         f"{row.output_size[0]}x{row.output_size[1]}", f"{row.parameters:,}", f"{row.macs / 1e6:.2f} M")
        for row in rows
    ]
    table.append(("total", "", "", "", "", "", "", f"{parameters:,}", f"{macs / 1e6:.2f} M"))
    print_table(("layer", "type", "stride", "dilation", "in", "out", "output", "params", "mult-adds"), table,
                 (False, False, True, True, True, True, True, True, True))
    head = f"with a {args.num_labels}-way classifier" if args.num_labels else "without classifier"
    print(
        f"\nMobileNetV1 alpha {args.depth_multiplier:g} at {args.resolution}x{args.resolution}, output stride "
        f"{args.output_stride}, {head}: {parameters:,} parameters, {macs / 1e6:.1f} M multiply-adds"
    )
    return 0
