"""Fine-tuning an imported TF Object Detection API model in the demo: `train --init-from` / `TrainConfig(init_from=)`.

The OD-API fixtures (tests/fixtures/odapi/, written by real TensorFlow; 128 px, depth multiplier 0.25, 3 or 4
classes) are fine-tuned on the demo's synthetic shapes (5 categories, 128 px): the class head is new, the feature
extractor and box head are the import's; the detector trains with its own OD-API loss, is evaluated with COCOeval,
drawn, checkpointed, resumed and rebuilt from `model.safetensors` without the TF files.
"""

from __future__ import annotations

import math
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection_demo import checkpoint as checkpoint_io
from detection_demo.__main__ import main
from detection_demo.data import COCO_STAT_NAMES
from detection_demo.evaluate import evaluate_checkpoint
from detection_demo.models import build_model, load_trained_model, odapi_model_spec
from detection_demo.predict import predict_images
from detection_demo.synthetic import CATEGORIES
from detection_demo.train import TrainConfig, train
from mnv1_backbone.detection import from_tf_object_detection
from mnv1_backbone.detection.odapi import ODAPISSDDetector

FIXTURES = Path(__file__).parent / "fixtures" / "odapi"
SSD = FIXTURES / "ssd_k1_sigmoid"  # 4 classes, sigmoid, weighted sigmoid loss with hard example mining
FPN = FIXTURES / "fpn_shared"  # 3 classes, sigmoid focal loss
# Images at the fixtures' 128 px (the detector's own resize is then the identity), one thread, no augmentation so
# that an epoch's loss is comparable with the next one's.
TINY = {"image_size": 128, "batch_size": 4, "workers": 0, "progress": False, "threads": 1, "augment": False,
        "warmup_epochs": 0.0, "lr": 1e-3, "model_kwargs": {"score_thresh": 0.01}}
CATEGORY_NAMES = ["__background__", *CATEGORIES]
PHOTO = Path(__file__).parent / "data" / "coffee.png"


def _import(path: Path) -> ODAPISSDDetector:
    return from_tf_object_detection(path)


def _class_head(key: str) -> bool:
    return ".cls." in key or "class" in key.lower()


def test_new_class_head_keeps_feature_extractor_and_box_head() -> None:
    imported = _import(SSD).network.state_dict()
    torch.manual_seed(0)
    spec = odapi_model_spec(str(SSD), CATEGORY_NAMES, {i: i for i in range(1, 6)})
    assert spec.builder == "odapi" and spec.kwargs["pipeline"]["num_classes"] == 5
    model = build_model(spec)
    assert isinstance(model, ODAPISSDDetector) and model.num_classes == 5
    tuned = model.network.state_dict()
    assert set(tuned) == set(imported)
    changed = sorted(k for k in tuned if tuned[k].shape != imported[k].shape or not torch.equal(tuned[k], imported[k]))
    # Only the class head differs: 6 outputs (5 classes + background) per anchor instead of 5.
    assert changed and all(".cls." in k for k in changed), changed
    weight = next(k for k in changed if k.endswith("weight"))
    assert tuned[weight].shape[0] // 6 == imported[weight].shape[0] // 5
    box_keys = [k for k in tuned if ".box." in k]
    assert box_keys and all(torch.equal(tuned[k], imported[k]) for k in box_keys)


def test_same_number_of_classes_keeps_every_weight() -> None:
    imported = _import(SSD)
    spec = odapi_model_spec(str(SSD), ["__background__", "a", "b", "c", "d"], {1: 1, 2: 2, 3: 3, 4: 4})
    model = build_model(spec)
    a, b = imported.network.state_dict(), model.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The post-processing override is in the spec's config, and a rebuild without the TF files has it too.
    assert model.config.post_processing == imported.config.post_processing
    rebuilt = build_model(spec.for_inference())
    assert "init_from" not in spec.for_inference().kwargs and rebuilt.config == model.config


def test_spec_and_builder_read_the_tf_files_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec reads the model for its config and labels, the builder for its weights: one read of the TF files;
    and the builder's copy is not the spec's (fitting its class head leaves the cached read as it was)."""
    from detection_demo import models

    reads = []

    def counting(*args, **kwargs):
        reads.append(args[0])
        return from_tf_object_detection(*args, **kwargs)

    monkeypatch.setattr(models.detection, "from_tf_object_detection", counting)
    monkeypatch.setattr(models, "_last_tf_read", None)
    spec = odapi_model_spec(str(SSD), CATEGORY_NAMES, {i: i for i in range(1, 6)})
    first, second = build_model(spec), build_model(spec)
    assert reads == [SSD]
    assert first.network is not second.network and first.num_classes == second.num_classes == 5
    assert models._last_tf_read[1].num_classes == 4  # the read itself, untouched by the class head


@pytest.mark.parametrize("folder", [SSD, FPN], ids=["ssd", "fpn"])
def test_categories_named_like_imported_classes_keep_their_scores(folder: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for file in folder.iterdir():
        if file.name != "reference.npz":
            shutil.copy(file, model_dir)
    names = ["cat", "cup", "saucer", "spoon"]
    (model_dir / "label_map.pbtxt").write_text("".join(f'item {{ id: {i} name: "{name}" }}\n'
                                                        for i, name in enumerate(names, 1)))
    imported = from_tf_object_detection(model_dir)
    # Category 2 is the model's class 3, category 3 its class 1 (names match case-insensitively); "zebra" is new.
    categories = ["__background__", "zebra", "Saucer", "cat"]
    torch.manual_seed(0)
    spec = odapi_model_spec(str(model_dir), categories, {1: 11, 2: 12, 3: 13})
    assert spec.kwargs["class_map"] == {"2": 3, "3": 1}
    model = build_model(spec).eval()
    image = torch.from_numpy(np.array(Image.open(PHOTO).convert("RGB"))).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        old_codes, old_logits = imported.predict_raw([image])
        codes, logits = model.predict_raw([image])
    assert logits.shape[-1] == 4 and torch.equal(codes, old_codes)
    # Same logits as the import for the background and the two known classes, at every anchor.
    assert torch.equal(logits[..., [0, 2, 3]], old_logits[..., [0, 3, 1]])
    assert not torch.allclose(logits[..., 1], old_logits[..., 2], atol=1e-3)  # zebra starts from a new head


def test_an_image_size_other_than_the_model_input_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="detection_demo"):
        odapi_model_spec(str(SSD), CATEGORY_NAMES, {}, image_size=128)
        assert not caplog.records
        odapi_model_spec(str(SSD), CATEGORY_NAMES, {}, image_size=256)
    assert "its 128x128 input; --image-size 128 resizes once" in caplog.text


def test_bad_settings_are_refused(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give init_from"):
        TrainConfig(model="odapi").validate()
    with pytest.raises(ValueError, match="cannot initialise 'fcos'"):
        TrainConfig(model="fcos", init_from=str(SSD)).validate()
    with pytest.raises(ValueError, match=r"\['box_score_thresh'\] do not apply"):
        odapi_model_spec(str(SSD), CATEGORY_NAMES, {}, {"box_score_thresh": 0.1})
    with pytest.raises(ValueError, match="depth_multiplier 1 differs from the imported model's 0.25"):
        train(TrainConfig(**TINY, data_root=str(data_root), output=str(tmp_path), init_from=str(SSD),
                          depth_multiplier=1.0, epochs=1, eval_interval=0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(TrainConfig(**TINY, data_root=str(data_root), output=str(tmp_path), init_from=str(tmp_path / "no"),
                          epochs=1, eval_interval=0))


@pytest.mark.slow  # ~10 s alone (training, COCOeval, pictures); more on a loaded machine
def test_fine_tuning_lowers_the_loss_then_evaluate_and_predict(data_root: Path, tmp_path: Path) -> None:
    result = train(TrainConfig(**TINY, data_root=str(data_root), output=str(tmp_path / "run"), init_from=str(SSD),
                               epochs=8, eval_interval=8))
    epochs = [record["loss"] for record in result.history["epochs"]]
    assert all(math.isfinite(loss) for loss in epochs)
    assert epochs[-1] < 0.8 * epochs[0], epochs
    assert set(COCO_STAT_NAMES) <= set(result.final_metrics)
    # evaluate and predict rebuild the detector from model.safetensors alone (no TF file) and find the same numbers.
    model, spec, _ = load_trained_model(result.weights)
    assert isinstance(model, ODAPISSDDetector) and spec.builder == "odapi" and model.num_classes == len(CATEGORIES)
    metrics, path = evaluate_checkpoint(result.weights, data_paths=_paths(data_root),
                                        batch_size=16, progress=False)
    assert path.is_file()
    assert {name: metrics[name] for name in COCO_STAT_NAMES} == {name: result.final_metrics[name]
                                                                 for name in COCO_STAT_NAMES}
    pictures = predict_images(result.weights, [data_root / "val"], tmp_path / "pictures", score_threshold=0.01)
    assert len(pictures) == 4 and all(p.stat().st_size > 0 for p in pictures)


def _paths(data_root: Path):
    from detection_demo.datasets import DataPaths

    return DataPaths.resolve(str(data_root), None, None, None, None)


def test_cli_init_from_tarball_and_resume_auto(data_root: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    archive = tmp_path / "ssd_mobilenet_v1_shapes_2019_01_01.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for file in sorted(SSD.iterdir()):
            if file.name != "reference.npz":
                tar.add(file, arcname=f"ssd_mobilenet_v1_shapes_2019_01_01/{file.name}")
    flags = ["--data-root", str(data_root), "--init-from", str(archive), "--image-size", "128", "--batch-size", "4",
             "--workers", "0", "--no-progress", "--threads", "1", "--no-augment", "--warmup-epochs", "0",
             "--epochs", "2", "--eval-interval", "0"]
    assert main(["train", *flags, "--output", str(tmp_path / "whole")]) == 0
    assert main(["train", *flags, "--output", str(tmp_path / "cut"), "--stop-after-epoch", "1"]) == 0
    archive.rename(tmp_path / "moved.tar.gz")  # a resumed run takes every weight from its checkpoint
    assert main(["train", *flags, "--output", str(tmp_path / "cut"), "--resume", "auto"]) == 0
    whole = checkpoint_io.load_checkpoint(tmp_path / "whole" / "checkpoint_last.pt")
    cut = checkpoint_io.load_checkpoint(tmp_path / "cut" / "checkpoint_last.pt")
    assert whole["model_spec"]["builder"] == "odapi" and whole["args"]["model"] == "odapi"
    assert cut["epoch"] == 2 and cut["global_step"] == whole["global_step"]
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    captured = capsys.readouterr().out
    assert "weights:" in captured


def test_fpn_import_trains_with_focal_loss(data_root: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = train(TrainConfig(**{**TINY, "batch_size": 8}, data_root=str(data_root), output=str(tmp_path),
                                   init_from=str(FPN), epochs=1, eval_interval=1))
    assert result.global_step == 1 and math.isfinite(result.history["steps"][0]["loss"])
    model, spec, _ = load_trained_model(result.weights)
    assert model.config.is_fpn and model.config.loss.classification == "weighted_sigmoid_focal"
    assert set(COCO_STAT_NAMES) <= set(result.final_metrics)
