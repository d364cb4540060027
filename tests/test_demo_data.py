"""Tests for the detection demo's data: the synthetic COCO generator, the dataset, the transforms and COCO eval.

Box/pixel consistency is checked on hand-made images: a saturated red rectangle on a grey background, whose
transformed box must cover exactly the transformed coloured pixels (grey stays grey under every photometric
distortion, so the rectangle is found by its saturation whatever the colour jitter did).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Subset
from torchvision import tv_tensors
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.transforms import v2

from detection_demo import synthetic
from detection_demo.data import (
    COCO_STAT_NAMES,
    CocoDetectionDataset,
    collate_fn,
    detections_to_coco,
    evaluate_coco,
    load_split,
    make_eval_transforms,
    make_train_transforms,
)
from detection_demo.synthetic import CATEGORIES, generate_dataset

# Not square, so that a height/width mix-up shows.
SMALL = {"num_train": 12, "num_val": 4, "image_size": (160, 192), "seed": 0}


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, **SMALL)
    return root


@pytest.fixture
def one_thread():
    """Run transforms on one torch thread, as DataLoader workers do; tiny images gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------


def test_generator_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = generate_dataset(tmp_path / "a", **SMALL, workers=1)
    # The second copy is drawn by two worker processes (small chunks so that 12 images go parallel).
    monkeypatch.setattr(synthetic, "_CHUNK_SIZE", 2)
    generate_dataset(tmp_path / "b", **SMALL, workers=2)
    generate_dataset(tmp_path / "c", **{**SMALL, "seed": 1})
    a, b, c = (_all_files(tmp_path / name) for name in "abc")
    assert first["regenerated"]
    assert len(a) == SMALL["num_train"] + SMALL["num_val"] + 3  # images, two annotation files, meta.json
    assert a == b
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert a["train/000001.jpg"] != c["train/000001.jpg"]


def test_generation_is_skipped_when_meta_matches(tmp_path: Path) -> None:
    args = {"num_train": 3, "num_val": 2, "image_size": (64, 64)}
    generate_dataset(tmp_path, **args)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = generate_dataset(tmp_path, **args)
    assert not again["regenerated"]
    assert again["train"]["num_images"] == 3 and again["val"]["num_images"] == 2
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps

    changed = generate_dataset(tmp_path, **{**args, "num_train": 2, "seed": 5})
    assert changed["regenerated"]
    assert json.loads((tmp_path / "meta.json").read_text())["seed"] == 5
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000001.jpg", "000002.jpg"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": 0}, "num_train must be an int >= 1, got 0"),
        ({"num_val": 2.5}, "num_val must be an int >= 1, got 2.5"),
        ({"image_size": (16, 64)}, r"image_size must be \(height, width\) with ints >= 32, got \(16, 64\)"),
        ({"seed": -1}, "seed must be an int >= 0, got -1"),
        ({"workers": 0}, "workers must be an int >= 1 or None, got 0"),
    ],
)
def test_generator_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, **kwargs)


@pytest.mark.parametrize("split", ["train", "val"])
def test_generated_annotations_are_valid_coco(dataset_root: Path, split: str) -> None:
    coco = COCO(str(dataset_root / "annotations" / f"instances_{split}.json"))
    height, width = SMALL["image_size"]
    num_images = SMALL[f"num_{split}"]

    assert sorted(coco.getImgIds()) == list(range(1, num_images + 1))
    assert sorted(coco.getAnnIds()) == list(range(1, len(coco.anns) + 1))
    assert sorted(coco.getCatIds()) == list(range(1, len(CATEGORIES) + 1))
    assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == list(CATEGORIES)
    assert len(CATEGORIES) >= 4

    for image in coco.imgs.values():
        with Image.open(dataset_root / split / image["file_name"]) as file:
            assert file.format == "JPEG"
            assert file.size == (image["width"], image["height"]) == (width, height)
    objects_per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert min(objects_per_image) == 0  # negatives are included
    assert max(objects_per_image) <= 6

    for annotation in coco.anns.values():
        x, y, w, h = annotation["bbox"]
        assert all(isinstance(v, float) for v in annotation["bbox"])
        assert x >= 0 and y >= 0 and w > 1 and h > 1
        assert x + w <= width and y + h <= height
        assert 0 < annotation["area"] <= w * h
        assert annotation["iscrowd"] == 0


def test_generated_objects_vary_in_size_and_category(dataset_root: Path) -> None:
    coco = COCO(str(dataset_root / "annotations" / "instances_train.json"))
    side = min(SMALL["image_size"])
    extents = np.array([max(a["bbox"][2:]) / side for a in coco.anns.values()])
    assert extents.min() < 0.12
    assert extents.max() > 0.4
    assert len({a["category_id"] for a in coco.anns.values()}) >= 4
    # Objects overlap: some pair of boxes in one image intersects.
    overlapping = 0
    for image_id in coco.getImgIds():
        boxes = [coco.anns[i]["bbox"] for i in coco.getAnnIds(imgIds=[image_id])]
        for i, (x1, y1, w1, h1) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1 :]:
                overlapping += min(x1 + w1, x2 + w2) > max(x1, x2) and min(y1 + h1, y2 + h2) > max(y1, y2)
    assert overlapping > 0


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_yields_detector_targets(dataset_root: Path) -> None:
    dataset = load_split(dataset_root, "train")
    coco = dataset.coco
    assert len(dataset) == SMALL["num_train"]
    assert dataset.num_classes == len(CATEGORIES) + 1
    assert dataset.categories == ["__background__", *CATEGORIES]
    summary = dataset.summary()
    assert summary["negative_images"] >= 1
    assert summary["boxes"] == summary["annotations"] == len(coco.anns)
    assert summary["crowd_dropped"] == summary["degenerate_dropped"] == 0

    for index in range(len(dataset)):
        image, target = dataset[index]
        assert isinstance(image, tv_tensors.Image)
        assert image.dtype == torch.uint8 and image.shape == (3, *SMALL["image_size"])
        boxes = target["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes)
        assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY
        assert boxes.canvas_size == SMALL["image_size"]
        assert target["labels"].dtype == torch.int64
        image_id = target["image_id"]
        assert image_id == dataset.ids[index]
        expected = [(a["bbox"], a["category_id"]) for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))]
        xyxy = [[x, y, x + w, y + h] for (x, y, w, h), _ in expected]
        assert boxes.tolist() == xyxy
        assert [dataset.label_to_cat_id[label] for label in target["labels"].tolist()] == [c for _, c in expected]


def _write_coco(
    folder: Path,
    annotations: list[dict[str, Any]],
    *,
    categories: list[dict[str, Any]] | None = None,
    num_images: int = 2,
    size: tuple[int, int] = (100, 120),
    rectangle: tuple[int, int, int, int] = (30, 20, 90, 70),
) -> Path:
    """Write `num_images` grey PNGs of `size` (H, W) holding a red rectangle (x0, y0, x1, y1) and a COCO file."""
    height, width = size
    pixels = np.full((height, width, 3), 100, dtype=np.uint8)
    x0, y0, x1, y1 = rectangle
    pixels[y0:y1, x0:x1] = (255, 0, 0)
    images = []
    for image_id in range(1, num_images + 1):
        Image.fromarray(pixels).save(folder / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    if categories is None:
        categories = [{"id": 3, "name": "box"}, {"id": 7, "name": "other"}, {"id": 90, "name": "last"}]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _annotation(ann_id: int, bbox: list[float], *, image_id: int = 1, category_id: int = 3, **extra: Any) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": 1.0,
            "iscrowd": 0, **extra}


def _coloured_extent(image: torch.Tensor) -> list[float] | None:
    """XYXY pixel-edge extent of the coloured (non-grey) pixels of a float (3, H, W) image in [0, 1].

    A pixel counts when its saturation (max - min channel) is above half the image's largest: resampling blurs
    the rectangle's edges, and half-covered pixels mark where the box edge went.
    """
    spread = image.amax(dim=0) - image.amin(dim=0)
    if spread.max() < 0.05:  # all grey
        return None
    ys, xs = torch.nonzero(spread > 0.5 * spread.max(), as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_crowd_degenerate_and_empty_images_are_counted(tmp_path: Path) -> None:
    annotations = [
        _annotation(1, [30, 20, 60, 50]),
        _annotation(2, [10, 10, 40, 40], category_id=7, iscrowd=1),
        _annotation(3, [5, 5, 0.5, 30]),  # degenerate: narrower than 1 px
        _annotation(4, [150, 10, 20, 20]),  # wholly outside the 120 px wide image
        _annotation(5, [-5, 60, 20, 30], category_id=90),  # reaches outside: clipped to [0, 60, 15, 90]
        _annotation(6, [0, 0, 50, 50], image_id=3, category_id=7, iscrowd=1),  # image 3 only has a crowd region
    ]
    dataset = CocoDetectionDataset(tmp_path, _write_coco(tmp_path, annotations, num_images=3))
    assert dataset.summary() == {
        "images": 3,
        "negative_images": 2,  # image 2 has no annotation, image 3 only a crowd region
        "annotations": 6,
        "boxes": 2,
        "crowd_dropped": 2,
        "degenerate_dropped": 2,
        "clipped": 1,
        "categories": 3,
    }
    # COCO category ids 3, 7, 90 (with gaps, as in real COCO) become contiguous labels 1, 2, 3.
    assert dataset.cat_id_to_label == {3: 1, 7: 2, 90: 3}
    assert dataset.label_to_cat_id == {1: 3, 2: 7, 3: 90}
    assert dataset.categories == ["__background__", "box", "other", "last"]
    assert dataset.num_classes == 4
    assert len(dataset.coco.anns) == 6  # the ground truth for COCOeval keeps everything

    _, target = dataset[0]
    assert target["boxes"].tolist() == [[30, 20, 90, 70], [0, 60, 15, 90]]
    assert target["labels"].tolist() == [1, 3]
    for index in (1, 2):
        _, target = dataset[index]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["labels"].dtype == torch.int64


def test_horizontal_flip_moves_box_with_pixels(tmp_path: Path) -> None:
    path = _write_coco(tmp_path, [_annotation(1, [30, 20, 60, 50])])
    flip = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)])
    image, target = CocoDetectionDataset(tmp_path, path, flip)[0]
    assert target["boxes"].tolist() == [[30, 20, 90, 70]]  # 120 - 90 = 30, 120 - 30 = 90: symmetric by design
    assert _coloured_extent(image) == [30, 20, 90, 70]

    path = _write_coco(tmp_path, [_annotation(1, [10, 20, 40, 50])], rectangle=(10, 20, 50, 70))
    image, target = CocoDetectionDataset(tmp_path, path, flip)[0]
    assert target["boxes"].tolist() == [[70, 20, 110, 70]]
    assert _coloured_extent(image) == [70, 20, 110, 70]


def test_crop_and_resize_move_box_with_pixels(tmp_path: Path) -> None:
    path = _write_coco(tmp_path, [_annotation(1, [30, 20, 60, 50])])
    # Crop 60 x 90 from the middle of 100 x 120 (top 20, left 15) cuts the rectangle's top; then scale y by 2
    # and x by 1/2.
    transform = v2.Compose([v2.CenterCrop((60, 90)), v2.Resize((120, 45)), v2.ToDtype(torch.float32, scale=True)])
    image, target = CocoDetectionDataset(tmp_path, path, transform)[0]
    assert image.shape == (3, 120, 45)
    assert target["boxes"].tolist() == [[7.5, 0.0, 37.5, 100.0]]
    assert _coloured_extent(image) == pytest.approx(target["boxes"][0].tolist(), abs=1.0)


@pytest.mark.usefixtures("one_thread")
def test_train_transforms_keep_boxes_on_pixels(tmp_path: Path) -> None:
    path = _write_coco(tmp_path, [_annotation(1, [30, 20, 60, 50])])
    dataset = CocoDetectionDataset(tmp_path, path, make_train_transforms(128))
    checked = 0
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert target["labels"].dtype == torch.int64 and target["image_id"] == 1
        boxes = target["boxes"]
        assert boxes.canvas_size == (128, 128)
        if len(boxes) == 0:  # the IoU crop left the rectangle's centre out: its box is dropped
            continue
        assert target["labels"].tolist() == [1]
        extent = _coloured_extent(image)
        assert extent is not None
        assert extent == pytest.approx(boxes[0].tolist(), abs=1.0), f"seed {seed}"
        checked += 1
    assert checked >= 8


@pytest.mark.usefixtures("one_thread")
def test_train_transforms_take_images_without_boxes(tmp_path: Path) -> None:
    dataset = CocoDetectionDataset(tmp_path, _write_coco(tmp_path, []), make_train_transforms(64))
    for seed in range(3):
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert image.shape == (3, 64, 64)
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_eval_transforms_keep_the_original_image(dataset_root: Path) -> None:
    dataset = load_split(dataset_root, "val", make_eval_transforms())
    raw = load_split(dataset_root, "val")
    image, target = dataset[0]
    raw_image, raw_target = raw[0]
    assert image.dtype == torch.float32 and image.shape == raw_image.shape
    torch.testing.assert_close(image, raw_image.float() / 255)
    assert target["boxes"].tolist() == raw_target["boxes"].tolist()


@pytest.mark.usefixtures("one_thread")
def test_collate_fn_batches_lists(dataset_root: Path) -> None:
    loader = DataLoader(load_split(dataset_root, "train", make_train_transforms(96)), batch_size=3,
                        collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list)
    assert len(images) == len(targets) == 3
    assert all(image.shape == (3, 96, 96) for image in images)
    assert [t["image_id"] for t in targets] == [1, 2, 3]


@pytest.mark.usefixtures("one_thread")
def test_batches_feed_a_torchvision_detector(dataset_root: Path) -> None:
    """The contract with the training loop: batches (with a negative image) train an SSD, eval outputs evaluate."""
    train = load_split(dataset_root, "train", make_train_transforms(320))
    negative = next(i for i in range(len(train)) if train.coco.getAnnIds(imgIds=[train.ids[i]]) == [])
    loader = DataLoader(Subset(train, [0, negative]), batch_size=2, collate_fn=collate_fn)
    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=train.num_classes)
    images, targets = next(iter(loader))
    assert targets[1]["boxes"].shape == (0, 4)
    losses = model(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    assert all(torch.isfinite(loss) for loss in losses.values())

    val = load_split(dataset_root, "val", make_eval_transforms())
    image, target = val[0]
    model.eval()
    with torch.no_grad():
        outputs = model([image])
    boxes = outputs[0]["boxes"]
    assert boxes[:, 2].max() <= image.shape[-1] and boxes[:, 3].max() <= image.shape[-2]  # mapped back to the input
    detections = detections_to_coco(outputs, [target["image_id"]], val.label_to_cat_id)
    metrics = evaluate_coco(val.coco, detections, image_ids=[target["image_id"]])
    assert 0.0 <= metrics["AP"] <= 1.0 or metrics["AP"] == -1.0


def test_image_size_mismatch_names_the_file(tmp_path: Path) -> None:
    path = _write_coco(tmp_path, [])
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 121
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"1\.png: image is 120x100 .* says 121x100 for image id 1"):
        CocoDetectionDataset(tmp_path, path)[0]


def _break(data: dict[str, Any], change: str) -> dict[str, Any]:
    annotation = data["annotations"][1]
    if change == "missing section":
        del data["annotations"]
    elif change == "section not a list":
        data["images"] = {}
    elif change == "missing bbox":
        del annotation["bbox"]
    elif change == "short bbox":
        annotation["bbox"] = [1, 2, 3]
    elif change == "text in bbox":
        annotation["bbox"] = [1, 2, "3", 4]
    elif change == "nan in bbox":
        annotation["bbox"] = [1, 2, float("nan"), 4]
    elif change == "unknown category":
        annotation["category_id"] = 42
    elif change == "unknown image":
        annotation["image_id"] = 9
    elif change == "duplicate id":
        annotation["id"] = 1
    elif change == "bad iscrowd":
        annotation["iscrowd"] = 2
    elif change == "image without file_name":
        del data["images"][1]["file_name"]
    elif change == "category without name":
        del data["categories"][2]["name"]
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing section", "missing top-level key 'annotations'"),
        ("section not a list", "'images' must be a list, got dict"),
        ("missing bbox", r"annotations\[1\] \(id=2\): missing key 'bbox'"),
        ("short bbox", r"annotations\[1\] \(id=2\): invalid 'bbox': \[1, 2, 3\]"),
        ("text in bbox", r"annotations\[1\] \(id=2\): invalid 'bbox'"),
        ("nan in bbox", r"annotations\[1\] \(id=2\): invalid 'bbox'"),
        ("unknown category", r"annotations\[1\] \(id=2\): unknown category_id 42"),
        ("unknown image", r"annotations\[1\] \(id=2\): unknown image_id 9"),
        ("duplicate id", r"annotations\[1\] \(id=1\): duplicate id 1"),
        ("bad iscrowd", r"annotations\[1\] \(id=2\): iscrowd must be 0 or 1, got 2"),
        ("image without file_name", r"images\[1\] \(id=2\): missing key 'file_name'"),
        ("category without name", r"categories\[2\] \(id=90\): missing key 'name'"),
    ],
)
def test_malformed_annotation_file_names_file_and_entry(tmp_path: Path, change: str, message: str) -> None:
    path = _write_coco(tmp_path, [_annotation(1, [30, 20, 60, 50]), _annotation(2, [0, 0, 10, 10], image_id=2)])
    path.write_text(json.dumps(_break(json.loads(path.read_text()), change)))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        CocoDetectionDataset(tmp_path, path)


def test_annotation_file_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "instances_bad.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not valid JSON"):
        CocoDetectionDataset(tmp_path, path)


# ---------------------------------------------------------------------------------------------------------------
# COCO evaluation
# ---------------------------------------------------------------------------------------------------------------


def _targets_as_outputs(dataset: CocoDetectionDataset, *, shift: float = 0.0) -> tuple[list[dict], list[int]]:
    """Each image's target as a detector output with score 1, boxes moved right by `shift` of their width."""
    outputs, image_ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        boxes = target["boxes"].as_subclass(torch.Tensor).clone()
        boxes[:, [0, 2]] += shift * (boxes[:, 2] - boxes[:, 0])[:, None]
        outputs.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": target["labels"]})
        image_ids.append(target["image_id"])
    return outputs, image_ids


def test_ground_truth_as_detections_scores_ap_one(dataset_root: Path) -> None:
    dataset = load_split(dataset_root, "val", make_eval_transforms())
    detections = detections_to_coco(*_targets_as_outputs(dataset), dataset.label_to_cat_id)
    assert len(detections) == len(dataset.coco.anns)
    assert {"image_id", "category_id", "bbox", "score"} <= set(detections[0])

    metrics = evaluate_coco(dataset.coco, detections)
    assert set(metrics) == {*COCO_STAT_NAMES, "VOC_AP50", "per_category"}
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["VOC_AP50"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)
    present = {dataset.coco.cats[a["category_id"]]["name"] for a in dataset.coco.anns.values()}
    assert set(metrics["per_category"]) == set(CATEGORIES)
    for name in CATEGORIES:
        expected = 1.0 if name in present else -1.0  # -1: no ground truth of that category, as in pycocotools
        assert metrics["per_category"][name] == pytest.approx({"AP": expected, "AP50": expected, "VOC_AP50": expected})


def test_shifted_detections_pass_iou_half_but_not_three_quarters(dataset_root: Path) -> None:
    dataset = load_split(dataset_root, "val")
    # Shifting by 1/5 of the width gives IoU 0.8 / 1.2 = 2/3 with the ground truth.
    detections = detections_to_coco(*_targets_as_outputs(dataset, shift=0.2), dataset.label_to_cat_id)
    metrics = evaluate_coco(dataset.coco, detections)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(0.0)


def test_category_id_gaps_survive_the_round_trip(tmp_path: Path) -> None:
    annotations = [_annotation(1, [30, 20, 60, 50]), _annotation(2, [0, 0, 20, 20], image_id=2, category_id=90)]
    dataset = CocoDetectionDataset(tmp_path, _write_coco(tmp_path, annotations))
    detections = detections_to_coco(*_targets_as_outputs(dataset), dataset.label_to_cat_id)
    assert [d["category_id"] for d in detections] == [3, 90]
    assert detections[0]["bbox"] == [30, 20, 60, 50]
    metrics = evaluate_coco(dataset.coco, detections)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["per_category"]["other"] == {"AP": -1.0, "AP50": -1.0, "VOC_AP50": -1.0}


def test_zero_detections_score_zero(dataset_root: Path) -> None:
    dataset = load_split(dataset_root, "val")
    metrics = evaluate_coco(dataset.coco, [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AR100"] == 0.0
    assert all(metrics[name] in (0.0, -1.0) for name in COCO_STAT_NAMES)
    assert all(value["AP"] <= 0.0 for value in metrics["per_category"].values())


def test_evaluation_subset_of_images(dataset_root: Path) -> None:
    dataset = load_split(dataset_root, "val")
    outputs, image_ids = _targets_as_outputs(dataset)
    first = next(k for k, output in enumerate(outputs) if len(output["labels"]))  # an image with objects
    detections = detections_to_coco(outputs[first : first + 1], image_ids[first : first + 1], dataset.label_to_cat_id)
    assert len(dataset.coco.getAnnIds(imgIds=[image_ids[first]])) < len(dataset.coco.anns)
    assert evaluate_coco(dataset.coco, detections)["AR100"] < 1.0
    assert evaluate_coco(dataset.coco, detections, image_ids=[image_ids[first]])["AP"] == pytest.approx(1.0)


def test_detections_that_do_not_fit_the_ground_truth_are_rejected(dataset_root: Path) -> None:
    dataset = load_split(dataset_root, "val")
    detection = {"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}
    with pytest.raises(ValueError, match=r"detections\[0\]: image_id 999 is not in the ground truth"):
        evaluate_coco(dataset.coco, [detection])
    with pytest.raises(ValueError, match=r"detections\[0\]: category_id 77 is not in the ground truth"):
        evaluate_coco(dataset.coco, [{**detection, "image_id": 1, "category_id": 77}])
    output = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([9])}
    with pytest.raises(ValueError, match="image 1: label 9 is not in label_to_cat_id"):
        detections_to_coco([output], [1], dataset.label_to_cat_id)
    with pytest.raises(ValueError, match="got 1 outputs but 2 image ids"):
        detections_to_coco([output], [1, 2], dataset.label_to_cat_id)
