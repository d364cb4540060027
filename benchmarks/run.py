"""Speed of mnv1_backbone against its peers, measured in one process with the same inputs.

Every case warms up, then reports the median of many timed runs; ratios are to Hugging Face
transformers' eager MobileNetV1 measured in the same run (only ratios from one run mean anything on
a shared machine). Peers that are not installed are skipped, and the table says so.

    python benchmarks/run.py                 # full run, 2 threads, JSON to benchmarks/results.json
    python benchmarks/run.py --quick         # fewer repetitions, no torch.compile
    python benchmarks/run.py --device cuda   # also float16/bfloat16 cases on a GPU

Cases: classifier at 224x224, batch 1 and 8 (ours eager / fast path / fast path + torch.compile /
int8, transformers, timm `mobilenetv1_100`, torchvision `mobilenet_v2` and `mobilenet_v3_large`);
the backbone's (5, 11, 13) features at 320x320; SSDLite-MobileNetV1 against torchvision's
`ssdlite320_mobilenet_v3_large` at batch 1, and one training step of each at batch 4.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1Config, MobileNetV1ForImageClassification  # noqa: E402
from mnv1_backbone.inference import optimize_for_inference, quantize_int8  # noqa: E402

GFLOP_PER_IMAGE = 1.14  # 2 x 568.7 M multiply-adds at 224x224, alpha 1.0


def median_ms(fn: Callable[[], object], warmup: int, repeats: int, inference: bool = True) -> float:
    with torch.inference_mode(inference):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def matmul_gflops(repeats: int) -> float:
    """The machine's dense float32 matrix-product rate: the ceiling a conv net can approach."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ms = median_ms(lambda: a @ b, 2, repeats)
    return 2 * 2048**3 / (ms / 1000) / 1e9


def peer_models(skipped: list[str]) -> dict[str, Callable[[torch.Tensor], object]]:
    peers: dict[str, Callable[[torch.Tensor], object]] = {}
    try:
        import timm

        timm_model = timm.create_model("mobilenetv1_100", pretrained=False).eval()
        peers["timm mobilenetv1_100"] = timm_model
    except Exception as err:  # not installed, or the model name changed
        skipped.append(f"timm: {err}")
    from torchvision.models import mobilenet_v2, mobilenet_v3_large

    peers["torchvision mobilenet_v2"] = mobilenet_v2().eval()
    peers["torchvision mobilenet_v3_large"] = mobilenet_v3_large().eval()
    return peers


def classifier_cases(args, results: list[dict], skipped: list[str]) -> None:
    try:
        import transformers
    except ImportError:
        skipped.append("transformers: not installed (ratios are then to ours eager)")
        transformers = None
    ours = MobileNetV1ForImageClassification(MobileNetV1Config()).eval()
    hf = None
    if transformers is not None:
        hf = transformers.MobileNetV1ForImageClassification(transformers.MobileNetV1Config(num_labels=1001)).eval()
        hf.load_state_dict(ours.state_dict())  # same weights
    peers = peer_models(skipped)
    calibration = [torch.rand(2, 3, 224, 224) * 2 - 1 for _ in range(4)]
    int8 = quantize_int8(ours, calibration)
    for batch in (1, 8):
        x = torch.rand(batch, 3, 224, 224) * 2 - 1
        fast = optimize_for_inference(ours, x)
        cases: dict[str, Callable[[], object]] = {}
        if hf is not None:
            cases["transformers eager"] = lambda x=x: hf(x)
        cases["ours eager"] = lambda x=x: ours(x)
        cases["ours fast path"] = lambda x=x, fast=fast: fast(x)
        if not args.quick:
            compiled = optimize_for_inference(ours, x, compile=True)
            with torch.inference_mode():
                compiled(x)  # compile outside the timing
            cases["ours fast path + compile"] = lambda x=x, compiled=compiled: compiled(x)
        cases["ours int8"] = lambda x=x: int8(x)
        for name, model in peers.items():
            cases[name] = lambda model=model, x=x: model(x)
        run_group(f"classifier 224x224 batch {batch}", cases, args, results, batch=batch)


def backbone_cases(args, results: list[dict]) -> None:
    backbone = MobileNetV1Backbone((5, 11, 13)).eval()
    x = torch.rand(1, 3, 320, 320) * 2 - 1
    fast = optimize_for_inference(backbone, x)
    run_group(
        "backbone (5, 11, 13) 320x320 batch 1",
        {"ours eager": lambda: backbone(x), "ours fast path": lambda: fast(x)},
        args,
        results,
        batch=1,
    )


def detector_cases(args, results: list[dict]) -> None:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from mnv1_backbone.detection import ssdlite320_mobilenet_v1

    ours = ssdlite320_mobilenet_v1(num_classes=91).eval()
    theirs = ssdlite320_mobilenet_v3_large(num_classes=91, weights=None, weights_backbone=None).eval()
    images = [torch.rand(3, 320, 320)]
    run_group(
        "SSDLite 320x320 batch 1 (inference)",
        {
            "torchvision ssdlite320_mobilenet_v3_large": lambda: theirs(images),
            "ours ssdlite320_mobilenet_v1": lambda: ours(images),
        },
        args,
        results,
        batch=1,
    )
    batch = [torch.rand(3, 320, 320) for _ in range(4)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 200.0, 220.0]]), "labels": torch.tensor([1])} for _ in batch]

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            loss = sum(model(batch, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return run

    ours.train()
    theirs.train()
    run_group(
        "SSDLite 320x320 training step, batch 4",
        {
            "torchvision ssdlite320_mobilenet_v3_large": step(theirs, torch.optim.SGD(theirs.parameters(), lr=1e-4)),
            "ours ssdlite320_mobilenet_v1": step(ours, torch.optim.SGD(ours.parameters(), lr=1e-4)),
        },
        args,
        results,
        batch=4,
        repeats_scale=0.3,
        inference=False,
    )


def cuda_cases(args, results: list[dict]) -> None:
    model = MobileNetV1ForImageClassification(MobileNetV1Config()).eval().cuda()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.rand(8, 3, 224, 224, device="cuda") * 2 - 1).to(dtype)
        fast = optimize_for_inference(model.to(dtype), x)

        def synced(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                fn()
                torch.cuda.synchronize()

            return run

        run_group(
            f"CUDA classifier batch 8 {str(dtype).replace('torch.', '')}",
            {"ours eager": synced(lambda x=x: model(x)), "ours fast path": synced(lambda x=x, fast=fast: fast(x))},
            args,
            results,
            batch=8,
        )


def run_group(
    title: str, cases: dict, args, results: list[dict], *, batch: int, repeats_scale: float = 1.0, inference=True
) -> None:
    repeats = max(5, int(args.repeats * repeats_scale))
    timings = {name: median_ms(fn, args.warmup, repeats, inference) for name, fn in cases.items()}
    reference = timings.get("transformers eager") or next(iter(timings.values()))
    print(f"\n{title}  (median of {repeats} runs)")
    for name, ms in timings.items():
        ratio = reference / ms
        print(f"  {name:<44} {ms:9.2f} ms  {ratio:5.2f}x")
        results.append({"case": title, "model": name, "median_ms": ms, "speedup_vs_reference": ratio, "batch": batch})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile case")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 30, quick 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5, quick 2)")
    parser.add_argument("--skip-detection", action="store_true", help="leave out the SSDLite rows")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="add CUDA float16/bfloat16 cases")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results.json", help="JSON output")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (8 if args.quick else 30)
    args.warmup = args.warmup or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: list[dict] = []
    skipped: list[str] = []
    rate = matmul_gflops(args.repeats)
    floor_ms = GFLOP_PER_IMAGE / rate * 1000
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    print(f"machine: {machine}\nmatrix-product rate: {rate:.1f} GFLOP/s -> floor {floor_ms:.1f} ms per 224x224 image")
    classifier_cases(args, results, skipped)
    backbone_cases(args, results)
    if not args.skip_detection:
        detector_cases(args, results)
    if args.device == "cuda":
        if torch.cuda.is_available():
            cuda_cases(args, results)
        else:
            skipped.append("cuda: not available")
    for row in results:
        if row["case"].startswith("classifier"):
            row["fraction_of_floor"] = floor_ms * row["batch"] / row["median_ms"]
    for reason in skipped:
        print(f"skipped {reason}")
    args.output.write_text(
        json.dumps(
            {
                "machine": machine,
                "matmul_gflops": rate,
                "floor_ms_per_image": floor_ms,
                "results": results,
                "skipped": skipped,
                "quick": args.quick,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
