"""Speed of mnv1_backbone against its peers, measured in one process with the same inputs.

Every group of cases warms each case up, then times them in interleaved rounds (one untimed, then one timed
call of each case per round), so that a machine that speeds up or slows down affects every case alike; it
reports the median per case and the ratio to Hugging Face transformers' eager MobileNetV1 (or the group's
first case) measured in the same rounds. Only ratios from one run mean anything on a shared machine. Peers
that are not installed are skipped, and the output says so.

    python benchmarks/run.py                 # full run, 2 threads, JSON to benchmarks/results.json
    python benchmarks/run.py --quick         # fewer rounds, no torch.compile
    python benchmarks/run.py --device cuda   # also the classifier cases on a GPU in float32/16 and bfloat16

Cases: classifier at 224x224, batch 1 and 8 (ours eager / fast path / fast path + torch.compile, both also
in the opt-in bfloat16 / int8, onnxruntime fp32 on our export and onnxruntime's own static int8 of it
(benchmarks/onnx_peer.py), transformers, timm `mobilenetv1_100`, torchvision `mobilenet_v2` and
`mobilenet_v3_large`); the backbone's (5, 11, 13) features at 320x320; SSDLite-MobileNetV1 against
torchvision's `ssdlite320_mobilenet_v3_large` at batch 1, SSDLite's exportable network (no NMS) in PyTorch
(eager, fast-path backbone eager or compiled, the whole network compiled) against onnxruntime, and one
training step of each at batch 4. The compute floor is the classifier's 1.14 GFLOP per image at the dense
matrix-product rate measured at the start (the best of three sizes); the rate is measured again at the end
to show drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_peer  # noqa: E402  (beside this file)

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1Config, MobileNetV1ForImageClassification  # noqa: E402
from mnv1_backbone.inference import optimize_for_inference  # noqa: E402
from mnv1_backbone.quantization import quantize_int8  # noqa: E402

GFLOP_PER_IMAGE = 1.14  # 2 x 568.7 M multiply-adds at 224x224, alpha 1.0
REFERENCE = "transformers eager"


def time_interleaved(
    cases: dict[str, Callable[[], object]], warmup: int, rounds: int, inference: bool = True, settle: int = 1
) -> dict[str, float]:
    """Median milliseconds per case, timing the cases in turn in each round.

    Each case first runs `settle` untimed calls in its turn: the thread pool of the case before it (torch's
    OpenMP workers, onnxruntime's intra-op pool) keeps spinning for a while after its call returns, and on
    two cores that spinning took the next case's cores (torch's fast path measured 632 ms instead of 13 ms
    right after two onnxruntime sessions, onnxruntime 1.4x slower right after torch). One untimed call
    gives the times each case has when run alone (docs/performance.md, "Against ONNX Runtime").
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode(inference):
        for fn in cases.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in cases.items():
                for _ in range(settle):
                    fn()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def matmul_gflops(rounds: int) -> float:
    """The best dense float32 matrix-product rate of a few sizes: the ceiling a conv net can approach."""
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        ms = time_interleaved({"matmul": lambda a=a, b=b: a @ b}, 3, max(5, rounds // 2))["matmul"]
        best = max(best, 2 * n**3 / (ms / 1000) / 1e9)
    return best


def describe_machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # VNNI decides int8's activation bits; AVX512-BF16/AMX decide whether bfloat16 on the CPU pays.
    vector_flags = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"}
    flags = " ".join(sorted(flag for flag in _cpu_flags() if flag in vector_flags))
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "LD_PRELOAD")
    return (
        f"{cpu} ({os.cpu_count()} logical CPUs; {flags or 'no AVX flags read'}), {threads} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}, allocator env: {malloc or 'default'}"
    )


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def peer_models(skipped: list[str]) -> dict[str, torch.nn.Module]:
    peers: dict[str, torch.nn.Module] = {}
    try:
        import timm

        peers["timm mobilenetv1_100"] = timm.create_model("mobilenetv1_100", pretrained=False).eval()
    except Exception as err:  # not installed, or the model name changed
        skipped.append(f"timm: {err}")
    from torchvision.models import mobilenet_v2, mobilenet_v3_large

    peers["torchvision mobilenet_v2"] = mobilenet_v2().eval()
    peers["torchvision mobilenet_v3_large"] = mobilenet_v3_large().eval()
    return peers


def classifier_models(skipped: list[str]) -> dict[str, torch.nn.Module]:
    """The reference (transformers, with our weights), ours eager, then the peers: every classifier group's rows."""
    ours = MobileNetV1ForImageClassification(MobileNetV1Config()).eval()
    models: dict[str, torch.nn.Module] = {}
    try:
        import transformers
    except ImportError:
        skipped.append("transformers: not installed (ratios are then to ours eager)")
    else:
        hf = transformers.MobileNetV1ForImageClassification(transformers.MobileNetV1Config(num_labels=1001)).eval()
        hf.load_state_dict(ours.state_dict())  # same weights
        models[REFERENCE] = hf
    models["ours eager"] = ours
    models.update(peer_models(skipped))
    return models


def _ours_first(models: dict[str, torch.nn.Module], x: torch.Tensor, ours_extra: dict) -> dict:
    """Cases in table order: the reference, ours eager, our other variants, then the peers."""
    cases: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        cases[name] = lambda model=model, x=x: model(x)
        if name == "ours eager":
            cases.update(ours_extra)
    return cases


def classifier_cases(args, results: list[dict], skipped: list[str]) -> None:
    models = classifier_models(skipped)
    ours = models["ours eager"]
    calibration = [torch.rand(2, 3, 224, 224) * 2 - 1 for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        int8 = quantize_int8(ours, calibration)
    for batch in (1, 8):
        x = torch.rand(batch, 3, 224, 224) * 2 - 1
        fast = optimize_for_inference(ours, x)
        variants: dict[str, Callable[[], object]] = {"ours fast path": lambda x=x, fast=fast: fast(x)}
        if not args.quick:
            compiled = optimize_for_inference(ours, x, compile=True)  # compiles here, outside the timing
            variants["ours fast path + compile"] = lambda x=x, compiled=compiled: compiled(x)
        bf16 = optimize_for_inference(ours, x, dtype=torch.bfloat16)
        variants["ours fast path bf16 (opt-in)"] = lambda x=x, bf16=bf16: bf16(x)
        if not args.quick:
            bf16_compiled = optimize_for_inference(ours, x, compile=True, dtype=torch.bfloat16)
            variants["ours fast path + compile, bf16 (opt-in)"] = lambda x=x, fn=bf16_compiled: fn(x)
        variants["ours int8"] = lambda x=x: int8(x)
        if args.onnx_workdir is not None:
            images = torch.cat(calibration)  # the same 8 images as quantize_int8's, in batches of this size
            fast_nchw = optimize_for_inference(ours, x, channels_last=False)  # ONNX wants NCHW, no flips of layout
            variants.update(
                onnx_peer.classifier_rows(fast_nchw, x, list(images.split(batch)), args.threads, args.onnx_workdir)
            )
        run_group(f"classifier 224x224 batch {batch}", _ours_first(models, x, variants), args, results, batch=batch)


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


def compiled_backbone_network(detector: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """SSDNetwork of a copy of `detector` whose backbone is the compiled fast path (compiled here)."""
    from mnv1_backbone.detection import SSDNetwork, ssdlite320_mobilenet_v1

    copy = ssdlite320_mobilenet_v1(num_classes=91).eval()
    copy.load_state_dict(detector.state_dict())
    with torch.inference_mode():
        copy.backbone.backbone = optimize_for_inference(copy.backbone.backbone, x, compile=True)
    network = SSDNetwork(copy).eval()
    return lambda: network(x)


def compiled_network(network: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """torch.compile of the whole SSDNetwork with Inductor's weight freezing (which folds the BatchNorms of the
    extra layers and the head too), compiled here and checked against the network."""
    from torch._inductor import config as inductor_config

    compiled = torch.compile(network)
    with torch.inference_mode(), inductor_config.patch(freezing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, expected = compiled(x), network(x)
    for a, b in zip(got, expected, strict=True):
        if float((a - b).abs().max()) > 1e-4 * max(float(b.abs().max()), 1e-30):
            raise RuntimeError("the compiled SSDNetwork differs from the eager one")

    def run() -> object:
        with inductor_config.patch(freezing=True):
            return compiled(x)

    return run


def detector_cases(args, results: list[dict]) -> None:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from mnv1_backbone.detection import SSDNetwork, ssdlite320_mobilenet_v1

    ours = ssdlite320_mobilenet_v1(num_classes=91).eval()
    theirs = ssdlite320_mobilenet_v3_large(num_classes=91, weights=None, weights_backbone=None).eval()
    images = [torch.rand(3, 320, 320)]
    fast = ssdlite320_mobilenet_v1(num_classes=91).eval()
    fast.load_state_dict(ours.state_dict())
    fast.backbone.backbone = optimize_for_inference(fast.backbone.backbone, torch.rand(1, 3, 320, 320))
    run_group(
        "SSDLite 320x320 batch 1 (inference)",
        {
            "torchvision ssdlite320_mobilenet_v3_large": lambda: theirs(images),
            "ours ssdlite320_mobilenet_v1": lambda: ours(images),
            "ours, fast-path backbone": lambda: fast(images),
        },
        args,
        results,
        batch=1,
    )
    if args.onnx_workdir is not None:
        x = images[0][None]
        eager_network = SSDNetwork(ours).eval()
        fast_nchw = ssdlite320_mobilenet_v1(num_classes=91).eval()
        fast_nchw.load_state_dict(ours.state_dict())
        fast_nchw.backbone.backbone = optimize_for_inference(fast_nchw.backbone.backbone, x, channels_last=False)
        fast_network = SSDNetwork(fast).eval()
        cases = {
            "ours SSDNetwork eager": lambda: eager_network(x),
            "ours SSDNetwork, fast-path backbone": lambda: fast_network(x),
        }
        if not args.quick:
            cases["ours SSDNetwork, compiled fast-path backbone"] = compiled_backbone_network(ours, x)
            cases["ours SSDNetwork, whole network compiled (freezing)"] = compiled_network(SSDNetwork(ours).eval(), x)
        cases["onnxruntime SSDNetwork (our fast-path export)"] = onnx_peer.ssd_row(
            SSDNetwork(fast_nchw).eval(), x, args.threads, args.onnx_workdir
        )
        run_group("SSDLite network (no post-processing) 320x320 batch 1", cases, args, results, batch=1)
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
        rounds_scale=0.3,
        inference=False,
    )


def reduced_precision_cases(args, results: list[dict], device: str) -> None:
    """The classifier cases on `device` in float32, float16 and bfloat16 (int8 and compile are CPU/float32 rows)."""
    models = classifier_models([])  # what is not installed was reported by the CPU cases
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def synced(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            fn()
            synchronize()

        return run

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for model in models.values():
            model.to(device=device, dtype=dtype)
        for batch in (1, 8):
            x = (torch.rand(batch, 3, 224, 224, device=device) * 2 - 1).to(dtype)
            fast = optimize_for_inference(models["ours eager"], x)
            cases = _ours_first(models, x, {"ours fast path": lambda fast=fast, x=x: fast(x)})
            title = f"{device.upper()} classifier 224x224 batch {batch} {str(dtype).replace('torch.', '')}"
            run_group(title, {name: synced(fn) for name, fn in cases.items()}, args, results, batch=batch)


def run_group(
    title: str, cases: dict, args, results: list[dict], *, batch: int, rounds_scale: float = 1.0, inference=True
) -> None:
    rounds = max(5, int(args.rounds * rounds_scale))
    timings = time_interleaved(cases, args.warmup, rounds, inference)
    reference_name = REFERENCE if REFERENCE in timings else next(iter(timings))
    reference = timings[reference_name]
    floor = args.floor_ms * batch if title.startswith("classifier") else None
    print(f"\n{title}  (median of {rounds} interleaved rounds; speed-up vs {reference_name})")
    for name, ms in timings.items():
        row = {"case": title, "model": name, "median_ms": ms, "speedup_vs_reference": reference / ms, "batch": batch}
        line = f"  {name:<44} {ms:9.2f} ms  {reference / ms:5.2f}x"
        if floor is not None:
            row["fraction_of_floor"] = floor / ms
            line += f"  {floor / ms:4.0%} of floor"
        print(line)
        results.append(row)


def check_targets(results: list[dict]) -> list[str]:
    """The targets of docs/performance.md, each with this run's figure and whether it was met."""
    speedup = {(row["case"], row["model"]): row["speedup_vs_reference"] for row in results}
    lines: list[str] = []

    def target(label: str, value: float | None, goal: float, at_most: bool = False) -> None:
        if value is not None:
            met = value <= goal if at_most else value >= goal
            relation = "<=" if at_most else ">="
            lines.append(f"  {'met    ' if met else 'NOT met'}  {label}: {value:.2f} (goal {relation} {goal:g})")

    for batch, goal in ((1, 1.8), (8, 2.0)):
        case = f"classifier 224x224 batch {batch}"
        if (case, REFERENCE) not in speedup:
            continue
        fast = max(speedup[case, m] for m in ("ours fast path", "ours fast path + compile") if (case, m) in speedup)
        target(f"batch {batch}: fast path (best of eager, compiled) speed-up vs transformers eager", fast, goal)
        for peer in ("timm mobilenetv1_100", "torchvision mobilenet_v2"):
            if (case, peer) in speedup:
                target(f"batch {batch}: fast path speed / {peer} speed", fast / speedup[case, peer], 1.0)
        target(f"batch {batch}: ours eager speed-up vs transformers eager", speedup.get((case, "ours eager")), 1.0)
        onnx_fp32 = speedup.get((case, "onnxruntime fp32 (our export)"))
        if onnx_fp32 is not None:
            target(f"batch {batch}: fast path speed / onnxruntime fp32 speed (issue 16)", fast / onnx_fp32, 1.0)
            onnx_int8, int8 = speedup.get((case, "onnxruntime int8 (static QDQ)")), speedup.get((case, "ours int8"))
            if onnx_int8 is not None and int8 is not None:
                target(f"batch {batch}: ours int8 speed / onnxruntime int8 speed", int8 / onnx_int8, 1.0)
        if batch == 1:
            target("batch 1: int8 speed-up vs transformers eager", speedup.get((case, "ours int8")), 3.0)
    network = "SSDLite network (no post-processing) 320x320 batch 1"
    ours_ssd = [
        speedup[network, m]
        for m in (
            "ours SSDNetwork, fast-path backbone",
            "ours SSDNetwork, compiled fast-path backbone",
            "ours SSDNetwork, whole network compiled (freezing)",
        )
        if (network, m) in speedup
    ]
    ssd_onnx = speedup.get((network, "onnxruntime SSDNetwork (our fast-path export)"))
    if ours_ssd and ssd_onnx is not None:
        target("SSDLite network: our best float32 speed / onnxruntime speed", max(ours_ssd) / ssd_onnx, 1.0)
    ssd = speedup.get(("SSDLite 320x320 batch 1 (inference)", "ours ssdlite320_mobilenet_v1"))
    if ssd is not None:
        target("SSDLite batch 1: our time / torchvision ssdlite320_mobilenet_v3_large's", 1 / ssd, 1.3, at_most=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no torch.compile case")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per group (default 20, quick 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs of each case first (default 5, quick 2)")
    parser.add_argument("--skip-detection", action="store_true", help="leave out the SSDLite rows")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="add CUDA float16/bfloat16 cases")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results.json", help="JSON output")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (8 if args.quick else 20)
    args.warmup = args.warmup or (2 if args.quick else 5)
    unavailable = onnx_peer.available()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64  # several compiled fast paths share one forward; none may fall back
    results: list[dict] = []
    skipped: list[str] = []
    machine = describe_machine(args.threads)
    rate = matmul_gflops(args.rounds)
    args.floor_ms = GFLOP_PER_IMAGE / rate * 1000
    print(f"machine: {machine}")
    if unavailable is None:
        import onnxruntime

        print(f"onnxruntime {onnxruntime.__version__} (CPU provider, {args.threads} intra-op threads)")
    else:
        skipped.append(unavailable)
    print(f"matrix-product rate: {rate:.1f} GFLOP/s -> floor {args.floor_ms:.1f} ms per 224x224 image")
    with tempfile.TemporaryDirectory() as onnx_dir:
        args.onnx_workdir = Path(onnx_dir) if unavailable is None else None
        classifier_cases(args, results, skipped)
        backbone_cases(args, results)
        if not args.skip_detection:
            detector_cases(args, results)
    if args.device == "cuda":
        if torch.cuda.is_available():
            reduced_precision_cases(args, results, "cuda")
        else:
            skipped.append("cuda: not available")
    rate_after = matmul_gflops(args.rounds)
    print(f"\nmatrix-product rate at the end: {rate_after:.1f} GFLOP/s (start {rate:.1f})")
    targets = check_targets(results)
    if targets:
        print("\ntargets (docs/performance.md):\n" + "\n".join(targets))
    for reason in skipped:
        print(f"skipped {reason}")
    report = {
        "machine": machine,
        "matmul_gflops": rate,
        "matmul_gflops_end": rate_after,
        "floor_ms_per_image": args.floor_ms,
        "results": results,
        "targets": targets,
        "skipped": skipped,
        "quick": args.quick,
        "rounds": args.rounds,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
