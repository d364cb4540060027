"""timm's MobileNetV1 weights: `from_timm` of the classifier and backbone, files, Hub ids, conversion, detection.

timm is the oracle: its own `mobilenetv1_100` / `mobilenetv1_125` with random weights and perturbed BatchNorm
statistics (`conftest.randomize`), compared on logits and feature maps. No network: Hub downloads are replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize
from safetensors.torch import save_file

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1ForImageClassification, cli
from mnv1_backbone.errors import StateDictMismatchError

timm = pytest.importorskip("timm")
ROOT = Path(__file__).resolve().parent.parent
CHELSEA = ROOT / "tests" / "data" / "chelsea.png"


@pytest.fixture(scope="module")
def timm_model() -> torch.nn.Module:
    return randomize(timm.create_model("mobilenetv1_100", pretrained=False), seed=3)


@pytest.fixture(scope="module")
def timm_file(timm_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("timm") / "mobilenetv1_100.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(path))
    return path


def test_classifier_matches_timm_forward(timm_model) -> None:
    ours = MobileNetV1ForImageClassification.from_timm(timm_model)
    x = torch.randn(2, 3, 96, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = timm_model(x)
        actual = ours(x).logits
    assert not ours.training
    assert (actual - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 1.0  # the comparison is not between near-zero numbers


def test_backbone_matches_timm_features(timm_model) -> None:
    backbone = MobileNetV1Backbone.from_timm(timm_model, out_indices=(5, 13))
    x = torch.randn(1, 3, 97, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = timm_model.forward_features(x)
        actual = backbone(x)["Conv2d_13_pointwise"]
    assert not backbone.training
    assert backbone.config.tf_padding is False and backbone.config.layer_norm_eps == 1e-5
    assert (actual - expected).abs().max().item() <= 1e-4


def test_config_has_timms_labels_padding_and_eps(timm_model) -> None:
    config = MobileNetV1ForImageClassification.from_timm(timm_model.state_dict()).config
    assert config.num_labels == 1000 and len(config.id2label) == 1000
    assert config.id2label[0] == "tench, Tinca tinca" and config.id2label[281] == "tabby, tabby cat"  # no background
    assert config.label2id["espresso"] == 967
    assert (config.tf_padding, config.layer_norm_eps, config.hidden_act, config.depth_multiplier) == (
        False, 1e-5, "relu6", 1.0
    )
    assert config.classifier_dropout_rate == 0.0 and config.image_size == 224


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_from_a_state_dict_file(timm_model, tmp_path, suffix) -> None:
    path = tmp_path / f"weights{suffix}"
    tensors = {k: v.contiguous() for k, v in timm_model.state_dict().items()}
    save_file(tensors, str(path)) if suffix == ".safetensors" else torch.save(tensors, path)
    ours = MobileNetV1ForImageClassification.from_timm(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x).logits - timm_model(x)).abs().max().item() <= 1e-4


def test_save_pretrained_writes_timms_preprocessing(timm_model, tmp_path) -> None:
    ours = MobileNetV1ForImageClassification.from_timm(timm_model)
    ours.save_pretrained(tmp_path)
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg = timm_model.pretrained_cfg
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875 and tuple(cfg["mean"]) == (0.5,) * 3
    assert processor["resample"] == 3  # PIL bicubic
    assert processor["size"] == {"shortest_edge": 256}  # int(224 / 0.875), timm's scale_size
    assert processor["crop_size"] == {"height": 224, "width": 224}
    assert processor["image_mean"] == [0.5] * 3 and processor["image_std"] == [0.5] * 3
    again = MobileNetV1ForImageClassification.from_pretrained(tmp_path)
    assert again.config.id2label == ours.config.id2label and not again.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ours(x).logits, rtol=0, atol=0)


def test_the_wider_model_and_its_crop() -> None:
    model = randomize(timm.create_model("mobilenetv1_125", pretrained=False), seed=5)
    ours = MobileNetV1ForImageClassification.from_timm(model)
    assert ours.config.depth_multiplier == 1.25
    assert ours.image_processor.size == {"shortest_edge": 248}  # crop_pct 0.9 in timm's pretrained_cfg
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x).logits - model(x)).abs().max().item() <= 1e-4


def test_the_variant_with_a_head_conv_is_refused() -> None:
    model = timm.create_model("mobilenetv1_100h", pretrained=False)
    with pytest.raises(StateDictMismatchError, match="conv_head"):
        MobileNetV1ForImageClassification.from_timm(model)


def test_hub_id_offline_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE.*model.safetensors"):
        MobileNetV1ForImageClassification.from_timm("timm/mobilenetv1_100")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub = pytest.importorskip("huggingface_hub")

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError, match="could not fetch 'timm/mobilenetv1_100.ra4_e3600_r224_in1k'"):
        MobileNetV1ForImageClassification.from_timm("timm/mobilenetv1_100")


def test_hub_id_downloads_the_weights_and_pretrained_cfg(timm_file, tmp_path, monkeypatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"pretrained_cfg": {"crop_pct": 0.95, "input_size": [3, 256, 256]}}))
    seen = []

    def download(repo_id, filename, **kwargs):
        seen.append((repo_id, filename))
        return str(timm_file if filename == "model.safetensors" else config)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    model = MobileNetV1ForImageClassification.from_timm("timm/mobilenetv1_100")
    assert seen[0] == ("timm/mobilenetv1_100.ra4_e3600_r224_in1k", "model.safetensors")
    assert model.config.image_size == 256 and model.image_processor.size == {"shortest_edge": 269}


def test_cli_converts_a_timm_file(timm_model, timm_file, tmp_path, capsys) -> None:
    destination = tmp_path / "converted"
    assert cli.main(["convert", str(timm_file), str(destination)]) == 0
    assert json.loads((destination / "preprocessor_config.json").read_text())["resample"] == 3
    converted = MobileNetV1ForImageClassification.from_pretrained(destination)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (converted(x).logits - timm_model(x)).abs().max().item() <= 1e-4
    capsys.readouterr()
    assert cli.main(["classify", str(CHELSEA), "--weights", str(timm_file), "--json", "--top-k", "1"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["predictions"][0]
    assert 0 <= top["index"] < 1000 and top["label"] == converted.config.id2label[top["index"]]


def test_timm_weights_as_a_detection_backbone(timm_model, timm_file) -> None:
    from mnv1_backbone.detection import ssdlite_mobilenet_v1

    detector = ssdlite_mobilenet_v1(size=128, weights_backbone=str(timm_file), num_classes=3)
    backbone = detector.backbone.backbone
    assert backbone.config.tf_padding is False and backbone.config.layer_norm_eps == 1e-5
    torch.testing.assert_close(
        backbone.conv_stem.convolution.weight, timm_model.conv_stem.weight, rtol=0, atol=0
    )
    torch.testing.assert_close(
        backbone.layer[21].normalization.running_var, timm_model.blocks[3][5].bn2.running_var, rtol=0, atol=0
    )
