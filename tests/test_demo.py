"""Tests for the detection demo's commands: train -> checkpoint -> resume -> evaluate -> predict, end to end.

Everything runs on a tiny synthetic dataset (8 train / 4 val images of 128 px, resized to 64 px by the models)
with a 0.25-wide backbone trained from scratch, so the numbers are meaningless; what is checked is the plumbing:
files, counters, exact resumption, the label mapping, the exported weights and the stop on a non-finite loss.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from detection_demo import checkpoint as checkpoint_io
from detection_demo.__main__ import main
from detection_demo.data import COCO_STAT_NAMES
from detection_demo.datasets import DataPaths
from detection_demo.models import ModelSpec, build_model, load_trained_model, resolve_backbone_weights
from detection_demo.synthetic import CATEGORIES
from detection_demo.train import NonFiniteLossError, TrainConfig, train, warmup_cosine
from mnv1_backbone.detection import ssdlite_mobilenet_v1

REPO = Path(__file__).resolve().parents[1]
# One torch thread: tiny tensors gain nothing from two, and on a busy machine threads waiting for each other burn CPU.
TINY = {"image_size": 64, "depth_multiplier": 0.25, "batch_size": 4, "workers": 0, "progress": False,
        "warmup_epochs": 0.5, "threads": 1}
TINY_FLAGS = ["--image-size", "64", "--depth-multiplier", "0.25", "--batch-size", "4", "--workers", "0",
              "--no-progress", "--warmup-epochs", "0.5", "--threads", "1"]


@pytest.fixture(scope="module")
def cli_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`python -m detection_demo train` in a subprocess, stopped after epoch 1 of 2 (as if interrupted)."""
    output = tmp_path_factory.mktemp("run")
    command = [sys.executable, "-m", "detection_demo", "train", "--data-root", str(data_root), "--output",
               str(output), "--epochs", "2", "--eval-interval", "1", "--stop-after-epoch", "1", *TINY_FLAGS]
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    first = checkpoint_io.load_checkpoint(output / "checkpoint_last.pt")
    return {"output": output, "stdout": process.stdout, "first": first}


@pytest.mark.slow
def test_cli_train_writes_a_complete_checkpoint(cli_run: dict[str, Any], data_root: Path) -> None:
    output, first = cli_run["output"], cli_run["first"]
    assert "not finished:   continue with --resume" in cli_run["stdout"]
    assert not (output / "model.safetensors").exists()  # only a finished run exports
    steps_per_epoch = 8 // 4
    assert first["epoch"] == 1 and first["global_step"] == steps_per_epoch
    assert first["args"]["data_paths"]["train_images"] == str(data_root / "train")
    assert set(first["rng"]) >= {"python", "numpy", "torch"}
    assert first["optimizer"]["state"]  # AdamW moments exist after a step
    spec = ModelSpec.from_dict(first["model_spec"])
    assert spec.builder == "ssdlite"
    assert spec.categories == ["__background__", *CATEGORIES]
    assert spec.label_to_cat_id == {i + 1: i + 1 for i in range(len(CATEGORIES))}
    assert spec.kwargs["size"] == 64 and spec.kwargs["depth_multiplier"] == 0.25
    assert "weights_backbone" not in spec.kwargs  # width 0.25 has no pretrained weights: random init
    history = json.loads((output / "history.json").read_text())
    assert [e["epoch"] for e in history["evals"]] == [1]
    assert (output / "training_curves.png").stat().st_size > 0
    assert not list(output.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.slow
def test_cli_resume_evaluate_predict(cli_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output, first = cli_run["output"], cli_run["first"]
    assert main(["train", "--data-root", "ignored-on-resume", "--output", str(output), "--resume", "auto",
                 "--no-progress", "--workers", "0"]) == 0
    last = checkpoint_io.load_checkpoint(output / "checkpoint_last.pt")
    # It continued from epoch 1: two more steps, not four from scratch, with epoch 1's history kept.
    assert last["epoch"] == 2 and last["global_step"] == 2 * first["global_step"]
    assert [s["step"] for s in last["history"]["steps"]] == [1, 2, 3, 4]
    assert last["history"]["steps"][:2] == first["history"]["steps"]
    assert [e["epoch"] for e in last["history"]["evals"]] == [1, 2]
    # The optimizer continued too: AdamW's step count is the total, not the steps of this run.
    assert all(float(state["step"]) == 4 for state in last["optimizer"]["state"].values())
    assert last["scheduler"]["last_epoch"] == 4
    assert (output / "model.safetensors").is_file()

    json_path = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(output / "checkpoint_last.pt"), "--output", str(json_path),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(json_path.read_text())
    assert all(isinstance(metrics[name], float) for name in COCO_STAT_NAMES)
    assert set(metrics["per_category"]) == set(CATEGORIES)
    assert "(AP50)" in printed and "circle" in printed
    # The same numbers as the training loop's last evaluation: the checkpoint alone rebuilds the model.
    assert metrics["AP"] == pytest.approx(last["history"]["evals"][-1]["AP"])

    pictures = tmp_path / "pictures"
    val_images = sorted(Path(last["args"]["data_paths"]["val_images"]).glob("*.jpg"))[:2]
    assert main(["predict", *map(str, val_images), "--checkpoint", str(output / "model.safetensors"),
                 "--out", str(pictures), "--score-threshold", "0.0"]) == 0
    written = sorted(pictures.glob("*.png"))
    assert [p.stem for p in written] == [p.stem for p in val_images]
    with Image.open(written[0]) as image:
        assert image.size == (128, 128)
    drawn = json.loads((pictures / "predictions.json").read_text())
    assert all(d["category"] in CATEGORIES for found in drawn.values() for d in found)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(data_root: Path, tmp_path: Path) -> None:
    settings = {**TINY, "data_root": str(data_root), "epochs": 2, "eval_interval": 0, "zoom_out": 2.0}
    straight = train(TrainConfig(**settings, output=str(tmp_path / "straight")))
    stopped = train(TrainConfig(**settings, output=str(tmp_path / "split"), stop_after_epoch=1))
    assert not stopped.completed and stopped.epoch == 1 and stopped.weights is None
    resumed = train(TrainConfig(**settings, output=str(tmp_path / "split"), resume="auto"))
    assert resumed.completed and resumed.epoch == 2 and resumed.global_step == straight.global_step

    a = checkpoint_io.load_checkpoint(straight.checkpoint)
    b = checkpoint_io.load_checkpoint(resumed.checkpoint)
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=0, atol=0, msg=key)
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][index][name], value, rtol=0, atol=0)
    assert [s["loss"] for s in a["history"]["steps"]] == [s["loss"] for s in b["history"]["steps"]]

    # The exported weights load into the builder itself through `weights=`.
    model = ssdlite_mobilenet_v1(size=64, num_classes=len(CATEGORIES) + 1, depth_multiplier=0.25,
                                 weights=straight.weights)
    for key, tensor in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(tensor, a["model"][key], rtol=0, atol=0)


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_message(data_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    from detection_demo import train as train_module

    def poisoned_build(spec: ModelSpec) -> torch.nn.Module:
        model = build_model(spec)
        calls = {"n": 0}

        def nan_on_third_step(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if module.training:
                calls["n"] += 1
                if calls["n"] == 3:
                    return {**output, "classification": output["classification"] * math.nan}
            return output

        model.register_forward_hook(nan_on_third_step)
        return model

    monkeypatch.setattr(train_module, "build_model", poisoned_build)
    output = tmp_path / "nan"
    code = main(["train", "--data-root", str(data_root), "--output", str(output), "--epochs", "2",
                 "--eval-interval", "0", *TINY_FLAGS])
    assert code == 1
    message = capsys.readouterr().err
    assert "non-finite loss nan at step 3 (epoch 2" in message
    assert "classification=nan" in message
    # The checkpoint of epoch 1 is intact, nothing was exported.
    assert checkpoint_io.load_checkpoint(output / "checkpoint_last.pt")["global_step"] == 2
    assert not (output / "model.safetensors").exists()

    # The Python API raises; with batch 2 there are 4 steps per epoch, so step 3 is in epoch 1.
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 3 \(epoch 1"):
        train(TrainConfig(**{**TINY, "batch_size": 2}, data_root=str(data_root), output=str(tmp_path / "nan2"),
                          epochs=1, eval_interval=0))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["fasterrcnn", "retinanet", "fcos", "maskrcnn"])
def test_every_builder_trains_and_evaluates(model: str, data_root: Path, tmp_path: Path) -> None:
    # Fewer RoIs and detections than torchvision's defaults: the box head's FC and the mask pasting dominate CPU time.
    extra = {"rpn_post_nms_top_n_train": 200, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 32,
             "box_detections_per_img": 20} if model in ("fasterrcnn", "maskrcnn") else {"detections_per_img": 20}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # One step of 8 images at 64 px: the FPN heads (four 256-channel 3x3 convs per level) dominate CPU time.
        result = train(TrainConfig(**{**TINY, "batch_size": 8}, model=model, data_root=str(data_root),
                                   output=str(tmp_path), epochs=1, eval_interval=1, model_kwargs=extra))
    assert result.global_step == 1 and math.isfinite(result.history["steps"][0]["loss"])
    assert set(result.final_metrics) >= set(COCO_STAT_NAMES)
    rebuilt, spec, _ = load_trained_model(result.weights)
    assert spec.builder == model and spec.kwargs["min_size"] == 64
    assert type(rebuilt).__name__.lower().startswith(model[:4])


def test_warmup_cosine_schedule() -> None:
    factor = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert factor(0) == pytest.approx(0.001)
    assert factor(5) == pytest.approx(0.001 + 0.999 * 0.5)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 120))


def test_data_paths_from_root_or_coco_layout(tmp_path: Path) -> None:
    paths = DataPaths.resolve(tmp_path)
    assert paths.split("val") == (tmp_path / "val", tmp_path / "annotations" / "instances_val.json")
    coco = DataPaths.resolve(None, "c/train2017", "c/a/instances_train2017.json", "c/val2017",
                             "c/a/instances_val2017.json")
    assert coco.val_images == Path("c/val2017")
    with pytest.raises(ValueError, match="--val-images, --val-annotations must be given"):
        DataPaths.resolve(None, "c/train2017", "c/a/instances_train2017.json")


def test_backbone_weights_choice(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_backbone_weights("none", None) is None
    with caplog.at_level(logging.WARNING):
        assert resolve_backbone_weights("auto", 0.5) is None
    assert "no pretrained backbone of width 0.5" in caplog.text
    with pytest.raises(FileNotFoundError, match="does-not-exist.pb"):
        resolve_backbone_weights("does-not-exist.pb", None)
    found = resolve_backbone_weights("auto", None)
    if found is not None:  # the `nudity` package is installed: Google's frozen graph
        assert found.name == "retrained_graph.pb" and found.is_file()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "yolo"}, "model must be one of"),
        ({"epochs": 0}, "epochs must be an int >= 1, got 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ({"zoom_out": 0.5}, "zoom_out out of range: 0.5"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
    ],
)
def test_train_config_rejects_bad_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes).validate()


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path)]) == 1
    assert "--data-root" in capsys.readouterr().err


def test_checkpoint_loading_refuses_code_and_the_legacy_format(tmp_path: Path) -> None:
    """Demo checkpoints are read like weights files: weights-only pickles in torch's zip format, clear errors."""

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    hostile = tmp_path / "hostile.pt"
    torch.save({"model": Payload()}, hostile)
    with pytest.raises(ValueError, match="hostile.pt is not a readable checkpoint: .*its pickle was refused") as info:
        checkpoint_io.load_checkpoint(hostile)
    assert "weights_only=False" not in str(info.value)  # torch's advice would run the code
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy.pt is not a readable checkpoint: .*not in torch's zip format"):
        checkpoint_io.load_checkpoint(legacy)
