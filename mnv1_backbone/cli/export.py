"""`mnv1 export`: ONNX / TorchScript / torch.export files of the classifier or backbone, verified after loading."""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._common import (
    CLIError,
    add_command,
    add_out_indices_option,
    add_output_stride_option,
    add_weights_option,
    check_out_indices,
    image_side,
    load_backbone,
    load_classifier,
    positive_float,
    positive_int,
)

__all__ = ["add_parser", "run"]

_EXPORT_FORMATS = ("onnx", "torchscript", "exported-program")
# Smallest dynamic input side: at 32 pixels the stride-32 map is 1x1, and torch.export specializes size-1 dims.
_MIN_DYNAMIC_SIZE = 33
_MAX_DYNAMIC_SIZE = 4096
_DEFAULT_TOLERANCE = 1e-4


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the command's parser to the `mnv1` subcommands."""
    sub = add_command(
        commands,
        "export",
        "Export the classifier or the backbone, then load the file back and check it against eager PyTorch.",
        "Formats: 'onnx' (torch.onnx.export with the torch.export-based exporter, checked with onnxruntime),\n"
        "'torchscript' (torch.jit.script + torch.jit.save) and 'exported-program' (torch.export.export +\n"
        "torch.export.save). The classifier outputs its logits; the backbone outputs its feature maps (a dict\n"
        "for TorchScript and exported programs, outputs named after the maps in ONNX). The export fails (exit 1)\n"
        "when the largest absolute difference from eager exceeds --tolerance.",
        "  mnv1 export --weights mobilenet_v1_1.0_224/ --format onnx mobilenet_v1.onnx\n"
        "  mnv1 export --weights frozen.pb --format exported-program backbone.pt2 --model backbone --dynamic",
    )
    sub.add_argument("out", metavar="OUT", help="the file to write (.onnx, .pt, .pt2)")
    add_weights_option(sub)
    sub.add_argument("--format", required=True, choices=_EXPORT_FORMATS, help="the export format")
    sub.add_argument("--model", choices=("classifier", "backbone"), default="classifier",
                     help="export the whole classifier (logits) or the backbone (feature maps)")
    add_out_indices_option(sub, "backbone only: the blocks whose outputs to return")
    add_output_stride_option(sub, "backbone only: total stride of the deepest map (dilation as TF-slim)")
    sub.add_argument("--image-size", type=image_side, metavar="N",
                     help="side of the square example input (default: the checkpoint's image_size, 224 for Google's)")
    sub.add_argument("--batch-size", type=positive_int, default=1, metavar="B", help="batch of the example input")
    sub.add_argument("--dynamic", action="store_true",
                     help=f"make batch, height and width dynamic (sides {_MIN_DYNAMIC_SIZE}..{_MAX_DYNAMIC_SIZE}; "
                     "traced at batch >= 2) and verify at a second size too; TorchScript is always dynamic")
    sub.add_argument("--tolerance", type=positive_float, default=_DEFAULT_TOLERANCE, metavar="T",
                     help="largest allowed absolute difference between the exported model and eager PyTorch")
    sub.add_argument("--optimized", action="store_true",
                     help="export the inference fast path (BatchNorm folded into the convolutions, TF padding "
                     "without Pad operations; onnx and exported-program only), checked against the model as loaded")
    sub.set_defaults(handler=run)
    return sub


def _export_module(kind: str, fmt: str, model: Any) -> tuple[Any, list[str]]:
    """The module to export and its output names: logits for the classifier, the maps for the backbone."""
    from torch import Tensor, nn

    class ClassifierLogits(nn.Module):
        """The classifier returning only its logits (exported graphs need plain tensor outputs)."""

        def __init__(self, classifier: nn.Module) -> None:
            super().__init__()
            self.classifier = classifier

        def forward(self, pixel_values: Tensor) -> Tensor:
            return self.classifier(pixel_values).logits

    class BackboneMaps(nn.Module):
        """The backbone returning its maps as a tuple, in `feature_info` order (ONNX outputs are positional)."""

        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.names = list(backbone.output_names)

        def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
            features = self.backbone(pixel_values)
            return tuple(features[name] for name in self.names)

    if kind == "classifier":
        return ClassifierLogits(model).eval(), ["logits"]
    names = list(model.output_names)
    if fmt == "onnx":
        return BackboneMaps(model).eval(), names
    return model, names  # TorchScript and torch.export keep the dict of maps


def _named_outputs(output: Any, names: Sequence[str]) -> dict[str, Any]:
    """Outputs as {name: tensor}, whether a tensor, a dict, or a list/tuple in `names` order."""
    import numpy as np
    import torch

    if isinstance(output, dict):
        values = [output[name] for name in names]
    elif isinstance(output, (list, tuple)):
        values = list(output)
    else:
        values = [output]
    if len(values) != len(names):
        raise CLIError(f"the exported model returned {len(values)} outputs, expected {len(names)} ({names})")
    return {
        name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        for name, value in zip(names, values, strict=True)
    }


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' own warnings and progress prints: verification below is what counts."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_onnx(module: Any, example: Any, out: Path, names: list[str], dynamic_shapes: Any) -> Callable:
    import torch

    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the torch.export-based ONNX exporter needs it)
    except ModuleNotFoundError as error:
        raise CLIError(
            f"ONNX export needs the Python package {error.name!r}: pip install 'mnv1_backbone[export]'"
        ) from None
    with _quiet_exporter():
        torch.onnx.export(
            module, (example,), str(out), dynamo=True, external_data=False, input_names=["pixel_values"],
            output_names=names, dynamic_shapes=dynamic_shapes, verbose=False,
        )
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x.numpy()})


def _export_torchscript(module: Any, example: Any, out: Path) -> Callable:
    import torch

    with _quiet_exporter():  # torch 2.10+ marks TorchScript deprecated; it still works and is tested here
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(out))
        loaded = torch.jit.load(str(out), map_location="cpu")
    return loaded


def _export_program(module: Any, example: Any, out: Path, dynamic_shapes: Any) -> Callable:
    import torch

    with _quiet_exporter():
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, str(out))
    loaded = torch.export.load(str(out))
    return loaded.module()


def _file_size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def run(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    if args.optimized and args.format == "torchscript":
        raise CLIError("--optimized exports with onnx or exported-program; TorchScript cannot script the fast path")
    if out.is_dir():
        raise CLIError(f"OUT must be a file name, {out} is a folder")
    if not out.parent.is_dir():
        raise CLIError(f"the folder of OUT does not exist: {out.parent}")
    if args.model == "backbone":
        check_out_indices(args.out_indices)
        model, config = load_backbone(args.weights, args.out_indices, args.output_stride)
    else:
        model = load_classifier(args.weights)
        config = model.config
    size = args.image_size if args.image_size is not None else config.image_size
    batch = max(args.batch_size, 2) if args.dynamic else args.batch_size  # torch.export specializes batch 1
    module, names = _export_module(args.model, args.format, model)
    reference = module  # what the exported file is checked against: the model as loaded
    if args.optimized:
        from ..inference import optimize_for_inference

        module, _ = _export_module(args.model, args.format, optimize_for_inference(model, channels_last=False))
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(batch, config.num_channels, size, size, generator=generator) * 2 - 1
    dynamic_shapes = None
    if args.dynamic:
        if size < _MIN_DYNAMIC_SIZE:
            raise CLIError(f"--dynamic needs --image-size >= {_MIN_DYNAMIC_SIZE}, got {size}")
        dims = {
            0: torch.export.Dim("batch", min=1, max=1024),
            2: torch.export.Dim("height", min=_MIN_DYNAMIC_SIZE, max=_MAX_DYNAMIC_SIZE),
            3: torch.export.Dim("width", min=_MIN_DYNAMIC_SIZE, max=_MAX_DYNAMIC_SIZE),
        }
        dynamic_shapes = (dims,)
    if args.format == "onnx":
        run = _export_onnx(module, example, out, names, dynamic_shapes)
    elif args.format == "torchscript":
        run = _export_torchscript(module, example, out)
    else:
        run = _export_program(module, example, out, dynamic_shapes)
    inputs = [example]
    if args.dynamic:
        # A second, odd-sized input of another batch proves the dimensions really are dynamic.
        other = (batch + 1, config.num_channels, size + 17, max(_MIN_DYNAMIC_SIZE, size - 15))
        inputs.append(torch.rand(*other, generator=generator) * 2 - 1)
    worst = 0.0
    print(f"exported {args.model} to {out} ({args.format}, {_file_size(out)})")
    for x in inputs:
        with torch.inference_mode():
            expected = _named_outputs(reference(x), names)
            actual = _named_outputs(run(x), names)
        for name in names:
            if tuple(actual[name].shape) != tuple(expected[name].shape):
                raise CLIError(
                    f"{name}: the exported model gives shape {tuple(actual[name].shape)}, eager gives "
                    f"{tuple(expected[name].shape)} for input {tuple(x.shape)}"
                )
            diff = (actual[name].float() - expected[name].float()).abs().max().item()
            worst = max(worst, diff)
            print(f"  input {'x'.join(map(str, x.shape))}  {name}  {'x'.join(map(str, expected[name].shape))}  "
                  f"max abs diff {diff:.2e}")
    if not worst <= args.tolerance:  # also catches NaN
        raise CLIError(
            f"verification failed: max abs diff {worst:.3e} > tolerance {args.tolerance:g}; {out} does not match "
            "eager PyTorch"
        )
    print(f"verified: max abs diff {worst:.2e} <= {args.tolerance:g}")
    return 0
