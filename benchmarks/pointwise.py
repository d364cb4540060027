"""MobileNetV1's 1x1 convolutions as oneDNN convolutions or as BLAS matrix products, on channels-last inputs.

Why `optimize_for_inference` runs the pointwise layers as `F.linear` on the (N, H, W, C) view: this script times
both forms on the 13 pointwise shapes of MobileNetV1 1.0 at 224x224, in interleaved rounds, and prints the
median per layer and the totals.

    python benchmarks/pointwise.py              # batch 1, 2 threads
    python benchmarks/pointwise.py --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

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
    totals = {"conv": 0.0, "linear": 0.0}
    print(f"batch {args.batch}, {args.threads} threads, median of {args.rounds} interleaved rounds")
    with torch.inference_mode():
        for cin, cout, side in POINTWISE:
            x = torch.randn(args.batch, cin, side, side).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(cin, cout, 1).eval().to(memory_format=torch.channels_last)
            weight = conv.weight.flatten(1)
            cases = {
                "conv": lambda x=x, conv=conv: conv(x),
                "linear": lambda x=x, weight=weight, bias=conv.bias: F.linear(x.permute(0, 2, 3, 1), weight, bias),
            }
            times: dict[str, list[float]] = {name: [] for name in cases}
            for fn in cases.values():
                for _ in range(5):
                    fn()
            for _ in range(args.rounds):
                for name, fn in cases.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
            for name, ms in medians.items():
                totals[name] += ms
            print(f"  {cin:>4} -> {cout:<4} at {side:>3}x{side:<3}  conv {medians['conv']:7.3f} ms  "
                  f"linear {medians['linear']:7.3f} ms  ({medians['conv'] / medians['linear']:.2f}x)")
    print(f"total: conv {totals['conv']:.2f} ms, linear {totals['linear']:.2f} ms "
          f"({totals['conv'] / totals['linear']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
