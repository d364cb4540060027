"""``python -m mnv1_backbone.convert SRC DST [--image-size N] [--raw] [--no-tf-padding]``: a TF release to HF files.

SRC is a release archive (``mobilenet_v1_<alpha>_<res>[_quant].tgz``), a checkpoint prefix (or its ``.index``) or
a frozen ``.pb``; DST receives ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``, which
transformers loads unchanged. The work is `mnv1_backbone.convert.convert`; this is only its command line. Errors
print one line on stderr and exit with status 1 (2 for bad arguments), without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mnv1_backbone.convert.archive import convert_with_report
from mnv1_backbone.errors import WeightsFormatError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mnv1_backbone.convert",
        description="Convert Google's TF MobileNetV1 release (.tgz, checkpoint prefix or frozen .pb) to an "
        "HF-format directory (config.json, model.safetensors, preprocessor_config.json).",
    )
    parser.add_argument("src", help="release .tgz, checkpoint prefix (dir/mobilenet_v1_1.0_224.ckpt) or frozen .pb")
    parser.add_argument("dst", help="output directory (created if needed)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="N",
        help="input resolution; default: the _<res> in SRC's name (224 in mobilenet_v1_1.0_224.tgz), else 224",
    )
    parser.add_argument(
        "--raw", action="store_true", help="use the raw variables, not their ExponentialMovingAverage shadows"
    )
    parser.add_argument(
        "--no-tf-padding",
        action="store_true",
        help="the checkpoint was trained with use_explicit_padding=True (symmetric padding, VALID convolutions); "
        "a checkpoint does not record its padding, so say it here",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what was mapped and what was ignored")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        report = convert_with_report(args.src, args.dst, image_size=args.image_size, prefer_ema=not args.raw,
                                    tf_padding=not args.no_tf_padding)
    except (WeightsFormatError, ValueError, OSError) as err:
        # WeightsFormatError is a ValueError; OSError covers missing files and unwritable destinations.
        message = str(err).replace("\n", " ")
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
