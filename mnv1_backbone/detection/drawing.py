"""Detections drawn on an image: torchvision's `draw_bounding_boxes` with one palette, font and caption style.

Shared by `mnv1 detect` (the OD-API and demo detectors) and the demo's `predict`, so every picture the project
draws looks the same: label k in matplotlib's tab10 colour k - 1, white captions on a band of the box's colour
(readable on any background), line width and font size scaled to the image's shorter side.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import Tensor

__all__ = ["PALETTE", "draw_detection_boxes"]

#: matplotlib's tab10.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


@functools.cache
def _caption_font() -> str | None:
    """A TrueType font for the captions (matplotlib's DejaVu Sans); None: PIL's small bitmap default."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    except (ImportError, ValueError):
        return None


def draw_detection_boxes(image: Tensor, boxes: Tensor, labels: Sequence[int], captions: Sequence[str]) -> Tensor:
    """`image` (uint8, (3, H, W)) with `boxes` ((N, 4), x1 y1 x2 y2 pixels) drawn and captioned; as is if N = 0."""
    if len(boxes) == 0:
        return image
    from torchvision.utils import draw_bounding_boxes

    side = min(image.shape[-2:])
    font = _caption_font()
    return draw_bounding_boxes(
        image, boxes, labels=list(captions), colors=[PALETTE[(label - 1) % len(PALETTE)] for label in labels],
        width=max(1, round(side / 160)), font=font, font_size=max(9, round(side / 24)) if font else None,
        label_colors="white", fill_labels=True,
    )
