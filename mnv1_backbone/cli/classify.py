"""`mnv1 classify`: top-k ImageNet (or the checkpoint's) labels of images, through the public classifier API."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._common import (
    WEIGHTS_HELP,
    CLIError,
    add_command,
    add_weights_option,
    load_classifier,
    positive_int,
    print_table,
    processor_for,
    read_image,
)

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the command's parser to the `mnv1` subcommands."""
    sub = add_command(
        commands,
        "classify",
        "Classify images with a MobileNetV1 classifier and print the top-k labels.",
        "Images are preprocessed with MobileNetV1ImageProcessor: the checkpoint's preprocessor_config.json when the\n"
        "weights are a directory that has one, else Hugging Face's defaults for the checkpoint's image size\n"
        "(resize the short side to image_size + 32, center crop image_size, scale to [-1, 1]).",
        "  mnv1 classify cat.png dog.jpg --weights mobilenet_v1_1.0_224/\n"
        "  mnv1 classify cat.png --weights mobilenet_v1_1.0_224_frozen.pb --top-k 3 --json",
    )
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    add_weights_option(
        sub,
        WEIGHTS_HELP + "; default: Google's mobilenet_v1_1.0_224 frozen graph when the nudity package ships it "
        "(pip install --no-deps nudity==0.2.3)",
        required=False,
    )
    sub.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                     help="how many of the most probable classes to show per image")
    sub.add_argument("--json", action="store_true",
                     help="print JSON instead of a table: a list of {image, predictions: [{rank, index, label, "
                     "probability}]}")
    sub.set_defaults(handler=run)
    return sub


def run(args: argparse.Namespace) -> int:
    import torch

    images = [(path, read_image(path)) for path in args.images]  # fail on a bad image before loading weights
    weights = args.weights if args.weights is not None else _bundled_weights()
    model = load_classifier(weights)
    processor = processor_for(weights, model.config.image_size)
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
        print_table(("rank", "index", "probability", "label"), rows, (True, True, True, False))
    return 0


def _bundled_weights() -> str:
    """Google's ImageNet graph where a package ships it (as the README's examples find it); else say how to get
    weights, in one line."""
    from ..pretrained import find_bundled_frozen_graph

    graph = find_bundled_frozen_graph()
    if graph is None:
        raise CLIError(
            "no --weights given and no bundled weights found: pass --weights (an HF directory, a TF release file, "
            "a timm state-dict file or 'timm/mobilenetv1_100'), or install Google's mobilenet_v1_1.0_224 graph "
            "with 'pip install --no-deps nudity==0.2.3'"
        )
    return str(graph)
