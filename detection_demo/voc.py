"""Pascal VOC as a second input format, and VOC's AP@0.5 beside the COCO metrics.

Reading: a VOC root as `torchvision.datasets.VOCDetection` lays it out (`Annotations/<id>.xml`,
`JPEGImages/<id>.jpg`, `ImageSets/Main/<split>.txt` listing the ids of a split) becomes COCO instances data in
memory (`voc_to_coco`), so the same dataset, training loop and COCOeval serve both formats:

- VOC boxes are 1-based inclusive pixel indices (the devkit's `xmax - xmin + 1` is the width); they become
  0-based continuous COCO boxes `[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`, as detectron2 does.
- `difficult` objects become `iscrowd` 1: left out of the training targets, and in evaluation neither a miss
  when not found nor a false positive when found (COCOeval's crowd regions, `evaluate_voc`'s ignored objects).
- Images get ids 1..N in the order of the list file; the VOC id stays in the image entry as `voc_id`.
- The classes are VOC's 20 in the devkit's order when every name in the files is one of them (so labels match
  other VOC tools), otherwise the sorted names found, with ids 1..K.

Evaluating: `evaluate_voc` is VOC's detection AP at IoU > 0.5 per class, averaged over the classes with
ground truth; `voc_ap` is the area under the precision envelope (VOC2010 onwards; `eleven_point` gives VOC2007's
11-point average instead). IoU is computed on continuous boxes (no devkit `+ 1`), as COCOeval does.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

__all__ = ["VOC_CLASSES", "evaluate_voc", "read_voc_ids", "read_voc_xml", "voc_ap", "voc_classes", "voc_to_coco"]

logger = logging.getLogger(__name__)

#: The 20 Pascal VOC classes in the devkit's order (label k + 1 is VOC_CLASSES[k]).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

_MAX_XML_BYTES = 16 * 1024 * 1024  # a VOC file is a few kB; refuse to parse something that cannot be one


def read_voc_ids(list_file: str | Path) -> list[str]:
    """The image ids of an `ImageSets/Main/<split>.txt` (first word of each non-empty line)."""
    path = Path(list_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"VOC image-set list not found: {path} (one image id per line, e.g. written with "
            f"`ls Annotations | sed 's/\\.xml$//' > {path.name}`)"
        )
    ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: no image ids")
    duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if duplicates:
        raise ValueError(f"{path}: image ids listed twice: {duplicates[:10]}")
    return ids


def _text(element: ET.Element, tag: str, path: Path, where: str) -> str:
    found = element.find(tag)
    if found is None or found.text is None or not found.text.strip():
        raise ValueError(f"{path}: {where}: missing <{tag}>")
    return found.text.strip()


def _number(element: ET.Element, tag: str, path: Path, where: str) -> float:
    text = _text(element, tag, path, where)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: {where}: <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}: {where}: <{tag}> is not finite: {text!r}")
    return value


def read_voc_xml(path: str | Path) -> dict[str, Any]:
    """One VOC annotation file: `filename`, `width`, `height` (0 when absent) and `objects`, each a dict with
    `name`, `difficult` (bool) and `bndbox` (xmin, ymin, xmax, ymax as in the file: 1-based, inclusive).

    Raises:
        ValueError: not VOC XML, or an object without a name or a valid box; the message names the file and object.
    """
    path = Path(path)
    data = path.read_bytes()
    # VOC files never declare entities; refusing them keeps expat's entity expansion out of play.
    if len(data) > _MAX_XML_BYTES or b"<!ENTITY" in data or b"<!DOCTYPE" in data:
        raise ValueError(f"{path}: not a VOC annotation file (too large, or declares a DOCTYPE/entities)")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as error:
        raise ValueError(f"{path}: not valid XML ({error})") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: expected an <annotation> root element, got <{root.tag}>")
    filename = root.findtext("filename", default="").strip()
    size = root.find("size")
    width = height = 0
    if size is not None and size.findtext("width") and size.findtext("height"):
        width = int(_number(size, "width", path, "<size>"))
        height = int(_number(size, "height", path, "<size>"))
    objects = []
    for index, element in enumerate(root.findall("object")):
        where = f"object {index}"
        name = _text(element, "name", path, where)
        where = f"object {index} ({name})"
        box = element.find("bndbox")
        if box is None:
            raise ValueError(f"{path}: {where}: missing <bndbox>")
        xmin, ymin, xmax, ymax = (_number(box, tag, path, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"{path}: {where}: <bndbox> has xmax < xmin or ymax < ymin: "
                             f"{[xmin, ymin, xmax, ymax]}")
        difficult = element.findtext("difficult", default="0").strip()
        if difficult not in ("0", "1"):
            raise ValueError(f"{path}: {where}: <difficult> must be 0 or 1, got {difficult!r}")
        objects.append({"name": name, "difficult": difficult == "1", "bndbox": (xmin, ymin, xmax, ymax)})
    return {"filename": filename, "width": width, "height": height, "objects": objects}


def _annotation_dir(list_file: Path) -> Path:
    """`<root>/Annotations` for `<root>/ImageSets/Main/<split>.txt`."""
    return list_file.resolve().parents[2] / "Annotations"


def voc_classes(list_files: Iterable[str | Path]) -> list[str]:
    """The class names of the VOC splits listed by `list_files` (see the module docstring for the order)."""
    names: set[str] = set()
    for list_file in list_files:
        annotation_dir = _annotation_dir(Path(list_file))
        for voc_id in read_voc_ids(list_file):
            names |= {obj["name"] for obj in read_voc_xml(annotation_dir / f"{voc_id}.xml")["objects"]}
    if names <= set(VOC_CLASSES):
        return list(VOC_CLASSES)
    return sorted(names)


def voc_to_coco(list_file: str | Path, image_dir: str | Path, classes: Sequence[str]) -> dict[str, Any]:
    """COCO instances data for the VOC split that `list_file` (`<root>/ImageSets/Main/<split>.txt`) lists.

    The XML files are read from `<root>/Annotations/`, the images named `<id>.jpg` (or the XML's `<filename>`
    when it names the same id) in `image_dir`; where the XML gives no size, it is read from the image's header.

    Raises:
        FileNotFoundError: the list or an annotation file is missing.
        ValueError: a file is malformed, or an object's class is not in `classes`; the message names the file.
    """
    list_file, image_dir = Path(list_file), Path(image_dir)
    annotation_dir = _annotation_dir(list_file)
    category_ids = {name: index for index, name in enumerate(classes, start=1)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, voc_id in enumerate(read_voc_ids(list_file), start=1):
        xml_path = annotation_dir / f"{voc_id}.xml"
        if not xml_path.is_file():
            raise FileNotFoundError(f"{list_file}: lists {voc_id!r} but {xml_path} does not exist")
        record = read_voc_xml(xml_path)
        file_name = record["filename"] if Path(record["filename"]).stem == voc_id else f"{voc_id}.jpg"
        width, height = record["width"], record["height"]
        if width <= 0 or height <= 0:
            try:
                with PIL.Image.open(image_dir / file_name) as image:
                    width, height = image.size
            except (OSError, SyntaxError, ValueError) as error:
                raise ValueError(f"{xml_path} gives no image size and {image_dir / file_name} cannot be read "
                                 f"({type(error).__name__}: {error})") from None
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "voc_id": voc_id})
        for obj in record["objects"]:
            if obj["name"] not in category_ids:
                raise ValueError(f"{xml_path}: class {obj['name']!r} is not one of {list(classes)}")
            xmin, ymin, xmax, ymax = obj["bndbox"]
            w, h = xmax - xmin + 1, ymax - ymin + 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[obj["name"]], "bbox": [xmin - 1, ymin - 1, w, h],
                                "area": w * h, "iscrowd": int(obj["difficult"])})
    difficult = sum(a["iscrowd"] for a in annotations)
    logger.info("%s: %d VOC images, %d objects (%d difficult: ignored in training and evaluation)", list_file,
                len(images), len(annotations), difficult)
    categories = [{"id": category_id, "name": name} for name, category_id in category_ids.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


# --------------------------------------------------------------------------------------------------------------
# VOC AP
# --------------------------------------------------------------------------------------------------------------


def voc_ap(recall: Sequence[float] | np.ndarray, precision: Sequence[float] | np.ndarray, *,
           eleven_point: bool = False) -> float:
    """Average precision of a ranked list from its cumulative recall and precision (one value per detection).

    Default: the area under the precision envelope (precision at recall r = the best precision at any recall
    >= r), VOC2010 onwards. `eleven_point`: VOC2007's mean of that envelope at recall 0, 0.1, ..., 1.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.shape != precision.shape or recall.ndim != 1:
        raise ValueError(f"recall and precision must be 1-D of one length, got {recall.shape} and {precision.shape}")
    if eleven_point:
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # the envelope: best precision at this recall or beyond
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one XYXY box with (N, 4) XYXY boxes, continuous coordinates."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def evaluate_voc(
    ground_truth: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
    eleven_point: bool = False,
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """VOC detection AP of COCO result dicts against COCO instances data (`COCO.dataset`).

    Per category, detections are taken by falling score; each is a true positive when its best-overlapping
    ground-truth box of that category in its image has IoU > `iou_threshold` and was not matched before, ignored
    when that box is difficult (`iscrowd` 1), else a false positive. Recall counts the non-difficult boxes.

    Returns:
        `{"mAP": mean AP over the categories with non-difficult ground truth (-1.0 if none), "per_category":
        {name: AP or -1.0 without ground truth}}`.
    """
    keep = set(image_ids) if image_ids is not None else None
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    truth: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    grouped: dict[tuple[int, int], list[tuple[list[float], bool]]] = {}
    for annotation in ground_truth["annotations"]:
        if keep is None or annotation["image_id"] in keep:
            key = (annotation["category_id"], annotation["image_id"])
            grouped.setdefault(key, []).append((annotation["bbox"], bool(annotation.get("iscrowd", 0))))
    for key, items in grouped.items():
        boxes = np.array([[x, y, x + w, y + h] for (x, y, w, h), _ in items], dtype=np.float64)
        truth[key] = (boxes, np.array([difficult for _, difficult in items], dtype=bool))

    per_category: dict[str, float] = {}
    for category_id, name in names.items():
        positives = sum(int((~d).sum()) for (c, _), (_, d) in truth.items() if c == category_id)
        if positives == 0:
            per_category[name] = -1.0
            continue
        ranked = sorted((d for d in detections if d["category_id"] == category_id
                         and (keep is None or d["image_id"] in keep)), key=lambda d: -float(d["score"]))
        matched = {key: np.zeros(len(boxes), dtype=bool) for key, (boxes, _) in truth.items() if key[0] == category_id}
        hits: list[bool] = []
        for detection in ranked:
            key = (category_id, detection["image_id"])
            x, y, w, h = detection["bbox"]
            if key in truth:
                boxes, difficult = truth[key]
                overlaps = _iou(np.array([x, y, x + w, y + h], dtype=np.float64), boxes)
                best = int(overlaps.argmax())
                if overlaps[best] > iou_threshold:
                    if difficult[best]:
                        continue  # neither a hit nor a false alarm
                    hits.append(not matched[key][best])
                    matched[key][best] = True
                    continue
            hits.append(False)
        true_positives = np.cumsum(hits, dtype=np.float64)
        ranks = np.arange(1, len(hits) + 1, dtype=np.float64)
        per_category[name] = voc_ap(true_positives / positives, true_positives / np.maximum(ranks, 1),
                                    eleven_point=eleven_point) if hits else 0.0
    measured = [ap for ap in per_category.values() if ap >= 0]
    return {"mAP": float(np.mean(measured)) if measured else -1.0, "per_category": per_category}
