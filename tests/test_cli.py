"""The `mnv1` command line, through its real entry points.

Most tests call `mnv1_backbone.cli.main([...])` in-process (starting Python with torch costs seconds); a few
run `python -m mnv1_backbone` and the installed `mnv1` script as subprocesses, to test the entry points, the
exit codes and stderr as a user sees them. Models are tiny (width 0.25, 64x64 inputs), except where Google's
real weights show that classification is right.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import randomize
from PIL import Image
from safetensors import safe_open

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1Config, MobileNetV1ForImageClassification, cli
from mnv1_backbone.image_processing import MobileNetV1ImageProcessor
from mnv1_backbone.pretrained import find_bundled_frozen_graph

ROOT = Path(__file__).parent.parent
DATA = ROOT / "tests" / "data"
CHELSEA, COFFEE = DATA / "chelsea.png", DATA / "coffee.png"
TF_CHECKPOINT = ROOT / "tests" / "fixtures" / "tf_slim" / "mobilenet_v1_0.25_128.ckpt"
CAT_CLASSES = range(282, 287)  # tabby, tiger cat, Persian, Siamese, Egyptian cat (1001-way indices)
ESPRESSO = 968

needs_real_weights = pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="needs nudity==0.2.3's graph")


def installed_script() -> Path | None:
    """The `mnv1` console script beside this interpreter (pip install -e . puts it there), if installed."""
    for name in ("mnv1", "mnv1.exe"):
        script = Path(sys.executable).parent / name
        if script.is_file():
            return script
    return None


def run_cli(*args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """Run `mnv1` (the installed script when given, else `python -m mnv1_backbone`) as a user would."""
    command = [str(script)] if script is not None else [sys.executable, "-m", "mnv1_backbone"]
    command += list(args)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """An HF directory: width 0.25, 64x64, 10 labels, random weights and BatchNorm statistics."""
    directory = tmp_path_factory.mktemp("small") / "mobilenet_v1_0.25_64"
    config = MobileNetV1Config(depth_multiplier=0.25, image_size=64, num_labels=10)
    randomize(MobileNetV1ForImageClassification(config), seed=1).save_pretrained(directory)
    return directory


# --- entry points ------------------------------------------------------------------------------------------------


def test_console_script_is_declared() -> None:
    assert 'mnv1 = "mnv1_backbone.cli:main"' in (ROOT / "pyproject.toml").read_text()
    scripts = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "mnv1"]
    if not scripts:
        pytest.skip("package metadata predates the console script; reinstall with pip install -e .")
    assert scripts[0].value == "mnv1_backbone.cli:main"


@needs_real_weights
def test_classify_real_photos_through_the_mnv1_script() -> None:
    script = installed_script()  # None (python -m then) only where the package was installed before the script
    graph = str(find_bundled_frozen_graph())
    result = run_cli("classify", str(CHELSEA), str(COFFEE), "--weights", graph, "--top-k", "3", "--json", script=script)
    assert result.returncode == 0, result.stderr
    chelsea, coffee = json.loads(result.stdout)
    assert chelsea["image"] == str(CHELSEA) and len(chelsea["predictions"]) == 3
    assert chelsea["predictions"][0]["index"] in CAT_CLASSES
    assert all(p["index"] in CAT_CLASSES for p in chelsea["predictions"])  # tabby, Egyptian, tiger cat
    assert coffee["predictions"][0] == {
        "rank": 1, "index": ESPRESSO, "label": "espresso", "probability": pytest.approx(0.99, abs=0.01)
    }


def test_user_error_through_python_m_is_one_line(tmp_path) -> None:
    result = run_cli("classify", str(tmp_path / "missing.png"), "--weights", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_line_error(result.stderr, "mnv1 classify: error: image not found", "missing.png")


# --- argument errors and help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["classify", "x.png", "--weights", "w", "--top-k", "0"], "--top-k: expected a positive integer, got 0"),
        (["features", "x.png"], "the following arguments are required: --weights"),
        (["features", "x.png", "--weights", "w", "--out-indices", "14"], "expected a block number in [0, 13]"),
        (["detect", "x.png", "--checkpoint", "c", "--out", "o", "--score-threshold", "2"], "expected a number in"),
        (["export", "--weights", "w", "--format", "tflite", "out"], "invalid choice: 'tflite'"),
        (["info", "--resolution", "16"], "at least 32 pixels"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, fragment, "--help")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_is_described(capsys) -> None:
    parser = cli.build_parser()
    commands = _subcommands(parser)
    assert set(commands) == {"classify", "features", "detect", "convert", "export", "info"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text
        for action in sub._actions:
            for option in action.option_strings:
                assert option in text, (name, option)


# --- classify -------------------------------------------------------------------------------------------------------


def test_classify_table_lists_top_k_per_image(small_checkpoint, capsys) -> None:
    assert cli.main(["classify", str(CHELSEA), str(COFFEE), "--weights", str(small_checkpoint), "--top-k", "4"]) == 0
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == [str(CHELSEA), str(COFFEE)]
    for block in blocks:
        header, *rows = block.splitlines()[1:]
        assert header.split() == ["rank", "index", "probability", "label"]
        assert [row.split()[0] for row in rows] == ["1", "2", "3", "4"]
        assert all(row.split()[3].startswith("LABEL_") and row.split()[2].endswith("%") for row in rows)


def test_classify_json_matches_the_python_api(small_checkpoint, capsys) -> None:
    assert cli.main(["classify", str(COFFEE), "--weights", str(small_checkpoint), "--json", "--top-k", "2"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    model = MobileNetV1ForImageClassification.from_pretrained(small_checkpoint).eval()
    processor = MobileNetV1ImageProcessor(size={"shortest_edge": 96}, crop_size=64)  # image_size + 32, image_size
    with torch.no_grad():
        logits = model(processor(Image.open(COFFEE))["pixel_values"]).logits
    expected = processor.post_process_image_classification(logits, top_k=2, id2label=model.config.id2label)[0]
    assert [(p["index"], p["label"]) for p in result["predictions"]] == [(i, label) for i, label, _ in expected]
    assert [p["probability"] for p in result["predictions"]] == pytest.approx([p for *_, p in expected], abs=1e-6)


@pytest.mark.parametrize(
    ("make_weights", "fragments"),
    [
        (lambda tmp: tmp / "missing.pb", ["weights not found", "missing.pb"]),
        (lambda tmp: COFFEE, ["coffee.png", "not a TF release file"]),  # a photo passed as weights
        (lambda tmp: tmp, ["has no config.json"]),  # a folder that is not a checkpoint
    ],
)
def test_classify_wrong_weights_is_one_line(make_weights, fragments, tmp_path, capsys) -> None:
    assert cli.main(["classify", str(CHELSEA), "--weights", str(make_weights(tmp_path))]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "mnv1 classify: error:", *fragments)


def test_classify_rejects_a_file_that_is_not_an_image(small_checkpoint, tmp_path, capsys) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a PNG")
    assert cli.main(["classify", str(CHELSEA), str(fake), "--weights", str(small_checkpoint)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # checked before any image is classified
    assert_one_line_error(captured.err, "notes.png is not an image file Pillow can read")


def test_traceback_flag_shows_the_exception(tmp_path) -> None:
    with pytest.raises(cli.CLIError, match="image not found"):
        cli.main(["classify", str(tmp_path / "x.png"), "--weights", str(tmp_path), "--traceback"])


# --- features -------------------------------------------------------------------------------------------------------


def test_features_table_and_saved_maps(small_checkpoint, tmp_path, capsys) -> None:
    saved = tmp_path / "maps.safetensors"
    argv = ["features", str(CHELSEA), "--weights", str(small_checkpoint), "--out-indices", "5", "11", "13",
            "--output-stride", "16", "--save", str(saved)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{CHELSEA}: input 1x3x64x64"
    assert lines[1].split() == ["name", "block", "channels", "stride", "shape"]
    assert [line.split() for line in lines[2:5]] == [
        ["Conv2d_5_pointwise", "5", "64", "8", "1x64x8x8"],
        ["Conv2d_11_pointwise", "11", "128", "16", "1x128x4x4"],
        ["Conv2d_13_pointwise", "13", "256", "16", "1x256x4x4"],  # dilated, not strided, at output stride 16
    ]
    backbone = MobileNetV1Backbone.from_pretrained(small_checkpoint, (5, 11, 13), output_stride=16).eval()
    pixels = MobileNetV1ImageProcessor(size={"shortest_edge": 96}, crop_size=64)(Image.open(CHELSEA))["pixel_values"]
    with torch.no_grad():
        expected = backbone(pixels)
    with safe_open(str(saved), framework="pt") as file:
        assert sorted(file.keys()) == sorted(expected)
        for name in expected:
            torch.testing.assert_close(file.get_tensor(name), expected[name][0:1], rtol=0, atol=0)
        info = json.loads(file.metadata()["feature_info"])
    assert [(i["name"], i["stride"], i["channels"]) for i in info] == [
        (f.name, f.stride, f.channels) for f in backbone.feature_info
    ]


def test_features_uses_the_checkpoints_preprocessor_config_and_resize(small_checkpoint, tmp_path, capsys) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(small_checkpoint, checkpoint)
    MobileNetV1ImageProcessor(size={"shortest_edge": 90}, crop_size=80).save_pretrained(checkpoint)
    assert cli.main(["features", str(CHELSEA), "--weights", str(checkpoint), "--out-indices", "13", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_shape"] == [1, 3, 80, 80]
    assert report["features"] == [
        {"name": "Conv2d_13_pointwise", "block": 13, "channels": 256, "stride": 32, "shape": [1, 256, 3, 3]}
    ]
    # --resize keeps the whole 451x300 photo: short side 100 -> 100x150.
    argv = ["features", str(CHELSEA), "--weights", str(checkpoint), "--out-indices", "0", "--resize", "100", "--json"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["features"][0]["shape"] == [1, 8, 50, 75]


# --- detect ---------------------------------------------------------------------------------------------------------


def test_detect_draws_boxes_from_a_demo_checkpoint(tmp_path, capsys) -> None:
    models = pytest.importorskip("detection_demo.models")
    from detection_demo.checkpoint import export_safetensors

    spec = models.ModelSpec(
        "ssdlite", {"depth_multiplier": 0.25, "size": 96, "detections_per_img": 2},
        ["__background__", "cat", "cup"], {1: 17, 2: 47},
    )
    weights = tmp_path / "model.safetensors"
    export_safetensors(randomize(models.build_model(spec), seed=2), weights, spec.to_dict())
    out = tmp_path / "drawn"
    argv = ["detect", str(CHELSEA), str(COFFEE), "--checkpoint", str(weights), "--out", str(out),
            "--score-threshold", "0"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert f"{CHELSEA}: 2 detections >= 0 -> {out / 'chelsea.png'}" in text
    for photo in (CHELSEA, COFFEE):
        with Image.open(out / photo.name) as drawn, Image.open(photo) as original:
            assert drawn.format == "PNG" and drawn.size == original.size
            assert drawn.convert("RGB").tobytes() != original.convert("RGB").tobytes()  # boxes were drawn
    report = json.loads((out / "predictions.json").read_text())
    assert [len(report[str(photo)]) for photo in (CHELSEA, COFFEE)] == [2, 2]
    assert {d["category"] for found in report.values() for d in found} <= {"cat", "cup"}


def test_detect_rejects_a_classifier_checkpoint(small_checkpoint, tmp_path, capsys) -> None:
    for checkpoint in (small_checkpoint / "model.safetensors", small_checkpoint / "config.json"):
        argv = ["detect", str(CHELSEA), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
        assert cli.main(argv) == 1
        assert_one_line_error(capsys.readouterr().err, "mnv1 detect: error:", checkpoint.name)


# --- convert --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path(f"{TF_CHECKPOINT}.index").is_file(), reason="TF checkpoint fixture not present")
def test_convert_tf_checkpoint_then_classify(tmp_path, capsys) -> None:
    destination = tmp_path / "converted"
    assert cli.main(["convert", str(TF_CHECKPOINT), str(destination)]) == 0
    out = capsys.readouterr().out
    assert "MobileNetV1 alpha 0.25, 128x128, 1001 labels, 470,329 parameters" in out
    assert {p.name for p in destination.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert MobileNetV1ImageProcessor.from_pretrained(destination).crop_size == {"height": 128, "width": 128}
    assert cli.main(["classify", str(CHELSEA), "--weights", str(destination), "--json", "--top-k", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == 1
    # A non-empty destination is refused unless --force.
    assert cli.main(["convert", str(TF_CHECKPOINT), str(destination)]) == 1
    assert_one_line_error(capsys.readouterr().err, "is not empty; pass --force")


def test_convert_hf_directory_with_new_image_size(small_checkpoint, tmp_path, capsys) -> None:
    destination = tmp_path / "copy"
    assert cli.main(["convert", str(small_checkpoint), str(destination), "--image-size", "96"]) == 0
    capsys.readouterr()
    original = MobileNetV1ForImageClassification.from_pretrained(small_checkpoint)
    copy = MobileNetV1ForImageClassification.from_pretrained(destination)
    assert copy.config.image_size == 96
    for key, value in original.state_dict().items():
        torch.testing.assert_close(copy.state_dict()[key], value, rtol=0, atol=0)
    assert MobileNetV1ImageProcessor.from_pretrained(destination).size == {"shortest_edge": 128}


# --- export ---------------------------------------------------------------------------------------------------------


def _max_diff(text: str) -> float:
    return float(text.strip().splitlines()[-1].split("max abs diff ")[1].split()[0])


@pytest.mark.filterwarnings("ignore:`torch.jit")  # TorchScript is deprecated in torch 2.10+, still supported
def test_export_torchscript_classifier_round_trip(small_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "classifier.pt"
    assert cli.main(["export", "--weights", str(small_checkpoint), "--format", "torchscript", str(out)]) == 0
    text = capsys.readouterr().out
    assert "logits  1x10  max abs diff" in text and text.strip().splitlines()[-1].startswith("verified")
    assert _max_diff(text) <= 1e-4
    loaded = torch.jit.load(str(out))
    model = MobileNetV1ForImageClassification.from_pretrained(small_checkpoint).eval()
    x = torch.rand(2, 3, 70, 90) * 2 - 1  # another batch and size: TorchScript is dynamic
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x).logits, rtol=1e-5, atol=1e-5)


def test_export_dynamic_exported_program_backbone(small_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "backbone.pt2"
    argv = ["export", "--weights", str(small_checkpoint), "--format", "exported-program", str(out), "--model",
            "backbone", "--out-indices", "1", "2", "--dynamic"]  # few layers: a quick trace
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "input 2x3x64x64  Conv2d_2_pointwise  2x32x16x16" in text
    assert "input 3x3x81x49  Conv2d_2_pointwise  3x32x21x13" in text  # verified at a second size and batch
    program = torch.export.load(str(out))
    backbone = MobileNetV1Backbone.from_pretrained(small_checkpoint, (1, 2)).eval()
    x = torch.rand(1, 3, 100, 33) * 2 - 1  # the smallest side --dynamic allows
    with torch.no_grad():
        expected, actual = backbone(x), program.module()(x)
    assert list(actual) == ["Conv2d_1_pointwise", "Conv2d_2_pointwise"]
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5)


def test_export_onnx_backbone_checked_with_onnxruntime(small_checkpoint, tmp_path, capsys) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "backbone.onnx"
    argv = ["export", "--weights", str(small_checkpoint), "--format", "onnx", str(out), "--model", "backbone",
            "--out-indices", "1", "3", "--image-size", "48"]
    assert cli.main(argv) == 0
    assert _max_diff(capsys.readouterr().out) <= 1e-4
    assert not Path(f"{out}.data").exists()  # weights inside the one file
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["Conv2d_1_pointwise", "Conv2d_3_pointwise"]
    assert [o.shape for o in session.get_outputs()] == [[1, 16, 24, 24], [1, 32, 12, 12]]


@pytest.mark.parametrize("fmt", ["onnx", "exported-program"])
def test_export_optimized_has_no_pad_and_matches_the_model_as_loaded(fmt, small_checkpoint, tmp_path, capsys) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / ("classifier.onnx" if fmt == "onnx" else "classifier.pt2")
    argv = ["export", "--weights", str(small_checkpoint), "--format", fmt, str(out), "--optimized",
            "--image-size", "64"]
    assert cli.main(argv) == 0
    assert _max_diff(capsys.readouterr().out) <= 1e-4  # against the unoptimized classifier
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        operators = {node.op_type for node in onnx.load(out).graph.node}
        assert "Pad" not in operators and "BatchNormalization" not in operators and "Conv" in operators
    else:
        targets = {str(node.target) for node in torch.export.load(str(out)).graph.nodes}
        assert not any("pad" in target or "batch_norm" in target for target in targets), targets
    argv[4] = "torchscript"
    assert cli.main(argv) == 1
    assert "--optimized exports with onnx or exported-program" in capsys.readouterr().err


def test_export_fails_when_the_exported_model_disagrees(small_checkpoint, tmp_path, capsys, monkeypatch) -> None:
    def broken_export(module, example, out):
        out.write_bytes(b"stand-in")
        return lambda x: module(x) + 1e-3

    monkeypatch.setattr(cli.export, "_export_torchscript", broken_export)
    argv = ["export", "--weights", str(small_checkpoint), "--format", "torchscript", str(tmp_path / "bad.pt")]
    assert cli.main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, "verification failed: max abs diff 1.000e-03 > tolerance 0.0001")


# --- info -----------------------------------------------------------------------------------------------------------


def test_info_alpha_1_at_224_matches_the_paper(capsys) -> None:
    assert cli.main(["info"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["layer", "type", "stride", "dilation", "in", "out", "output", "params", "mult-adds"]
    assert len(lines) == 1 + 27 + 2 + 1 + 2  # header, 27 convs, pool and logits, total, blank + summary
    assert lines[1].split()[:8] == ["Conv2d_0", "conv", "3x3", "2", "1", "3", "32", "112x112"]
    assert lines[-1].endswith("4,233,001 parameters, 568.7 M multiply-adds")  # paper: 4.2 M, 569 M


@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_info_json_matches_real_models(alpha, capsys) -> None:
    assert cli.main(["info", "--alpha", str(alpha), "--resolution", "97", "--output-stride", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    classifier = MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=alpha))
    assert report["parameters"] == sum(p.numel() for p in classifier.parameters())
    assert report["parameters"] == {0.25: 470_329, 0.5: 1_332_105}[alpha]  # DESIGN.md §1
    assert sum(row["parameters"] for row in report["layers"]) == report["parameters"]
    backbone = MobileNetV1Backbone(tuple(range(14)), depth_multiplier=alpha, output_stride=16).eval()
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 97, 97))
    rows = {row["name"]: row for row in report["layers"]}
    for info in backbone.feature_info:
        row = rows[info.name]
        assert [1, row["out_channels"], *row["output_size"]] == list(features[info.name].shape)
    assert rows["Conv2d_13_depthwise"]["dilation"] == 2 and rows["Conv2d_12_depthwise"]["stride"] == 1


def test_layer_table_multiply_adds_by_hand() -> None:
    rows = {row.name: row for row in cli.layer_table(1.0, 224)}
    assert rows["Conv2d_0"].macs == 112 * 112 * 3 * 3 * 3 * 32
    assert rows["Conv2d_1_depthwise"].macs == 112 * 112 * 3 * 3 * 32
    assert rows["Conv2d_1_pointwise"].macs == 112 * 112 * 32 * 64
    assert rows["Logits"].macs == 1024 * 1001
    assert sum(row.macs for row in rows.values()) == 568_741_376
    assert sum(row.parameters for row in cli.layer_table(0.75, 224)) == 2_586_329
    bare = cli.layer_table(1.0, 224, num_labels=0)
    assert bare[-1].name == "Conv2d_13_pointwise" and sum(r.parameters for r in bare) == 4_233_001 - 1_026_025


# --- issue 14: convert --no-tf-padding; classify without --weights -----------------------------------------------
def test_convert_no_tf_padding_records_symmetric_padding(tmp_path, small_checkpoint, capsys) -> None:
    destination = tmp_path / "explicit"
    assert cli.main(["convert", str(TF_CHECKPOINT), str(destination), "--no-tf-padding"]) == 0
    assert json.loads((destination / "config.json").read_text())["tf_padding"] is False
    expected = MobileNetV1ForImageClassification.from_tf(TF_CHECKPOINT, tf_padding=False)
    converted = MobileNetV1ForImageClassification.from_pretrained(destination)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, expected(x).logits, rtol=0, atol=0)
    capsys.readouterr()
    assert cli.main(["convert", str(small_checkpoint), str(tmp_path / "hf"), "--no-tf-padding"]) == 1
    assert "--no-tf-padding is for TF checkpoints" in capsys.readouterr().err


def test_classify_without_weights_uses_the_bundled_graph(capsys) -> None:
    from mnv1_backbone.pretrained import find_bundled_frozen_graph

    if find_bundled_frozen_graph() is None:
        pytest.skip("needs `pip install --no-deps nudity==0.2.3`")
    assert cli.main(["classify", str(CHELSEA), "--json", "--top-k", "1"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["predictions"][0]
    assert "cat" in top["label"]  # Google's ImageNet weights on the photo of a cat


def test_classify_without_weights_or_bundled_graph_says_how_to_get_them(monkeypatch, capsys) -> None:
    import mnv1_backbone.pretrained as pretrained

    monkeypatch.setattr(pretrained, "find_bundled_frozen_graph", lambda: None)
    assert cli.main(["classify", str(CHELSEA)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--weights" in error and "nudity==0.2.3" in error
