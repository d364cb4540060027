"""Checkpoint IO: HF directories both ways, our safetensors file, strict loading, hostile and broken files."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
from conftest import hf_classifier, randomize

from mnv1_backbone import (
    MobileNetV1Config,
    MobileNetV1ForImageClassification,
    StateDictMismatchError,
    WeightsFormatError,
)
from mnv1_backbone.weights import load_checkpoint, save_safetensors


def _small(num_labels: int = 1001) -> MobileNetV1ForImageClassification:
    config = MobileNetV1Config(depth_multiplier=0.25, num_labels=num_labels)
    return randomize(MobileNetV1ForImageClassification(config), seed=11)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_pretrained_loads_in_transformers_with_identical_outputs(tmp_path, safe_serialization) -> None:
    transformers = pytest.importorskip("transformers")
    ours = _small()
    ours.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    theirs = transformers.MobileNetV1ForImageClassification.from_pretrained(tmp_path).eval()
    assert theirs.config.id2label[0] == "background"
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=0, rtol=0)
    # And back: what transformers writes, we read.
    theirs.save_pretrained(tmp_path / "back")
    again = MobileNetV1ForImageClassification.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ours(x).logits, atol=0, rtol=0)


def test_state_dict_keys_identical_to_transformers() -> None:
    hf = hf_classifier(0.25)
    ours = MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25))
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert len(ours.state_dict()) == 164
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}


def test_bare_model_checkpoint_loads_into_the_classifier_trunk(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.MobileNetV1Model(transformers.MobileNetV1Config(depth_multiplier=0.25, num_labels=0))
    hf_model.save_pretrained(tmp_path)
    model = MobileNetV1ForImageClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(
        model.mobilenet_v1.conv_stem.convolution.weight, hf_model.conv_stem.convolution.weight
    )


def test_single_safetensors_file_carries_its_config(tmp_path) -> None:
    ours = _small(num_labels=7)
    save_safetensors(ours, tmp_path / "m.safetensors", ours.config)
    config, state_dict = load_checkpoint(tmp_path / "m.safetensors")
    assert config.num_labels == 7 and config.depth_multiplier == 0.25
    loaded = MobileNetV1ForImageClassification.from_pretrained(tmp_path / "m.safetensors").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ours(x).logits, atol=0, rtol=0)


def test_strict_loading_lists_missing_unexpected_and_misshapen(tmp_path) -> None:
    ours = _small()
    ours.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["mobilenet_v1.layer.3.convolution.weight"]
    tensors["mobilenet_v1.extra.weight"] = torch.zeros(1)
    tensors["classifier.bias"] = torch.zeros(10)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StateDictMismatchError) as info:
        MobileNetV1ForImageClassification.from_pretrained(tmp_path)
    message = str(info.value)
    assert "1 missing: mobilenet_v1.layer.3.convolution.weight" in message
    assert "1 unexpected: mobilenet_v1.extra.weight" in message
    assert "classifier.bias: file (10,) vs model (1001,)" in message


def test_corrupt_safetensors_names_the_file(tmp_path) -> None:
    _small().save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFormatError, match="model.safetensors"):
        MobileNetV1ForImageClassification.from_pretrained(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    MobileNetV1Config(depth_multiplier=0.25).to_json_file(tmp_path / "config.json")
    with open(tmp_path / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"classifier.weight": _Exploit()}, handle)
    with pytest.raises(WeightsFormatError, match="weights-only"):
        MobileNetV1ForImageClassification.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_missing_files_and_dirs(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        MobileNetV1ForImageClassification.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        MobileNetV1ForImageClassification.from_pretrained(tmp_path)
    MobileNetV1Config().to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        MobileNetV1ForImageClassification.from_pretrained(tmp_path)


def test_hub_id_without_huggingface_hub_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match="huggingface_hub is not installed"):
        MobileNetV1ForImageClassification.from_pretrained("google/mobilenet_v1_1.0_224")


def test_hub_id_without_network_says_what_to_do(monkeypatch) -> None:
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="could not fetch 'google/mobilenet_v1_1.0_224'.*local directory"):
        MobileNetV1ForImageClassification.from_pretrained("google/mobilenet_v1_1.0_224")


def test_hub_id_resolves_through_snapshot_download(monkeypatch, tmp_path) -> None:
    hub = pytest.importorskip("huggingface_hub")
    _small().save_pretrained(tmp_path)
    seen = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: seen.append(repo_id) or str(tmp_path))
    model = MobileNetV1ForImageClassification.from_pretrained("google/mobilenet_v1_0.25_128")
    assert seen == ["google/mobilenet_v1_0.25_128"] and model.config.depth_multiplier == 0.25


def test_writes_are_atomic(tmp_path, monkeypatch) -> None:
    ours = _small()
    ours.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import mnv1_backbone.hf_checkpoint as hf_checkpoint

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_write_removes_the_temporary_files_of_killed_writers(tmp_path) -> None:
    from mnv1_backbone._io import atomic_write

    target = tmp_path / "model.safetensors"
    dead = tmp_path / ".model.safetensors.999999999.k3x9.tmp"  # beyond any pid_max: no such process
    alive = tmp_path / f".model.safetensors.{os.getppid()}.a1b2.tmp"  # a live writer's file stays
    mine = tmp_path / f".model.safetensors.{os.getpid()}.c3d4.tmp"  # so does one of this process
    other = tmp_path / ".other.safetensors.999999999.e5f6.tmp"  # another target's file is not ours to touch
    for file in (dead, alive, mine, other):
        file.write_bytes(b"partial")
    atomic_write(target, lambda tmp: tmp.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole"
    assert not dead.exists() and alive.exists() and mine.exists() and other.exists()
