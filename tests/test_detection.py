"""Detection builders: training and inference through torchvision, freezing, learning, scripting, weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image
from torchvision.transforms.v2.functional import resize

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1Config, MobileNetV1ForImageClassification
from mnv1_backbone import detection as det
from mnv1_backbone.layers import FrozenBatchNorm2d
from mnv1_backbone.pretrained import find_bundled_frozen_graph

DATA = Path(__file__).parent / "data"

BUILDERS = {
    "ssdlite": det.ssdlite320_mobilenet_v1,
    "fasterrcnn": det.fasterrcnn_mobilenet_v1_fpn,
    "maskrcnn": det.maskrcnn_mobilenet_v1_fpn,
    "retinanet": det.retinanet_mobilenet_v1_fpn,
    "fcos": det.fcos_mobilenet_v1_fpn,
}
# Small internal sizes keep CPU time low; the builders' defaults are torchvision's.
SMALL = {"ssdlite": {}, "retinanet": {"min_size": 160, "max_size": 224}, "fcos": {"min_size": 160, "max_size": 224}}
# 64 sampled RoIs per image instead of 512: the 12544x1024 box-head FC dominates CPU time otherwise.
SMALL.update({name: {**SMALL["fcos"], "box_batch_size_per_image": 64} for name in ("fasterrcnn", "maskrcnn")})


def _build(name: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return BUILDERS[name](**{**SMALL[name], **kwargs})


def _backbone(model) -> MobileNetV1Backbone:
    return model.backbone.backbone if hasattr(model.backbone, "backbone") else model.backbone.body


def _targets(images: list[torch.Tensor], with_masks: bool) -> list[dict[str, torch.Tensor]]:
    targets = []
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        boxes = torch.tensor([[0.1 * width, 0.2 * height, 0.6 * width, 0.7 * height],
                              [0.5 * width, 0.4 * height, 0.95 * width, 0.9 * height]])[: i + 1]
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])[: i + 1]}
        if with_masks:
            masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                masks[m, y1:y2, x1:x2] = 1
            target["masks"] = masks
        targets.append(target)
    return targets


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory):
    """HF-format classifier directories (random weights, random BN statistics) at widths 0.25 and 1.0."""
    dirs = {}
    for alpha in (0.25, 1.0):
        path = tmp_path_factory.mktemp(f"classifier_{alpha}")
        randomize(MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=alpha)), seed=3)
        model = randomize(MobileNetV1ForImageClassification(MobileNetV1Config(depth_multiplier=alpha)), seed=3)
        model.save_pretrained(path)
        dirs[alpha] = path
    return dirs


@pytest.mark.parametrize("depth_multiplier", [0.25, 1.0])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_train_and_eval_forward(name: str, depth_multiplier: float, classifier_dirs) -> None:
    torch.manual_seed(0)
    model = _build(name, num_classes=4, weights_backbone=classifier_dirs[depth_multiplier], trainable_backbone_layers=2)
    images = [torch.rand(3, 120, 170), torch.rand(3, 150, 100)]  # non-square, different sizes in one batch
    model.train()
    losses = model(images, _targets(images, with_masks=name == "maskrcnn"))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    backbone = _backbone(model)
    trainable_ids = set()
    for stage in range(4, 6):  # 2 trainable stages from the top
        trainable_ids |= {id(p) for m in backbone.stage_modules(stage) for p in m.parameters()}
    for parameter in backbone.parameters():
        if id(parameter) in trainable_ids:
            assert parameter.requires_grad and parameter.grad is not None
        else:
            assert not parameter.requires_grad and parameter.grad is None
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for image, output in zip(images, detections, strict=True):
        height, width = image.shape[-2:]
        assert set(output) >= {"boxes", "labels", "scores"}
        boxes = output["boxes"]
        assert boxes.shape[1] == 4 and len(output["labels"]) == len(boxes) == len(output["scores"])
        if len(boxes):
            # Boxes are clipped to the resized image, then scaled back: float rounding can add ~1e-5.
            assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= width + 1e-3
            assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= height + 1e-3
            assert output["labels"].min() >= 1 and output["labels"].max() <= 3


@pytest.mark.parametrize("name", list(BUILDERS))
def test_frozen_layers_stay_frozen_through_a_train_step(name: str, classifier_dirs) -> None:
    model = _build(name, num_classes=3, weights_backbone=classifier_dirs[0.25], trainable_backbone_layers=3)
    backbone = _backbone(model)
    frozen = [m for stage in range(3) for m in backbone.stage_modules(stage)]
    assert all(isinstance(m.normalization, FrozenBatchNorm2d) for m in frozen)
    assert all(m.normalization.eps == 1e-3 for m in frozen)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]  # SSD's 1x1 last level needs batch > 1 for BN
    sum(model(images, _targets(images, with_masks=name == "maskrcnn")).values()).backward()
    optimizer.step()
    after = backbone.state_dict()
    frozen_prefixes = [n + "." for n, m in backbone.named_modules() if any(m is f for f in frozen)]
    changed_trainable = False
    for key, value in before.items():
        if any(key.startswith(prefix) for prefix in frozen_prefixes):
            torch.testing.assert_close(after[key], value, atol=0, rtol=0)
        elif not torch.equal(after[key], value):
            changed_trainable = True
    assert changed_trainable


def _learning_data(num_images: int = 4, size: int = 128):
    """Bright rectangles (class 1) and dark ones (class 2) on noise: something a detector can learn quickly."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(num_images):
        image = torch.rand(3, size, size, generator=generator) * 0.3 + 0.35
        boxes, labels = [], []
        for label in (1, 2):
            w, h = torch.randint(size // 4, size // 2, (2,), generator=generator).tolist()
            x, y = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            image[:, y : y + h, x : x + w] = 1.0 if label == 1 else 0.0
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


@pytest.mark.parametrize("name", list(BUILDERS))
def test_loss_halves_on_a_small_problem(name: str) -> None:
    torch.manual_seed(0)
    kwargs = {"size": 96} if name == "ssdlite" else {**SMALL[name], "min_size": 96, "max_size": 96}
    builder = det.ssdlite_mobilenet_v1 if name == "ssdlite" else BUILDERS[name]
    model = builder(num_classes=3, depth_multiplier=0.25, **kwargs)
    images, targets = _learning_data(size=96)
    if name == "maskrcnn":
        for image, target in zip(images, targets, strict=True):
            masks = torch.zeros(len(target["boxes"]), *image.shape[-2:], dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in enumerate(target["boxes"].int().tolist()):
                masks[m, y1:y2, x1:x2] = 1
            target["masks"] = masks
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model.train()
    history = []
    for _ in range(60):
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        history.append(loss.item())
        if len(history) >= 5 and sum(history[-3:]) / 3 <= history[0] / 2:
            break
    assert sum(history[-3:]) / 3 <= history[0] / 2, history


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(BUILDERS))
def test_torchscript(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name, num_classes=3, depth_multiplier=0.25).eval()
    scripted = torch.jit.script(model)
    images = [torch.rand(3, 128, 150)]
    with torch.no_grad():
        expected = model(images)
        _, got = scripted(images)  # scripted detectors return (losses, detections)
    torch.testing.assert_close(got[0]["boxes"], expected[0]["boxes"])
    torch.testing.assert_close(got[0]["scores"], expected[0]["scores"])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_weights_backbone_gives_exactly_the_classifier_trunk(name: str, classifier_dirs) -> None:
    classifier = MobileNetV1ForImageClassification.from_pretrained(classifier_dirs[0.25]).eval()
    model = _build(name, num_classes=3, weights_backbone=classifier_dirs[0.25]).eval()
    backbone = _backbone(model)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        hidden = classifier(x, output_hidden_states=True).hidden_states
        features = backbone(x)
    for info in backbone.feature_info:
        torch.testing.assert_close(features[info.name], hidden[2 * info.index - 1], atol=0, rtol=0)


def test_weights_backbone_accepts_our_safetensors_file(tmp_path, classifier_dirs) -> None:
    from mnv1_backbone.weights import save_safetensors

    classifier = MobileNetV1ForImageClassification.from_pretrained(classifier_dirs[0.25])
    save_safetensors(classifier, tmp_path / "c.safetensors", classifier.config)
    model = det.ssdlite320_mobilenet_v1(num_classes=3, weights_backbone=tmp_path / "c.safetensors")
    torch.testing.assert_close(
        _backbone(model).conv_stem.convolution.weight, classifier.mobilenet_v1.conv_stem.convolution.weight
    )


@pytest.mark.parametrize("name", ["ssdlite", "retinanet"])
def test_detector_weights_round_trip(tmp_path, name: str) -> None:
    from safetensors.torch import save_file

    model = _build(name, num_classes=3, depth_multiplier=0.25).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "det.safetensors"))
    again = _build(name, num_classes=3, depth_multiplier=0.25, weights=tmp_path / "det.safetensors").eval()
    images = [torch.rand(3, 128, 128)]
    with torch.no_grad():
        torch.testing.assert_close(again(images)[0]["scores"], model(images)[0]["scores"])
    with pytest.raises(ValueError, match="wrong shape"):
        _build(name, num_classes=5, depth_multiplier=0.25, weights=tmp_path / "det.safetensors")


def test_trainable_layers_follow_torchvision(classifier_dirs) -> None:
    with pytest.warns(UserWarning, match="no effect if weights_backbone is not set"):
        model = det.ssdlite320_mobilenet_v1(num_classes=3, depth_multiplier=0.25, trainable_backbone_layers=2)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="trainable_backbone_layers must be an int in \\[0, 6\\]"):
        det.fasterrcnn_mobilenet_v1_fpn(weights_backbone=classifier_dirs[0.25], trainable_backbone_layers=7)
    default = det.fasterrcnn_mobilenet_v1_fpn(weights_backbone=classifier_dirs[0.25])
    assert _backbone(default).frozen_stages == 3  # torchvision's default: 3 trainable


def test_bad_arguments_raise(classifier_dirs) -> None:
    with pytest.raises(ValueError, match="depth_multiplier=0.5 does not match the backbone weights' 0.25"):
        det.retinanet_mobilenet_v1_fpn(weights_backbone=classifier_dirs[0.25], depth_multiplier=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        det.fcos_mobilenet_v1_fpn(num_classes=1)
    with pytest.raises(FileNotFoundError):
        det.ssdlite320_mobilenet_v1(weights_backbone="/nonexistent/dir")


def test_fpn_backbone_levels_and_channels() -> None:
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    fpn = det.mobilenet_v1_fpn_backbone(depth_multiplier=0.25, extra_blocks=LastLevelP6P7(256, 256))
    assert fpn.out_channels == 256 and fpn.strides == [8, 16, 32, 64, 128]
    out = fpn(torch.randn(1, 3, 128, 192))
    assert list(out) == ["0", "1", "2", "p6", "p7"]
    for (name, value), stride in zip(out.items(), fpn.strides, strict=True):
        assert value.shape == (1, 256, -(-128 // stride), -(-192 // stride)), name


def test_bring_your_own_detector() -> None:
    """The bare backbone drops into torchvision's SSD and FeaturePyramidNetwork by hand (the docs' recipe)."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    from torchvision.ops import FeaturePyramidNetwork

    backbone = MobileNetV1Backbone(out_indices=(11, 13), depth_multiplier=0.25)
    anchors = DefaultBoxGenerator([[2], [2, 3]])
    model = SSD(backbone, anchors, (192, 192), num_classes=3).eval()  # SSD reads backbone.out_channels
    with torch.no_grad():
        assert set(model([torch.rand(3, 150, 200)])[0]) == {"boxes", "scores", "labels"}
    fpn = FeaturePyramidNetwork(backbone.out_channels, 64)
    maps = fpn(backbone(torch.randn(1, 3, 128, 128)))
    assert [tuple(v.shape) for v in maps.values()] == [(1, 64, 8, 8), (1, 64, 4, 4)]


def test_weights_backbone_accepts_a_tf_checkpoint() -> None:
    """Google's TF-slim checkpoints (here a TF-written fixture) initialise detection backbones directly."""
    from pathlib import Path

    prefix = Path(__file__).parent / "fixtures" / "tf_slim" / "mobilenet_v1_0.25_128.ckpt"
    if not Path(f"{prefix}.index").is_file():
        pytest.skip("TF-slim fixture missing")
    classifier = MobileNetV1ForImageClassification.from_tf(prefix)
    model = det.ssdlite320_mobilenet_v1(num_classes=3, weights_backbone=prefix)
    assert _backbone(model).config.depth_multiplier == 0.25
    torch.testing.assert_close(
        _backbone(model).layer[0].convolution.weight, classifier.mobilenet_v1.layer[0].convolution.weight
    )


def test_ssd_network_decodes_exactly_like_the_detector() -> None:
    """SSDNetwork (the exportable part) + decode_ssd give model(images), bit for bit."""
    model = randomize(det.ssdlite320_mobilenet_v1(num_classes=5, depth_multiplier=0.25), seed=1)
    images = [torch.rand(3, 320, 320, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    network = det.SSDNetwork(model).eval()
    with torch.no_grad():
        expected = model(images)
        box_regression, class_logits, anchors = network(torch.stack(images))
    assert box_regression.shape == (2, anchors.shape[0], 4) and class_logits.shape == (2, anchors.shape[0], 5)
    got = det.decode_ssd(model, box_regression, class_logits, anchors)
    scaled = det.decode_ssd(model, box_regression, class_logits, anchors, original_sizes=[(640, 480), (320, 320)])
    for got_image, expected_image in zip(got, expected, strict=True):
        assert len(expected_image["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(got_image[key], expected_image[key]), key
    torch.testing.assert_close(scaled[0]["boxes"], got[0]["boxes"] * torch.tensor([1.5, 2.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match=r"expected \(B, 3, 320, 320\) images, got \(1, 3, 300, 300\)"):
        network(torch.rand(1, 3, 300, 300))
    with pytest.raises(ValueError, match="got 1 original sizes for 2 images"):
        det.decode_ssd(model, box_regression, class_logits, anchors, original_sizes=[(1, 1)])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="needs the real weights (nudity wheel)")
def test_ssd_network_exports_to_torch_export_and_onnx(tmp_path) -> None:
    """torch.export and ONNX (checked with onnxruntime) of SSDLite's network, on a real photo."""
    model = det.ssdlite320_mobilenet_v1(num_classes=91, weights_backbone=find_bundled_frozen_graph()).eval()
    network = det.SSDNetwork(model).eval()
    photo = torch.from_numpy(np.asarray(Image.open(DATA / "chelsea.png").convert("RGB"))).permute(2, 0, 1)
    x = resize(photo, [320, 320], antialias=True)[None].float() / 255
    with torch.no_grad():
        expected = network(x)
    exported = torch.export.export(network, (x,))
    with torch.no_grad():
        for got, want in zip(exported.module()(x), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "ssdlite.onnx"
    names = ["box_regression", "class_logits", "anchors"]
    torch.onnx.export(network, (x,), path, dynamo=True, external_data=False, input_names=["images"], output_names=names)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": x.numpy()})
    for got, want in zip(outputs, expected, strict=True):
        assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4


def test_weights_backbone_with_explicit_padding() -> None:
    """TF-slim checkpoints trained with use_explicit_padding=True: the padding is given with the weights."""
    prefix = Path(__file__).parent / "fixtures" / "tf_slim" / "mobilenet_v1_0.25_128.ckpt"
    explicit = det.ssdlite_mobilenet_v1(
        size=128, weights_backbone=det.BackboneWeights(prefix, tf_padding=False), num_classes=3
    )
    same = det.ssdlite_mobilenet_v1(size=128, weights_backbone=prefix, num_classes=3)
    assert explicit.backbone.backbone.config.tf_padding is False and same.backbone.backbone.config.tf_padding
    fpn = det.fasterrcnn_mobilenet_v1_fpn(weights_backbone=det.BackboneWeights(str(prefix), tf_padding=False),
                                          num_classes=3)
    assert fpn.backbone.body.config.tf_padding is False
    torch.testing.assert_close(
        explicit.backbone.backbone.layer[3].convolution.weight, same.backbone.backbone.layer[3].convolution.weight
    )
