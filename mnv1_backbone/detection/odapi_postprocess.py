"""The OD-API's SSD preprocessing and postprocessing, reproduced op for op.

Preprocessing (``fixed_shape_resizer`` + the MobileNet feature extractor's ``preprocess``): TF 1.x
``ResizeBilinear`` with ``align_corners=False`` and ``half_pixel_centers=False`` (output pixel i samples input
``i * in / out``, the scale computed in float32, no antialiasing; ``resize_bilinear_op.cc``'s ``compute_lerp``
order), then ``(2 / 255) * x - 1``. torch's ``interpolate`` samples at half-pixel centres, so this is our own.

Postprocessing (``ssd_meta_arch.postprocess`` + ``core/post_processing.multiclass_non_max_suppression``): the score
converter (IDENTITY, SIGMOID or SOFTMAX of ``logits / logit_scale``) over all columns, drop column 0 (background),
decode with the faster_rcnn coder, then per class: scores above ``score_threshold``, greedy NMS (IoU above
``iou_threshold`` suppresses; torchvision's `batched_nms` has the same rule) keeping at most
``max_detections_per_class``; merge, sort by score, keep ``max_total_detections``. Clipping to the window
[0, 0, 1, 1] depends on the OD-API version that exported the model (DESIGN.md §8): code before mid-2018 clipped
the decoded boxes and dropped those of zero area *before* NMS (``clip_before_nms=True``); later code runs NMS on
the unclipped boxes, then clips and drops boxes of zero area. Ties in scores keep the lower index first, as
``tf.nn.top_k`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .box_coder import decode_boxes

__all__ = ["Detections", "convert_scores", "postprocess_detections", "preprocess_image", "resize_bilinear_tf1"]


class Detections(NamedTuple):
    """One image's detections: boxes (K, 4) normalised (ymin, xmin, ymax, xmax), scores (K,), labels (K,) 1-based."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def _interpolation(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size), dtype=torch.float32)
    position = torch.arange(out_size, dtype=torch.float32) * scale
    floor = torch.floor(position)
    lower = floor.clamp(min=0).long()
    upper = torch.ceil(position).clamp(max=in_size - 1).long()
    lerp = position - floor
    return lower.to(device), upper.to(device), lerp.to(device)


def resize_bilinear_tf1(image: Tensor, size: tuple[int, int]) -> Tensor:
    """TF 1.x ``ResizeBilinear`` (align_corners=False, no half-pixel offset) of a (C, H, W) float32 image."""
    if image.dim() != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {list(image.shape)}")
    out_h, out_w = size
    in_h, in_w = image.shape[-2:]
    image = image.to(torch.float32)
    y0, y1, ylerp = _interpolation(in_h, out_h, image.device)
    x0, x1, xlerp = _interpolation(in_w, out_w, image.device)
    top_rows, bottom_rows = image[:, y0], image[:, y1]
    top_left, top_right = top_rows[:, :, x0], top_rows[:, :, x1]
    bottom_left, bottom_right = bottom_rows[:, :, x0], bottom_rows[:, :, x1]
    top = top_left + (top_right - top_left) * xlerp
    bottom = bottom_left + (bottom_right - bottom_left) * xlerp
    return top + (bottom - top) * ylerp[:, None]


def preprocess_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, H, W) image with values in [0, 1] -> (3, h, w) in [-1, 1], as the OD-API's SSD-MobileNet graph does.

    The OD-API feeds uint8 pixels; ``image * 255`` recovers them up to float rounding (<= 3e-5 of a pixel level).
    """
    resized = resize_bilinear_tf1(image.to(torch.float32) * 255.0, size)
    return torch.tensor(2.0 / 255.0, dtype=torch.float32) * resized - 1.0


def convert_scores(logits: Tensor, converter: str, logit_scale: float = 1.0) -> Tensor:
    """The OD-API score converter on (..., C + 1) logits; returns (..., C) scores without the background column."""
    scaled = logits / logit_scale if logit_scale != 1.0 else logits
    if converter == "SIGMOID":
        scores = torch.sigmoid(scaled)
    elif converter == "SOFTMAX":
        scores = torch.softmax(scaled, dim=-1)
    elif converter == "IDENTITY":
        scores = scaled
    else:
        raise ValueError(f"score converter {converter!r} is not one of IDENTITY, SIGMOID, SOFTMAX")
    return scores[..., 1:]


def _clip_unit(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """``box_list_ops.clip_to_window`` with window [0, 0, 1, 1]: clipped boxes and the mask of non-zero area."""
    clipped = boxes.clamp(0.0, 1.0)
    area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    return clipped, area > 0


def postprocess_detections(
    box_codes: Tensor,
    logits: Tensor,
    anchors: Tensor,
    *,
    box_coder_scales: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    score_converter: str = "SIGMOID",
    logit_scale: float = 1.0,
    score_threshold: float = 0.0,
    iou_threshold: float = 0.6,
    max_detections_per_class: int = 100,
    max_total_detections: int = 100,
    clip_before_nms: bool = False,
) -> Detections:
    """One image's (A, 4) box codes and (A, C + 1) logits -> its `Detections` (see the module docstring)."""
    boxes = decode_boxes(box_codes, anchors, box_coder_scales)
    scores = convert_scores(logits, score_converter, logit_scale)
    num_anchors, num_classes = scores.shape
    keep_area = torch.ones(num_anchors, dtype=torch.bool, device=boxes.device)
    if clip_before_nms:
        boxes, keep_area = _clip_unit(boxes)
    # Candidates: (anchor, class) pairs above the threshold (TF's NMS keeps scores > score_threshold).
    candidate = (scores > score_threshold) & keep_area[:, None]
    anchor_idx, class_idx = candidate.nonzero(as_tuple=True)
    cand_boxes = boxes[anchor_idx]
    cand_scores = scores[anchor_idx, class_idx]
    kept = batched_nms(cand_boxes, cand_scores, class_idx, iou_threshold)
    # batched_nms returns all classes together by decreasing score; keep each class's best few.
    kept_classes = class_idx[kept]
    rank_in_class = torch.zeros_like(kept)
    if kept.numel():
        order = torch.argsort(kept_classes, stable=True)
        sorted_classes = kept_classes[order]
        starts = torch.searchsorted(sorted_classes, sorted_classes, right=False)
        rank_in_class[order] = torch.arange(kept.numel(), device=kept.device) - starts
    kept = kept[rank_in_class < max_detections_per_class]
    # TF concatenates class by class (each in NMS order), then sorts by score; ties keep that order.
    kept = kept[torch.argsort(class_idx[kept], stable=True)]
    order = torch.argsort(cand_scores[kept], descending=True, stable=True)
    kept = kept[order]
    out_boxes, out_scores, out_labels = cand_boxes[kept], cand_scores[kept], class_idx[kept] + 1
    if not clip_before_nms:
        out_boxes, nonzero = _clip_unit(out_boxes)
        out_boxes, out_scores, out_labels = out_boxes[nonzero], out_scores[nonzero], out_labels[nonzero]
    k = min(max_total_detections, out_scores.numel())
    return Detections(out_boxes[:k], out_scores[:k], out_labels[:k])

