"""Parity of MobileNetV1Model / MobileNetV1ForImageClassification with transformers (the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import hf_classifier, ours_like, randomize

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1Config, MobileNetV1ForImageClassification

SIZES = [(32, 32), (97, 131), (224, 224), (320, 320)]


@pytest.mark.parametrize("depth_multiplier", [0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("tf_padding", [True, False])
def test_outputs_match_transformers(depth_multiplier: float, tf_padding: bool) -> None:
    hf = hf_classifier(depth_multiplier, tf_padding, seed=1)
    ours = ours_like(hf)
    assert list(ours.state_dict()) == list(hf.state_dict())
    generator = torch.Generator().manual_seed(2)
    for height, width in SIZES:
        x = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = hf(x, output_hidden_states=True)
            expected_base = hf.mobilenet_v1(x)
            got = ours(x, output_hidden_states=True)
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.pooler_output, expected_base.pooler_output, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.last_hidden_state, expected_base.last_hidden_state, atol=1e-5, rtol=0)
        assert len(got.hidden_states) == len(expected.hidden_states) == 26
        for ours_state, hf_state in zip(got.hidden_states, expected.hidden_states, strict=True):
            torch.testing.assert_close(ours_state, hf_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tf_padding", [True, False])
@pytest.mark.parametrize("size", [(32, 32), (97, 131), (224, 224)])
def test_backbone_outputs_equal_hf_hidden_states(tf_padding: bool, size: tuple[int, int]) -> None:
    hf = hf_classifier(0.5, tf_padding, seed=3)
    backbone = MobileNetV1Backbone(tuple(range(1, 14)), depth_multiplier=0.5, tf_padding=tf_padding)
    backbone.load_trunk(hf.state_dict())
    backbone.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        hidden = hf(x, output_hidden_states=True).hidden_states
        features = backbone(x)
    for info in backbone.feature_info:
        torch.testing.assert_close(features[info.name], hidden[2 * info.index - 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("depth_multiplier", "expected"), [(1.0, 4_233_001), (0.75, 2_586_329), (0.5, 1_332_105), (0.25, 470_329)]
)
def test_parameter_counts_match_the_paper_release(depth_multiplier: float, expected: int) -> None:
    model = MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=depth_multiplier))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_bare_model_without_pooling_and_hidden_states_off() -> None:
    from mnv1_backbone import MobileNetV1Model

    model = MobileNetV1Model(MobileNetV1Config(depth_multiplier=0.25), add_pooling_layer=False).eval()
    out = model(torch.randn(1, 3, 64, 64))
    assert out.pooler_output is None and out.hidden_states is None
    assert out.last_hidden_state.shape == (1, 256, 2, 2)


def test_tf_slim_pooling_equals_global_at_224_and_gives_a_logit_map_at_320() -> None:
    hf = hf_classifier(0.25, seed=4)
    global_model = ours_like(hf)
    config = MobileNetV1Config.from_dict({**hf.config.to_dict(), "pooling": "tf_slim"})
    slim_model = MobileNetV1ForImageClassification(config)
    slim_model.load_state_dict(hf.state_dict())
    slim_model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=generator)
    with torch.no_grad():
        # In float64: the two poolings sum in different orders, which float32 rounds differently by a few ulps of
        # logits ~30 (1.1e-5 seen); in float64 the same few ulps are ~1e-14, so any real difference would show.
        exact_slim, exact_global = slim_model.double()(x.double()).logits, global_model.double()(x.double()).logits
        torch.testing.assert_close(exact_slim, exact_global, atol=1e-10, rtol=0)
        slim_model.float()
        big = torch.randn(1, 3, 320, 320, generator=generator)
        logits_map = slim_model(big).logits
        last = slim_model.mobilenet_v1(big).last_hidden_state  # (1, C, 10, 10)
    assert logits_map.shape == (1, 1001, 2, 2)
    # Window (1, 1) of the 7x7 stride-2 VALID pooling covers rows and columns 2..8.
    window = last[:, :, 2:9, 2:9].mean(dim=(2, 3))
    expected = slim_model.classifier(window)
    # Same sums in another order (avg_pool2d vs mean): float32 rounding only, logits are ~10.
    torch.testing.assert_close(logits_map[:, :, 1, 1], expected, atol=1e-5, rtol=1e-5)


def test_small_inputs_pool_with_a_reduced_kernel() -> None:
    model = randomize(MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25, pooling="tf_slim")))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 96, 96)).logits  # 3x3 last map -> 3x3 kernel -> 1x1
    assert logits.shape == (1, 1001)


def test_labels_give_a_cross_entropy_loss() -> None:
    model = randomize(MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25, num_labels=5)))
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([1, 4])
    out = model(x, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_dropout_uses_the_corrected_rate() -> None:
    model = MobileNetV1ForImageClassification(MobileNetV1Config(classifier_dropout_prob=0.999))
    assert model.dropout.p == pytest.approx(0.001)
    assert MobileNetV1ForImageClassification(MobileNetV1Config(classifier_dropout_prob=0.2)).dropout.p == 0.2


def test_batch_norm_momentum_is_pytorch_momentum_not_tf_decay() -> None:
    model = MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25))
    assert model.mobilenet_v1.conv_stem.normalization.momentum == pytest.approx(0.0003)


@pytest.mark.parametrize("bad", [torch.randn(3, 64, 64), torch.randn(1, 1, 64, 64), torch.randn(1, 3, 31, 64)])
def test_bad_input_raises(bad: torch.Tensor) -> None:
    model = MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25)).eval()
    with pytest.raises(ValueError, match="4-D|input channels|at least 32x32"):
        model(bad)


def test_torchscript_classifier_matches_eager() -> None:
    model = randomize(MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25)))
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x).logits, model(x).logits, atol=1e-6, rtol=0)


# --- issue 14: loaders as transformers' (eval mode, return_dict, id2label, padding of TF checkpoints) ----------
TF_CHECKPOINT = Path(__file__).parent / "fixtures" / "tf_slim" / "mobilenet_v1_0.25_128.ckpt"


def _all_eval(model: torch.nn.Module) -> bool:
    return not any(module.training for module in model.modules())


def test_loaders_return_eval_models_and_constructors_train(tmp_path) -> None:
    model = MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25))
    assert all(module.training for module in model.modules())
    model.save_pretrained(tmp_path)
    assert _all_eval(MobileNetV1ForImageClassification.from_pretrained(tmp_path))
    assert _all_eval(MobileNetV1ForImageClassification.from_tf(TF_CHECKPOINT))


def test_from_pretrained_matches_transformers_without_calling_eval(tmp_path) -> None:
    """transformers' idiom never calls .eval(); in training mode BatchNorm would use the batch's statistics."""
    hf = hf_classifier(depth_multiplier=0.25, seed=2)
    hf.save_pretrained(tmp_path)
    ours = MobileNetV1ForImageClassification.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-5, rtol=0)


def test_return_dict_false_gives_transformers_tuples() -> None:
    hf = hf_classifier(depth_multiplier=0.25, seed=4, num_labels=5)
    ours = ours_like(hf)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        for kwargs in ({}, {"output_hidden_states": True}, {"labels": labels, "output_hidden_states": True}):
            expected = hf(x, return_dict=False, **kwargs)
            actual = ours(x, return_dict=False, **kwargs)
            assert isinstance(actual, tuple) and len(actual) == len(expected), kwargs
            for a, e in zip(actual, expected, strict=True):
                if isinstance(e, tuple):
                    assert isinstance(a, tuple) and len(a) == len(e)
                    for ai, ei in zip(a, e, strict=True):
                        torch.testing.assert_close(ai, ei, atol=1e-5, rtol=0)
                else:
                    torch.testing.assert_close(a, e, atol=1e-5, rtol=0)
        bare_hf = hf.mobilenet_v1(x, return_dict=False)
        bare = ours.mobilenet_v1(x, return_dict=False)
        assert len(bare) == len(bare_hf) == 2
        torch.testing.assert_close(bare[1], bare_hf[1], atol=1e-5, rtol=0)
        assert ours(x, return_dict=True).logits.shape == (2, 5)


def test_id2label_is_always_a_dict_and_survives_a_save(tmp_path) -> None:
    model = MobileNetV1ForImageClassification.from_tf(TF_CHECKPOINT)
    id2label = model.config.id2label
    assert type(id2label) is dict and len(id2label) == 1001 and id2label[0] == "background"
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 128, 128)).logits
    assert isinstance(model.config.id2label[logits.argmax(-1).item()], str)  # transformers' idiom
    assert type(model.config.label2id) is dict and model.config.label2id["tabby, tabby cat"] == 282
    model.save_pretrained(tmp_path)
    assert MobileNetV1ForImageClassification.from_pretrained(tmp_path).config.id2label == id2label
    small = MobileNetV1Config(num_labels=3)
    assert small.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert MobileNetV1Config.from_dict(small.to_dict()).id2label == small.id2label


def test_from_tf_accepts_explicit_padding() -> None:
    same = MobileNetV1ForImageClassification.from_tf(TF_CHECKPOINT)
    explicit = MobileNetV1ForImageClassification.from_tf(TF_CHECKPOINT, tf_padding=False)
    assert same.config.tf_padding is True and explicit.config.tf_padding is False
    torch.testing.assert_close(explicit.state_dict(), same.state_dict(), rtol=0, atol=0)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (explicit(x).logits - same(x).logits).abs().max() > 1e-3  # strided convs see other pixels
