"""A deterministic synthetic COCO-format detection dataset for the demo.

`generate_dataset` draws shapes of five categories (circle, triangle, rectangle, star, cross) over textured,
cluttered backgrounds and writes, under `root`::

    train/000001.jpg ...            JPEG images (quality 90); image ids start at 1 in each split
    val/000001.jpg ...
    annotations/instances_train.json
    annotations/instances_val.json  COCO format, readable by pycocotools
    meta.json                       generator version, seed, counts and image size

What makes it a dataset a detector has to learn rather than a toy:

- object diameters range from 5% to 60% of the shorter image side (uniform in their square root), so COCO's
  small, medium and large area ranges all occur (at 256 px about 45%, 50% and 5%);
- 1 to 6 objects per image, placed at random, so they overlap; about 2% of the images hold no object;
- every shape is randomly rotated and deformed (ellipse aspect, triangle angles, rectangle aspect, star points
  and depth, cross arm width); some are drawn as thick outlines only;
- colours are random for every object and every background, so colour alone does not identify a class; an object
  colour is picked to stand out from the background under it so that every annotated object is visible;
- backgrounds mix a colour gradient, two octaves of value noise and optional stripes, with distractor lines,
  scribbles, jagged blobs and speckles that are not objects; pixel noise covers the whole image and a few thin
  lines are drawn over the objects.

Occlusion: later objects occlude earlier ones. A placement that would leave an earlier object more than 70% hidden
(or its visible part narrower than 4 px) is rejected and another random object tried instead, so every drawn
object is annotated and no unannotated fragment is left in the image. Boxes are the *visible* extent of the
object, clipped to the image, as COCO boxes are (they enclose the visible segmentation); `area` is the visible
pixel count, as COCO's is the segmentation area. Boxes use pixel edges: a box covering pixel columns 3..9 is
x=3, w=7.

Every image is drawn from its own `numpy.random.Generator` seeded with (seed, split, index), so the output is the
same bytes for the same seed (given the same NumPy, Pillow and libjpeg builds), whatever the number of worker
processes drawing them.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "GENERATOR_VERSION", "generate_dataset"]

logger = logging.getLogger(__name__)

#: Bump when the drawn images or the annotation files change, so that old datasets are regenerated.
GENERATOR_VERSION = 1

#: Category names; category id = position + 1 (COCO ids start at 1).
CATEGORIES: tuple[str, ...] = ("circle", "triangle", "rectangle", "star", "cross")

_SPLITS = ("train", "val")
_JPEG_QUALITY = 90
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down for anti-aliased edges
_MIN_SIZE_FRACTION = 0.05  # object diameter, as a fraction of the shorter image side
_MAX_SIZE_FRACTION = 0.60
_MAX_OBJECTS = 6
_EMPTY_FRACTION = 0.02  # at least one image per split holds no object
_MIN_VISIBLE_FRACTION = 0.30  # skip placements that would hide an earlier object by more than 70%
_MIN_VISIBLE_SIDE = 4  # px; the visible box of an object must be at least this wide and high
_MIN_OBJECT_PIXELS = 30
_MIN_COLOUR_DISTANCE = 90.0  # RGB L2 distance between an object colour and the background under it
_CHUNK_SIZE = 16  # images per task sent to a worker process


_Object = tuple[int, tuple[int, int, int, int], int]  # category index, visible xywh box, visible pixel count


@dataclass
class _Shape:
    category: int  # index into CATEGORIES
    polygon: np.ndarray  # (N, 2) x, y in image pixels
    outline_width: float  # 0 for a filled shape


def _unit_polygon(category: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) of a randomly deformed shape that fits in the unit circle, before rotation."""
    if category == "circle":
        t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(t), rng.uniform(0.8, 1.0) * np.sin(t)], axis=1)
    if category == "triangle":
        angles = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-20.0, 20.0, size=3))
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if category == "rectangle":
        aspect = rng.uniform(0.35, 1.0)
        corners = np.array([[-1.0, -aspect], [1.0, -aspect], [1.0, aspect], [-1.0, aspect]])
        return corners / math.hypot(1.0, aspect)
    if category == "star":
        points = int(rng.integers(5, 7))
        inner = rng.uniform(0.38, 0.55)
        t = np.arange(2 * points) * np.pi / points
        radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    if category == "cross":
        a = rng.uniform(0.28, 0.42)  # half the arm width, arms of half-length 1
        plus = [(a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a),
                (-a, -1)]
        return np.array(plus, dtype=np.float64) / math.hypot(1.0, a)
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def _size_fraction(rng: np.random.Generator) -> float:
    """Object diameter as a fraction of the shorter image side, uniform in its square root.

    Between log-uniform (which at 256 px makes 60% of the objects COCO-"small", under 32x32 px of area) and
    uniform (few small ones); at 256 px this gives about 45% small, 50% medium and 5% large objects.
    """
    return rng.uniform(math.sqrt(_MIN_SIZE_FRACTION), math.sqrt(_MAX_SIZE_FRACTION)) ** 2


def _random_shape(rng: np.random.Generator, height: int, width: int) -> _Shape:
    category = int(rng.integers(len(CATEGORIES)))
    side = min(height, width)
    radius = side * _size_fraction(rng) / 2.0
    # The centre stays inside the image and at most half the radius may leave it (truncated objects).
    cx = rng.uniform(0.5 * radius, width - 0.5 * radius)
    cy = rng.uniform(0.5 * radius, height - 0.5 * radius)
    polygon = _unit_polygon(CATEGORIES[category], rng)
    if CATEGORIES[category] == "rectangle" and rng.random() < 0.5:
        theta = rng.normal(0.0, 0.05)  # half the rectangles stay near axis-aligned: tight boxes
    else:
        theta = rng.uniform(0.0, 2.0 * np.pi)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    polygon = polygon @ rotation.T * radius + np.array([cx, cy])
    outline = max(2.0, rng.uniform(0.12, 0.2) * radius) if rng.random() < 0.15 and radius >= 10 else 0.0
    return _Shape(category=category, polygon=polygon, outline_width=outline)


def _render_alpha(shape: _Shape, height: int, width: int) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Anti-aliased coverage in [0, 1] of `shape` over its clipped bounding region (y0, y1, x0, x1)."""
    pad = shape.outline_width + 2.0
    x0 = max(int(math.floor(shape.polygon[:, 0].min() - pad)), 0)
    x1 = min(int(math.ceil(shape.polygon[:, 0].max() + pad)), width)
    y0 = max(int(math.floor(shape.polygon[:, 1].min() - pad)), 0)
    y1 = min(int(math.ceil(shape.polygon[:, 1].max() + pad)), height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    ss = _SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(canvas)
    points = [((x - x0) * ss, (y - y0) * ss) for x, y in shape.polygon]
    if shape.outline_width > 0:
        draw.polygon(points, outline=255, width=max(1, round(shape.outline_width * ss)))
    else:
        draw.polygon(points, fill=255)
    alpha = np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0
    return alpha, (y0, y1, x0, x1)


def _upsampled_noise(rng: np.random.Generator, cells: int, height: int, width: int) -> np.ndarray:
    """Smooth value noise in [-1, 1], shape (H, W, 3): a coarse random grid resized bicubically."""
    grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    smooth = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) / 127.5 - 1.0


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured background, float32 (H, W, 3) in [0, 255]: colour gradient, two octaves of value noise, stripes."""
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    start, end = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    image = start + (end - start) * ramp[..., None]
    image += rng.uniform(15.0, 60.0) * _upsampled_noise(rng, int(rng.integers(3, 8)), height, width)
    image += rng.uniform(5.0, 30.0) * _upsampled_noise(rng, int(rng.integers(12, 40)), height, width)
    if rng.random() < 0.4:
        frequency = rng.uniform(0.03, 0.25)  # cycles per pixel
        phi = rng.uniform(0.0, np.pi)
        stripes = np.sin(2.0 * np.pi * frequency * (xx * math.cos(phi) + yy * math.sin(phi)))
        image += stripes[..., None] * rng.uniform(-30.0, 30.0, size=3).astype(np.float32)
    return np.clip(image, 0.0, 255.0)


def _draw_distractors(rng: np.random.Generator, image: Image.Image) -> None:
    """Clutter that is not an object: lines, scribbles, jagged blobs and speckles."""
    width, height = image.size
    side = min(width, height)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 9))):
        ends = rng.uniform(-0.1, 1.1, size=4) * np.array([width, height, width, height])
        draw.line([float(v) for v in ends], fill=_random_colour(rng), width=int(rng.integers(1, 5)))
    for _ in range(int(rng.integers(0, 4))):
        steps = rng.normal(0.0, 0.08 * side, size=(int(rng.integers(4, 11)), 2))
        points = np.cumsum(steps, axis=0) + rng.uniform(0, 1, size=2) * np.array([width, height])
        draw.line([(float(x), float(y)) for x, y in points], fill=_random_colour(rng), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 4))):
        vertices = int(rng.integers(12, 25))
        t = np.sort(rng.uniform(0.0, 2.0 * np.pi, size=vertices))
        radius = rng.uniform(0.03, 0.12) * side * rng.uniform(0.3, 1.0, size=vertices)
        centre = rng.uniform(0, 1, size=2) * np.array([width, height])
        points = np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)
        draw.polygon([(float(x), float(y)) for x, y in points], fill=_random_colour(rng))
    for _ in range(int(rng.integers(0, 40))):
        x, y = rng.uniform(0, 1, size=2) * np.array([width, height])
        r = float(rng.uniform(0.5, 2.0))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_random_colour(rng))


def _object_texture(rng: np.random.Generator, colour: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Fill of one object over its region, float32 (h, w, 3): base colour, shading, sometimes stripes or noise."""
    h, w = shape
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / max(h, w, 1)
    texture = colour + rng.uniform(-40.0, 40.0) * ramp[..., None]
    kind = rng.random()
    if kind < 0.25:
        frequency = rng.uniform(0.08, 0.3)
        phi = rng.uniform(0.0, np.pi)
        stripes = np.sin(2.0 * np.pi * frequency * (xx * math.cos(phi) + yy * math.sin(phi))) > 0
        texture = np.where(stripes[..., None], texture, texture * rng.uniform(0.5, 0.8))
    elif kind < 0.45:
        texture = texture + rng.uniform(8.0, 20.0) * rng.standard_normal(texture.shape, dtype=np.float32)
    return texture.astype(np.float32)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour far enough from the mean background colour `under`; the best of 12 draws otherwise."""
    best, best_distance = None, -1.0
    for _ in range(12):
        colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
        distance = float(np.linalg.norm(colour - under))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= _MIN_COLOUR_DISTANCE:
            break
    assert best is not None
    return best


def _visible_box(owner: np.ndarray, index: int) -> tuple[int, int, int, int, int] | None:
    """(x, y, w, h, pixel count) of the pixels owned by object `index`, or None when it has none."""
    ys, xs = np.nonzero(owner == index)
    if xs.size == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0, int(xs.size)


def _draw_image(
    rng: np.random.Generator, height: int, width: int, num_objects: int
) -> tuple[np.ndarray, list[_Object]]:
    """One image, uint8 (H, W, 3), and its objects as (category index, visible xywh box, visible pixels)."""
    base = Image.fromarray(_background(rng, height, width).astype(np.uint8), "RGB")
    _draw_distractors(rng, base)
    image = np.asarray(base, dtype=np.float32).copy()
    owner = np.full((height, width), -1, dtype=np.int16)  # which object each pixel shows; -1 = background
    full_pixels: list[int] = []
    categories: list[int] = []

    attempts = 0
    while len(categories) < num_objects and attempts < 20 * num_objects:
        attempts += 1
        shape = _random_shape(rng, height, width)
        rendered = _render_alpha(shape, height, width)
        if rendered is None:
            continue
        alpha, (y0, y1, x0, x1) = rendered
        mask = alpha >= 0.5
        if int(mask.sum()) < _MIN_OBJECT_PIXELS:
            continue
        region_owner = owner[y0:y1, x0:x1]
        hidden = np.unique(region_owner[mask])
        hidden = hidden[hidden >= 0]
        if hidden.size:
            trial = owner.copy()
            trial[y0:y1, x0:x1][mask] = len(categories)
            if not all(_still_visible(trial, int(j), full_pixels[j]) for j in hidden):
                continue
        region = image[y0:y1, x0:x1]
        colour = _pick_colour(rng, region[mask].mean(axis=0))
        texture = _object_texture(rng, colour, mask.shape)
        region += (texture - region) * alpha[..., None]
        region_owner[mask] = len(categories)
        full_pixels.append(int(mask.sum()))
        categories.append(shape.category)

    image += rng.uniform(2.0, 8.0) * rng.standard_normal(image.shape, dtype=np.float32)  # sensor-like noise
    result = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:  # thin lines over the objects; boxes ignore them (they hide a few pixels at most)
        draw = ImageDraw.Draw(result)
        for _ in range(int(rng.integers(1, 3))):
            ends = rng.uniform(0.0, 1.0, size=4) * np.array([width, height, width, height])
            draw.line([float(v) for v in ends], fill=_random_colour(rng), width=1)

    objects = []
    for index, category in enumerate(categories):
        box = _visible_box(owner, index)
        assert box is not None  # placements that would hide an object are rejected above
        x, y, w, h, pixels = box
        objects.append((category, (x, y, w, h), pixels))
    return np.asarray(result), objects


def _still_visible(owner: np.ndarray, index: int, full_pixels: int) -> bool:
    box = _visible_box(owner, index)
    if box is None:
        return False
    _, _, w, h, pixels = box
    return pixels >= _MIN_VISIBLE_FRACTION * full_pixels and min(w, h) >= _MIN_VISIBLE_SIDE


def _draw_and_save(task: tuple[Path, int, int, int, bool, int, int]) -> list[_Object]:
    """Draw image `index` of a split from its own generator, save it as JPEG and return its objects."""
    image_dir, seed, split_code, index, empty, height, width = task
    rng = np.random.default_rng([seed, split_code, index])
    num_objects = 0 if empty else int(rng.integers(1, _MAX_OBJECTS + 1))
    pixels, objects = _draw_image(rng, height, width, num_objects)
    Image.fromarray(pixels, "RGB").save(image_dir / f"{index + 1:06d}.jpg", "JPEG", quality=_JPEG_QUALITY)
    return objects


def _generate_split(
    root: Path, split: str, num_images: int, seed: int, height: int, width: int, workers: int
) -> dict[str, Any]:
    split_code = _SPLITS.index(split)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    for stale in image_dir.glob("*.jpg"):
        if stale.stem.isdigit():  # only files this generator writes
            stale.unlink()

    split_rng = np.random.default_rng([seed, split_code, 2**31 - 1])
    num_empty = max(1, round(_EMPTY_FRACTION * num_images))
    empty = set(split_rng.choice(num_images, size=num_empty, replace=False).tolist())
    tasks = [(image_dir, seed, split_code, index, index in empty, height, width) for index in range(num_images)]
    if workers > 1 and num_images >= 4 * _CHUNK_SIZE:
        # Spawned (not forked) workers: the caller may have started torch threads. Each image has its own
        # generator, so the output does not depend on the number of workers.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            all_objects = list(pool.map(_draw_and_save, tasks, chunksize=_CHUNK_SIZE))
    else:
        all_objects = [_draw_and_save(task) for task in tasks]

    images, annotations = [], []
    for index, objects in enumerate(all_objects):
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": width, "height": height})
        for category, (x, y, w, h), area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category + 1,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"mnv1_backbone synthetic shapes, {split}", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)],
    }
    annotation_file = root / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(coco) + "\n")
    return _split_info(image_dir, annotation_file, len(images), len(annotations))


def _split_info(image_dir: Path, annotation_file: Path, num_images: int, num_annotations: int) -> dict[str, Any]:
    return {
        "image_dir": image_dir,
        "annotation_file": annotation_file,
        "num_images": num_images,
        "num_annotations": num_annotations,
    }


def _existing_dataset(root: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Split infos of a complete dataset under `root` made with `meta`, or None if it must be (re)generated."""
    meta_path = root / "meta.json"
    try:
        if json.loads(meta_path.read_text()) != meta:
            return None
        splits = {}
        for split in _SPLITS:
            annotation_file = root / "annotations" / f"instances_{split}.json"
            coco = json.loads(annotation_file.read_text())
            expected = meta[f"num_{split}"]
            if len(coco["images"]) != expected or len(list((root / split).glob("*.jpg"))) != expected:
                return None
            splits[split] = _split_info(root / split, annotation_file, expected, len(coco["annotations"]))
        return splits
    except (OSError, ValueError, KeyError, TypeError):
        return None


def generate_dataset(
    root: str | Path,
    *,
    num_train: int = 600,
    num_val: int = 100,
    image_size: tuple[int, int] = (256, 256),
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the synthetic COCO-format dataset under `root`, unless an identical one is already there.

    Args:
        root: output folder; created if missing. The generator owns `train/`, `val/`, `annotations/` and
            `meta.json` in it (it deletes numerically named `*.jpg` files in `train/` and `val/` when regenerating).
        num_train: number of training images (>= 1).
        num_val: number of validation images (>= 1).
        image_size: (height, width) of every image, each at least 32.
        seed: seed of the whole dataset; the same seed gives the same bytes.
        workers: processes drawing images; None uses up to 8 CPU cores. The output does not depend on it. Worker
            processes are spawned (splits of 64 images or more), so a script calling this needs the usual
            `if __name__ == "__main__":` guard.

    Returns:
        A dict with `root`, `regenerated` (False when an existing dataset with the same `meta.json` was kept),
        `seconds`, `meta` (what `meta.json` holds), `categories` (names, category id = position + 1) and, per split
        (`train`, `val`), a dict with `image_dir`, `annotation_file`, `num_images` and `num_annotations`.
    """
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(v, int) and v >= 32 for v in image_size)
    ):
        raise ValueError(f"image_size must be (height, width) with ints >= 32, got {image_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")

    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    elif not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1 or None, got {workers!r}")

    root = Path(root)
    height, width = image_size
    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": [height, width],
        "categories": list(CATEGORIES),
    }
    start = time.perf_counter()
    splits = _existing_dataset(root, meta)
    regenerated = splits is None
    if splits is None:
        logger.info("generating %d train + %d val images of %dx%d under %s", num_train, num_val, height, width, root)
        root.mkdir(parents=True, exist_ok=True)
        (root / "meta.json").unlink(missing_ok=True)  # written last: an interrupted run is regenerated
        counts = {"train": num_train, "val": num_val}
        splits = {split: _generate_split(root, split, counts[split], seed, height, width, workers) for split in _SPLITS}
        (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    else:
        logger.info("keeping the dataset under %s (meta.json matches)", root)
    seconds = time.perf_counter() - start
    if regenerated:
        logger.info(
            "wrote %s in %.1f s",
            ", ".join(f"{s}: {v['num_images']} images / {v['num_annotations']} objects" for s, v in splits.items()),
            seconds,
        )
    return {
        "root": root,
        "regenerated": regenerated,
        "seconds": seconds,
        "meta": meta,
        "categories": list(CATEGORIES),
        **splits,
    }
