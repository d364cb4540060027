"""`mnv1 convert`: any weights this package reads to a Hugging Face model directory; a TF Object Detection API
model to ``model.safetensors`` + ``config.json`` (see `_odapi`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import CLIError, add_command, default_processor, image_side, processor_for, weights_kind
from ._odapi import add_model_options, is_odapi_model, run_convert

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the command's parser to the `mnv1` subcommands."""
    sub = add_command(
        commands,
        "convert",
        "Convert MobileNetV1 weights to a Hugging Face model directory.",
        "SRC: a TF checkpoint, frozen graph (.pb) or release archive (mobilenet_v1_<alpha>_<res>.tgz), a Hugging\n"
        "Face directory / our .safetensors, or timm's MobileNetV1 (a state-dict file or a timm/<name> Hub id).\n"
        "DST gets config.json, model.safetensors and preprocessor_config.json,\n"
        "which both this package and transformers load. No TensorFlow needed.\n"
        "A TF Object Detection API model (a folder or .tar.gz with pipeline.config, or a graph/checkpoint beside\n"
        "one) becomes model.safetensors + config.json, which ODAPISSDDetector.from_pretrained and\n"
        "'mnv1 detect --weights' read without the TF files.",
        "  mnv1 convert mobilenet_v1_1.0_224.tgz mobilenet_v1_1.0_224/\n"
        "  mnv1 convert mobilenet_v1_0.5_160_frozen.pb mobilenet_v1_0.5_160/ --image-size 160\n"
        "  mnv1 convert ssd_mobilenet_v1_coco_2018_01_28.tar.gz ssd_mobilenet_v1_coco/",
    )
    sub.add_argument("src", metavar="SRC", help="the weights to convert (see above)")
    sub.add_argument("dst", metavar="DST", help="output directory (created)")
    sub.add_argument("--image-size", type=image_side, metavar="N",
                     help="input resolution to record in config.json and the preprocessor (default: read from SRC, "
                     "or 224)")
    sub.add_argument("--no-ema", action="store_true",
                     help="TF checkpoints: use the raw variables instead of their ExponentialMovingAverage shadows")
    sub.add_argument("--no-tf-padding", action="store_true",
                     help="TF checkpoints trained with TF-slim's use_explicit_padding=True: record symmetric padding "
                     "(a checkpoint does not say; Google's releases use TF's SAME padding)")
    sub.add_argument("--force", action="store_true", help="write into DST even if it exists and is not empty")
    add_model_options(sub)
    sub.set_defaults(handler=run)
    return sub


def run(args: argparse.Namespace) -> int:
    from ..classification import MobileNetV1ForImageClassification
    from ..image_processing import PREPROCESSOR_CONFIG_NAME

    dst = Path(args.dst)
    kind = weights_kind(args.src)
    if dst.exists() and not dst.is_dir():
        raise CLIError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not args.force:
        raise CLIError(f"{dst} exists and is not empty; pass --force to write into it")
    if dst.resolve() == Path(args.src).resolve():
        raise CLIError("SRC and DST are the same folder")
    if is_odapi_model(args.src):
        if args.image_size is not None or args.no_ema:
            raise CLIError("--image-size and --no-ema do not apply to OD-API models (pipeline.config sets them)")
        return run_convert(args)
    if args.legacy_anchor_order or args.label_map:
        raise CLIError(f"--legacy-anchor-order and --label-map are for OD-API models; {args.src} is not one (no "
                       "pipeline.config in it or beside it)")
    if args.no_tf_padding and kind != "tf":
        raise CLIError(f"--no-tf-padding is for TF checkpoints; {args.src} records its own padding")
    if kind == "tf":
        from ..convert import convert_with_report

        report = convert_with_report(
            args.src, dst, image_size=args.image_size, prefer_ema=not args.no_ema, tf_padding=not args.no_tf_padding
        )
        print(report.summary())
    elif kind == "timm":
        model = MobileNetV1ForImageClassification.from_timm(args.src)
        if args.image_size is not None:
            model.config.image_size = args.image_size
            model.image_processor = default_processor(args.image_size)
        model.save_pretrained(dst)  # with timm's preprocessing as preprocessor_config.json
    else:
        model = MobileNetV1ForImageClassification.from_pretrained(args.src)
        if args.image_size is not None:
            model.config.image_size = args.image_size
        model.save_pretrained(dst)
        if args.image_size is None and (Path(args.src) / PREPROCESSOR_CONFIG_NAME).is_file():
            processor_for(args.src, model.config.image_size).save_pretrained(dst)  # keep the source's settings
        else:
            default_processor(model.config.image_size).save_pretrained(dst)
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
