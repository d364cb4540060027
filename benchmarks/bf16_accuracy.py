"""Accuracy of the opt-in bfloat16 fast path against float32, on Google's real weights and real photos.

`optimize_for_inference(model, dtype=torch.bfloat16)` is not the same function as float32 (bfloat16 keeps 8
significant bits), so its accuracy is stated, not assumed: this script runs the real photos that
tests/test_int8_accuracy.py lists (`PHOTOS`, packages' CC0 / public-domain / CC BY sample images) through
the float32 model and the bfloat16 fast path (eager and, with --compile, compiled) and prints top-1 agreement
and the logit cosine (mean, min) per path.

    python benchmarks/bf16_accuracy.py [--compile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_int8_accuracy import PHOTOS, _package_file  # noqa: E402

from mnv1_backbone import MobileNetV1ForImageClassification, MobileNetV1ImageProcessor  # noqa: E402
from mnv1_backbone.inference import optimize_for_inference  # noqa: E402
from mnv1_backbone.pretrained import find_bundled_frozen_graph  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="also the compiled bfloat16 fast path")
    args = parser.parse_args(argv)
    graph = find_bundled_frozen_graph()
    if graph is None:
        print("needs the real weights (find_bundled_frozen_graph() found none)")
        return 1
    model = MobileNetV1ForImageClassification.from_tf(graph).eval()
    photos = [Image.open(_package_file(package, path)).convert("RGB") for package, path, _ in PHOTOS]
    x = MobileNetV1ImageProcessor()(photos)["pixel_values"]
    paths = {"bf16 fast path": optimize_for_inference(model, x, dtype=torch.bfloat16)}
    if args.compile:
        paths["bf16 fast path + compile"] = optimize_for_inference(model, x, dtype=torch.bfloat16, compile=True)
    paths["bf16 eager model (model.bfloat16())"] = model.to(torch.bfloat16)
    with torch.inference_mode():
        reference = MobileNetV1ForImageClassification.from_tf(graph).eval()(x).logits
        for name, path in paths.items():
            inputs = x.to(torch.bfloat16) if "eager model" in name else x
            logits = path(inputs).logits.float()
            cosine = torch.nn.functional.cosine_similarity(logits, reference)
            agree = int((logits.argmax(-1) == reference.argmax(-1)).sum())
            top5 = int(sum(int(r) in row.tolist() for r, row in zip(reference.argmax(-1), logits.topk(5).indices,
                                                                     strict=True)))
            print(f"{name:<38} top-1 agreement {agree}/{len(PHOTOS)}, float32 top-1 in its top-5 {top5}/{len(PHOTOS)}, "
                  f"logit cosine mean {cosine.mean():.5f} min {cosine.min():.5f}, "
                  f"max |logit difference| {(logits - reference).abs().max():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
