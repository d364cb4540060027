"""The `mnv1` command line: classify, features, detect, convert, export and info.

Installed as the `mnv1` console script (`python -m mnv1_backbone` is the same program). Each subcommand is
a thin layer over the package's public API, so the CLI does nothing a user could not do in Python:
`MobileNetV1ForImageClassification` and `MobileNetV1ImageProcessor` for `classify`, `MobileNetV1Backbone`
for `features`, the demo's `detection_demo.predict` for `detect`, `mnv1_backbone.convert` for `convert`,
`torch.jit` / `torch.export` / `torch.onnx` for `export` (each export is loaded back, run and compared with
eager PyTorch), and `mnv1_backbone.config.plan_layers` for the analytic layer table of `info`.

User mistakes (a missing file, an unreadable image, weights that are not MobileNetV1's, a bad argument) end
with one line on stderr and a non-zero exit status: 2 for bad arguments (argparse's convention), 1 for
everything else. `--traceback` shows the full traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["CLIError", "LayerRow", "build_parser", "layer_table", "main"]

PROG = "mnv1"
_EXPORT_FORMATS = ("onnx", "torchscript", "exported-program")
_OUTPUT_STRIDES = (8, 16, 32)
# Smallest dynamic input side: at 32 pixels the stride-32 map is 1x1, and torch.export specializes size-1 dims.
_MIN_DYNAMIC_SIZE = 33
_MAX_DYNAMIC_SIZE = 4096
_DEFAULT_TOLERANCE = 1e-4
# Suffixes that mark a path as a file (not a Hugging Face Hub id such as "google/mobilenet_v1_1.0_224").
_FILE_SUFFIXES = {".pb", ".safetensors", ".bin", ".ckpt", ".index", ".tgz", ".gz", ".tar", ".pt", ".pth", ".json"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

WEIGHTS_HELP = (
    "MobileNetV1 classifier weights: a Hugging Face model directory (config.json with model.safetensors or "
    "pytorch_model.bin; its preprocessor_config.json is used when present), one of this package's .safetensors "
    "files, or a Google TF release file as mnv1_backbone.weights.load_tf reads it (checkpoint prefix such as "
    "dir/mobilenet_v1_1.0_224.ckpt, frozen graph .pb, release archive .tgz); a Hub id (user/name) is downloaded "
    "when huggingface_hub is installed"
)


class CLIError(Exception):
    """A user mistake the CLI reports in one line (no traceback)."""


# --------------------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------------------
class _ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to get help, no usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-wrapped descriptions and examples as written; show meaningful defaults in option help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" not in text and default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
            text += f" (default: {shown})"
        return text


_Value = TypeVar("_Value", int, float)


def _checked(
    convert: Callable[[str], _Value], is_valid: Callable[[_Value], bool], expected: str
) -> Callable[[str], _Value]:
    """An argparse `type` that converts the text, then checks the value; both failures name what was expected."""

    def parse(text: str) -> _Value:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not is_valid(value):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
_nonnegative_int = _checked(int, lambda value: value >= 0, "an integer >= 0")
_block_index = _checked(int, lambda value: 0 <= value <= 13, "a block number in [0, 13]")
_probability = _checked(float, lambda value: 0.0 <= value <= 1.0, "a number in [0, 1]")
_positive_float = _checked(float, lambda value: math.isfinite(value) and value > 0, "a positive number")


def _image_side(text: str) -> int:
    value = _positive_int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"MobileNetV1 needs inputs of at least 32 pixels, got {value}")
    return value


# Options several subcommands share: defined once so their type, default and metavar cannot drift apart; each
# subcommand words the help for its own use.
def _add_weights_option(parser: argparse.ArgumentParser, help_text: str = WEIGHTS_HELP) -> None:
    parser.add_argument("--weights", required=True, metavar="PATH", help=help_text)


def _add_out_indices_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--out-indices", nargs="+", type=_block_index, default=[5, 11, 13], metavar="K", help=help_text)


def _add_output_stride_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--output-stride", type=int, choices=_OUTPUT_STRIDES, default=32, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The `mnv1` argument parser with its six subcommands."""
    from . import __version__

    parser = _ArgumentParser(
        prog=PROG,
        description="MobileNetV1 for PyTorch: classify images, extract feature maps, draw detections, convert\n"
        "Google's TF weights, export to ONNX / TorchScript / torch.export, and print the layer table.",
        epilog="Run 'mnv1 COMMAND --help' for the options of each command.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the package version and exit")
    parser.add_argument("--traceback", action="store_true",
                        help="on errors, show the full Python traceback instead of one line (for bug reports)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_ArgumentParser)

    def command(name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, description=f"{summary}\n\n{description}", epilog=f"examples:\n{examples}",
            formatter_class=_HelpFormatter,
        )
        # Also accepted after the subcommand, where users tend to put it.
        sub.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                         help="on errors, show the full Python traceback instead of one line")
        return sub

    # --- classify ---------------------------------------------------------------------------------------------
    sub = command(
        "classify",
        "Classify images with a MobileNetV1 classifier and print the top-k labels.",
        "Images are preprocessed with MobileNetV1ImageProcessor: the checkpoint's preprocessor_config.json when the\n"
        "weights are a directory that has one, else Hugging Face's defaults for the checkpoint's image size\n"
        "(resize the short side to image_size + 32, center crop image_size, scale to [-1, 1]).",
        "  mnv1 classify cat.png dog.jpg --weights mobilenet_v1_1.0_224/\n"
        "  mnv1 classify cat.png --weights mobilenet_v1_1.0_224_frozen.pb --top-k 3 --json",
    )
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    _add_weights_option(sub)
    sub.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                     help="how many of the most probable classes to show per image")
    sub.add_argument("--json", action="store_true",
                     help="print JSON instead of a table: a list of {image, predictions: [{rank, index, label, "
                     "probability}]}")
    sub.set_defaults(handler=_cmd_classify)

    # --- features ---------------------------------------------------------------------------------------------
    sub = command(
        "features",
        "Run the backbone on one image and print each feature map's shape, stride and channels.",
        "Block numbers: 0 is the stem (Conv2d_0), k is Conv2d_k_pointwise; (5, 11, 13) are the stride 8/16/32 taps\n"
        "(C3/C4/C5) of TF's ssd_mobilenet_v1_fpn. The image is preprocessed as for 'classify', or resized without\n"
        "cropping with --resize.",
        "  mnv1 features cat.png --weights mobilenet_v1_1.0_224/ --out-indices 5 11 13\n"
        "  mnv1 features cat.png --weights frozen.pb --out-indices 11 13 --output-stride 16 --save maps.safetensors",
    )
    sub.add_argument("image", metavar="IMAGE", help="an image file (any format Pillow reads)")
    _add_weights_option(sub, WEIGHTS_HELP + "; only the trunk is used")
    _add_out_indices_option(sub, "increasing block numbers in [0, 13] whose outputs to return")
    _add_output_stride_option(
        sub, "total stride of the deepest map; 16 or 8 dilate the last blocks instead of striding (as TF-slim)"
    )
    sub.add_argument("--resize", type=_image_side, metavar="SHORT",
                     help="resize so the short side is SHORT pixels and keep the whole image (no center crop), "
                     "instead of the checkpoint's preprocessing")
    sub.add_argument("--save", metavar="FILE",
                     help="write the maps to this .safetensors file (keys: the map names; metadata: strides, "
                     "channels, input shape)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.set_defaults(handler=_cmd_features)

    # --- detect -----------------------------------------------------------------------------------------------
    sub = command(
        "detect",
        "Draw a trained detector's boxes on images and save them as PNG files.",
        "The checkpoint is one written by 'python -m detection_demo train' (checkpoint_last.pt or the exported\n"
        "model.safetensors): it holds the builder, its arguments and the category names, so nothing else is\n"
        "needed. Writes OUT/<image name>.png per image and OUT/predictions.json with every drawn box.",
        "  mnv1 detect street.jpg --checkpoint runs/demo/checkpoint_last.pt --out predictions/\n"
        "  mnv1 detect photos/ --checkpoint runs/demo/model.safetensors --score-threshold 0.3 --out predictions/",
    )
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    sub.add_argument("--checkpoint", required=True, metavar="PATH",
                     help="detector checkpoint from detection_demo (training checkpoint .pt or exported "
                     ".safetensors)")
    sub.add_argument("--score-threshold", type=_probability, default=0.5, metavar="S",
                     help="draw only detections scoring at least S (in [0, 1])")
    sub.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files (created if missing)")
    sub.add_argument("--device", default="cpu", help="torch device to run the detector on, e.g. cpu or cuda")
    sub.add_argument("--json", action="store_true",
                     help="print the detections as JSON ({image: [{category, score, box_xyxy}]}) instead of a "
                     "summary")
    sub.set_defaults(handler=_cmd_detect)

    # --- convert ----------------------------------------------------------------------------------------------
    sub = command(
        "convert",
        "Convert MobileNetV1 weights to a Hugging Face model directory.",
        "SRC: a TF checkpoint, frozen graph (.pb) or release archive (mobilenet_v1_<alpha>_<res>.tgz), or a Hugging\n"
        "Face directory / our .safetensors. DST gets config.json, model.safetensors and preprocessor_config.json,\n"
        "which both this package and transformers load. No TensorFlow needed.",
        "  mnv1 convert mobilenet_v1_1.0_224.tgz mobilenet_v1_1.0_224/\n"
        "  mnv1 convert mobilenet_v1_0.5_160_frozen.pb mobilenet_v1_0.5_160/ --image-size 160",
    )
    sub.add_argument("src", metavar="SRC", help="the weights to convert (see above)")
    sub.add_argument("dst", metavar="DST", help="output directory (created)")
    sub.add_argument("--image-size", type=_image_side, metavar="N",
                     help="input resolution to record in config.json and the preprocessor (default: read from SRC, "
                     "or 224)")
    sub.add_argument("--no-ema", action="store_true",
                     help="TF checkpoints: use the raw variables instead of their ExponentialMovingAverage shadows")
    sub.add_argument("--force", action="store_true", help="write into DST even if it exists and is not empty")
    sub.set_defaults(handler=_cmd_convert)

    # --- export -----------------------------------------------------------------------------------------------
    sub = command(
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
    _add_weights_option(sub)
    sub.add_argument("--format", required=True, choices=_EXPORT_FORMATS, help="the export format")
    sub.add_argument("--model", choices=("classifier", "backbone"), default="classifier",
                     help="export the whole classifier (logits) or the backbone (feature maps)")
    _add_out_indices_option(sub, "backbone only: the blocks whose outputs to return")
    _add_output_stride_option(sub, "backbone only: total stride of the deepest map (dilation as TF-slim)")
    sub.add_argument("--image-size", type=_image_side, metavar="N",
                     help="side of the square example input (default: the checkpoint's image_size, 224 for Google's)")
    sub.add_argument("--batch-size", type=_positive_int, default=1, metavar="B", help="batch of the example input")
    sub.add_argument("--dynamic", action="store_true",
                     help=f"make batch, height and width dynamic (sides {_MIN_DYNAMIC_SIZE}..{_MAX_DYNAMIC_SIZE}; "
                     "traced at batch >= 2) and verify at a second size too; TorchScript is always dynamic")
    sub.add_argument("--tolerance", type=_positive_float, default=_DEFAULT_TOLERANCE, metavar="T",
                     help="largest allowed absolute difference between the exported model and eager PyTorch")
    sub.add_argument("--optimized", action="store_true",
                     help="export the inference fast path (BatchNorm folded into the convolutions, TF padding "
                     "without Pad operations; onnx and exported-program only), checked against the model as loaded")
    sub.set_defaults(handler=_cmd_export)

    # --- info -------------------------------------------------------------------------------------------------
    sub = command(
        "info",
        "Print MobileNetV1's layer table with parameters and multiply-adds, computed from the architecture.",
        "Per layer: type, stride, dilation, channels in and out, output size, parameters (conv weights and\n"
        "BatchNorm scale and shift) and multiply-adds (convolutions and the classifier; pooling, BatchNorm and\n"
        "activations are not counted, as in the paper). Alpha 1.0 at 224: 4,233,001 parameters, 568.7 M\n"
        "multiply-adds (paper: 569 M). No weights are loaded.",
        "  mnv1 info\n"
        "  mnv1 info --depth-multiplier 0.5 --resolution 160 --json",
    )
    sub.add_argument("--depth-multiplier", "--alpha", type=_positive_float, default=1.0, metavar="A",
                     help="width multiplier alpha: channels are max(int(c * A), min_depth)")
    sub.add_argument("--resolution", type=_image_side, default=224, metavar="R", help="side of the square input")
    _add_output_stride_option(sub, "total stride of the last block (dilation as TF-slim)")
    sub.add_argument("--min-depth", type=_positive_int, default=8, metavar="D", help="fewest channels of any layer")
    sub.add_argument("--num-labels", type=_nonnegative_int, default=1001, metavar="N",
                     help="classifier outputs (Google's checkpoints: 1001); 0 for the bare network without "
                     "pooling and classifier")
    sub.add_argument("--json", action="store_true", help="print JSON (rows and totals) instead of a table")
    sub.set_defaults(handler=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `mnv1` command line with `argv` (default: `sys.argv[1:]`); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        # Library warnings are for the user: one line each, without file names and source lines.
        warnings.showwarning = _show_warning
        try:
            return args.handler(args)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except (CLIError, OSError, ValueError, ImportError) as error:
            if args.traceback:
                raise
            print(f"{PROG} {args.command}: error: {_error_line(error)}", file=sys.stderr)
            return 1


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _error_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename and not isinstance(error, CLIError):
        text = f"{error.strerror}: {error.filename}"
    elif isinstance(error, ModuleNotFoundError) and error.name:
        text = f"the Python package {error.name!r} is needed for this: install it with pip"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())  # one line, whatever the message held


# --------------------------------------------------------------------------------------------------------------
# Shared helpers: images and weights
# --------------------------------------------------------------------------------------------------------------
def _read_image(path: str) -> Any:
    """Open an image file fully (so a truncated file fails here, not later), upright as its EXIF orientation tag
    says (as transformers' `load_image` does for its pipelines), as an RGB-convertible PIL image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    file = Path(path)
    if not file.exists():
        raise CLIError(f"image not found: {file}")
    if file.is_dir():
        raise CLIError(f"{file} is a folder, not an image file")
    try:
        with Image.open(file) as image:
            image.load()
            return ImageOps.exif_transpose(image)  # a copy, turned when the tag asks for it
    except UnidentifiedImageError:
        raise CLIError(f"{file} is not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:  # Pillow's guard against huge images, before decoding
        raise CLIError(f"refusing {file}: {error}") from None
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot read image {file}: {' '.join(str(error).split())}") from None


def _weights_kind(weights: str) -> str:
    """'hf' (directory, our .safetensors or Hub id) or 'tf' (anything `load_tf` reads); raises if it is missing."""
    path = Path(weights)
    if path.is_dir():
        # An extracted TF release (checkpoint or frozen graph, no config.json) is TF; any other folder is HF's.
        is_tf = not (path / "config.json").exists() and (any(path.glob("*.index")) or any(path.glob("*.pb")))
        return "tf" if is_tf else "hf"
    if path.is_file() and path.suffix == ".safetensors":
        return "hf"
    if path.is_file() or Path(f"{weights}.index").is_file():  # a TF checkpoint is named by its prefix
        return "tf"
    if not path.exists() and path.suffix.lower() not in _FILE_SUFFIXES and _HUB_ID.match(weights):
        return "hf"  # a Hub id; from_pretrained fetches it
    raise CLIError(f"weights not found: {path}")


def _load_classifier(weights: str) -> Any:
    from .classification import MobileNetV1ForImageClassification

    if _weights_kind(weights) == "hf":
        model = MobileNetV1ForImageClassification.from_pretrained(weights)
    else:
        model = MobileNetV1ForImageClassification.from_tf(weights)
    return model.eval()


def _load_backbone(weights: str, out_indices: Sequence[int], output_stride: int) -> tuple[Any, Any]:
    """(backbone, the checkpoint's config): the config also tells the input size the weights were trained at."""
    from .backbone import MobileNetV1Backbone
    from .weights import load_checkpoint, load_tf

    config, state_dict = load_checkpoint(weights) if _weights_kind(weights) == "hf" else load_tf(weights)
    backbone = MobileNetV1Backbone.from_config(config, tuple(out_indices), output_stride=output_stride)
    backbone.load_trunk(state_dict, source=str(weights))
    return backbone.eval(), config


def _processor_for(weights: str, image_size: int) -> Any:
    """The checkpoint's preprocessor_config.json when it has one; else HF's defaults for `image_size`."""
    from .image_processing import PREPROCESSOR_CONFIG_NAME, MobileNetV1ImageProcessor

    directory = Path(weights)
    if directory.is_dir() and (directory / PREPROCESSOR_CONFIG_NAME).is_file():
        return MobileNetV1ImageProcessor.from_pretrained(directory)
    return _default_processor(image_size)


def _default_processor(image_size: int) -> Any:
    from .image_processing import MobileNetV1ImageProcessor

    # HF's MobileNetV1 processors resize the short side to image_size + 32 (256 for 224), then crop image_size.
    return MobileNetV1ImageProcessor(size={"shortest_edge": image_size + 32}, crop_size=image_size)


def _check_out_indices(indices: Sequence[int]) -> None:
    if list(indices) != sorted(set(indices)):
        raise CLIError(f"--out-indices must be increasing and without repeats, got {' '.join(map(str, indices))}")


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> None:
    """Print aligned columns; `right[i]` right-aligns column i (numbers)."""
    cells = [list(map(str, headers))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right, strict=True))
        print(line.rstrip())


# --------------------------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------------------------
def _cmd_classify(args: argparse.Namespace) -> int:
    import torch

    images = [(path, _read_image(path)) for path in args.images]  # fail on a bad image before loading weights
    model = _load_classifier(args.weights)
    processor = _processor_for(args.weights, model.config.image_size)
    id2label = model.config.resolved_id2label()
    results = []
    with torch.inference_mode():
        for path, image in images:
            pixel_values = processor(image, return_tensors="pt")["pixel_values"]
            logits = model(pixel_values).logits
            if logits.dim() != 2:
                raise CLIError(
                    f"the model gives a {tuple(logits.shape)} map of logits for {path}; classify needs one vector "
                    "per image (use global pooling or a center crop)"
                )
            top = processor.post_process_image_classification(logits, top_k=args.top_k, id2label=id2label)[0]
            predictions = [
                {"rank": rank, "index": index, "label": label, "probability": probability}
                for rank, (index, label, probability) in enumerate(top, start=1)
            ]
            results.append({"image": path, "predictions": predictions})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for number, result in enumerate(results):
        if number:
            print()
        print(result["image"])
        rows = [(p["rank"], p["index"], f"{100 * p['probability']:.2f}%", p["label"]) for p in result["predictions"]]
        _print_table(("rank", "index", "probability", "label"), rows, (True, True, True, False))
    return 0


# --------------------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------------------
def _cmd_features(args: argparse.Namespace) -> int:
    import torch

    _check_out_indices(args.out_indices)
    save = Path(args.save) if args.save else None
    if save is not None and save.suffix != ".safetensors":
        raise CLIError(f"--save writes safetensors; give a file name ending in .safetensors, got {save}")
    image = _read_image(args.image)
    backbone, config = _load_backbone(args.weights, args.out_indices, args.output_stride)
    if args.resize is not None:
        from .image_processing import MobileNetV1ImageProcessor

        processor = MobileNetV1ImageProcessor(size={"shortest_edge": args.resize}, do_center_crop=False)
    else:
        processor = _processor_for(args.weights, config.image_size)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        features = backbone(pixel_values)
    maps = [
        {
            "name": info.name,
            "block": info.index,
            "channels": info.channels,
            "stride": info.stride,
            "shape": list(features[info.name].shape),
        }
        for info in backbone.feature_info
    ]
    if save is not None:
        from safetensors.torch import save_file

        from ._io import atomic_write

        metadata = {
            "format": "pt",
            "image": str(args.image),
            "input_shape": json.dumps(list(pixel_values.shape)),
            "feature_info": json.dumps([{k: m[k] for k in ("name", "block", "channels", "stride")} for m in maps]),
        }
        tensors = {name: value.contiguous() for name, value in features.items()}
        atomic_write(save, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    if args.json:
        report = {"image": args.image, "input_shape": list(pixel_values.shape), "features": maps}
        if save is not None:
            report["saved"] = str(save)
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.image}: input {'x'.join(map(str, pixel_values.shape))}")
    rows = [(m["name"], m["block"], m["channels"], m["stride"], "x".join(map(str, m["shape"]))) for m in maps]
    _print_table(("name", "block", "channels", "stride", "shape"), rows, (False, True, True, True, False))
    if save is not None:
        print(f"saved {len(maps)} maps to {save}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# detect
# --------------------------------------------------------------------------------------------------------------
def _cmd_detect(args: argparse.Namespace) -> int:
    for item in args.images:  # fail on a bad image before building the detector; folders are expanded later
        if not Path(item).is_dir():
            _read_image(item)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise CLIError(f"checkpoint not found: {checkpoint}")
    if checkpoint.suffix != ".safetensors" and not zipfile.is_zipfile(checkpoint):  # torch.save writes zip files
        raise CLIError(
            f"{checkpoint} is not a detection_demo checkpoint (a training checkpoint .pt or an exported .safetensors)"
        )
    try:
        from detection_demo.predict import predict_images
    except ImportError as error:
        raise CLIError(f"detect needs the detection_demo package installed with mnv1_backbone ({error})") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    written = predict_images(checkpoint, args.images, out, score_threshold=args.score_threshold, device=args.device)
    report = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for (image, found), png in zip(report.items(), written, strict=True):
        print(f"{image}: {len(found)} detection{'s' if len(found) != 1 else ''} >= {args.score_threshold:g} -> {png}")
        for detection in found:
            box = ", ".join(f"{v:.1f}" for v in detection["box_xyxy"])
            print(f"  {detection['category']:<20} {detection['score']:.3f}  [{box}]")
    print(f"wrote {len(written)} image{'s' if len(written) != 1 else ''} and {out / 'predictions.json'}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace) -> int:
    from .classification import MobileNetV1ForImageClassification
    from .image_processing import PREPROCESSOR_CONFIG_NAME

    dst = Path(args.dst)
    kind = _weights_kind(args.src)
    if dst.exists() and not dst.is_dir():
        raise CLIError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not args.force:
        raise CLIError(f"{dst} exists and is not empty; pass --force to write into it")
    if dst.resolve() == Path(args.src).resolve():
        raise CLIError("SRC and DST are the same folder")
    if kind == "tf":
        from .convert import convert_with_report

        report = convert_with_report(args.src, dst, image_size=args.image_size, prefer_ema=not args.no_ema)
        print(report.summary())
    else:
        model = MobileNetV1ForImageClassification.from_pretrained(args.src)
        if args.image_size is not None:
            model.config.image_size = args.image_size
        model.save_pretrained(dst)
        if args.image_size is None and (Path(args.src) / PREPROCESSOR_CONFIG_NAME).is_file():
            _processor_for(args.src, model.config.image_size).save_pretrained(dst)  # keep the source's settings
        else:
            _default_processor(model.config.image_size).save_pretrained(dst)
    # Load the result back: what was written must be what the loaders read.
    model = MobileNetV1ForImageClassification.from_pretrained(dst)
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    files = ", ".join(sorted(p.name for p in dst.iterdir() if p.is_file()))
    print(f"wrote {dst}: {files}")
    print(
        f"MobileNetV1 alpha {config.depth_multiplier:g}, {config.image_size}x{config.image_size}, "
        f"{config.num_labels} labels, {parameters:,} parameters"
    )
    return 0


# --------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------
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


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    if args.optimized and args.format == "torchscript":
        raise CLIError("--optimized exports with onnx or exported-program; TorchScript cannot script the fast path")
    if out.is_dir():
        raise CLIError(f"OUT must be a file name, {out} is a folder")
    if not out.parent.is_dir():
        raise CLIError(f"the folder of OUT does not exist: {out.parent}")
    if args.model == "backbone":
        _check_out_indices(args.out_indices)
        model, config = _load_backbone(args.weights, args.out_indices, args.output_stride)
    else:
        model = _load_classifier(args.weights)
        config = model.config
    size = args.image_size if args.image_size is not None else config.image_size
    batch = max(args.batch_size, 2) if args.dynamic else args.batch_size  # torch.export specializes batch 1
    module, names = _export_module(args.model, args.format, model)
    reference = module  # what the exported file is checked against: the model as loaded
    if args.optimized:
        from .inference import optimize_for_inference

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


# --------------------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------------------
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
    from .config import MobileNetV1Config, plan_layers

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


def _cmd_info(args: argparse.Namespace) -> int:
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
    _print_table(("layer", "type", "stride", "dilation", "in", "out", "output", "params", "mult-adds"), table,
                 (False, False, True, True, True, True, True, True, True))
    head = f"with a {args.num_labels}-way classifier" if args.num_labels else "without classifier"
    print(
        f"\nMobileNetV1 alpha {args.depth_multiplier:g} at {args.resolution}x{args.resolution}, output stride "
        f"{args.output_stride}, {head}: {parameters:,} parameters, {macs / 1e6:.1f} M multiply-adds"
    )
    return 0
