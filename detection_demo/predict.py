"""Predictions drawn on pictures: boxes, category names and scores over each input image, saved as PNG.

`predict_images` runs a trained detector on image files and draws the detections scoring at least a threshold
with `mnv1_backbone.detection.drawing` (torchvision's `draw_bounding_boxes`, one colour per category) into
`<out>/<image stem>.png`; it also writes every drawn detection to `<out>/predictions.json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps
import torch
from torch import nn
from torchvision.transforms.v2 import functional as F

from mnv1_backbone._io import IMAGE_SUFFIXES, collect_images
from mnv1_backbone.detection.drawing import draw_detection_boxes

from .models import load_trained_model

__all__ = ["IMAGE_SUFFIXES", "collect_images", "draw_detections", "predict_images"]

logger = logging.getLogger(__name__)

def draw_detections(image: torch.Tensor, detection: dict[str, torch.Tensor], categories: Sequence[str],
                    score_threshold: float) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """`image` (uint8, (3, H, W)) with the detections scoring >= `score_threshold` drawn; and those detections."""
    keep = detection["scores"] >= score_threshold
    boxes, scores, labels = detection["boxes"][keep].cpu(), detection["scores"][keep].cpu(), detection["labels"][keep]
    labels = labels.cpu().tolist()
    captions = [f"{categories[label]} {score:.2f}" for label, score in zip(labels, scores.tolist(), strict=True)]
    drawn = draw_detection_boxes(image, boxes, labels, captions)
    found = [{"category": categories[label], "score": round(score, 4), "box_xyxy": [round(v, 1) for v in box]}
             for label, score, box in zip(labels, scores.tolist(), boxes.tolist(), strict=True)]
    return drawn, found


@torch.inference_mode()
def predict_images(
    checkpoint: str | Path | None,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    score_threshold: float = 0.5,
    device: str = "cpu",
    model: nn.Module | None = None,
    categories: Sequence[str] | None = None,
) -> list[Path]:
    """Draw a checkpoint's detections on `images` into PNG files under `out`; return the PNG paths.

    Pass `model` and `categories` instead of `checkpoint` to use a model already in memory.
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
    if model is None:
        if checkpoint is None:
            raise ValueError("give a checkpoint or a model")
        model, spec, _ = load_trained_model(checkpoint, device)
        categories = spec.categories
    elif categories is None:
        raise ValueError("categories are needed with a model")
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    report: dict[str, list[dict[str, Any]]] = {}
    for path in collect_images(images):
        with PIL.Image.open(path) as file:  # upright, as the EXIF orientation tag says (phone photos)
            image = F.pil_to_tensor(PIL.ImageOps.exif_transpose(file).convert("RGB"))
        detection = model([F.to_dtype(image, torch.float32, scale=True).to(device)])[0]
        drawn, found = draw_detections(image, detection, list(categories), score_threshold)
        target = out / f"{path.stem}.png"
        if target in written:  # same name in two folders
            target = out / f"{path.stem}_{len(written)}.png"
        F.to_pil_image(drawn).save(target)
        written.append(target)
        report[str(path)] = found
        logger.info("%s: %d detections >= %.2f -> %s", path, len(found), score_threshold, target)
    (out / "predictions.json").write_text(json.dumps(report, indent=2) + "\n")
    return written
