"""`mnv1 features`: the backbone's feature maps of one image (shapes, strides, channels), optionally saved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ._common import (
    WEIGHTS_HELP,
    CLIError,
    add_command,
    add_out_indices_option,
    add_output_stride_option,
    add_weights_option,
    check_out_indices,
    image_side,
    load_backbone,
    print_table,
    processor_for,
    read_image,
)

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the command's parser to the `mnv1` subcommands."""
    sub = add_command(
        commands,
        "features",
        "Run the backbone on one image and print each feature map's shape, stride and channels.",
        "Block numbers: 0 is the stem (Conv2d_0), k is Conv2d_k_pointwise; (5, 11, 13) are the stride 8/16/32 taps\n"
        "(C3/C4/C5) of TF's ssd_mobilenet_v1_fpn. The image is preprocessed as for 'classify', or resized without\n"
        "cropping with --resize.",
        "  mnv1 features cat.png --weights mobilenet_v1_1.0_224/ --out-indices 5 11 13\n"
        "  mnv1 features cat.png --weights frozen.pb --out-indices 11 13 --output-stride 16 --save maps.safetensors",
    )
    sub.add_argument("image", metavar="IMAGE", help="an image file (any format Pillow reads)")
    add_weights_option(sub, WEIGHTS_HELP + "; only the trunk is used")
    add_out_indices_option(sub, "increasing block numbers in [0, 13] whose outputs to return")
    add_output_stride_option(
        sub, "total stride of the deepest map; 16 or 8 dilate the last blocks instead of striding (as TF-slim)"
    )
    sub.add_argument("--resize", type=image_side, metavar="SHORT",
                     help="resize so the short side is SHORT pixels and keep the whole image (no center crop), "
                     "instead of the checkpoint's preprocessing")
    sub.add_argument("--save", metavar="FILE",
                     help="write the maps to this .safetensors file (keys: the map names; metadata: strides, "
                     "channels, input shape)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.set_defaults(handler=run)
    return sub


def run(args: argparse.Namespace) -> int:
    import torch

    check_out_indices(args.out_indices)
    save = Path(args.save) if args.save else None
    if save is not None and save.suffix != ".safetensors":
        raise CLIError(f"--save writes safetensors; give a file name ending in .safetensors, got {save}")
    image = read_image(args.image)
    backbone, config = load_backbone(args.weights, args.out_indices, args.output_stride)
    if args.resize is not None:
        from ..image_processing import MobileNetV1ImageProcessor

        processor = MobileNetV1ImageProcessor(size={"shortest_edge": args.resize}, do_center_crop=False)
    else:
        processor = processor_for(args.weights, config.image_size)
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

        from .._io import atomic_write

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
    print_table(("name", "block", "channels", "stride", "shape"), rows, (False, True, True, True, False))
    if save is not None:
        print(f"saved {len(maps)} maps to {save}")
    return 0
