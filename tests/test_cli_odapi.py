"""`mnv1 detect --weights` and `mnv1 convert` with TF Object Detection API models (the OD-API fixtures of
tests/fixtures/odapi/, written by real TensorFlow; packed into a model-zoo-style .tar.gz here): boxes drawn on real
photos with the label map's names, the printed detections, and the convert round trip."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from mnv1_backbone.cli import main
from mnv1_backbone.detection import from_tf_object_detection
from mnv1_backbone.detection.odapi import ODAPISSDDetector

FIXTURES = Path(__file__).parent / "fixtures" / "odapi"
SSD = FIXTURES / "ssd_k1_sigmoid"  # 4 classes, 128 px, score_threshold 0.35 in its pipeline.config
PHOTOS = [Path(__file__).parent / "data" / "chelsea.png", Path(__file__).parent / "data" / "coffee.png"]
NAMES = {1: "cat", 2: "cup", 3: "saucer", 4: "spoon"}
MODEL_NAME = "ssd_mobilenet_v1_tiny_2019_01_28"


def _label_map_text() -> str:
    return "".join(f'item {{\n  id: {i}\n  name: "/m/{i:04d}"\n  display_name: "{name}"\n}}\n'
                   for i, name in NAMES.items())


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model-zoo-style archive: <name>/pipeline.config, model.ckpt.*, frozen_inference_graph.pb, a label map."""
    root = tmp_path_factory.mktemp("zoo")
    folder = root / MODEL_NAME
    folder.mkdir()
    for file in SSD.iterdir():
        if file.name != "reference.npz":
            shutil.copy(file, folder / file.name)
    (folder / "tiny_label_map.pbtxt").write_text(_label_map_text())
    archive = root / f"{MODEL_NAME}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=MODEL_NAME)
    return archive


def _expected(score_thresh: float) -> list[dict]:
    """The Python API's detections of the fixture on the photos, at that threshold."""
    model = from_tf_object_detection(SSD, score_thresh=score_thresh)
    with torch.no_grad():
        return [model([pil_to_tensor(Image.open(p).convert("RGB")).float() / 255])[0] for p in PHOTOS]


def test_detect_draws_labelled_boxes_and_prints_them(tarball: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pictures"
    assert main(["detect", "--weights", str(tarball), *map(str, PHOTOS), "--out", str(out),
                 "--score-thresh", "0.4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "predictions.json").read_text())
    expected = _expected(0.4)
    total = 0
    for photo, want in zip(PHOTOS, expected, strict=True):
        found = report[str(photo)]
        assert len(found) == len(want["boxes"]) > 0
        total += len(found)
        assert [d["category"] for d in found] == [NAMES[int(label)] for label in want["labels"]]
        assert np.allclose([d["box_xyxy"] for d in found], want["boxes"].numpy(), atol=0.06)
        assert np.allclose([d["score"] for d in found], want["scores"].numpy(), atol=6e-5)
        assert f"{photo}: {len(found)} detections >= 0.4 -> {out / (photo.stem + '.png')}" in printed
        first = found[0]
        assert f"  {first['category']:<20} {first['score']:.3f}  [" in printed

        source = np.asarray(Image.open(photo).convert("RGB"))
        drawn = np.asarray(Image.open(out / f"{photo.stem}.png").convert("RGB"))
        assert drawn.shape == source.shape
        changed = (drawn != source).any(-1)
        # Every box's bottom edge is drawn (the caption sits at the top left, inside the box).
        for x1, _, x2, y2 in (np.array(d["box_xyxy"]) for d in found):
            row = min(int(round(y2)), source.shape[0] - 1)
            assert changed[max(row - 1, 0) : row + 2, int(x1) + 2 : int(x2) - 1].any(axis=0).mean() > 0.9
        # Nothing is drawn away from the boxes (and their captions, at most 16 font sizes wide to the right).
        touched = np.zeros_like(changed)
        side = min(source.shape[:2])
        margin, caption = max(1, round(side / 160)) + 1, 16 * max(9, round(side / 24))
        for x1, y1, x2, y2 in (np.array(d["box_xyxy"]) for d in found):
            touched[max(int(y1) - margin, 0) : int(y2) + margin + 1,
                    max(int(x1) - margin, 0) : max(int(x2), int(x1) + caption) + margin + 1] = True
        assert changed.any() and not changed[~touched].any()
    assert f"wrote 2 images and {out / 'predictions.json'}" in printed
    assert total > 2


def test_detect_accepts_a_folder_a_graph_and_a_converted_model(tarball: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", str(tarball), str(tmp_path / "converted")]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == ["config.json", "model.safetensors"]
    assert "OD-API ssd_mobilenet_v1, depth multiplier 0.25, 128x128, 4 classes" in printed
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    folder = tmp_path / "extracted" / MODEL_NAME
    reports = {}
    for name, weights in (("tar", tarball), ("folder", folder), ("graph", folder / "frozen_inference_graph.pb"),
                          ("converted", tmp_path / "converted")):
        out = tmp_path / name
        assert main(["detect", "--weights", str(weights), str(PHOTOS[1]), "--out", str(out), "--json"]) == 0
        reports[name] = json.loads(capsys.readouterr().out)
        assert reports[name] == json.loads((out / "predictions.json").read_text())
    found = reports["tar"][str(PHOTOS[1])]
    assert found and {d["category"] for d in found} <= set(NAMES.values())  # the label map beside the model
    assert reports["folder"] == reports["tar"] == reports["converted"]
    graph = reports["graph"][str(PHOTOS[1])]
    assert [d["category"] for d in graph] == [d["category"] for d in found]
    assert np.allclose([d["box_xyxy"] for d in graph], [d["box_xyxy"] for d in found], atol=0.11)


def test_convert_round_trip_gives_the_tf_load_detections(tarball: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", str(tarball), str(tmp_path / "converted")]) == 0
    capsys.readouterr()
    converted = ODAPISSDDetector.from_pretrained(tmp_path / "converted")  # config.json + model.safetensors only
    original = from_tf_object_detection(tarball)
    assert converted.id2label == NAMES == original.id2label
    assert converted.config == original.config and not converted.legacy_anchor_order
    for photo in PHOTOS:
        image = pil_to_tensor(Image.open(photo).convert("RGB")).float() / 255
        with torch.no_grad():
            a, b = converted([image])[0], original([image])[0]
        assert len(a["boxes"]) and all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    # The anchor order is part of the conversion.
    assert main(["convert", str(SSD), str(tmp_path / "legacy"), "--legacy-anchor-order"]) == 0
    assert json.loads((tmp_path / "legacy" / "config.json").read_text())["legacy_anchor_order"] is True
    assert main(["detect", "--weights", str(tmp_path / "converted"), str(PHOTOS[0]), "--out", str(tmp_path / "o"),
                 "--legacy-anchor-order"]) == 1
    assert "converted without --legacy-anchor-order" in capsys.readouterr().err


def test_convert_recognises_a_bare_od_api_graph_and_not_a_classifier_graph(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from mnv1_backbone.cli._odapi import is_odapi_model

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(SSD / "frozen_inference_graph.pb", bare)  # without its pipeline.config: read from the graph
    assert is_odapi_model(bare / "frozen_inference_graph.pb")
    classifier_graph = Path(__file__).parent / "fixtures" / "tf_slim" / "mobilenet_v1_0.125_128_quant_frozen.pb"
    assert classifier_graph.is_file() and not is_odapi_model(classifier_graph)
    assert main(["convert", str(bare / "frozen_inference_graph.pb"), str(tmp_path / "converted")]) == 0
    assert "4 classes, 330 anchors" in capsys.readouterr().out
    assert ODAPISSDDetector.from_pretrained(tmp_path / "converted").anchors.shape == (330, 4)


def test_detect_and_convert_errors_are_one_line(tarball: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    truncated = tmp_path / f"{MODEL_NAME}.tar.gz"
    truncated.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    assert main(["detect", "--weights", str(truncated), str(PHOTOS[0]), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt or truncated" in err and str(truncated) in err
    assert main(["detect", "--weights", str(tmp_path / "missing"), str(PHOTOS[0]), "--out", str(tmp_path / "o")]) == 1
    assert "weights not found" in capsys.readouterr().err
    assert main(["detect", "--checkpoint", str(tarball), str(PHOTOS[0]), "--out", str(tmp_path / "o"),
                 "--legacy-anchor-order"]) == 1
    assert "are for OD-API models (--weights)" in capsys.readouterr().err
    empty = tmp_path / "empty"
    assert main(["detect", "--weights", str(tarball), str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o")]) == 1
    assert f"no such image or folder: {tmp_path / 'nope.jpg'}" in capsys.readouterr().err
    empty.mkdir()
    assert main(["detect", "--weights", str(tarball), str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "no images found in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", str(PHOTOS[0]), "--out", str(tmp_path / "o")])  # neither --weights nor --checkpoint
    assert exit_info.value.code == 2
    assert "--weights" in capsys.readouterr().err
