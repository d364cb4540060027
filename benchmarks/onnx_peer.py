"""ONNX Runtime as a peer: our own exports of the same weights, run by onnxruntime's CPU provider.

ONNX Runtime is what a CPU user would deploy instead of PyTorch, so the benchmark runs it on exactly our
network: the BatchNorm-folded, pad-free fast path exported with `channels_last=False` (27 Conv + Clip nodes,
no Pad, no BatchNormalization; see docs/export.md), and for int8 onnxruntime's own static quantization of
that export (QDQ format, per-channel int8 weights, uint8 activations, calibrated on the same images our
`quantize_int8` sees). The SSDLite rows export `SSDNetwork` (normalise, backbone, head, anchors).

Everything here is optional: `available()` says why a row is skipped when onnxruntime, onnx or onnxscript
is missing. Sessions use `threads` intra-op threads and one inter-op thread, like torch's settings, all graph
optimisations and thread spinning that stops when a run returns (`session.force_spinning_stop`).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn


def available() -> str | None:
    """None when the ONNX Runtime rows can run, otherwise the reason they cannot."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            return f"onnxruntime rows: {module} is not installed (pip install 'mnv1_backbone[export]')"
    return None


class _Logits(nn.Module):
    """The classifier's logits alone: ONNX wants tensors out, not our ClassifierOutput tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


def export(module: nn.Module, example: torch.Tensor, path: Path, output_names: Sequence[str]) -> Path:
    """torch.onnx.export (the torch.export-based exporter) with the exporter's chatter silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), dynamo=True, external_data=False, input_names=["x"],
            output_names=list(output_names), verbose=False,
        )
    return path


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Its intra-op threads spin while a run lasts (the default, its fastest) but stop when it returns: left
    # spinning, they took the cores of whatever ran next on two cores (torch's fast path measured 632 ms
    # instead of 13 ms right after two sessions), as they would in a service that does other work between runs.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(path: Path, threads: int, x: torch.Tensor) -> Callable[[], object]:
    """A zero-argument call that runs `path` on `x` (converted to NumPy once, outside the timing)."""
    sess = session(path, threads)
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


def quantize_int8(float_path: Path, int8_path: Path, calibration: Sequence[torch.Tensor]) -> Path:
    """onnxruntime's static QDQ quantization of `float_path`, calibrated on `calibration` (MinMax ranges).

    Per-channel int8 weights and uint8 activations, as onnxruntime's documentation recommends for CNNs on
    x86; the graph is pre-processed (shape inference, optimisation) first, as its tooling advises.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class _Images(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self._batches = iter([{name: batch.numpy()} for batch in calibration])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))
        quantize_static(
            str(prepared), str(int8_path), _Images(session(float_path, 1).get_inputs()[0].name),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return int8_path


def classifier_rows(
    fast_float: nn.Module, x: torch.Tensor, calibration: Sequence[torch.Tensor], threads: int, workdir: Path
) -> dict[str, Callable[[], object]]:
    """'onnxruntime fp32' and 'onnxruntime int8' rows for `fast_float`, our fast path with channels_last=False.

    The export is checked against the PyTorch model before timing, so a wrong export cannot win a row.
    """
    batch = x.shape[0]
    float_path = export(_Logits(fast_float), x, workdir / f"classifier_b{batch}.onnx", ["logits"])
    rows = {"onnxruntime fp32 (our export)": runner(float_path, threads, x)}
    with torch.inference_mode():
        expected = fast_float(x).logits
    got = torch.from_numpy(session(float_path, threads).run(None, {"x": x.numpy()})[0])
    if float((got - expected).abs().max()) > 1e-3:
        raise RuntimeError(f"the ONNX export differs from PyTorch by {float((got - expected).abs().max()):.2e}")
    int8_path = quantize_int8(float_path, workdir / f"classifier_b{batch}_int8.onnx", calibration)
    rows["onnxruntime int8 (static QDQ)"] = runner(int8_path, threads, x)
    return rows


def ssd_row(network: nn.Module, x: torch.Tensor, threads: int, workdir: Path) -> Callable[[], object]:
    """SSDNetwork exported to ONNX and run by onnxruntime on `x` ((1, 3, 320, 320) in [0, 1])."""
    path = export(network, x, workdir / "ssdlite.onnx", ["box_regression", "class_logits", "anchors"])
    return runner(path, threads, x)
