"""Tests for the demo on data as users have it: exports numbered from 0, a `_background_` category, missing and
truncated image files, and Pascal VOC XML datasets; and VOC's AP@0.5.

Every dataset is built in tmp_path (a few small images): the labelme-style file follows labelme's `labelme2coco.py`
output (DESIGN.md §7: image, annotation and category ids from 0, `_background_` id 0 without boxes, `file_name`
relative to the annotation file's folder, polygon segmentations), the VOC one `torchvision.datasets.VOCDetection`'s
layout.
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
from torch.utils.data import DataLoader

from detection_demo.__main__ import main
from detection_demo.data import (
    BadImageError,
    CocoDetectionDataset,
    check_images,
    collate_fn,
    detections_to_coco,
    evaluate_coco,
    make_eval_transforms,
    scan_images,
)
from detection_demo.datasets import DataPaths, open_split
from detection_demo.evaluate import detect_dataset
from detection_demo.models import load_trained_model
from detection_demo.voc import VOC_CLASSES, evaluate_voc, read_voc_xml, voc_ap

TINY_FLAGS = ["--image-size", "64", "--depth-multiplier", "0.25", "--batch-size", "2", "--workers", "0",
              "--no-progress", "--threads", "1", "--epochs", "1", "--eval-interval", "1"]


def _photo(path: Path, size: tuple[int, int], seed: int, box: tuple[int, int, int, int] | None = None) -> None:
    """A noisy image of `size` (W, H) with a bright rectangle at `box` (x0, y0, x1, y1), saved by its suffix."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 120, (height, width, 3), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = (230, 200, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)


def _truncate(path: Path, keep: float = 0.5) -> None:
    """Cut the file after `keep` of its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------------------------------------------------------
# labelme-style COCO: ids from 0, `_background_`
# ---------------------------------------------------------------------------------------------------------------


def _labelme_coco(folder: Path, num_images: int = 4, size: tuple[int, int] = (96, 80)) -> Path:
    """A COCO file as labelme's labelme2coco.py writes it, with its JPEGImages/, in `folder`."""
    categories = [{"supercategory": None, "id": 0, "name": "_background_"},
                  {"supercategory": None, "id": 1, "name": "car"},
                  {"supercategory": None, "id": 2, "name": "person"}]
    images, annotations = [], []
    for image_id in range(num_images):  # labelme: enumerate() from 0
        box = (10 + 4 * image_id, 12, 50 + 4 * image_id, 60)
        _photo(folder / "JPEGImages" / f"2011_00000{image_id}.jpg", size, image_id, box)
        images.append({"license": 0, "url": None, "file_name": f"JPEGImages/2011_00000{image_id}.jpg",
                       "height": size[1], "width": size[0], "date_captured": None, "id": image_id})
        x0, y0, x1, y1 = box
        annotations.append({"id": len(annotations), "image_id": image_id, "category_id": 1 + image_id % 2,
                            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "area": float((x1 - x0) * (y1 - y0)),
                            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "iscrowd": 0})
    data = {"info": {"description": None, "url": None, "version": None, "year": 2026, "contributor": None,
                     "date_created": "2026-01-01 00:00:00.000000"},
            "licenses": [{"url": None, "id": 0, "name": None}], "images": images, "type": "instances",
            "annotations": annotations, "categories": categories}
    path = folder / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def _targets_as_detections(dataset: CocoDetectionDataset) -> list[dict[str, Any]]:
    outputs, image_ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        outputs.append({"boxes": target["boxes"].as_subclass(torch.Tensor), "scores": torch.ones(len(target["labels"])),
                        "labels": target["labels"]})
        image_ids.append(target["image_id"])
    return detections_to_coco(outputs, image_ids, dataset.label_to_cat_id)


def test_labelme_ids_from_zero_evaluate_with_the_users_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _labelme_coco(tmp_path)
    with caplog.at_level("INFO", logger="detection_demo"):
        dataset = CocoDetectionDataset(tmp_path, path, make_eval_transforms())
    assert "renumbered 1..4 internally" in caplog.text
    assert "category '_background_' (id 0) has no boxes: left out of the classes" in caplog.text
    assert dataset.categories == ["__background__", "car", "person"]
    assert dataset.label_to_cat_id == {1: 1, 2: 2}
    assert dataset.dropped_categories == ["_background_"]
    assert dataset.ids == [0, 1, 2, 3]  # the file's image ids, 0 included
    assert sorted(dataset.coco.anns) == [1, 2, 3, 4]
    assert [a["source_id"] for a in dataset.coco.dataset["annotations"]] == [0, 1, 2, 3]

    detections = _targets_as_detections(dataset)
    assert [d["image_id"] for d in detections] == [0, 1, 2, 3]  # results carry the file's ids
    assert [d["category_id"] for d in detections] == [1, 2, 1, 2]
    metrics = evaluate_coco(dataset.coco, detections)
    # With annotation id 0 kept, COCOeval would score image 0's perfect detection a false positive (AP < 1).
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    assert metrics["VOC_AP50"] == pytest.approx(1.0)
    assert set(metrics["per_category"]) == {"car", "person"}


def test_background_category_with_boxes_stays_a_class(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _labelme_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 0
    path.write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="detection_demo"):
        dataset = CocoDetectionDataset(tmp_path, path)
    assert dataset.categories == ["__background__", "_background_", "car", "person"]
    assert "category '_background_' (id 0) has boxes: kept as a class" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Missing and truncated images
# ---------------------------------------------------------------------------------------------------------------


def _coco_root(root: Path, num_train: int = 6, num_val: int = 2, suffix: str = ".jpg") -> Path:
    """A `--data-root` layout (train/, val/, annotations/instances_{train,val}.json) of small photos."""
    for split, count in (("train", num_train), ("val", num_val)):
        images, annotations = [], []
        for image_id in range(1, count + 1):
            box = (8 + 3 * image_id, 10, 60, 58)
            name = f"{image_id:03d}{suffix}"
            _photo(root / split / name, (80, 72), image_id + 100 * (split == "val"), box)
            images.append({"id": image_id, "file_name": name, "width": 80, "height": 72})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": 1,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    return root


def test_scan_names_every_bad_file_in_one_message(tmp_path: Path) -> None:
    root = _coco_root(tmp_path, num_train=5)
    (root / "train" / "002.jpg").unlink()
    _truncate(root / "train" / "003.jpg")
    _photo(root / "train" / "004.jpg", (81, 72), 0)  # another size than the annotations say
    _photo(root / "val" / "001.png", (80, 72), 0)
    _truncate(root / "val" / "001.png")
    (root / "val" / "001.png").rename(root / "val" / "001.jpg")  # a PNG named .jpg, cut short
    # A JPEG with bytes after its end marker (some cameras write them) decodes: it must not be reported.
    with (root / "train" / "005.jpg").open("ab") as file:
        file.write(b"\x00" * 100)
    paths = DataPaths.resolve(root)
    train_set, val_set = open_split(paths, "train"), open_split(paths, "val")
    assert [bad.image_id for bad in scan_images(train_set, threads=2)] == [2, 3, 4]

    with pytest.raises(BadImageError) as caught:
        check_images([train_set, val_set, None])
    message = str(caught.value)
    assert message.startswith("4 of 7 image files cannot be used")
    assert f"{root / 'train' / '002.jpg'}: missing" in message
    assert re.search(re.escape(str(root / "train" / "003.jpg")) + r": unreadable \(OSError: image file is truncated",
                     message)
    assert f"{root / 'train' / '004.jpg'}: is 81x72 (WxH) but the annotations say 80x72" in message
    assert f"{root / 'val' / '001.jpg'}: unreadable" in message
    assert "005.jpg" not in message
    assert len(train_set) == 5  # nothing left out without skip_bad_images

    assert check_images([train_set, val_set], skip_bad_images=True) == 4
    assert train_set.ids == [1, 5] and len(val_set) == 1
    assert sorted(train_set.coco.imgs) == [1, 5]  # evaluation against coco ignores them too
    assert sorted(a["image_id"] for a in train_set.coco.anns.values()) == [1, 5]
    assert train_set.excluded_images == [str(root / "train" / f"00{i}.jpg") for i in (2, 3, 4)]
    assert train_set.skip_bad_images and val_set.skip_bad_images


def test_image_failing_after_the_scan_stops_or_is_skipped_and_counted(tmp_path: Path) -> None:
    """A file that breaks after the scan (or that the scan cannot see) fails in a DataLoader worker."""
    root = _coco_root(tmp_path, num_train=6)
    dataset = open_split(DataPaths.resolve(root), "train", make_eval_transforms())
    assert check_images([dataset]) == 0
    _truncate(root / "train" / "002.jpg")
    (root / "train" / "005.jpg").unlink()

    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_fn)
    with pytest.raises(BadImageError) as caught:
        list(loader)
    # The worker's traceback is not part of the message, which names the file.
    assert re.fullmatch(re.escape(str(root / "train" / "002.jpg")) + r": cannot decode the image \(OSError: .*\)",
                        str(caught.value))

    dataset.skip_bad_images = True
    batches = list(DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_fn))
    assert [[t["image_id"] for t in targets] for _, targets in batches] == [[1, 3], [4, 6]]
    assert dataset.skipped_images == 2  # counted in the workers, seen here
    list(DataLoader(dataset, batch_size=3, num_workers=0, collate_fn=collate_fn))
    assert dataset.skipped_images == 4


def test_train_stops_with_one_message_naming_the_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _coco_root(tmp_path / "data")
    (root / "train" / "002.jpg").unlink()
    _truncate(root / "train" / "004.jpg")
    code = main(["train", "--data-root", str(root), "--output", str(tmp_path / "run"), *TINY_FLAGS])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not re.match(r"\d\d:\d\d:\d\d ", line)]  # not the log lines
    assert lines[0] == "error: 2 of 8 image files cannot be used (fix or remove them, or give --skip-bad-images to " \
                       "leave them out):"
    assert len(lines) == 3
    assert lines[1] == f"  {root / 'train' / '002.jpg'}: missing"
    assert lines[2].startswith(f"  {root / 'train' / '004.jpg'}: unreadable (OSError: image file is truncated")
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_train_with_skip_bad_images_trains_on_the_rest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _coco_root(tmp_path / "data")
    (root / "train" / "002.jpg").unlink()
    _truncate(root / "train" / "004.jpg")
    with caplog.at_level("INFO", logger="detection_demo"):
        code = main(["train", "--data-root", str(root), "--output", str(tmp_path / "run"), "--skip-bad-images",
                     *TINY_FLAGS])
    assert code == 0
    assert "left out 2 missing or unreadable images (--skip-bad-images)" in caplog.text
    model, spec, args = load_trained_model(tmp_path / "run" / "checkpoint_last.pt")
    assert args["skip_bad_images"] is True
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["steps"][-1]["step"] == 2  # 4 good images, batch 2, one epoch
    assert history["evals"][-1]["AP"] >= 0.0


# ---------------------------------------------------------------------------------------------------------------
# Pascal VOC
# ---------------------------------------------------------------------------------------------------------------


def _voc_xml(name: str, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    parts = [f"<annotation><folder>VOC2012</folder><filename>{name}.jpg</filename><size><width>{size[0]}</width>"
             f"<height>{size[1]}</height><depth>3</depth></size><segmented>0</segmented>"]
    for label, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(f"<object><name>{label}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def _voc_root(root: Path, classes: tuple[str, str] = ("dog", "person")) -> Path:
    """A VOC root: 4 train and 2 val images; val has one difficult object and no `classes[1]` at all."""
    splits = {"train": ["2008_000001", "2008_000002", "2008_000003", "2008_000004"],
              "val": ["2008_000005", "2008_000006"]}
    size = (88, 72)
    for split, ids in splits.items():
        for k, voc_id in enumerate(ids):
            box = (9 + 3 * k, 11, 60, 62)  # VOC pixel indices, 1-based and inclusive
            _photo(root / "JPEGImages" / f"{voc_id}.jpg", size, k, (box[0] - 1, box[1] - 1, box[2], box[3]))
            objects = [(classes[0], box, 0)] if split == "val" else [(classes[k % 2], box, 0)]
            if voc_id == "2008_000006":
                objects.append((classes[0], (60, 5, 85, 30), 1))
            (root / "Annotations").mkdir(parents=True, exist_ok=True)
            (root / "Annotations" / f"{voc_id}.xml").write_text(_voc_xml(voc_id, size, objects))
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_layout_reads_as_coco_with_difficult_as_crowd(tmp_path: Path) -> None:
    root = _voc_root(tmp_path)
    paths = DataPaths.resolve(root, data_format="voc")
    assert paths.train_images == root / "JPEGImages"
    assert paths.val_annotations == root / "ImageSets" / "Main" / "val.txt"
    # A checkpoint records to_dict(); evaluate turns every value back into a Path.
    assert DataPaths(**{k: Path(v) for k, v in paths.to_dict().items()}) == paths

    train_set, val_set = open_split(paths, "train"), open_split(paths, "val")
    assert train_set.categories == ["__background__", *VOC_CLASSES]  # the names are VOC's: its 20, in its order
    assert val_set.label_to_cat_id == train_set.label_to_cat_id  # though val has no person
    _, target = train_set[0]
    assert target["boxes"].tolist() == [[8.0, 10.0, 60.0, 62.0]]  # xmin - 1, ymin - 1, xmax, ymax
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1]
    assert val_set.summary()["crowd_dropped"] == 1  # the difficult object is no training target
    _, target = val_set[1]
    assert len(target["boxes"]) == 1
    assert [image["voc_id"] for image in val_set.coco.dataset["images"]] == ["2008_000005", "2008_000006"]

    metrics = evaluate_coco(val_set.coco, _targets_as_detections(val_set))  # the difficult one not detected
    assert metrics["AP"] == pytest.approx(1.0) and metrics["VOC_AP50"] == pytest.approx(1.0)

    custom = _voc_root(tmp_path / "custom", classes=("widget", "gadget"))
    assert open_split(DataPaths.resolve(custom, data_format="voc"), "val").categories == \
        ["__background__", "gadget", "widget"]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<annotation><object><name>dog</name></object></annotation>", r"object 0 \(dog\): missing <bndbox>"),
        ("<annotation><object><bndbox/></object></annotation>", "object 0: missing <name>"),
        ("<annotation><object><name>dog</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>3</ymax>"
         "</bndbox></object></annotation>", r"object 0 \(dog\): <xmin> is not a number: 'a'"),
        ("<annotation><object><name>dog</name><difficult>2</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
         "<xmax>2</xmax><ymax>3</ymax></bndbox></object></annotation>", "<difficult> must be 0 or 1, got '2'"),
        ("<annotation>", "not valid XML"),
        ("<!DOCTYPE a [<!ENTITY b 'c'>]><annotation/>", "declares a DOCTYPE/entities"),
        ("<root/>", "expected an <annotation> root element, got <root>"),
    ],
)
def test_malformed_voc_xml_names_the_file(tmp_path: Path, xml: str, message: str) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(xml)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": .*" + message):
        read_voc_xml(path)


def test_voc_split_without_list_says_how_to_make_one(tmp_path: Path) -> None:
    root = _voc_root(tmp_path)
    (root / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val image-set list not found: .*val\.txt"):
        open_split(DataPaths.resolve(root, data_format="voc"), "val")


# ---------------------------------------------------------------------------------------------------------------
# VOC AP
# ---------------------------------------------------------------------------------------------------------------


def test_voc_ap_of_a_hand_computed_ranking() -> None:
    # 3 objects; detections by falling score: hit, miss, hit, miss.
    recall = [1 / 3, 1 / 3, 2 / 3, 2 / 3]
    precision = [1.0, 1 / 2, 2 / 3, 2 / 4]
    # Area under the envelope: precision 1 up to recall 1/3, then 2/3 up to 2/3, then nothing: 1/3 + 2/9.
    assert voc_ap(recall, precision) == pytest.approx(5 / 9)
    # 11 points: 1 at recall 0-0.3 (4 points), 2/3 at 0.4-0.6 (3 points), 0 at 0.7-1.0: (4 + 2) / 11.
    assert voc_ap(recall, precision, eleven_point=True) == pytest.approx(6 / 11)
    assert voc_ap([0.5, 1.0], [1.0, 1.0]) == pytest.approx(1.0)
    assert voc_ap([], []) == 0.0
    with pytest.raises(ValueError, match="recall and precision must be 1-D of one length"):
        voc_ap([0.5], [1.0, 0.5])


def test_evaluate_voc_ignores_difficult_and_counts_duplicates() -> None:
    boxes = [[0, 0, 10, 10], [20, 20, 10, 10], [40, 40, 10, 10], [60, 60, 10, 10]]
    truth = {
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": box, "iscrowd": int(k == 3)}
                        for k, box in enumerate(boxes)],
    }

    def detection(box: list[float], score: float) -> dict[str, Any]:
        return {"image_id": 1, "category_id": 1, "bbox": box, "score": score}

    detections = [
        detection([0, 0, 10, 10], 0.9),  # hit
        detection([1, 0, 10, 10], 0.8),  # the same object again: a false positive
        detection([60, 60, 10, 10], 0.75),  # the difficult object: ignored
        detection([20, 20, 10, 10], 0.7),  # hit
        detection([90, 90, 5, 5], 0.6),  # nothing there: false positive
        detection([44, 40, 10, 10], 0.5),  # IoU 6 x 10 / 140 = 0.43 < 0.5 with the third: false positive
    ]
    # Ranked hits: 1, 0, 1, 0, 0 over 3 objects -> recall 1/3, 1/3, 2/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2, 2/5.
    result = evaluate_voc(truth, detections)
    assert result["per_category"] == {"a": pytest.approx(5 / 9), "b": -1.0}
    assert result["mAP"] == pytest.approx(5 / 9)
    assert evaluate_voc(truth, [])["per_category"]["a"] == 0.0


def test_voc_dataset_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _voc_root(tmp_path / "voc")
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(root), "--data-format", "voc", "--output", str(run), *TINY_FLAGS]) == 0
    metrics_path = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoint_last.pt"), "--output", str(metrics_path),
                 "--no-progress"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["annotation_file"] == str(root / "ImageSets" / "Main" / "val.txt")
    assert 0.0 <= metrics["AP"] <= 1.0 and 0.0 <= metrics["VOC_AP50"] <= 1.0
    assert set(metrics["per_category"]) == set(VOC_CLASSES)
    # The same split named on the command line gives the same numbers.
    again = tmp_path / "again.json"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoint_last.pt"), "--data-root", str(root),
                 "--data-format", "voc", "--output", str(again), "--no-progress"]) == 0
    assert json.loads(again.read_text())["VOC_AP50"] == metrics["VOC_AP50"]
    capsys.readouterr()


def test_labelme_coco_trains_and_evaluates(tmp_path: Path) -> None:
    data = tmp_path / "labelme"
    data.mkdir()
    path = _labelme_coco(data, num_images=4)
    run = tmp_path / "run"
    common = ["--train-images", str(data), "--train-annotations", str(path), "--val-images", str(data),
              "--val-annotations", str(path)]
    assert main(["train", *common, "--output", str(run), *TINY_FLAGS]) == 0
    model, spec, _ = load_trained_model(run / "checkpoint_last.pt")
    assert spec.categories == ["__background__", "car", "person"]
    metrics_path = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoint_last.pt"), "--output", str(metrics_path),
                 "--no-progress"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert set(metrics["per_category"]) == {"car", "person"} and 0.0 <= metrics["AP"] <= 1.0
    # Detections carry the file's image and category ids (image 0 included).
    dataset = CocoDetectionDataset(data, path, make_eval_transforms())
    detections = detect_dataset(model, dataset, spec.label_to_cat_id, progress=False)
    assert {d["image_id"] for d in detections} <= {0, 1, 2, 3}
    assert {d["category_id"] for d in detections} <= {1, 2}
    assert 0 in {d["image_id"] for d in detections}


def test_skipping_every_image_of_a_split_is_an_error(tmp_path: Path) -> None:
    root = _coco_root(tmp_path, num_train=2, num_val=1)
    (root / "val" / "001.jpg").unlink()
    paths = DataPaths.resolve(root)
    with pytest.raises(BadImageError, match=r"instances_val\.json: none of its 1 images can be used, e.g. .*001\.jpg: "
                                            "missing"):
        check_images([open_split(paths, "train"), open_split(paths, "val")], skip_bad_images=True)


def test_train_counts_images_that_fail_after_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files that break after the scan are skipped with --skip-bad-images and counted in history.json."""
    import detection_demo.train as train_module

    root = _coco_root(tmp_path / "data")
    monkeypatch.setattr(train_module, "check_images", lambda *args, **kwargs: 0)  # as if they broke after it
    (root / "train" / "002.jpg").unlink()
    _truncate(root / "train" / "004.jpg")
    # Batches of 2: a batch left with one image (SSDLite's BatchNorm cannot train on it) skips its update.
    code = main(["train", "--data-root", str(root), "--output", str(tmp_path / "run"), "--skip-bad-images",
                 *TINY_FLAGS, "--epochs", "2"])
    assert code == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["epochs"][-1]["skipped_images"] == 4  # two files, two epochs
    assert history["epochs"][-1]["step"] == 2 * 3  # 6 images, batch 2: every planned step counted
