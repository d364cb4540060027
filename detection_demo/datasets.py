"""Which images and annotations a run reads: a COCO-style root, explicit COCO 2017 paths or a Pascal VOC root.

`DataPaths` resolves `--data-root` (the layout `synthetic.generate_dataset` writes: `<root>/<split>/` and
`<root>/annotations/instances_<split>.json`) or the explicit `--train-images/--train-annotations/--val-images/
--val-annotations` of a real COCO 2017 download (`train2017/` and `annotations/instances_train2017.json`, ...).
With `data_format="voc"` the root is a VOC one (`torchvision.datasets.VOCDetection`'s layout): the images are
`<root>/JPEGImages/` and the "annotations" of a split are its list `<root>/ImageSets/Main/<split>.txt`, whose XML
files `voc.voc_to_coco` reads from `<root>/Annotations/`.
`open_split` builds a `CocoDetectionDataset` for one split; with `masks=True` (Mask R-CNN) every target also holds
`masks`, decoded from the COCO segmentation or, where an annotation has none, filled from its box.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from .data import CocoDetectionDataset
from .voc import voc_classes, voc_to_coco

__all__ = ["DATA_FORMATS", "CocoInstanceDataset", "DataPaths", "open_split"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
DATA_FORMATS = ("coco", "voc")


@dataclass(frozen=True)
class DataPaths:
    """Image folders and annotation files of the train and val splits, and their format ("coco" or "voc").

    For VOC, an "annotation file" is the split's image-set list (`ImageSets/Main/<split>.txt`).
    """

    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path
    data_format: str = "coco"

    def __post_init__(self) -> None:
        # Checkpoints record `to_dict()`, which readers may turn back into paths wholesale: take "voc" as text.
        data_format = str(self.data_format)
        if data_format not in DATA_FORMATS:
            raise ValueError(f"data format must be one of {DATA_FORMATS}, got {data_format!r}")
        object.__setattr__(self, "data_format", data_format)

    @classmethod
    def resolve(
        cls,
        data_root: str | Path | None,
        train_images: str | Path | None = None,
        train_annotations: str | Path | None = None,
        val_images: str | Path | None = None,
        val_annotations: str | Path | None = None,
        data_format: str = "coco",
    ) -> DataPaths:
        """Explicit paths win over the ones derived from `data_root`; every path must be known in the end.

        A VOC root gives `<root>/JPEGImages` and `<root>/ImageSets/Main/{train,val}.txt`.
        """
        if data_format not in DATA_FORMATS:
            raise ValueError(f"data format must be one of {DATA_FORMATS}, got {data_format!r}")
        root = Path(data_root) if data_root is not None else None
        if data_format == "voc":
            lists = root / "ImageSets" / "Main" if root else None
            derived: dict[str, Path | None] = {
                "train_images": root / "JPEGImages" if root else None,
                "train_annotations": lists / "train.txt" if lists else None,
                "val_images": root / "JPEGImages" if root else None,
                "val_annotations": lists / "val.txt" if lists else None,
            }
        else:
            derived = {
                "train_images": root / "train" if root else None,
                "train_annotations": root / "annotations" / "instances_train.json" if root else None,
                "val_images": root / "val" if root else None,
                "val_annotations": root / "annotations" / "instances_val.json" if root else None,
            }
        given = {"train_images": train_images, "train_annotations": train_annotations, "val_images": val_images,
                 "val_annotations": val_annotations}
        paths = {name: Path(given[name]) if given[name] is not None else derived[name] for name in derived}
        missing = [name for name, path in paths.items() if path is None]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise ValueError(f"no --data-root, so {flags} must be given")
        return cls(**paths, data_format=data_format)  # type: ignore[arg-type]

    def split(self, split: str) -> tuple[Path, Path]:
        """(image folder, annotation file) of `split` ("train" or "val")."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_annotations")

    def to_dict(self) -> dict[str, str]:
        return {name: str(getattr(self, name)) for name in self.__dataclass_fields__}


class CocoInstanceDataset(CocoDetectionDataset):
    """`CocoDetectionDataset` whose targets also hold `masks` (`tv_tensors.Mask`, uint8, (N, H, W)) for Mask R-CNN.

    A mask is the annotation's segmentation (polygons or RLE, decoded by pycocotools); an annotation without one
    (the synthetic dataset has none) gets its box filled, which is logged once. The transforms run on image,
    boxes and masks together.
    """

    def __init__(self, image_dir: str | Path, annotation_file: str | Path,
                 transforms: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_dir, annotation_file, None, **kwargs)
        self.instance_transforms = transforms
        without = sum(1 for ann in self.coco.anns.values() if not ann.get("segmentation"))
        if without:
            logger.warning("%s: %d of %d annotations have no segmentation; their masks are their boxes",
                           self.annotation_file, without, len(self.coco.anns))

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]] | None:
        sample = super().__getitem__(index)  # no transforms yet: the base class has none
        if sample is None:  # an unreadable image, skipped
            return None
        image, target = sample
        height, width = image.shape[-2:]
        masks = np.zeros((len(target["boxes"]), height, width), dtype=np.uint8)
        for row, (annotation_id, box) in enumerate(zip(self.annotation_ids(index), target["boxes"].tolist(),
                                                       strict=True)):
            annotation = self.coco.anns[annotation_id]
            if annotation.get("segmentation"):
                masks[row] = self.coco.annToMask(annotation)
            else:
                x1, y1, x2, y2 = (round(v) for v in box)
                masks[row, y1:y2, x1:x2] = 1
        target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        if self.instance_transforms is not None:
            image, target = self.instance_transforms(image, target)
        return image, target


def open_split(paths: DataPaths, split: str,
               transforms: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
               *, masks: bool = False, skip_bad_images: bool = False) -> CocoDetectionDataset:
    """The dataset of `split`; with `masks`, a `CocoInstanceDataset`.

    `skip_bad_images` makes the dataset skip images that fail to decode (see `data.check_images` for the scan that
    finds most of them up front).
    """
    image_dir, annotation_file = paths.split(split)
    if not annotation_file.is_file():
        what = "image-set list" if paths.data_format == "voc" else "annotations"
        raise FileNotFoundError(f"{split} {what} not found: {annotation_file}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{split} image folder not found: {image_dir}")
    cls = CocoInstanceDataset if masks else CocoDetectionDataset
    annotations = None
    if paths.data_format == "voc":
        # One class list for both splits, so that their labels agree even when a class is missing from one.
        lists = [path for path in (paths.train_annotations, paths.val_annotations) if path.is_file()]
        annotations = voc_to_coco(annotation_file, image_dir, voc_classes(lists))
    return cls(image_dir, annotation_file, transforms, annotations=annotations, skip_bad_images=skip_bad_images)
