"""MobileNetV1Config: HF field names and defaults, JSON round trips, validation, the TF constants."""

from __future__ import annotations

import json

import pytest

from mnv1_backbone import MobileNetV1Config


def test_defaults_are_hugging_faces() -> None:
    transformers = pytest.importorskip("transformers")
    ours, theirs = MobileNetV1Config().to_dict(), transformers.MobileNetV1Config().to_dict()
    for key in ("num_channels", "image_size", "depth_multiplier", "min_depth", "hidden_act", "tf_padding",
                "classifier_dropout_prob", "initializer_range", "layer_norm_eps", "model_type"):
        assert ours[key] == theirs[key], key


def test_json_round_trip_through_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = MobileNetV1Config(depth_multiplier=0.5, tf_padding=False, classifier_dropout_prob=0.001)
    config.to_json_file(tmp_path / "config.json")
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "MobileNetV1Config"
    assert theirs.depth_multiplier == 0.5 and theirs.tf_padding is False and theirs.num_labels == 1001
    assert theirs.id2label[0] == "background"
    theirs.save_pretrained(tmp_path / "back")
    again = MobileNetV1Config.from_json_file(tmp_path / "back" / "config.json")
    assert (again.depth_multiplier, again.tf_padding, again.num_labels) == (0.5, False, 1001)
    assert again.id2label == config.resolved_id2label()


def test_unknown_keys_survive_a_round_trip(tmp_path) -> None:
    config = MobileNetV1Config.from_dict({"model_type": "mobilenet_v1", "torch_dtype": "float32", "num_labels": 3})
    config.to_json_file(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["torch_dtype"] == "float32" and data["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}


def test_the_two_hf_porting_bugs_are_handled() -> None:
    config = MobileNetV1Config()  # HF's default 0.999 is TF's keep probability
    assert config.classifier_dropout_prob == 0.999
    assert config.classifier_dropout_rate == pytest.approx(0.001)
    assert MobileNetV1Config(classifier_dropout_prob=0.2).classifier_dropout_rate == 0.2
    assert config.batch_norm_momentum == pytest.approx(0.0003)  # 1 - TF's decay 0.9997


def test_id2label_sets_num_labels() -> None:
    config = MobileNetV1Config.from_dict({"id2label": {"0": "cat", "1": "dog"}})
    assert config.num_labels == 2 and config.label2id == {"cat": 0, "dog": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth_multiplier": 0.0}, "depth_multiplier"),
        ({"depth_multiplier": float("nan")}, "depth_multiplier"),
        ({"min_depth": 0}, "min_depth"),
        ({"hidden_act": "mish"}, "hidden_act"),
        ({"classifier_dropout_prob": 1.0}, "classifier_dropout_prob"),
        ({"image_size": 16}, "image_size"),
        ({"num_labels": -1}, "num_labels"),
        ({"pooling": "max"}, "pooling"),
        ({"layer_norm_eps": 0}, "layer_norm_eps"),
    ],
)
def test_invalid_values_raise(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MobileNetV1Config(**kwargs)


def test_bad_files_name_the_file(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        MobileNetV1Config.from_json_file(tmp_path / "bad.json")
    (tmp_path / "bert.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="bert.json: config is for model_type 'bert'"):
        MobileNetV1Config.from_json_file(tmp_path / "bert.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        MobileNetV1Config.from_json_file(tmp_path / "missing.json")


def test_hf_list_image_size_is_accepted() -> None:
    assert MobileNetV1Config.from_dict({"image_size": [192, 192]}).image_size == 192
