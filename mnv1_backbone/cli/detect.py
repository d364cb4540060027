"""`mnv1 detect`: draw a detection_demo detector's boxes on images (the demo's `predict_images`), or a TF
Object Detection API model's (`--weights`, see `_odapi`)."""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path
from typing import Any

from ._common import CLIError, add_command, probability, read_image
from ._odapi import add_model_options, run_detect

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the command's parser to the `mnv1` subcommands."""
    sub = add_command(
        commands,
        "detect",
        "Draw a trained detector's boxes on images and save them as PNG files.",
        "The checkpoint is one written by 'python -m detection_demo train' (checkpoint_last.pt or the exported\n"
        "model.safetensors): it holds the builder, its arguments and the category names, so nothing else is\n"
        "needed. Writes OUT/<image name>.png per image and OUT/predictions.json with every drawn box.\n"
        "--weights instead runs a TF Object Detection API SSD-MobileNetV1 (model-zoo .tar.gz, model folder,\n"
        "frozen_inference_graph.pb, or a folder 'mnv1 convert' wrote), captioned with its label map's names.",
        "  mnv1 detect street.jpg --checkpoint runs/demo/checkpoint_last.pt --out predictions/\n"
        "  mnv1 detect photos/ --checkpoint runs/demo/model.safetensors --score-threshold 0.3 --out predictions/\n"
        "  mnv1 detect --weights ssd_mobilenet_v1_coco_2018_01_28.tar.gz photo.jpg --out predictions/",
    )
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH",
                        help="detector checkpoint from detection_demo (training checkpoint .pt or exported "
                        ".safetensors)")
    source.add_argument("--weights", metavar="MODEL",
                        help="a TF Object Detection API model: model-zoo .tar.gz, model folder (pipeline.config + "
                        "model.ckpt.*), frozen_inference_graph.pb, or a folder written by 'mnv1 convert'")
    sub.add_argument("--score-threshold", "--score-thresh", type=probability, default=0.5, metavar="S",
                     help="draw only detections scoring at least S (in [0, 1]); with --weights also the model's "
                     "score_thresh (its pipeline.config score_threshold)")
    add_model_options(sub)
    sub.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files (created if missing)")
    sub.add_argument("--device", default="cpu", help="torch device to run the detector on, e.g. cpu or cuda")
    sub.add_argument("--json", action="store_true",
                     help="print the detections as JSON ({image: [{category, score, box_xyxy}]}) instead of a "
                     "summary")
    sub.set_defaults(handler=run)
    return sub


def run(args: argparse.Namespace) -> int:
    if args.weights is not None:
        return run_detect(args)
    if args.legacy_anchor_order or args.label_map:
        raise CLIError("--legacy-anchor-order and --label-map are for OD-API models (--weights); a demo checkpoint "
                       "holds its own settings and names")
    for item in args.images:  # fail on a bad image before building the detector; folders are expanded later
        if not Path(item).is_dir():
            read_image(item)
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
