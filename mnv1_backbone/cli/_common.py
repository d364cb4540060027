"""What the `mnv1` commands share: the one-line-error parser, value checks, shared options, images and weights.

Options several commands take (`--weights`, `--out-indices`, `--output-stride`) are defined here once, so their
type, default and metavar cannot drift apart; each command words the help for its own use.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "OUTPUT_STRIDES",
    "PROG",
    "WEIGHTS_HELP",
    "CLIArgumentParser",
    "CLIError",
    "HelpFormatter",
    "add_command",
    "add_out_indices_option",
    "add_output_stride_option",
    "add_weights_option",
    "block_index",
    "check_out_indices",
    "checked",
    "default_processor",
    "image_side",
    "load_backbone",
    "load_classifier",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "print_table",
    "probability",
    "processor_for",
    "read_image",
    "weights_kind",
]

PROG = "mnv1"
OUTPUT_STRIDES = (8, 16, 32)
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



class CLIArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to get help, no usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-wrapped descriptions and examples as written; show meaningful defaults in option help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" not in text and default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
            text += f" (default: {shown})"
        return text


_Value = TypeVar("_Value", int, float)


def checked(
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


positive_int = checked(int, lambda value: value >= 1, "a positive integer")
nonnegative_int = checked(int, lambda value: value >= 0, "an integer >= 0")
block_index = checked(int, lambda value: 0 <= value <= 13, "a block number in [0, 13]")
probability = checked(float, lambda value: 0.0 <= value <= 1.0, "a number in [0, 1]")
positive_float = checked(float, lambda value: math.isfinite(value) and value > 0, "a positive number")


def image_side(text: str) -> int:
    value = positive_int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"MobileNetV1 needs inputs of at least 32 pixels, got {value}")
    return value


# Options several subcommands share: defined once so their type, default and metavar cannot drift apart; each
# subcommand words the help for its own use.
def add_weights_option(parser: argparse.ArgumentParser, help_text: str = WEIGHTS_HELP, required: bool = True) -> None:
    parser.add_argument("--weights", required=required, metavar="PATH", help=help_text)


def add_out_indices_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--out-indices", nargs="+", type=block_index, default=[5, 11, 13], metavar="K", help=help_text)


def add_output_stride_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--output-stride", type=int, choices=OUTPUT_STRIDES, default=32, help=help_text)



def add_command(commands: Any, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand parser with the shared layout: summary, description, examples, and `--traceback`."""
    sub = commands.add_parser(
        name, help=summary, description=f"{summary}\n\n{description}", epilog=f"examples:\n{examples}",
        formatter_class=HelpFormatter,
    )
    # Also accepted after the subcommand, where users tend to put it.
    sub.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                     help="on errors, show the full Python traceback instead of one line")
    return sub


def read_image(path: str) -> Any:
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


def weights_kind(weights: str) -> str:
    """'hf' (directory, our .safetensors or Hub id), 'timm' (a timm state-dict file or "timm/<name>" Hub id) or 'tf'
    (anything `load_tf` reads); raises if it is missing."""
    from ..weights import is_timm_file, is_timm_hub_id

    if is_timm_hub_id(weights) or is_timm_file(weights):
        return "timm"
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


def load_classifier(weights: str) -> Any:
    from ..classification import MobileNetV1ForImageClassification

    kind = weights_kind(weights)
    if kind == "hf":
        model = MobileNetV1ForImageClassification.from_pretrained(weights)
    elif kind == "timm":
        model = MobileNetV1ForImageClassification.from_timm(weights)
    else:
        model = MobileNetV1ForImageClassification.from_tf(weights)
    return model.eval()


def load_backbone(weights: str, out_indices: Sequence[int], output_stride: int) -> tuple[Any, Any]:
    """(backbone, the checkpoint's config): the config also tells the input size the weights were trained at."""
    from ..backbone import MobileNetV1Backbone
    from ..weights import load_checkpoint, load_tf, load_timm

    kind = weights_kind(weights)
    if kind == "timm":
        config, state_dict = load_timm(weights)[:2]
    else:
        config, state_dict = load_checkpoint(weights) if kind == "hf" else load_tf(weights)
    backbone = MobileNetV1Backbone.from_config(config, tuple(out_indices), output_stride=output_stride)
    backbone.load_trunk(state_dict, source=str(weights))
    return backbone.eval(), config


def processor_for(weights: str, image_size: int) -> Any:
    """The checkpoint's preprocessor_config.json when it has one; else HF's defaults for `image_size`."""
    from ..image_processing import PREPROCESSOR_CONFIG_NAME, MobileNetV1ImageProcessor

    directory = Path(weights)
    if directory.is_dir() and (directory / PREPROCESSOR_CONFIG_NAME).is_file():
        return MobileNetV1ImageProcessor.from_pretrained(directory)
    if weights_kind(weights) == "timm":  # timm's own evaluation settings
        from ..classification import timm_image_processor
        from ..weights import load_timm

        return timm_image_processor(load_timm(weights).preprocessing)
    return default_processor(image_size)


def default_processor(image_size: int) -> Any:
    from ..image_processing import MobileNetV1ImageProcessor

    # HF's MobileNetV1 processors resize the short side to image_size + 32 (256 for 224), then crop image_size.
    return MobileNetV1ImageProcessor(size={"shortest_edge": image_size + 32}, crop_size=image_size)


def check_out_indices(indices: Sequence[int]) -> None:
    if list(indices) != sorted(set(indices)):
        raise CLIError(f"--out-indices must be increasing and without repeats, got {' '.join(map(str, indices))}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> None:
    """Print aligned columns; `right[i]` right-aligns column i (numbers)."""
    cells = [list(map(str, headers))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right, strict=True))
        print(line.rstrip())
