"""Where the fast path's time goes: each of MobileNetV1's 27 convolutions against its own floor.

For the eager fast path (`optimize_for_inference`, channels-last: on x86 pre-packed oneDNN convolutions with
ReLU6 fused, elsewhere pointwise layers as matrix products) at 224x224, this script profiles a few calls with
`torch.profiler`, each layer wrapped in a `record_function` label, and prints per layer: the median time of
its conv (or matrix product) and of its ReLU6 (none where it is fused), and the layer's floor:

* pointwise, stem and classifier: FLOPs / the dense float32 matrix-product rate measured here (best of three sizes);
* depthwise: bytes moved (input, output, weights, in float32) / the memory bandwidth measured here by copying a
  tensor of the layer's input size (so the bandwidth is that of the cache level the layer's maps live in).

Then the whole call: its median wall time without the profiler, the sum of the per-layer times, and what is
left (flips, the channels-last conversion of the input, pooling, Python and dispatch overhead). With
`--onnxruntime`, the same per-layer table for onnxruntime 1.32 running our export (`SessionOptions.enable_profiling`,
the node times of its JSON trace).

    python benchmarks/profile_fast_path.py --batch 1
    python benchmarks/profile_fast_path.py --batch 8 --onnxruntime
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import matmul_gflops, time_interleaved  # noqa: E402  (beside this file)

from mnv1_backbone import MobileNetV1Config, MobileNetV1ForImageClassification  # noqa: E402
from mnv1_backbone.inference import FoldedConvActivation, optimize_for_inference  # noqa: E402


def median_ms(fn: Callable[[], object], warmup: int, rounds: int) -> float:
    """run.py's timing of a single case (no untimed settling call: nothing else runs in between)."""
    return time_interleaved({"case": fn}, warmup, rounds, settle=0)["case"]


def _page_faults(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """Minor page faults and system CPU milliseconds per call: memory the allocator gave back and takes again."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_minflt - before.ru_minflt) / calls, (after.ru_stime - before.ru_stime) * 1000 / calls


class _Labelled(nn.Module):
    """A layer run under a profiler label (the label costs a microsecond or two per call)."""

    def __init__(self, label: str, module: nn.Module) -> None:
        super().__init__()
        self.label, self.module = label, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with record_function(self.label):
            return self.module(x)


# The ops a layer's conv runs as: pre-packed oneDNN (ReLU6 fused into it), a conv or a matrix product.
CONV_OPS = ("mkldnn::_convolution_pointwise", "aten::conv2d", "aten::linear")


def _layer_plan(fast: nn.Module, x: torch.Tensor) -> list[dict]:
    """Name, kind, input and output shapes of each folded layer (one eager call with hooks)."""
    plan: list[dict] = []
    hooks = []
    for module in fast.modules():
        if isinstance(module, FoldedConvActivation):
            conv = module.convolution

            def hook(mod, inputs, output, conv=conv) -> None:
                kind = "depthwise" if conv.groups > 1 else ("pointwise" if conv.kernel_size == (1, 1) else "stem")
                plan.append({"kind": kind, "in": tuple(inputs[0].shape), "out": tuple(output.shape),
                             "weight": tuple(conv.weight.shape), "module": mod, "input": inputs[0].clone()})

            hooks.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        fast(x)
    for h in hooks:
        h.remove()
    names = {"stem": "stem 3x3/2", "depthwise": "dw", "pointwise": "pw"}
    block = 0
    for entry in plan:
        if entry["kind"] == "depthwise":
            block += 1
        entry["name"] = names[entry["kind"]] if entry["kind"] == "stem" else f"{names[entry['kind']]}{block}"
    return plan


def _alone_ms(plan: list[dict], calls: int) -> None:
    """Each layer called on its own (on the input it gets in the model), without the profiler: no per-op
    profiler cost, but also no cache shared with its neighbours."""
    with torch.inference_mode():
        for entry in plan:
            module, inp = entry.pop("module"), entry.pop("input")
            entry["alone"] = median_ms(lambda module=module, inp=inp: module(inp), 5, max(20, 2 * calls))


def _label(fast: nn.Module, plan: list[dict]) -> None:
    """Wrap every folded layer (in call order, which is module order here) in a `_Labelled`."""
    index = 0
    for name, module in list(fast.named_modules()):
        if isinstance(module, FoldedConvActivation):
            parent_name, _, child = name.rpartition(".")
            setattr(fast.get_submodule(parent_name), child, _Labelled(plan[index]["name"], module))
            index += 1


def _floor_ms(entry: dict, gflops: float, bandwidth: dict[tuple, float]) -> float:
    n, cin, h, w = entry["in"]
    _, cout, ho, wo = entry["out"]
    weight = 1
    for d in entry["weight"]:
        weight *= d
    if entry["kind"] == "depthwise":
        moved = 4 * (n * cin * h * w + n * cout * ho * wo + weight)
        return moved / bandwidth[entry["in"]] * 1000
    flops = 2 * n * ho * wo * weight
    return flops / (gflops * 1e9) * 1000


def _bandwidth(shape: tuple) -> float:
    """Bytes per second of copying a float32 tensor of `shape` (read + write), channels-last like the fast path."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    ms = median_ms(lambda: out.copy_(x), 5, 30)
    return 2 * 4 * x.numel() / (ms / 1000)


def profile_torch(fast: nn.Module, x: torch.Tensor, plan: list[dict], calls: int) -> dict[str, dict[str, float]]:
    """Median per label over `calls` profiled calls: the conv/linear op's time and the activation's."""
    per_call: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with torch.inference_mode():
        for _ in range(3):
            fast(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fast(x)
    labels = {entry["name"] for entry in plan}
    outside: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name in labels:
            conv = sum(c.cpu_time_total for c in event.cpu_children if c.name in CONV_OPS)
            act = sum(c.cpu_time_total for c in event.cpu_children if c.name not in CONV_OPS)
            per_call[event.name]["conv"].append(conv / 1000)
            per_call[event.name]["act"].append(act / 1000)
            per_call[event.name]["label"].append(event.cpu_time_total / 1000)
        elif event.cpu_parent is None and not event.name.startswith("ProfilerStep"):
            outside[event.name] += event.cpu_time_total / 1000 / calls
    result = {name: {key: statistics.median(v) for key, v in values.items()} for name, values in per_call.items()}
    result["_outside"] = dict(outside)
    return result


def profile_onnxruntime(
    fast_nchw: nn.Module, x: torch.Tensor, threads: int, calls: int
) -> list[tuple[str, str, float]]:
    """(node name, op type, median ms) of each node of onnxruntime's run of our export, in graph order."""
    import onnx_peer
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        path = onnx_peer.export(onnx_peer._Logits(fast_nchw), x, Path(tmp) / "model.onnx", ["logits"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        sess = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        for _ in range(3 + calls):
            sess.run(None, feed)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"]
    start_of_timed = runs[3]["ts"] if len(runs) > 3 else 0
    nodes: dict[str, list[float]] = defaultdict(list)
    op_type: dict[str, str] = {}
    order: list[str] = []
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < start_of_timed:
            continue
        name = event["name"][: -len("_kernel_time")]
        if name not in op_type:
            order.append(name)
        op_type[name] = event.get("args", {}).get("op_name", "?")
        nodes[name].append(event["dur"] / 1000)
    wall = statistics.median(r["dur"] / 1000 for r in runs[3:]) if len(runs) > 3 else float("nan")
    return [(name, op_type[name], statistics.median(nodes[name])) for name in order] + [("(model_run wall)", "", wall)]


def _onnxruntime_wall(fast_nchw: nn.Module, x: torch.Tensor, threads: int, calls: int) -> float:
    import onnx_peer

    with tempfile.TemporaryDirectory() as tmp:
        path = onnx_peer.export(onnx_peer._Logits(fast_nchw), x, Path(tmp) / "model.onnx", ["logits"])
        run = onnx_peer.runner(path, threads, x)
        return median_ms(run, 5, 3 * calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=None, help="profiled calls (default 20 at batch 1, 5 above)")
    parser.add_argument("--onnxruntime", action="store_true", help="also onnxruntime's per-node times")
    parser.add_argument("--json", type=Path, default=None, help="write the tables as JSON")
    args = parser.parse_args(argv)
    calls = args.calls or (20 if args.batch == 1 else 5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MobileNetV1ForImageClassification(MobileNetV1Config()).eval()
    x = torch.rand(args.batch, 3, 224, 224) * 2 - 1
    fast = optimize_for_inference(model, x)
    plan = _layer_plan(fast, x)
    gflops = matmul_gflops(rounds=10)
    bandwidth = {entry["in"]: _bandwidth(entry["in"]) for entry in plan if entry["kind"] == "depthwise"}
    with torch.inference_mode():
        wall = median_ms(lambda: fast(x), 5, 3 * calls)
        faults, system_ms = _page_faults(lambda: fast(x), 3 * calls)
    _alone_ms(plan, calls)
    _label(fast, plan)
    prof = profile_torch(fast, x, plan, calls)
    print(f"batch {args.batch}, {args.threads} threads, torch {torch.__version__}; matrix-product rate {gflops:.0f} "
          f"GFLOP/s; profiled medians of {calls} calls (ms)")
    print("conv, relu6: profiled (each op pays the profiler's few microseconds); alone: the layer (conv + relu6) timed "
          "on its own, unprofiled")
    print(f"{'layer':<11} {'shape in':<18} {'conv':>7} {'relu6':>6} {'alone':>7} {'floor':>7} {'alone/floor':>11}  "
          "bandwidth")
    totals: dict[str, float] = defaultdict(float)
    rows = []
    for entry in plan:
        timing = prof[entry["name"]]
        floor = _floor_ms(entry, gflops, bandwidth)
        kind = entry["kind"]
        totals[f"{kind} conv"] += timing["conv"]
        totals[f"{kind} floor"] += floor
        totals["relu6"] += timing["act"]
        totals["labelled"] += timing["label"]
        totals[f"{kind} alone"] += entry["alone"]
        bw = f"{bandwidth[entry['in']] / 1e9:6.1f} GB/s" if kind == "depthwise" else ""
        shape = "x".join(str(d) for d in entry["in"][1:])
        print(f"{entry['name']:<11} {shape:<18} {timing['conv']:7.3f} {timing['act']:6.3f} {entry['alone']:7.3f} "
              f"{floor:7.3f} {entry['alone'] / floor:10.1f}x  {bw}")
        rows.append({**entry, **timing, "floor_ms": floor})
    print("\ntotals (ms):")
    for kind in ("stem", "depthwise", "pointwise"):
        conv, floor, alone = totals[f"{kind} conv"], totals[f"{kind} floor"], totals[f"{kind} alone"]
        print(f"  {kind:<10} conv {conv:7.2f}  alone (conv + relu6) {alone:7.2f}  floor {floor:6.2f}  "
              f"({floor / alone:4.0%} of floor alone)")
    print(f"  relu6 (separate ops)   {totals['relu6']:7.2f}")
    print(f"  27 labelled layers     {totals['labelled']:7.2f}  (conv + relu6 + the layer's own Python/dispatch)")
    print("  outside the layers (profiled, per call):")
    for name, ms in sorted(prof["_outside"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {name:<32} {ms:7.3f}")
    print(f"  wall time, unprofiled  {wall:7.2f}  ({faults:.0f} minor page faults, {system_ms:.1f} ms of system time "
          "per call: the allocator)")
    conv_sum = sum(totals[f"{kind} conv"] for kind in ("stem", "depthwise", "pointwise"))
    print(f"  wall - (conv + relu6)  {wall - conv_sum - totals['relu6']:7.2f}  (layout, flips, pooling, classifier, "
          "Python/dispatch)")
    alone_sum = sum(totals[f"{kind} alone"] for kind in ("stem", "depthwise", "pointwise"))
    print(f"  sum of layers alone    {alone_sum:7.2f}  -> wall - that {wall - alone_sum:6.2f}")
    report = {"batch": args.batch, "gflops": gflops, "wall_ms": wall, "layers": rows, "totals": dict(totals),
              "outside": prof["_outside"], "page_faults_per_call": faults, "system_ms_per_call": system_ms}
    if args.onnxruntime:
        fast_nchw = optimize_for_inference(model, x, channels_last=False)
        nodes = profile_onnxruntime(fast_nchw, x, args.threads, calls)
        ort_wall = _onnxruntime_wall(fast_nchw, x, args.threads, calls)
        print("\nonnxruntime (our export, ORT_ENABLE_ALL), node medians (ms):")
        convs = [n for n in nodes if n[1] in ("Conv", "FusedConv", "NhwcFusedConv")]
        floors = [_floor_ms(entry, gflops, bandwidth) for entry in plan]
        for (_, op, ms), entry, floor in zip(convs, plan, floors, strict=False):
            print(f"  {entry['name']:<11} {op:<14} {ms:7.3f}  floor {floor:7.3f}  ({ms / floor:.1f}x)")
        other = [n for n in nodes if n not in convs]
        for name, op, ms in other:
            print(f"  {name:<40} {op:<14} {ms:7.3f}")
        by_kind: dict[str, float] = defaultdict(float)
        for (_, _, ms), entry in zip(convs, plan, strict=False):
            by_kind[entry["kind"]] += ms
        print("  totals: " + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items())
              + f"; all nodes {sum(n[2] for n in nodes[:-1]):.2f}; wall time, unprofiled {ort_wall:.2f}")
        report["onnxruntime"] = nodes
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
