"""A/B timings of the levers issue 16 names, each against the fast path as it is, in interleaved rounds.

Every group builds its cases first (compiling where a case compiles), then times them in interleaved rounds (one
call of each case per round) and prints medians and the ratio to the group's first case. Only ratios within one
group of one run mean anything on a shared machine.

    python benchmarks/levers.py classifier --batch 1      # eager and compiled variants, bf16, onnxruntime options
    python benchmarks/levers.py classifier --batch 8 --autotune   # adds max_autotune (minutes of compiling)
    python benchmarks/levers.py ssd                       # SSDNetwork: fast backbone, compiled backbone, whole net
    python benchmarks/levers.py shapes                    # pre-packing when the input shape keeps changing

Cases (classifier): the eager fast path as built (pre-packed oneDNN convolutions with ReLU6 fused, on x86),
the same without pre-packing with its pointwise layers forced to matrix products and to oneDNN convolutions,
the compiled fast path as built (Inductor with weight freezing and `cpp_wrapper`), without `cpp_wrapper`,
with `max_autotune` (C++ GEMM templates; on the matrix-product form too), bfloat16 (eager with and without
pre-packing, and compiled), and onnxruntime on our export with the benchmark's session options and with
others (thread spinning off; with --all-onnx default options and fewer graph optimisations).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_peer  # noqa: E402
from run import compiled_network, time_interleaved  # noqa: E402

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1Config, MobileNetV1ForImageClassification  # noqa: E402
from mnv1_backbone.inference import FoldedConvActivation, optimize_for_inference  # noqa: E402


def report(title: str, timings: dict[str, float], rounds: int) -> None:
    first = next(iter(timings.values()))
    print(f"\n{title} (median of {rounds} interleaved rounds; ratio = first case's time / this case's)")
    for name, ms in timings.items():
        print(f"  {name:<58} {ms:8.2f} ms  {first / ms:5.2f}x")


@contextlib.contextmanager
def inductor(**options):
    from torch._inductor import config

    with config.patch(**options):
        yield


def compiled_case(
    model, x, *, dtype=None, matmul: bool = False, cpp_wrapper: bool = True, **options
) -> Callable[[], object]:
    """optimize_for_inference(compile=True), compiled now under extra Inductor options.

    With `matmul` the pointwise layers keep their matrix-product form under compile (Inductor then sees
    `linear` ops, which max_autotune's C++ GEMM templates can take) instead of convolutions.
    """
    fast = optimize_for_inference(model, compile=True, dtype=dtype)
    fast.cpp_wrapper = cpp_wrapper  # optimize_for_inference turns it on for CPU models
    if matmul:
        for module in fast.modules():
            if isinstance(module, FoldedConvActivation) and module.convolution.kernel_size == (1, 1):
                module.pointwise_as_matmul = True
    with torch.inference_mode(), inductor(**options), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        fast(x)
        print(f"  compiled {options or ''}{' matmul' if matmul else ''}{' ' + str(dtype) if dtype else ''}"
              f"{'' if cpp_wrapper else ' no cpp_wrapper'} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    return lambda: fast(x)


def onnx_case(path: Path, x: torch.Tensor, threads: int | None, *, spinning: bool = True, level: str = "ALL",
              inter: int | None = 1, stop_spinning: bool = True) -> Callable[[], object]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if inter is not None:
        options.inter_op_num_threads = inter
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if stop_spinning:  # as run.py's sessions (onnx_peer.session): spin during a run, not after it
        options.add_session_config_entry("session.force_spinning_stop", "1")
    sess = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


def classifier(args) -> None:
    model = MobileNetV1ForImageClassification(MobileNetV1Config()).eval()
    x = torch.rand(args.batch, 3, 224, 224) * 2 - 1
    cases: dict[str, Callable[[], object]] = {}
    fast = optimize_for_inference(model, x)
    cases["fast eager (as built: pre-packed oneDNN convs where available)"] = lambda: fast(x)
    for name, max_batch in (("as matrix products", None), ("as oneDNN convs", 0)):
        forced = optimize_for_inference(model, x)
        for module in forced.modules():
            if isinstance(module, FoldedConvActivation):
                module.matmul_max_batch, module.packed_weights = max_batch, None
        cases[f"fast eager, no pre-packing, pointwise {name}"] = lambda forced=forced: forced(x)
    if "bf16" in args.only or not args.only:
        bf16 = optimize_for_inference(model, x, dtype=torch.bfloat16)
        cases["fast eager bf16"] = lambda: bf16(x)
        bf16_plain = optimize_for_inference(model, x, dtype=torch.bfloat16)
        for module in bf16_plain.modules():
            if isinstance(module, FoldedConvActivation):
                module.packed_weights = None
        cases["fast eager bf16, no pre-packing"] = lambda: bf16_plain(x)
    if "compile" in args.only or not args.only:
        cases["compiled (as built: freezing, cpp_wrapper)"] = compiled_case(model, x)
        cases["compiled, freezing only (no cpp_wrapper)"] = compiled_case(model, x, cpp_wrapper=False)
        cases["compiled, pointwise as matmul"] = compiled_case(model, x, matmul=True)
        if args.autotune:
            cases["compiled + max_autotune (C++ GEMM), pointwise as matmul"] = compiled_case(
                model, x, matmul=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"
            )
            cases["compiled + max_autotune (C++ GEMM)"] = compiled_case(
                model, x, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"
            )
        if "bf16" in args.only or not args.only:
            cases["compiled bf16"] = compiled_case(model, x, dtype=torch.bfloat16)
    if onnx_peer.available() is None and ("onnx" in args.only or not args.only):
        with tempfile.TemporaryDirectory() as tmp:
            fast_nchw = optimize_for_inference(model, x, channels_last=False)
            path = onnx_peer.export(onnx_peer._Logits(fast_nchw), x, Path(tmp) / "c.onnx", ["logits"])
            cases["onnxruntime (run.py's: 2 intra, 1 inter, ALL, spin stops)"] = onnx_case(path, x, args.threads)
            cases["onnxruntime, spinning off"] = onnx_case(path, x, args.threads, spinning=False)
            if args.all_onnx:  # its threads then spin into the next case's time (see run.py's time_interleaved)
                cases["onnxruntime, spinning on after runs"] = onnx_case(path, x, args.threads, stop_spinning=False)
            if args.all_onnx:  # each session's spinning pool disturbs the others: off by default
                cases["onnxruntime, default SessionOptions"] = onnx_case(path, x, None, inter=None)
                cases["onnxruntime, ORT_ENABLE_EXTENDED"] = onnx_case(path, x, args.threads, level="EXTENDED")
                cases["onnxruntime, ORT_ENABLE_BASIC"] = onnx_case(path, x, args.threads, level="BASIC")
            timings = time_interleaved(cases, args.warmup, args.rounds, settle=args.settle)
    else:
        timings = time_interleaved(cases, args.warmup, args.rounds, settle=args.settle)
    report(f"classifier 224x224 batch {args.batch}, {args.threads} threads", timings, args.rounds)


def ssd(args) -> None:
    from mnv1_backbone.detection import SSDNetwork, ssdlite320_mobilenet_v1

    torch.manual_seed(0)
    detector = ssdlite320_mobilenet_v1(num_classes=91).eval()
    x = torch.rand(1, 3, 320, 320)
    cases: dict[str, Callable[[], object]] = {}

    def with_backbone(**options) -> torch.nn.Module:
        copy = ssdlite320_mobilenet_v1(num_classes=91).eval()
        copy.load_state_dict(detector.state_dict())
        copy.backbone.backbone = optimize_for_inference(copy.backbone.backbone, x, **options)
        return SSDNetwork(copy).eval()

    fast = with_backbone()
    cases["SSDNetwork, fast-path backbone (eager)"] = lambda: fast(x)
    eager = SSDNetwork(detector).eval()
    cases["SSDNetwork eager"] = lambda: eager(x)
    compiled_backbone = with_backbone(compile=True)
    cases["SSDNetwork, compiled fast-path backbone"] = lambda: compiled_backbone(x)
    # run.py's recipe: compiled here with freezing and checked against the network.
    cases["whole SSDNetwork compiled (freezing), eager model inside"] = compiled_network(SSDNetwork(detector).eval(), x)
    cases["whole SSDNetwork compiled (freezing), fast-path backbone inside"] = compiled_network(with_backbone(), x)
    if onnx_peer.available() is None:
        with tempfile.TemporaryDirectory() as tmp:
            nchw = with_backbone(channels_last=False)
            path = onnx_peer.export(nchw, x, Path(tmp) / "ssd.onnx", ["box_regression", "class_logits", "anchors"])
            cases["onnxruntime SSDNetwork (run.py's options)"] = onnx_case(path, x, args.threads)
            timings = time_interleaved(cases, args.warmup, args.rounds, settle=args.settle)
    else:
        timings = time_interleaved(cases, args.warmup, args.rounds, settle=args.settle)
    report(f"SSDLite network 320x320 batch 1, {args.threads} threads", timings, args.rounds)


def shapes(args) -> None:
    """The pre-packed eager backbone when input shapes change: its cache keeps four packs per layer, so five shapes
    in turn repack every layer on every call (its worst case), against the plain convolutions, which re-pack
    their weights on every call anyway."""
    backbone = MobileNetV1Backbone((5, 11, 13)).eval()
    fast = optimize_for_inference(backbone)
    plain = optimize_for_inference(backbone)
    for module in plain.modules():
        if isinstance(module, FoldedConvActivation):
            module.packed_weights = None
    sizes = [(320, 320), (320, 352), (352, 320), (288, 320), (320, 288)]
    inputs = [torch.rand(args.batch, 3, h, w) for h, w in sizes]

    def in_turn(model: torch.nn.Module) -> Callable[[], object]:
        calls = itertools.count()
        return lambda: model(inputs[next(calls) % len(inputs)])

    cases = {
        "pre-packed, five shapes in turn (repacks every call)": in_turn(fast),
        "plain convolutions, five shapes in turn": in_turn(plain),
        "pre-packed, one shape": lambda: fast(inputs[0]),
        "plain convolutions, one shape": lambda: plain(inputs[0]),
    }
    timings = time_interleaved(cases, args.warmup, args.rounds, settle=args.settle)
    report(f"backbone (5, 11, 13) around 320x320, batch {args.batch}, {args.threads} threads", timings, args.rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("group", choices=["classifier", "ssd", "shapes"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--all-onnx", action="store_true", help="also default options, EXTENDED, BASIC sessions")
    parser.add_argument("--settle", type=int, default=1, help="untimed calls before each timed call (run.py's)")
    parser.add_argument("--autotune", action="store_true", help="add max_autotune cases (slow to compile)")
    parser.add_argument("--only", nargs="*", default=[], choices=["bf16", "compile", "onnx"],
                        help="restrict the classifier's optional cases to these kinds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64  # many compiled variants of the same forward in one process
    {"classifier": classifier, "ssd": ssd, "shapes": shapes}[args.group](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
