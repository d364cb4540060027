"""The `mnv1` command line: classify, features, detect, convert, export and info.

Installed as the `mnv1` console script (`python -m mnv1_backbone` is the same program). Each subcommand is
a thin layer over the package's public API, so the CLI does nothing a user could not do in Python:
`MobileNetV1ForImageClassification` and `MobileNetV1ImageProcessor` for `classify`, `MobileNetV1Backbone`
for `features`, the demo's `detection_demo.predict` for `detect`, `mnv1_backbone.convert` for `convert`,
`torch.jit` / `torch.export` / `torch.onnx` for `export` (each export is loaded back, run and compared with
eager PyTorch), and `mnv1_backbone.config.plan_layers` for the analytic layer table of `info`.

One module per command holds its parser (`add_parser`) and its `run`; the options and helpers they share live
in `_common`. A new command is a new module and one line in `COMMANDS`.

User mistakes (a missing file, an unreadable image, weights that are not MobileNetV1's, a bad argument) end
with one line on stderr and a non-zero exit status: 2 for bad arguments (argparse's convention), 1 for
everything else. `--traceback` shows the full traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from . import classify, convert, detect, export, features, info
from ._common import PROG, CLIArgumentParser, CLIError, HelpFormatter
from .info import LayerRow, layer_table

__all__ = ["COMMANDS", "CLIError", "LayerRow", "build_parser", "layer_table", "main"]

# The subcommands, in the order `mnv1 --help` lists them.
COMMANDS = (classify, features, detect, convert, export, info)


def build_parser() -> argparse.ArgumentParser:
    """The `mnv1` argument parser with its subcommands."""
    from .. import __version__

    parser = CLIArgumentParser(
        prog=PROG,
        description="MobileNetV1 for PyTorch: classify images, extract feature maps, draw detections, convert\n"
        "Google's TF weights, export to ONNX / TorchScript / torch.export, and print the layer table.",
        epilog="Run 'mnv1 COMMAND --help' for the options of each command.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the package version and exit")
    parser.add_argument("--traceback", action="store_true",
                        help="on errors, show the full Python traceback instead of one line (for bug reports)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=CLIArgumentParser)
    for command in COMMANDS:
        command.add_parser(commands)
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

