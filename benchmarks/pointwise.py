"""MobileNetV1's 1x1 convolutions, with their ReLU6, in the three forms `optimize_for_inference` can take.

On channels-last inputs: oneDNN's convolution through `F.conv2d` (which re-packs the weight on every call), oneDNN's
convolution on a weight pre-packed for the input's shape with ReLU6 fused (the eager fast path on x86 with oneDNN),
and `F.linear` on the (N, H, W, C) view (BLAS; the form elsewhere). This script times them on the 13 pointwise
shapes of MobileNetV1 1.0 at 224x224, in interleaved rounds, and prints the median per layer and the totals.

    python benchmarks/pointwise.py              # batch 1, 2 threads
    python benchmarks/pointwise.py --batch 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import time_interleaved  # noqa: E402  (beside this file)

from mnv1_backbone.inference import _OneDNNPackedWeights  # noqa: E402

# (input channels, output channels, side) of Conv2d_1..13_pointwise at 224x224, alpha 1.0.
POINTWISE = [
    (32, 64, 112), (64, 128, 56), (128, 128, 56), (128, 256, 28), (256, 256, 28), (256, 512, 14),
    (512, 512, 14), (512, 512, 14), (512, 512, 14), (512, 512, 14), (512, 512, 14), (512, 1024, 7), (1024, 1024, 7),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prepacked = _OneDNNPackedWeights.available(torch.device("cpu"), torch.float32)
    names = ["conv", "linear"] + (["prepacked"] if prepacked else [])
    totals = dict.fromkeys(names, 0.0)
    print(
        f"batch {args.batch}, {args.threads} threads, median of {args.rounds} interleaved rounds; ms, each with ReLU6"
    )
    relu6 = nn.ReLU6(inplace=True)
    with torch.inference_mode():
        for cin, cout, side in POINTWISE:
            x = torch.randn(args.batch, cin, side, side).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(cin, cout, 1).eval().to(memory_format=torch.channels_last)
            weight = conv.weight.flatten(1)
            cases = {
                "conv": lambda x=x, conv=conv: relu6(conv(x)),
                "linear": lambda x=x, weight=weight, bias=conv.bias: relu6(
                    F.linear(x.permute(0, 2, 3, 1), weight, bias)
                ),
            }
            if prepacked:
                packed = _OneDNNPackedWeights()
                cases["prepacked"] = lambda x=x, conv=conv, packed=packed: packed.convolution(x, conv, relu6)
            medians = time_interleaved(cases, 5, args.rounds, settle=0)
            for name, ms in medians.items():
                totals[name] += ms
            print(
                f"  {cin:>4} -> {cout:<4} at {side:>3}x{side:<3}  " + "  ".join(f"{n} {medians[n]:7.3f}" for n in names)
            )
    print("total: " + ", ".join(f"{n} {totals[n]:.2f} ms ({totals['conv'] / totals[n]:.2f}x conv)" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
