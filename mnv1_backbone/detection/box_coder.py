"""The OD-API's ``faster_rcnn_box_coder`` (``box_coders/faster_rcnn_box_coder.py``) on (ymin, xmin, ymax, xmax) boxes.

Codes are (ty, tx, th, tw) = (y_scale (y - ya) / ha, x_scale (x - xa) / wa, h_scale log(h / ha), w_scale log(w / wa))
with scales (10, 10, 5, 5) by default. Encoding adds 1e-8 to the sizes, as TF does (``EPSILON``), so degenerate boxes
give finite codes. torchvision's `BoxCoder` uses (x1, y1, x2, y2), (x, y, w, h) code order, weights as multipliers
and clamps the size codes at log(1000 / 16); the OD-API does none of that, so this is our own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["decode_boxes", "encode_boxes"]

_EPSILON = 1e-8


def _centers(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ymin, xmin, ymax, xmax = boxes.unbind(-1)
    height = ymax - ymin
    width = xmax - xmin
    return ymin + height / 2.0, xmin + width / 2.0, height, width


def decode_boxes(codes: Tensor, anchors: Tensor, scales: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> Tensor:
    """(..., A, 4) codes (ty, tx, th, tw) + (A, 4) anchors -> (..., A, 4) boxes (ymin, xmin, ymax, xmax)."""
    ycenter_a, xcenter_a, ha, wa = _centers(anchors)
    ty, tx, th, tw = codes.unbind(-1)
    ty = ty / scales[0]
    tx = tx / scales[1]
    th = th / scales[2]
    tw = tw / scales[3]
    w = torch.exp(tw) * wa
    h = torch.exp(th) * ha
    ycenter = ty * ha + ycenter_a
    xcenter = tx * wa + xcenter_a
    return torch.stack([ycenter - h / 2.0, xcenter - w / 2.0, ycenter + h / 2.0, xcenter + w / 2.0], dim=-1)


def encode_boxes(boxes: Tensor, anchors: Tensor, scales: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> Tensor:
    """(A, 4) boxes matched to (A, 4) anchors, both (ymin, xmin, ymax, xmax) -> (A, 4) codes (ty, tx, th, tw)."""
    ycenter_a, xcenter_a, ha, wa = _centers(anchors)
    ycenter, xcenter, h, w = _centers(boxes)
    ha = ha + _EPSILON
    wa = wa + _EPSILON
    h = h + _EPSILON
    w = w + _EPSILON
    tx = (xcenter - xcenter_a) / wa * scales[1]
    ty = (ycenter - ycenter_a) / ha * scales[0]
    tw = torch.log(w / wa) * scales[3]
    th = torch.log(h / ha) * scales[2]
    return torch.stack([ty, tx, th, tw], dim=-1)
