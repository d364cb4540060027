"""Anchor generators of the TF Object Detection API, computed as TF computes them (float32, same op order).

`ssd_anchor_box_specs` + `ssd_anchors` follow ``anchor_generators/multiple_grid_anchor_generator.py``
(``create_ssd_anchors`` and ``MultipleGridAnchorGenerator._generate``) and ``grid_anchor_generator.tile_anchors``:
per layer, scales ``min + (max - min) * i / (n - 1)`` (or the given ones) followed by 1.0; layer 0 with
``reduce_boxes_in_lowest_layer`` has the fixed boxes (0.1, 1:1), (s0, 2:1), (s0, 1:2); every other layer has one
box per aspect ratio at scale s_i and one at sqrt(s_i * s_{i+1}) with ``interpolated_scale_aspect_ratio``.
Box heights are ``s / sqrt(ar)``, widths ``s * sqrt(ar)`` (times the base anchor size), centres at
``(i + 0.5) / map size`` unless strides/offsets are given, and anchors are laid out (layer, y, x, box).

Anchor order (DESIGN.md §8): OD-API code since November 2017 appends the interpolated box last; older code (the
zoo's ``*_11_06_2017`` models) put it right after aspect ratio 1.0. ``legacy_order=True`` gives the old order.
A model trained with one order and run with the other gives plausible but wrong boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["multiscale_anchors", "ssd_anchor_box_specs", "ssd_anchors"]


def ssd_anchor_box_specs(
    *,
    num_layers: int = 6,
    min_scale: float = 0.2,
    max_scale: float = 0.95,
    scales: Sequence[float] = (),
    aspect_ratios: Sequence[float] = (1.0, 2.0, 3.0, 1.0 / 2, 1.0 / 3),
    interpolated_scale_aspect_ratio: float = 1.0,
    reduce_boxes_in_lowest_layer: bool = True,
    legacy_order: bool = False,
) -> list[list[tuple[float, float]]]:
    """The (scale, aspect ratio) of each box per location, per layer, as ``create_ssd_anchors`` builds them."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if not aspect_ratios:
        raise ValueError("aspect_ratios must not be empty")
    if any(not ar > 0 for ar in aspect_ratios):
        raise ValueError(f"aspect ratios must be positive, got {list(aspect_ratios)}")
    if scales:
        if len(scales) != num_layers:
            raise ValueError(f"got {len(scales)} scales for {num_layers} layers")
        all_scales = [float(s) for s in scales] + [1.0]
    elif num_layers == 1:
        all_scales = [min_scale, 1.0]
    else:
        all_scales = [min_scale + (max_scale - min_scale) * i / (num_layers - 1) for i in range(num_layers)] + [1.0]
    specs: list[list[tuple[float, float]]] = []
    for layer in range(num_layers):
        scale, scale_next = all_scales[layer], all_scales[layer + 1]
        if layer == 0 and reduce_boxes_in_lowest_layer:
            specs.append([(0.1, 1.0), (scale, 2.0), (scale, 0.5)])
            continue
        layer_specs = [(scale, float(ar)) for ar in aspect_ratios]
        if interpolated_scale_aspect_ratio > 0.0:
            interpolated = (math.sqrt(scale * scale_next), float(interpolated_scale_aspect_ratio))
            if legacy_order:
                if 1.0 not in [ar for _, ar in layer_specs]:
                    raise ValueError("legacy_order puts the interpolated anchor after aspect ratio 1.0, but "
                                     f"aspect_ratios {list(aspect_ratios)} has no 1.0")
                position = [ar for _, ar in layer_specs].index(1.0) + 1
                layer_specs.insert(position, interpolated)
            else:
                layer_specs.append(interpolated)
        specs.append(layer_specs)
    return specs


def ssd_anchors(
    feature_map_shapes: Sequence[tuple[int, int]],
    box_specs: Sequence[Sequence[tuple[float, float]]],
    *,
    image_size: tuple[int, int] = (1, 1),
    base_anchor_size: tuple[float, float] = (1.0, 1.0),
    anchor_strides: Sequence[tuple[int, int]] | None = None,
    anchor_offsets: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Normalised anchors (A, 4) as (ymin, xmin, ymax, xmax), ordered (layer, y, x, box), float32.

    Args:
        feature_map_shapes: (height, width) of each predictor map.
        box_specs: per layer, the (scale, aspect ratio) of each box (`ssd_anchor_box_specs`).
        image_size: the (height, width) of the resized image; only strides/offsets in pixels and a non-square
            image (base anchors are scaled by min(h, w) / h and min(h, w) / w) use it.
        base_anchor_size: (height, width) the boxes are multiplied by.
        anchor_strides, anchor_offsets: per layer, in pixels; default 1 / map size and half a stride.
    """
    if len(feature_map_shapes) != len(box_specs):
        raise ValueError(f"got {len(feature_map_shapes)} feature maps for {len(box_specs)} anchor layers")
    for name, value in (("anchor_strides", anchor_strides), ("anchor_offsets", anchor_offsets)):
        if value is not None and len(value) != len(box_specs):
            raise ValueError(f"{name} has {len(value)} entries, expected {len(box_specs)}")
    f32 = torch.float32
    im_h, im_w = torch.tensor(float(image_size[0]), dtype=f32), torch.tensor(float(image_size[1]), dtype=f32)
    min_im = torch.minimum(im_h, im_w)
    base_h = min_im / im_h * torch.tensor(base_anchor_size[0], dtype=f32)
    base_w = min_im / im_w * torch.tensor(base_anchor_size[1], dtype=f32)
    layers = []
    for index, ((grid_h, grid_w), specs) in enumerate(zip(feature_map_shapes, box_specs, strict=True)):
        if anchor_strides is None:
            stride_y = 1.0 / torch.tensor(float(grid_h), dtype=f32)
            stride_x = 1.0 / torch.tensor(float(grid_w), dtype=f32)
        else:
            stride_y = torch.tensor(float(anchor_strides[index][0]), dtype=f32) / im_h
            stride_x = torch.tensor(float(anchor_strides[index][1]), dtype=f32) / im_w
        if anchor_offsets is None:
            offset_y, offset_x = 0.5 * stride_y, 0.5 * stride_x
        else:
            offset_y = torch.tensor(float(anchor_offsets[index][0]), dtype=f32) / im_h
            offset_x = torch.tensor(float(anchor_offsets[index][1]), dtype=f32) / im_w
        scales = torch.tensor([s for s, _ in specs], dtype=f32)
        ratio_sqrts = torch.sqrt(torch.tensor([ar for _, ar in specs], dtype=f32))
        heights = scales / ratio_sqrts * base_h
        widths = scales * ratio_sqrts * base_w
        y = torch.arange(grid_h, dtype=f32) * stride_y + offset_y
        x = torch.arange(grid_w, dtype=f32) * stride_x + offset_x
        k = len(specs)
        cy = y.view(grid_h, 1, 1).expand(grid_h, grid_w, k)
        cx = x.view(1, grid_w, 1).expand(grid_h, grid_w, k)
        h = heights.view(1, 1, k).expand(grid_h, grid_w, k)
        w = widths.view(1, 1, k).expand(grid_h, grid_w, k)
        boxes = torch.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], dim=-1)
        layers.append(boxes.reshape(-1, 4))
    return torch.cat(layers, dim=0)


# --- multiscale_anchor_generator (FPN models); owned by the FPN port (odapi_fpn.py) -------------------------------


def _check_level_range(min_level: int, max_level: int) -> None:
    for name, value in (("min_level", min_level), ("max_level", max_level)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if max_level < min_level:
        raise ValueError(f"max_level {max_level} is below min_level {min_level}")


def multiscale_anchors(
    feature_map_shapes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
    *,
    min_level: int = 3,
    max_level: int = 7,
    anchor_scale: float = 4.0,
    aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5),
    scales_per_octave: int = 2,
    normalize: bool = True,
) -> Tensor:
    """Anchors (A, 4) as (ymin, xmin, ymax, xmax), ordered (level, y, x, anchor), float32, as the OD-API's
    ``multiscale_grid_anchor_generator.py`` computes them (through ``grid_anchor_generator.tile_anchors``).

    Level l (``min_level..max_level``, one per map) has stride ``2**l`` pixels and base size ``anchor_scale * 2**l``;
    its anchors at a location are, aspect ratio by aspect ratio, the scales ``2**(k / scales_per_octave)``
    (``ops.meshgrid(scales, aspect_ratios)`` flattened: aspect-major), of height ``scale / sqrt(ar) * base`` and width
    ``scale * sqrt(ar) * base``. Centres are ``i * stride + offset``, where the offset is half a stride only along a
    side of the image that ``2**l`` divides, and 0 along the others (the OD-API's rule). Coordinates are divided by
    the image (height, width) when ``normalize`` (the generator's ``normalize_coordinates``), else in pixels.

    Args:
        feature_map_shapes: (height, width) of each level's map, levels min_level..max_level in order.
        image_size: (height, width) of the network input (the resized image, before any pad_to_multiple).
    """
    _check_level_range(min_level, max_level)
    if len(feature_map_shapes) != max_level - min_level + 1:
        raise ValueError(
            f"got {len(feature_map_shapes)} feature maps for levels {min_level}..{max_level} "
            f"({max_level - min_level + 1} expected)"
        )
    if isinstance(scales_per_octave, bool) or not isinstance(scales_per_octave, int) or scales_per_octave < 1:
        raise ValueError(f"scales_per_octave must be an int >= 1, got {scales_per_octave!r}")
    if not aspect_ratios or any(not ar > 0 for ar in aspect_ratios):
        raise ValueError(f"aspect_ratios must be positive and not empty, got {list(aspect_ratios)}")
    if not anchor_scale > 0:
        raise ValueError(f"anchor_scale must be positive, got {anchor_scale!r}")
    im_h, im_w = image_size
    for name, value in (("image height", im_h), ("image width", im_w)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r} in image_size {image_size!r}")
    f32 = torch.float32
    octave_scales = [2 ** (float(k) / scales_per_octave) for k in range(scales_per_octave)]
    # ops.meshgrid(scales, aspect_ratios) tiles scales along the last axis: flattened, aspect-major.
    scales = torch.tensor([s for _ in aspect_ratios for s in octave_scales], dtype=f32)
    ratio_sqrts = torch.sqrt(torch.tensor([float(ar) for ar in aspect_ratios for _ in octave_scales], dtype=f32))
    levels = []
    for level, (grid_h, grid_w) in zip(range(min_level, max_level + 1), feature_map_shapes, strict=True):
        stride = 2**level
        base = torch.tensor(float(stride * anchor_scale), dtype=f32)
        heights = scales / ratio_sqrts * base
        widths = scales * ratio_sqrts * base
        # The OD-API: half a stride where the image side is a multiple of the stride (or 1), else 0.
        offset_y = stride / 2.0 if im_h % stride == 0 or im_h == 1 else 0.0
        offset_x = stride / 2.0 if im_w % stride == 0 or im_w == 1 else 0.0
        y = torch.arange(grid_h, dtype=f32) * float(stride) + offset_y
        x = torch.arange(grid_w, dtype=f32) * float(stride) + offset_x
        k = scales.numel()
        cy = y.view(grid_h, 1, 1).expand(grid_h, grid_w, k)
        cx = x.view(1, grid_w, 1).expand(grid_h, grid_w, k)
        h = heights.view(1, 1, k).expand(grid_h, grid_w, k)
        w = widths.view(1, 1, k).expand(grid_h, grid_w, k)
        boxes = torch.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], dim=-1).reshape(-1, 4)
        if normalize:
            # box_list_ops.to_normalized_coordinates: multiply by 1 / size, computed in float32.
            scale_y = 1.0 / torch.tensor(float(im_h), dtype=f32)
            scale_x = 1.0 / torch.tensor(float(im_w), dtype=f32)
            boxes = boxes * torch.stack([scale_y, scale_x, scale_y, scale_x])
        levels.append(boxes)
    return torch.cat(levels, dim=0)
