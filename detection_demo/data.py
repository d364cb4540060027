"""COCO-format detection data for the demo: dataset, transforms, batching and COCO evaluation.

- `CocoDetectionDataset` reads a COCO instances file with pycocotools and yields `(image, target)` pairs in the
  form torchvision's detectors and `torchvision.transforms.v2` expect: a `tv_tensors.Image` (uint8 before the
  transforms) and a dict with `boxes` (`tv_tensors.BoundingBoxes`, XYXY, absolute pixels), `labels` (int64,
  contiguous 1..K; 0 is the detectors' background) and `image_id` (int). The annotation file is validated first:
  a malformed one raises `ValueError` naming the file and the entry at fault. Crowd and degenerate boxes are left
  out of the training targets and counted (`summary()`); images without objects are kept as negatives.
- `make_train_transforms` / `make_eval_transforms`: the SSD augmentation recipe of torchvision's detection
  references (photometric distortion, zoom out, IoU crop, horizontal flip) plus a resize to a fixed square.
- `check_images` scans the image files of datasets before training (in parallel, header-level: open, `verify()`,
  size against the annotation file, the end of a JPEG) and stops with one `BadImageError` listing every missing
  or unreadable file, or with `skip_bad_images` leaves them out. A file that fails to decode later anyway (cut
  mid-stream, deleted) raises `BadImageError` naming it, or with `skip_bad_images` is skipped and counted
  (`CocoDetectionDataset.skipped_images`, shared by the DataLoader's worker processes).
- Real exports: annotation ids from 0 (labelme, CVAT, Roboflow; COCOeval reads id 0 as "no match") are renumbered
  1..N internally (`source_id` keeps the file's); image and category ids are kept as the file has them, so
  results carry the user's ids. A `_background_` category without boxes (labelme) is left out of the classes.
- `collate_fn` batches `(image, target)` pairs as lists, as the detectors take them, dropping skipped samples.
- `detections_to_coco` and `evaluate_coco`: detector outputs to COCO results, and pycocotools' COCOeval (bbox) with
  the 12 standard numbers named and AP per category, and VOC's AP@0.5 beside them (`voc.evaluate_voc`).

Why not `torchvision.datasets.CocoDetection` + `wrap_dataset_for_transforms_v2`: the wrapper returns raw COCO
category ids as labels, keeps crowd boxes, and returns a target without `boxes` for an image without objects,
which the detectors and `SanitizeBoundingBoxes` cannot take. Fixing those after the wrapper would need a second
pass over the same annotations, so this module indexes the file with pycocotools directly and builds the same
tv_tensors the wrapper would.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset, get_worker_info
from torchvision import tv_tensors
from torchvision.transforms import v2

from .voc import evaluate_voc

__all__ = [
    "COCO_STAT_NAMES",
    "BACKGROUND_NAMES",
    "BadImage",
    "BadImageError",
    "CocoDetectionDataset",
    "DatasetSummary",
    "check_images",
    "collate_fn",
    "detections_to_coco",
    "evaluate_coco",
    "load_coco_annotations",
    "load_split",
    "make_eval_transforms",
    "make_train_transforms",
    "scan_images",
    "validate_coco",
]

logger = logging.getLogger(__name__)

#: Names of the 12 numbers `COCOeval.summarize()` prints for bbox, in its order.
COCO_STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
                                    "ARl")

#: Category names that mean "no object" (labelme's `_background_`, torchvision's `__background__`); such a
#: category without annotations is left out of the classes.
BACKGROUND_NAMES: frozenset[str] = frozenset({"_background_", "__background__"})

Target = dict[str, Any]

_SKIP_SLOTS = 257  # skip counters: the main process and up to 256 DataLoader workers without sharing a slot


class BadImageError(ValueError):
    """An image file is missing, unreadable or cut short; the message names the file(s).

    A `ValueError` (bad input data, like a malformed annotation file), so the CLI reports it in one line.
    """

    def __init__(self, message: str) -> None:
        # A DataLoader worker's exception reaches the main process rebuilt as
        # `BadImageError("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback ...: <message>")`;
        # keep <message>: the worker's traceback tells the user nothing the message does not.
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


# --------------------------------------------------------------------------------------------------------------
# Reading and validating annotation files
# --------------------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows 1e400-digit integers)
        return False


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_bbox(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(x) for x in value)


def _check_entries(path: Path, data: dict[str, Any], section: str, required: dict[str, Callable[[Any], bool]]) -> None:
    entries = data[section]
    if not isinstance(entries, list):
        raise ValueError(f"{path}: '{section}' must be a list, got {type(entries).__name__}")
    seen: set[int] = set()
    for index, entry in enumerate(entries):
        where = f"{path}: {section}[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
        if "id" in entry:
            where += f" (id={entry['id']!r})"
        for key, check in required.items():
            if key not in entry:
                raise ValueError(f"{where}: missing key '{key}'")
            if not check(entry[key]):
                raise ValueError(f"{where}: invalid '{key}': {entry[key]!r}")
        if entry["id"] in seen:
            raise ValueError(f"{where}: duplicate id {entry['id']}")
        seen.add(entry["id"])


def load_coco_annotations(annotation_file: str | Path) -> COCO:
    """Read and validate a COCO instances file; return the pycocotools index of it (see `validate_coco`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON or an entry is malformed; the message names the file and the entry
            (section, index and id).
    """
    path = Path(annotation_file)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))  # JSON is UTF-8 (RFC 8259), whatever the locale says
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        # json's C parser recurses once per nesting level: "[" * 100000 would exhaust the stack.
        raise ValueError(f"{path}: not a COCO file: its JSON is nested too deeply") from None
    return validate_coco(data, path)


def validate_coco(data: Any, path: str | Path) -> COCO:
    """Validate COCO instances data (a parsed file, or one built from another format) and index it.

    Checks what pycocotools and COCOeval rely on and would otherwise fail on later, or silently get wrong:
    the three sections are lists; every image has an int `id`, a `file_name` and positive `width`/`height`;
    every category an int `id` and a `name`; every annotation an int `id`, a known `image_id` and
    `category_id`, a `bbox` of 4 finite numbers; ids are unique per section. A missing `area` is set to the box
    area and a missing `iscrowd` to 0 (both are optional in hand-made files but COCOeval reads them).

    Annotation ids below 1 (labelme, CVAT and Roboflow number from 0) are renumbered 1..N in file order, each
    annotation keeping the file's id as `source_id`: COCOeval records a match as the matched annotation's id,
    so id 0 would read as "no match" and a perfect detection as a false positive. Image and category ids stay
    as they are (0 is fine for those), so results written for them carry the file's ids.

    Args:
        data: the parsed JSON; modified in place (defaults filled in, ids renumbered).
        path: the file it came from, for messages.

    Raises:
        ValueError: an entry is malformed; the message names `path` and the entry (section, index and id).
    """
    path = Path(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with images, annotations and categories")
    for section in ("images", "annotations", "categories"):
        if section not in data:
            raise ValueError(f"{path}: missing top-level key '{section}'")

    image_keys = {"id": _is_int, "file_name": _is_name, "width": _is_positive_int, "height": _is_positive_int}
    _check_entries(path, data, "images", image_keys)
    _check_entries(path, data, "categories", {"id": _is_int, "name": _is_name})
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    _check_entries(
        path,
        data,
        "annotations",
        {"id": _is_int, "image_id": _is_int, "category_id": _is_int, "bbox": _is_bbox},
    )
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}] (id={annotation['id']})"
        if annotation["image_id"] not in image_ids:
            raise ValueError(f"{where}: unknown image_id {annotation['image_id']}")
        if annotation["category_id"] not in category_ids:
            raise ValueError(f"{where}: unknown category_id {annotation['category_id']}")
        if "iscrowd" not in annotation:
            annotation["iscrowd"] = 0
        elif annotation["iscrowd"] not in (0, 1):
            raise ValueError(f"{where}: iscrowd must be 0 or 1, got {annotation['iscrowd']!r}")
        if "area" not in annotation:
            annotation["area"] = float(annotation["bbox"][2]) * float(annotation["bbox"][3])
            if not math.isfinite(annotation["area"]):
                raise ValueError(f"{where}: the area of bbox {annotation['bbox']} is not a finite number")
        elif not _is_number(annotation["area"]):
            raise ValueError(f"{where}: invalid 'area': {annotation['area']!r}")
    if any(annotation["id"] < 1 for annotation in data["annotations"]):
        for number, annotation in enumerate(data["annotations"], start=1):
            annotation["source_id"] = annotation["id"]
            annotation["id"] = number
        logger.info("%s: annotation ids start below 1 (as labelme, CVAT and Roboflow export them); renumbered "
                    "1..%d internally (COCOeval reads id 0 as 'no match'), image and category ids kept",
                    path, len(data["annotations"]))
    return _coco_from_dict(data)


def _coco_from_dict(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSummary:
    """What `CocoDetectionDataset` kept and dropped from its annotation file."""

    images: int
    negative_images: int  # images without any box left for training (kept as negatives)
    annotations: int  # in the file
    boxes: int  # kept as training targets
    crowd_dropped: int
    degenerate_dropped: int  # w or h <= min_box_size after clipping to the image, or outside it
    clipped: int  # kept boxes that reached outside the image and were clipped to it
    categories: int


class CocoDetectionDataset(Dataset):
    """A COCO instances file and its image folder as `(image, target)` pairs for torchvision detectors.

    `image` is a `tv_tensors.Image` of shape (3, H, W), uint8 before `transforms`. `target` holds `boxes`
    (`tv_tensors.BoundingBoxes`, XYXY, absolute pixels, shape (N, 4), N may be 0), `labels` (int64, shape (N,),
    contiguous 1..K in the order of the category ids; 0 is background) and `image_id` (int, the COCO id).

    Training targets leave out crowd annotations (`iscrowd=1`; VOC's `difficult` objects come in as crowd) and
    degenerate boxes (after clipping to the image, width or height <= `min_box_size` px; a box wholly outside the
    image is one); boxes reaching outside the image are clipped. `coco` keeps every annotation of the file (crowd
    regions included): evaluate against it, as COCOeval handles crowd regions itself. A category named
    `_background_` or `__background__` without annotations (labelme writes one, id 0) is left out of `coco` and
    of the classes, with a logged note.

    An image that cannot be read raises `BadImageError` naming the file; with `skip_bad_images` (settable later)
    the sample comes out as None instead (`collate_fn` drops it), is logged and counted in `skipped_images`.

    Args:
        image_dir: folder holding the images named by `file_name`.
        annotation_file: COCO instances JSON; validated by `load_coco_annotations`. With `annotations`, only the
            name of the source (e.g. a VOC image-set list) for messages.
        transforms: called as `transforms(image, target)`, e.g. `make_train_transforms()`.
        min_box_size: boxes whose clipped width or height is not above this (px) are dropped.
        annotations: COCO instances data already in memory (e.g. `voc.voc_to_coco`), used instead of reading
            `annotation_file`; validated by `validate_coco`.
        skip_bad_images: skip unreadable images at load time instead of raising.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: Callable[[Any, Target], tuple[Any, Target]] | None = None,
        *,
        min_box_size: float = 1.0,
        annotations: dict[str, Any] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        if not _is_number(min_box_size) or min_box_size < 0:
            raise ValueError(f"min_box_size must be a number >= 0, got {min_box_size!r}")
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.min_box_size = min_box_size
        self.skip_bad_images = skip_bad_images
        # Shared memory, so that samples skipped in DataLoader worker processes count in the main process: one slot
        # per process (the main one, then worker k), so no lock is needed, and no lock ties the counter to one
        # multiprocessing start method (a fork-made lock cannot go to spawned workers).
        self._skipped = multiprocessing.RawArray("q", _SKIP_SLOTS)
        if annotations is None:
            self.coco = load_coco_annotations(self.annotation_file)
        else:
            self.coco = validate_coco(annotations, self.annotation_file)
        self.dropped_categories = self._drop_background_categories()
        cat_ids = sorted(self.coco.cats)
        self.cat_id_to_label: dict[int, int] = {cat_id: label for label, cat_id in enumerate(cat_ids, start=1)}
        self.label_to_cat_id: dict[int, int] = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        #: Category names by label; index 0 is "__background__".
        self.categories: list[str] = ["__background__"] + [self.coco.cats[c]["name"] for c in cat_ids]
        self.excluded_images: list[str] = []  # files left out by `exclude_images` (bad images skipped)
        self._index()

    def _drop_background_categories(self) -> list[str]:
        """Leave a background category without annotations out of `coco`; return the names left out."""
        used = {annotation["category_id"] for annotation in self.coco.anns.values()}
        dropped = []
        for cat_id, category in sorted(self.coco.cats.items()):
            if category["name"] not in BACKGROUND_NAMES:
                continue
            if cat_id in used:
                logger.warning("%s: category %r (id %d) has boxes: kept as a class", self.annotation_file,
                               category["name"], cat_id)
                continue
            del self.coco.cats[cat_id]
            self.coco.catToImgs.pop(cat_id, None)
            dropped.append(category["name"])
            logger.info("%s: category %r (id %d) has no boxes: left out of the classes (the detectors have their "
                        "own background class 0)", self.annotation_file, category["name"], cat_id)
        if dropped:
            self.coco.dataset["categories"] = [c for c in self.coco.dataset["categories"] if c["id"] in self.coco.cats]
        return dropped

    def _index(self) -> None:
        """Training boxes and labels of every image of `coco`, and the summary of what was kept and dropped."""
        self.ids: list[int] = sorted(self.coco.imgs)
        crowd = degenerate = clipped = 0
        self._boxes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._annotation_ids: list[list[int]] = []  # the annotation each kept box came from, e.g. for its mask
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            width, height = info["width"], info["height"]
            boxes, labels, annotation_ids = [], [], []
            for annotation in self.coco.imgToAnns.get(image_id, []):
                if annotation["iscrowd"]:
                    crowd += 1
                    continue
                x, y, w, h = annotation["bbox"]
                box = [min(max(x, 0.0), width), min(max(y, 0.0), height),
                       min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
                if box[2] - box[0] <= self.min_box_size or box[3] - box[1] <= self.min_box_size:
                    degenerate += 1
                    continue
                clipped += box != [x, y, x + w, y + h]
                boxes.append(box)
                labels.append(self.cat_id_to_label[annotation["category_id"]])
                annotation_ids.append(annotation["id"])
            self._boxes.append(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
            self._labels.append(np.asarray(labels, dtype=np.int64))
            self._annotation_ids.append(annotation_ids)

        self._summary = DatasetSummary(
            images=len(self.ids),
            negative_images=sum(len(labels) == 0 for labels in self._labels),
            annotations=len(self.coco.anns),
            boxes=sum(len(labels) for labels in self._labels),
            crowd_dropped=crowd,
            degenerate_dropped=degenerate,
            clipped=clipped,
            categories=len(self.cat_id_to_label),
        )
        s = self._summary
        logger.info(
            "%s: %d images (%d without objects), %d categories, %d of %d annotations kept; dropped %d crowd and "
            "%d degenerate, clipped %d",
            self.annotation_file, s.images, s.negative_images, s.categories, s.boxes, s.annotations, s.crowd_dropped,
            s.degenerate_dropped, s.clipped,
        )

    @property
    def num_classes(self) -> int:
        """Number of detector classes, background included (K + 1)."""
        return len(self.categories)

    @property
    def skipped_images(self) -> int:
        """Samples skipped so far because their image could not be read (all DataLoader workers together; two loaders
        running over the same dataset at once could lose a count: their workers share slots)."""
        return int(sum(self._skipped))

    def summary(self) -> dict[str, int]:
        """Counts of images, kept boxes and dropped annotations (see `DatasetSummary`)."""
        return asdict(self._summary)

    def __len__(self) -> int:
        return len(self.ids)

    def annotation_ids(self, index: int) -> list[int]:
        """COCO ids of the annotations behind the training boxes of image `index`, in the order of its `boxes`
        (the ids of `coco`: renumbered ones where the file's started at 0, see `validate_coco`)."""
        return list(self._annotation_ids[index])

    def image_path(self, index: int) -> Path:
        """The image file of sample `index`."""
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def image_files(self) -> list[tuple[int, Path, int, int]]:
        """`(image_id, path, width, height)` of every image, as the annotation file gives them."""
        return [(image_id, self.image_dir / info["file_name"], info["width"], info["height"])
                for image_id, info in ((i, self.coco.imgs[i]) for i in self.ids)]

    def exclude_images(self, image_ids: Iterable[int]) -> None:
        """Leave these images and their annotations out of the dataset and of `coco` (so evaluation ignores them)."""
        excluded = set(image_ids)
        unknown = excluded - set(self.coco.imgs)
        if unknown:
            raise ValueError(f"{self.annotation_file}: no images with ids {sorted(unknown)}")
        if not excluded:
            return
        self.excluded_images += [str(self.image_dir / self.coco.imgs[i]["file_name"]) for i in sorted(excluded)]
        data = self.coco.dataset
        data["images"] = [image for image in data["images"] if image["id"] not in excluded]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in excluded]
        self.coco = _coco_from_dict(data)
        self._index()

    def load_image(self, index: int) -> tv_tensors.Image:
        """The image at `index`, uint8 (3, H, W), RGB; its size is checked against the annotation file.

        Raises:
            BadImageError: the file is missing, cannot be decoded (e.g. cut short) or has another size than the
                annotation file says; the message names the file.
        """
        info = self.coco.imgs[self.ids[index]]
        path = self.image_dir / info["file_name"]
        try:
            # Pillow rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
            with PIL.Image.open(path) as file:
                image = tv_tensors.Image(v2.functional.pil_to_tensor(file.convert("RGB")))
        except FileNotFoundError:
            raise BadImageError(f"{path}: image file not found (image id {info['id']})") from None
        except _DECODE_ERRORS as error:
            raise BadImageError(f"{path}: cannot decode the image ({type(error).__name__}: {error})") from None
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise BadImageError(
                f"{path}: image is {image.shape[-1]}x{image.shape[-2]} (WxH) but {self.annotation_file} says "
                f"{info['width']}x{info['height']} for image id {info['id']}"
            )
        return image

    def _load_or_skip(self, index: int) -> tv_tensors.Image | None:
        try:
            return self.load_image(index)
        except BadImageError as error:
            if not self.skip_bad_images:
                raise
            worker = get_worker_info()
            self._skipped[0 if worker is None else 1 + worker.id % (_SKIP_SLOTS - 1)] += 1
            logger.warning("skipped a sample (--skip-bad-images): %s", error)
            return None

    def __getitem__(self, index: int) -> tuple[Any, Target] | None:
        image = self._load_or_skip(index)
        if image is None:
            return None
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(self._boxes[index]),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=tuple(image.shape[-2:]),
            ),
            "labels": torch.from_numpy(self._labels[index]),
            "image_id": self.ids[index],
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# --------------------------------------------------------------------------------------------------------------
# Scanning the image files before training
# --------------------------------------------------------------------------------------------------------------

# What Pillow raises on a file it cannot decode: OSError ("image file is truncated", UnidentifiedImageError),
# SyntaxError ("not a PNG file"), ValueError and EOFError on broken headers, DecompressionBombError on a header
# claiming a huge image.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


@dataclass(frozen=True)
class BadImage:
    """An image file that cannot be used, and why."""

    path: Path
    problem: str
    image_id: int


def _inspect_image(path: Path, width: int, height: int) -> str | None:
    """What is wrong with the image file at `path` (None: nothing found), without decoding its pixels.

    Pillow's `open` reads the header (format, size); `verify` checks what a format allows without decoding (PNG:
    every chunk's CRC, so a PNG cut short fails); a JPEG must end with its EOI marker (FF D9), and one that does
    not (cut short, or trailing bytes some cameras add) is decoded in full to tell the two apart.
    """
    try:
        with PIL.Image.open(path) as image:
            size, image_format = image.size, image.format
            image.verify()
        if size != (width, height):
            return f"is {size[0]}x{size[1]} (WxH) but the annotations say {width}x{height}"
        if image_format == "JPEG":
            with path.open("rb") as file:
                file.seek(-2, os.SEEK_END)
                ends_with_eoi = file.read(2) == b"\xff\xd9"
            if not ends_with_eoi:
                with PIL.Image.open(path) as image:
                    image.load()
    except FileNotFoundError:
        return "missing"
    except _DECODE_ERRORS as error:
        return f"unreadable ({type(error).__name__}: {error})"
    return None


def scan_images(dataset: CocoDetectionDataset, *, threads: int | None = None) -> list[BadImage]:
    """Check every image file of `dataset` (see `_inspect_image`) in a thread pool; return the bad ones.

    Header-level checks read a few kilobytes per file (a PNG is read once, not decoded), so the time is bounded by
    the file system, not by decoding; threads overlap the reads (Pillow releases the GIL in file reads).

    Args:
        threads: worker threads; default min(32, 4 x CPU cores).
    """
    files = dataset.image_files()
    threads = threads or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(lambda file: _inspect_image(file[1], file[2], file[3]), files))
    return [BadImage(path, problem, image_id)
            for (image_id, path, _, _), problem in zip(files, problems, strict=True) if problem is not None]


def check_images(
    datasets: Iterable[CocoDetectionDataset | None],
    *,
    skip_bad_images: bool = False,
    threads: int | None = None,
) -> int:
    """Scan the image files of `datasets` before a run; stop on bad ones or leave them out. Return how many were.

    Every dataset is scanned before anything is reported, so one message lists every missing or unreadable file.
    With `skip_bad_images` those images (and their annotations) are left out of the datasets instead, and the
    datasets skip images that fail to decode later (`CocoDetectionDataset.skip_bad_images`).

    Raises:
        BadImageError: some files are missing or unreadable (without `skip_bad_images`); the message names each.
    """
    start = time.perf_counter()
    datasets = [dataset for dataset in datasets if dataset is not None]
    found = [(dataset, scan_images(dataset, threads=threads)) for dataset in datasets]
    total = sum(len(dataset) for dataset in datasets)
    bad = [image for _, images in found for image in images]
    logger.info("scanned %d image files in %.1f s: %d missing or unreadable", total, time.perf_counter() - start,
                len(bad))
    if bad and not skip_bad_images:
        lines = "\n".join(f"  {image.path}: {image.problem}" for image in bad)
        raise BadImageError(f"{len(bad)} of {total} image files cannot be used (fix or remove them, or give "
                            f"--skip-bad-images to leave them out):\n{lines}")
    for dataset, images in found:
        dataset.skip_bad_images = skip_bad_images
        if images:
            if len(images) == len(dataset):
                raise BadImageError(f"{dataset.annotation_file}: none of its {len(images)} images can be used, e.g. "
                                    f"{images[0].path}: {images[0].problem}")
            dataset.exclude_images(image.image_id for image in images)
            logger.warning("%s: left out %d missing or unreadable images (--skip-bad-images): %s",
                           dataset.annotation_file, len(images), ", ".join(str(image.path) for image in images))
    return len(bad)


def load_split(root: str | Path, split: str, transforms: Callable[[Any, Target], tuple[Any, Target]] | None = None,
               **kwargs: Any) -> CocoDetectionDataset:
    """The `split` ("train" or "val") of a dataset laid out as `synthetic.generate_dataset` writes it.

    `root/<split>/` holds the images and `root/annotations/instances_<split>.json` the annotations, as in COCO.
    """
    root = Path(root)
    return CocoDetectionDataset(root / split, root / "annotations" / f"instances_{split}.json", transforms, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Transforms and batching
# --------------------------------------------------------------------------------------------------------------


def make_train_transforms(
    size: int = 320,
    *,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    zoom_out: float = 4.0,
    hflip_prob: float = 0.5,
) -> v2.Compose:
    """SSD training augmentation (torchvision's detection references, "ssd" preset) and a square resize.

    Photometric distortion, zoom out (canvas up to `zoom_out` times larger, filled with `mean`), IoU crop,
    horizontal flip, resize to `size` x `size` (the aspect ratio is not kept, as SSD does), drop boxes that
    became degenerate, uint8 -> float32 in [0, 1]. Takes and returns `(image, target)`.

    An image without boxes is never cropped: `RandomIoUCrop` only crops around boxes and falls back to its
    "keep the image" option.

    Args:
        size: output height and width in pixels.
        mean: per-channel fill of the zoom-out canvas in [0, 1]; the model's normalisation mean (0.5 for Google's
            MobileNet weights, which is 0 after normalisation).
        zoom_out: largest zoom-out factor (>= 1; 1 disables zoom out).
        hflip_prob: probability of a horizontal flip.
    """
    if not _is_int(size) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if len(mean) != 3 or not all(0.0 <= m <= 1.0 for m in mean):
        raise ValueError(f"mean must be 3 values in [0, 1], got {mean!r}")
    if not zoom_out >= 1.0:
        raise ValueError(f"zoom_out must be >= 1, got {zoom_out!r}")
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob!r}")
    fill = [round(255 * m) for m in mean]  # the image is still uint8 when zoomed out
    steps: list[v2.Transform] = [v2.ToImage(), v2.RandomPhotometricDistort(p=0.5)]
    if zoom_out > 1.0:
        steps.append(v2.RandomZoomOut(fill={tv_tensors.Image: fill, "others": 0}, side_range=(1.0, zoom_out)))
    steps += [
        v2.RandomIoUCrop(),
        v2.RandomHorizontalFlip(p=hflip_prob),
        v2.Resize((size, size), antialias=True),
        v2.ClampBoundingBoxes(),
        # Removes the boxes RandomIoUCrop marked as outside the crop and those the resize shrank below 1 px.
        v2.SanitizeBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(steps)


def make_eval_transforms() -> v2.Compose:
    """Evaluation transform: the original image as float32 in [0, 1], boxes unchanged.

    The image keeps its size on purpose: torchvision's detectors resize internally (SSD to its fixed size) and map
    the predicted boxes back to the input size, so predictions come out in the original image's pixels, which is
    what `evaluate_coco` compares with the annotation file.
    """
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def collate_fn(batch: Sequence[tuple[Any, Target] | None]) -> tuple[list[Any], list[Target]]:
    """Batch `(image, target)` pairs as `(images, targets)` lists, the input torchvision's detectors take.

    Images may differ in size, so they are not stacked. None samples (images skipped with `skip_bad_images`) are
    dropped, so a batch can come out smaller, or empty.
    """
    samples = [sample for sample in batch if sample is not None]
    images = [image for image, _ in samples]
    targets = [target for _, target in samples]
    return images, targets


# --------------------------------------------------------------------------------------------------------------
# COCO evaluation
# --------------------------------------------------------------------------------------------------------------


def detections_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
) -> list[dict[str, Any]]:
    """torchvision detector outputs as COCO result dicts.

    Args:
        outputs: one dict per image with `boxes` (N, 4) XYXY in the image's pixels, `scores` (N,) and
            `labels` (N,) contiguous labels, as torchvision's detectors return in eval mode.
        image_ids: the COCO image id of each output (e.g. `target["image_id"]`).
        label_to_cat_id: contiguous label -> COCO category id (`CocoDetectionDataset.label_to_cat_id`).

    Returns:
        `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` per detection, for `evaluate_coco`.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"got {len(outputs)} outputs but {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = output["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
        scores = output["scores"].detach().to("cpu", torch.float64).reshape(-1).tolist()
        labels = output["labels"].detach().to("cpu").reshape(-1).tolist()
        if not len(scores) == len(labels) == len(boxes):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, scores, labels, strict=True):
            if label not in label_to_cat_id:
                raise ValueError(f"image {image_id}: label {label} is not in label_to_cat_id "
                                 f"(labels {sorted(label_to_cat_id)})")
            results.append({"image_id": int(image_id), "category_id": label_to_cat_id[label], "bbox": box,
                            "score": score})
    return results


def evaluate_coco(
    coco_gt: COCO,
    detections: Sequence[Mapping[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """COCO bbox evaluation of `detections` (COCO result dicts) against `coco_gt` with pycocotools' COCOeval.

    Args:
        coco_gt: the ground truth, e.g. `CocoDetectionDataset.coco`.
        detections: `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` dicts (`detections_to_coco`).
        image_ids: evaluate these images only (e.g. when only part of a split was run); default all of `coco_gt`.

    Returns:
        The 12 numbers of `COCOeval.summarize()` under `COCO_STAT_NAMES` (AP, AP50, ..., ARl) as floats;
        `VOC_AP50`, Pascal VOC's mAP at IoU > 0.5 (area under the precision envelope, VOC2010 onwards; crowd
        regions, which VOC's difficult objects become, ignored; `voc.evaluate_voc`); and `per_category`:
        `{name: {"AP": AP@[.5:.95], "AP50": AP@.5, "VOC_AP50": VOC AP}}` (area "all", 100 detections). As in
        pycocotools, a value is -1.0 where there is no ground truth to measure it (e.g. APs without small
        objects). With no detections every measurable value is 0.0.
    """
    gt_image_ids = set(coco_gt.getImgIds())
    gt_cat_ids = set(coco_gt.getCatIds())
    results = []
    for index, detection in enumerate(detections):
        if detection.get("image_id") not in gt_image_ids:
            raise ValueError(f"detections[{index}]: image_id {detection.get('image_id')!r} is not in the ground truth")
        if detection.get("category_id") not in gt_cat_ids:
            raise ValueError(
                f"detections[{index}]: category_id {detection.get('category_id')!r} is not in the ground truth"
            )
        results.append(dict(detection))  # loadRes adds keys to the dicts it gets

    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # pycocotools prints its progress and the summary table
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list; an empty result set evaluates to zeros
            coco_dt = _coco_from_dict({"images": list(coco_gt.dataset["images"]), "annotations": [],
                                       "categories": list(coco_gt.dataset["categories"])})
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    table = [line for line in log.getvalue().splitlines() if line.lstrip().startswith("Average")]
    logger.info("COCO bbox evaluation of %d detections:\n%s", len(results), "\n".join(table))

    metrics: dict[str, Any] = {name: float(value) for name, value in zip(COCO_STAT_NAMES, evaluator.stats, strict=True)}
    # precision: [IoU thresholds, recall thresholds, categories, area ranges, max detections]; -1 = no ground truth.
    precision = evaluator.eval["precision"]
    per_category: dict[str, dict[str, float]] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        name = coco_gt.cats[cat_id]["name"]
        all_iou = precision[:, :, k, 0, -1]
        at_50 = precision[0, :, k, 0, -1]  # iouThrs[0] == 0.5
        per_category[name] = {
            "AP": float(all_iou[all_iou > -1].mean()) if (all_iou > -1).any() else -1.0,
            "AP50": float(at_50[at_50 > -1].mean()) if (at_50 > -1).any() else -1.0,
        }
    # VOC's AP differs from COCO's AP50 in interpolation (area vs 101 points), ties (IoU > 0.5 vs >= 0.5) and
    # detections per image (all vs 100); users of VOC data compare with published VOC numbers.
    voc = evaluate_voc(coco_gt.dataset, results, image_ids=image_ids)
    metrics["VOC_AP50"] = voc["mAP"]
    for name, value in per_category.items():
        value["VOC_AP50"] = voc["per_category"][name]
    metrics["per_category"] = per_category
    return metrics
