"""MobileNetV1Backbone: outputs, declared metadata, output stride, freezing, errors, tracing and export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import hf_classifier, randomize

from mnv1_backbone import MobileNetV1Backbone
from mnv1_backbone.config import plan_layers
from mnv1_backbone.layers import FrozenBatchNorm2d

EXPECTED_STRIDES = {0: 2, 1: 2, 2: 4, 3: 4, 4: 8, 5: 8, 6: 16, 11: 16, 12: 32, 13: 32}


def _assert_shapes_match_feature_info(backbone: MobileNetV1Backbone, height: int, width: int) -> None:
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, height, width))
    assert list(out) == [info.name for info in backbone.feature_info]
    for info in backbone.feature_info:
        expected = (1, info.channels, math.ceil(height / info.stride), math.ceil(width / info.stride))
        assert tuple(out[info.name].shape) == expected, info


@pytest.mark.parametrize("out_indices", [(5, 11, 13), (0,), (0, 1, 2, 3), (11, 13), (4, 12), tuple(range(14))])
@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("size", [(32, 32), (97, 131), (128, 96)])
def test_feature_info_matches_real_outputs(out_indices, output_stride, size) -> None:
    backbone = MobileNetV1Backbone(out_indices, depth_multiplier=0.25, output_stride=output_stride).eval()
    _assert_shapes_match_feature_info(backbone, *size)


def test_default_taps_are_c3_c4_c5() -> None:
    backbone = MobileNetV1Backbone()
    assert [(i.name, i.channels, i.stride) for i in backbone.feature_info] == [
        ("Conv2d_5_pointwise", 256, 8),
        ("Conv2d_11_pointwise", 512, 16),
        ("Conv2d_13_pointwise", 1024, 32),
    ]
    assert backbone.out_channels == [256, 512, 1024]
    assert backbone.size_divisibility == 32


@pytest.mark.parametrize("index", sorted(EXPECTED_STRIDES))
def test_strides_follow_the_table(index: int) -> None:
    assert MobileNetV1Backbone((index,), depth_multiplier=0.25).feature_info[0].stride == EXPECTED_STRIDES[index]


def test_computes_nothing_past_the_last_requested_block() -> None:
    backbone = MobileNetV1Backbone((3, 5), depth_multiplier=0.25)
    assert len(backbone.layer) == 10  # blocks 1..5, two layers each
    calls = []
    for layer in backbone.layer:
        layer.register_forward_hook(lambda *args: calls.append(1))
    backbone(torch.randn(1, 3, 64, 64))
    assert len(calls) == 10


def test_output_stride_plans_follow_tf_slim() -> None:
    os16 = plan_layers(output_stride=16)
    assert [(p.stride, p.dilation) for p in os16[12:]] == [(1, 1), (1, 2)]
    os8 = plan_layers(output_stride=8)
    assert (os8[6].stride, os8[6].dilation) == (1, 1)
    assert [p.dilation for p in os8[7:13]] == [2] * 6
    assert os8[13].dilation == 4
    assert all(p.output_stride <= 8 for p in os8)


@pytest.mark.parametrize(("output_stride", "first_changed"), [(16, 12), (8, 6)])
def test_output_stride_keeps_early_outputs_and_dilates_later_ones(output_stride: int, first_changed: int) -> None:
    indices = tuple(range(14))
    reference = randomize(MobileNetV1Backbone(indices, depth_multiplier=0.25), seed=5)
    dilated = MobileNetV1Backbone(indices, depth_multiplier=0.25, output_stride=output_stride)
    dilated.load_state_dict(reference.state_dict())
    dilated.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref_out, dil_out = reference(x), dilated(x)
    for info in dilated.feature_info:
        if info.index < first_changed:
            torch.testing.assert_close(dil_out[info.name], ref_out[info.name], atol=0, rtol=0)
        else:
            assert info.stride == output_stride
            assert dil_out[info.name].shape[-2:] == (96 // output_stride, 128 // output_stride)


def test_dilated_tf_same_padding_accounts_for_dilation() -> None:
    """A dilated 3x3 depthwise conv with TF SAME pads `rate` on each side (effective kernel 2*rate+1)."""
    backbone = MobileNetV1Backbone((13,), depth_multiplier=0.25, output_stride=8)
    depthwise = backbone.layer[24].convolution  # block 13
    assert depthwise.dilation == (4, 4) and depthwise.padding == (4, 4) and depthwise.stride == (1, 1)


# --- freezing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen_stages", [0, 1, 3, 6])
def test_frozen_stages_have_no_gradients_and_fixed_statistics(frozen_stages: int) -> None:
    backbone = MobileNetV1Backbone((13,), depth_multiplier=0.25, frozen_stages=frozen_stages)
    randomize(backbone)
    backbone.train()
    frozen_modules = [m for stage in range(frozen_stages) for m in backbone.stage_modules(stage)]
    for module in frozen_modules:
        assert isinstance(module.normalization, FrozenBatchNorm2d)
        assert module.normalization.eps == 1e-3
        assert not any(p.requires_grad for p in module.parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    out = backbone(torch.randn(2, 3, 64, 64))["Conv2d_13_pointwise"]
    if frozen_stages == 6:
        assert not out.requires_grad
    else:
        out.sum().backward()
    frozen_ids = {id(p) for m in frozen_modules for p in m.parameters()}
    for parameter in backbone.parameters():
        if id(parameter) in frozen_ids:
            assert parameter.grad is None
        else:
            assert parameter.grad is not None
    frozen_names = {n for n, m in backbone.named_modules() if any(m is f for f in frozen_modules)}
    for key, value in backbone.state_dict().items():
        if any(key.startswith(name + ".") for name in frozen_names):
            torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_norm_eval_keeps_running_statistics_in_training() -> None:
    backbone = MobileNetV1Backbone((5,), depth_multiplier=0.25, norm_eval=True)
    backbone.train()
    before = backbone.layer[0].normalization.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64) * 5)
    torch.testing.assert_close(backbone.layer[0].normalization.running_mean, before)
    assert backbone.training and not backbone.layer[0].normalization.training


def test_frozen_backbone_keeps_its_outputs() -> None:
    backbone = randomize(MobileNetV1Backbone((5, 11), depth_multiplier=0.25))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone(x)
        backbone.freeze(6)
        after = backbone(x)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out_indices", "message"),
    [
        ((), "empty"),
        ((5, 5), "duplicates"),
        ((11, 5), "increasing"),
        ((14,), r"\[0, 13\]"),
        ((-1,), r"\[0, 13\]"),
        ((1.5,), r"\[0, 13\]"),
        (5, "sequence"),
    ],
)
def test_bad_out_indices_raise(out_indices, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MobileNetV1Backbone(out_indices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_stride": 4}, "output_stride"),
        ({"depth_multiplier": 0}, "depth_multiplier"),
        ({"frozen_stages": 7}, "frozen_stages"),
        ({"hidden_act": "mish"}, "hidden_act"),
    ],
)
def test_bad_options_raise(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MobileNetV1Backbone(**kwargs)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((3, 64, 64), "4-D"), ((1, 4, 64, 64), "expected 3 input channels, got 4"), ((1, 3, 31, 64), "31x64")],
)
def test_bad_inputs_raise(shape, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MobileNetV1Backbone(depth_multiplier=0.25)(torch.randn(shape))


# --- tracing, scripting, export -----------------------------------------------------------------------


def _backbone() -> MobileNetV1Backbone:
    return randomize(MobileNetV1Backbone((0, 5, 11, 13), depth_multiplier=0.25, tf_padding=True), seed=7)


def _assert_same(got: dict, expected: dict, atol: float = 1e-6) -> None:
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=1e-5)


def test_fx_symbolic_trace_keeps_tf_padding_dynamic() -> None:
    backbone = _backbone()
    traced = torch.fx.symbolic_trace(backbone)
    for size in [(97, 131), (96, 130)]:  # odd and even sizes move the TF SAME padding
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            _assert_same(traced(x), backbone(x))
    with pytest.raises(ValueError, match="at least 32x32"):
        traced(torch.randn(1, 3, 16, 16))


def test_torchvision_feature_extractor() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    backbone = _backbone()
    extractor = create_feature_extractor(backbone, {"layer.9": "c3", "layer.25": "c5"})
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        out, expected = extractor(x), backbone(x)
    torch.testing.assert_close(out["c3"], expected["Conv2d_5_pointwise"])
    torch.testing.assert_close(out["c5"], expected["Conv2d_13_pointwise"])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_script_and_trace() -> None:
    backbone = _backbone()
    scripted = torch.jit.script(backbone)
    x_odd, x_even = torch.randn(1, 3, 97, 131), torch.randn(2, 3, 96, 130)
    with torch.no_grad():
        _assert_same(scripted(x_odd), backbone(x_odd))
        _assert_same(scripted(x_even), backbone(x_even))
        traced = torch.jit.trace(backbone, x_odd, strict=False, check_trace=False)
        # The traced graph keeps the padding arithmetic, so other sizes still pad as TF does.
        _assert_same(traced(x_even), backbone(x_even))
    with pytest.raises(Exception, match="at least 32x32"):
        scripted(torch.randn(1, 3, 16, 16))


def test_torch_export_static_and_dynamic_sizes() -> None:
    backbone = _backbone()
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        exported = torch.export.export(backbone, (x,))
        _assert_same(exported.module()(x), backbone(x))
        # Dynamic sizes need every map to be >= 2 pixels (export specialises sizes 0 and 1): H, W >= 33.
        height, width = torch.export.Dim("height", min=33, max=4096), torch.export.Dim("width", min=33, max=4096)
        dynamic = torch.export.export(backbone, (x,), dynamic_shapes=({2: height, 3: width},))
        for size in [(96, 130), (225, 64)]:
            y = torch.randn(1, 3, *size)
            _assert_same(dynamic.module()(y), backbone(y))


# --- weights -----------------------------------------------------------------------------------------


def test_from_pretrained_hf_directory_loads_the_trunk(tmp_path) -> None:
    hf = hf_classifier(0.25, seed=8)
    hf.save_pretrained(tmp_path)
    backbone = MobileNetV1Backbone.from_pretrained(tmp_path, out_indices=(5, 11), output_stride=16).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        hidden = hf(x, output_hidden_states=True).hidden_states
        out = backbone(x)
    torch.testing.assert_close(out["Conv2d_5_pointwise"], hidden[9], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["Conv2d_11_pointwise"], hidden[21], atol=1e-6, rtol=0)


def test_from_pretrained_our_safetensors_file(tmp_path) -> None:
    from mnv1_backbone.weights import save_safetensors

    source = randomize(MobileNetV1Backbone(tuple(range(14)), depth_multiplier=0.5))
    save_safetensors(source, tmp_path / "trunk.safetensors", source.config)
    loaded = MobileNetV1Backbone.from_pretrained(tmp_path / "trunk.safetensors", out_indices=(13,), frozen_stages=2)
    loaded.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["Conv2d_13_pointwise"], source(x)["Conv2d_13_pointwise"])
    assert loaded.frozen_stages == 2


def test_from_pretrained_rejects_architecture_overrides(tmp_path) -> None:
    hf_classifier(0.25).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="depth_multiplier"):
        MobileNetV1Backbone.from_pretrained(tmp_path, depth_multiplier=0.5)


# --- issue 14: loaders return eval models; TF checkpoints with explicit padding --------------------------------
TF_CHECKPOINT = Path(__file__).parent / "fixtures" / "tf_slim" / "mobilenet_v1_0.25_128.ckpt"


def test_backbone_loaders_return_eval_models(tmp_path) -> None:
    from mnv1_backbone import MobileNetV1Config, MobileNetV1ForImageClassification

    assert MobileNetV1Backbone(depth_multiplier=0.25).training
    MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=0.25)).save_pretrained(tmp_path)
    for backbone in (MobileNetV1Backbone.from_pretrained(tmp_path), MobileNetV1Backbone.from_tf(TF_CHECKPOINT)):
        assert not any(module.training for module in backbone.modules())


def test_backbone_from_tf_accepts_explicit_padding() -> None:
    explicit = MobileNetV1Backbone.from_tf(TF_CHECKPOINT, out_indices=(13,), tf_padding=False)
    same = MobileNetV1Backbone.from_tf(TF_CHECKPOINT, out_indices=(13,))
    assert explicit.config.tf_padding is False and same.config.tf_padding is True
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (explicit(x)["Conv2d_13_pointwise"] - same(x)["Conv2d_13_pointwise"]).abs().max() > 1e-3
    from mnv1_backbone.weights import load_tf

    config, state_dict = load_tf(TF_CHECKPOINT)
    with pytest.raises(ValueError, match="tf_padding"):  # a config records its padding: only TF files take it
        MobileNetV1Backbone.from_state_dict(config, state_dict, tf_padding=False)
