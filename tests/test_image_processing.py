"""Tests for `mnv1_backbone.image_processing` and `mnv1_backbone.labels`.

Oracle: transformers' MobileNetV1 image processors, both backends when present: the torchvision one
(`MobileNetV1ImageProcessor`, what `AutoImageProcessor` returns) and the PIL one (`MobileNetV1ImageProcessorPil`).
We resize on uint8 with torchvision like the former, so we expect float-rounding agreement with it and at most one
uint8 step (2/255 after normalisation with std 0.5) against Pillow's resampling.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mnv1_backbone.image_processing import (
    BatchFeature,
    MobileNetV1ImageProcessor,
    post_process_image_classification,
)
from mnv1_backbone.labels import imagenet_id2label, imagenet_labels

DATA = Path(__file__).parent / "data"
PHOTOS = ["chelsea.png", "coffee.png"]
ONE_STEP = 2 / 255  # one uint8 step after rescale (1/255) and normalisation (std 0.5)
FLOAT_TOL = 1e-5
BACKENDS = ["torchvision", "pil"]
# (height, width): tiny, portrait, landscape, large, square, already at 256, odd crop margins (259 - 224 = 35),
# one pixel, extreme aspect ratio.
ODD_SIZES = [
    (10, 7),
    (7, 10),
    (300, 451),
    (451, 300),
    (1000, 333),
    (1200, 1600),
    (224, 224),
    (259, 256),
    (259, 700),
    (1, 1),
    (33, 2000),
]


def _hf_processor(backend: str, **kwargs):
    module = pytest.importorskip("transformers.models.mobilenet_v1")
    name = "MobileNetV1ImageProcessor" if backend == "torchvision" else "MobileNetV1ImageProcessorPil"
    cls = getattr(module, name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    return cls(**kwargs)


def _hf_pixels(backend: str, images, **kwargs) -> torch.Tensor:
    call_kwargs = {key: kwargs.pop(key) for key in ("do_convert_rgb", "do_rescale") if key in kwargs}
    return _hf_processor(backend, **kwargs)(images, return_tensors="pt", **call_kwargs)["pixel_values"]


def _tolerance(backend: str, std: float = 0.5) -> float:
    """Float rounding against HF's torchvision backend; one uint8 step, 1 / (255 * std), against Pillow's resize."""
    return FLOAT_TOL if backend == "torchvision" else 1 / (255 * std) + 1e-6


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _photo(name: str = "chelsea.png") -> Image.Image:
    with Image.open(DATA / name) as image:
        return image.convert("RGB")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


RAW = {"do_resize": False, "do_center_crop": False, "do_rescale": False, "do_normalize": False}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run this module's small tensor ops on one thread, restoring the count afterwards.

    On a busy two-core machine torch's intra-op pool made each 224x224 op take tens of milliseconds (threads waiting
    for each other); with one thread the module runs about ten times faster. Results do not depend on it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("index", "label"),
    [
        (0, "background"),
        (1, "tench, Tinca tinca"),
        (282, "tabby, tabby cat"),
        (283, "tiger cat"),
        (401, "academic gown, academic robe, judge's robe"),
        (968, "espresso"),
        (1000, "toilet tissue, toilet paper, bathroom tissue"),
    ],
)
def test_known_labels(index: int, label: str) -> None:
    assert imagenet_labels()[index] == label
    assert imagenet_id2label()[index] == label


def test_labels_shape_and_copies() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1001
    assert all(label and label == label.strip() for label in labels)
    assert imagenet_id2label() == dict(enumerate(labels))
    labels[0] = "changed"
    assert imagenet_labels()[0] == "background"


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("photo", PHOTOS)
def test_parity_real_photos(photo: str, backend: str) -> None:
    image = _photo(photo)
    ours = MobileNetV1ImageProcessor()(image)["pixel_values"]
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    assert _max_diff(ours, _hf_pixels(backend, image)) <= _tolerance(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("height", "width"), ODD_SIZES)
def test_parity_random_sizes(height: int, width: int, backend: str) -> None:
    image = Image.fromarray(_random_rgb(height, width, seed=height * 7 + width))
    ours = MobileNetV1ImageProcessor()(image)["pixel_values"]
    assert _max_diff(ours, _hf_pixels(backend, image)) <= _tolerance(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_non_default_settings(backend: str) -> None:
    settings = {
        "size": {"shortest_edge": 160},
        "crop_size": {"height": 128, "width": 96},
        "resample": 3,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    image = _photo("coffee.png")
    ours = MobileNetV1ImageProcessor(**settings)(image)["pixel_values"]
    assert ours.shape == (1, 3, 128, 96)
    assert _max_diff(ours, _hf_pixels(backend, image, **settings)) <= _tolerance(backend, std=0.224)


@pytest.mark.parametrize(("height", "width"), [(10, 7), (7, 250), (259, 224)])
def test_center_crop_without_resize_matches_hf_torchvision(height: int, width: int) -> None:
    # Too-small images are zero-padded (extra pixel after) and odd margins round down, as HF's torchvision backend.
    image = _random_rgb(height, width, seed=3)
    ours = MobileNetV1ImageProcessor(do_resize=False)(image)["pixel_values"]
    assert _max_diff(ours, _hf_pixels("torchvision", image, do_resize=False)) <= FLOAT_TOL


def test_center_crop_offset_rounds_down() -> None:
    rows = torch.arange(259, dtype=torch.uint8).view(1, 259, 1).expand(3, 259, 224)
    pixels = MobileNetV1ImageProcessor(do_resize=False, do_normalize=False, do_rescale=False)(rows)["pixel_values"]
    assert pixels[0, 0, 0, 0].item() == 17  # (259 - 224) / 2 = 17.5 -> 17; torchvision's center_crop gives 18


def test_resize_rounds_long_edge_down() -> None:
    processor = MobileNetV1ImageProcessor(do_center_crop=False)
    # 256 * 451 / 300 = 384.85 -> 384; 256 * 1000 / 333 = 768.77 -> 768.
    assert processor(_random_rgb(300, 451))["pixel_values"].shape == (1, 3, 256, 384)
    assert processor(_random_rgb(1000, 333))["pixel_values"].shape == (1, 3, 768, 256)


def test_batch_matches_single_images_and_hf() -> None:
    images = [_photo("chelsea.png"), Image.fromarray(_random_rgb(10, 7)), _photo("coffee.png")]
    processor = MobileNetV1ImageProcessor()
    batch = processor(images)["pixel_values"]
    assert batch.shape == (3, 3, 224, 224)
    for index, image in enumerate(images):
        assert torch.equal(batch[index], processor(image)["pixel_values"][0])
    assert _max_diff(batch, _hf_pixels("torchvision", images)) <= FLOAT_TOL


# ----------------------------------------------------------------------------------------------------------------
# Input kinds
# ----------------------------------------------------------------------------------------------------------------
def _chelsea_uint8() -> np.ndarray:
    """A 150x200 part of the cat photo: real texture, small enough to keep the input-kind tests fast."""
    return np.array(_photo("chelsea.png"))[60:210, 120:320]


@pytest.mark.parametrize(
    "make",
    [
        lambda array: array,  # numpy (H, W, 3) uint8
        lambda array: torch.from_numpy(array).permute(2, 0, 1),  # tensor (3, H, W) uint8, non-contiguous
        lambda array: [Image.fromarray(array)],  # list of one PIL image
        lambda array: torch.from_numpy(array).permute(2, 0, 1)[None],  # 4-D batch tensor
        lambda array: array[None],  # 4-D batch array (N, H, W, C)
    ],
    ids=["numpy", "tensor", "list", "tensor-batch", "numpy-batch"],
)
def test_uint8_inputs_equal_pil(make) -> None:
    array = _chelsea_uint8()
    processor = MobileNetV1ImageProcessor()
    expected = processor(Image.fromarray(array))["pixel_values"]
    assert torch.equal(processor(make(array))["pixel_values"], expected)


@pytest.mark.parametrize("kind", ["tensor", "numpy32", "numpy64"])
def test_float_inputs_in_unit_range(kind: str) -> None:
    array = _chelsea_uint8()
    unit = array.astype(np.float64) / 255
    image = {
        "tensor": torch.from_numpy(unit).float().permute(2, 0, 1),
        "numpy32": unit.astype(np.float32),
        "numpy64": unit,
    }[kind]
    ours = MobileNetV1ImageProcessor()(image)["pixel_values"]
    # Floats are resized without uint8 rounding: within one step of the uint8 result ...
    assert _max_diff(ours, MobileNetV1ImageProcessor()(array)["pixel_values"]) <= ONE_STEP
    # ... and equal to HF's torchvision backend told not to rescale (HF rescales floats by 1/255 again otherwise).
    hf = _hf_pixels("torchvision", torch.from_numpy(unit).float().permute(2, 0, 1), do_rescale=False)
    assert _max_diff(ours, hf) <= FLOAT_TOL


@pytest.mark.parametrize(
    "make",
    [
        lambda gray: Image.fromarray(gray),
        lambda gray: gray,
        lambda gray: gray[..., None],
        lambda gray: torch.from_numpy(gray),
        lambda gray: torch.from_numpy(gray)[None],
    ],
    ids=["pil-L", "numpy-HW", "numpy-HW1", "tensor-HW", "tensor-1HW"],
)
def test_grayscale_inputs(make) -> None:
    gray = np.array(Image.fromarray(_chelsea_uint8()).convert("L"))
    ours = MobileNetV1ImageProcessor()(make(gray))["pixel_values"]
    assert torch.equal(ours[:, 0], ours[:, 1]) and torch.equal(ours[:, 0], ours[:, 2])
    hf = _hf_pixels("torchvision", Image.fromarray(gray), do_convert_rgb=True)
    assert _max_diff(ours, hf) <= FLOAT_TOL


def _rgba_photo() -> np.ndarray:
    rgb = _chelsea_uint8()
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    alpha[:100] = 0  # fully transparent band: must come out white
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rgba_pil_composited_on_white_like_hf(backend: str) -> None:
    image = Image.fromarray(_rgba_photo())
    ours = MobileNetV1ImageProcessor()(image)["pixel_values"]
    assert _max_diff(ours, _hf_pixels(backend, image, do_convert_rgb=True)) <= _tolerance(backend)


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_rgba_arrays_round_like_pillow(kind: str) -> None:
    # Every (colour, alpha) pair once: the integer blend must equal Pillow's alpha_composite exactly.
    colour, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rgba = np.stack([colour, colour[::-1], np.full_like(colour, 7), alpha], axis=-1)
    image = rgba if kind == "numpy" else torch.from_numpy(rgba).permute(2, 0, 1)
    processor = MobileNetV1ImageProcessor(**RAW)
    expected = processor(Image.fromarray(rgba))["pixel_values"]
    assert torch.equal(processor(image)["pixel_values"], expected)
    assert (expected[0, :, :, 0] == 255).all()  # alpha 0 -> white


def test_float_rgba_tensor() -> None:
    rgba = torch.tensor([[[0.2]], [[0.4]], [[1.0]], [[0.5]]])
    pixels = MobileNetV1ImageProcessor(**RAW)(rgba)["pixel_values"]
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor([0.6, 0.7, 1.0]) * 255)


@pytest.mark.parametrize("mode", ["P", "PA", "LA", "CMYK", "1", "RGBX"])
def test_other_pil_modes_like_hf(mode: str) -> None:
    rgba = Image.fromarray(_rgba_photo()[:64, :80])
    if mode == "P":
        image = rgba.convert("RGB").quantize(16)
        image.info["transparency"] = 3  # palette colour key, as GIF/PNG files carry it
    elif mode == "PA":
        image = rgba.convert("PA")
    else:
        image = rgba.convert(mode)
    ours = MobileNetV1ImageProcessor()(image)["pixel_values"]
    assert _max_diff(ours, _hf_pixels("torchvision", image, do_convert_rgb=True)) <= FLOAT_TOL


def test_return_tensor_kinds() -> None:
    images = [_random_rgb(30, 40), _random_rgb(50, 20, seed=1)]
    processor = MobileNetV1ImageProcessor()
    pt = processor(images)
    assert isinstance(pt, BatchFeature) and pt.pixel_values is pt["pixel_values"]
    as_numpy = processor(images, return_tensors="np")["pixel_values"]
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    np.testing.assert_array_equal(as_numpy, pt["pixel_values"].numpy())
    as_list = processor(images, return_tensors=None)["pixel_values"]
    assert isinstance(as_list, list) and torch.equal(torch.stack(as_list), pt["pixel_values"])
    assert pt.to(torch.float64)["pixel_values"].dtype == torch.float64


def test_unstacked_sizes_without_crop_match_hf() -> None:
    images = [_random_rgb(30, 40), _random_rgb(50, 20, seed=1)]
    processor = MobileNetV1ImageProcessor(do_center_crop=False)
    with pytest.raises(ValueError, match="different sizes"):
        processor(images)
    ours = processor(images, return_tensors=None)["pixel_values"]
    hf = _hf_processor("torchvision", do_center_crop=False)(images)["pixel_values"]
    assert [tuple(image.shape) for image in ours] == [(3, 256, 341), (3, 640, 256)]
    for mine, theirs in zip(ours, hf, strict=True):
        assert _max_diff(mine, theirs) <= FLOAT_TOL


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        ([], ValueError, "empty list"),
        ([[np.zeros((8, 8, 3), np.uint8)]], TypeError, r"images\[0\] is a list; pass a flat list"),
        ("cat.png", TypeError, "unsupported type builtins.str"),
        (np.zeros((3, 20, 20), np.uint8), ValueError, r"shape \(3, 20, 20\); numpy images are channels-last"),
        (np.zeros((20, 20, 2), np.uint8), ValueError, "channels-last"),
        (np.zeros((20, 20, 3), np.int64), TypeError, "dtype int64; expected uint8"),
        (np.zeros(20, np.uint8), ValueError, "1 dimensions"),
        (torch.zeros(5, 8, 8, dtype=torch.uint8), ValueError, "has 5 channels"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), ValueError, r"has 8 channels.*channels-first"),
        (torch.zeros(1, 1, 3, 8, 8), ValueError, "5 dimensions"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), TypeError, "torch.int32"),
        (torch.full((3, 8, 8), 255.0), ValueError, r"values in \[255.0, 255.0\].*\[0, 1\]"),
        (torch.full((3, 8, 8), math.nan), ValueError, "NaN value"),
        (torch.zeros(3, 0, 8, dtype=torch.uint8), ValueError, "is empty"),
        (torch.zeros(0, 3, 8, 8), ValueError, "empty batch"),
        ([_random_rgb(8, 8), "x"], TypeError, r"images\[1\] has unsupported type"),
        (Image.new("I;16", (8, 8)), ValueError, "more than 8 bits"),
    ],
)
def test_bad_images(images, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MobileNetV1ImageProcessor()(images)


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"size": {"longest_edge": 5}}, ValueError, "size must be"),
        ({"size": 0}, ValueError, "size must be a positive int, got 0"),
        ({"crop_size": {"shortest_edge": 5}}, ValueError, "crop_size must be"),
        ({"resample": 4}, ValueError, r"resample must be .*2 \(BILINEAR\).*got 4"),
        ({"image_std": 0.0}, ValueError, "image_std must not contain 0"),
        ({"image_mean": [0.5, 0.5]}, ValueError, "image_mean must be one number or three"),
        ({"rescale_factor": -1.0}, ValueError, "rescale_factor must be a positive number"),
        ({"do_resize": "yes"}, TypeError, "do_resize must be True or False"),
    ],
)
def test_bad_settings(settings: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MobileNetV1ImageProcessor(**settings)


def test_settings_rechecked_on_call() -> None:
    processor = MobileNetV1ImageProcessor()
    processor.resample = 5
    with pytest.raises(ValueError, match="resample must be"):
        processor(_random_rgb(8, 8))
    processor.resample = 2
    with pytest.raises(ValueError, match="return_tensors must be"):
        processor(_random_rgb(8, 8), return_tensors="tf")


# ----------------------------------------------------------------------------------------------------------------
# Config files, both ways through transformers
# ----------------------------------------------------------------------------------------------------------------
CUSTOM = {
    "size": {"shortest_edge": 160},
    "crop_size": {"height": 128, "width": 128},
    "resample": 3,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("settings", [{}, CUSTOM], ids=["defaults", "custom"])
def test_ours_saved_loads_in_transformers(tmp_path: Path, settings: dict, backend: str) -> None:
    transformers = pytest.importorskip("transformers")
    ours = MobileNetV1ImageProcessor(**settings)
    ours.save_pretrained(tmp_path)
    # The plain call is what users write; it must give HF's default (torchvision) class.
    extra = {} if backend == "torchvision" else {"backend": "pil"}
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path, **extra)
    expected_class = "MobileNetV1ImageProcessor" if backend == "torchvision" else "MobileNetV1ImageProcessorPil"
    assert type(theirs).__name__ == expected_class
    assert json.loads(theirs.to_json_string()) == ours.to_dict()
    image = _photo("chelsea.png")
    tolerance = _tolerance(backend, std=min(ours.image_std))
    assert _max_diff(ours(image)["pixel_values"], theirs(image, return_tensors="pt")["pixel_values"]) <= tolerance


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("settings", [{}, CUSTOM], ids=["defaults", "custom"])
def test_transformers_saved_loads_in_ours(tmp_path: Path, settings: dict, backend: str) -> None:
    theirs = _hf_processor(backend, **settings)
    theirs.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "preprocessor_config.json").read_text())
    for source in (tmp_path, tmp_path / "preprocessor_config.json", str(tmp_path)):
        ours = MobileNetV1ImageProcessor.from_pretrained(source)
        assert ours.to_dict() == written
    image = _photo("coffee.png")
    tolerance = _tolerance(backend, std=min(ours.image_std))
    assert _max_diff(ours(image)["pixel_values"], theirs(image, return_tensors="pt")["pixel_values"]) <= tolerance


def test_legacy_config_like_transformers(tmp_path: Path) -> None:
    # Old feature-extractor files store plain ints: size = shortest edge, crop_size = square side.
    legacy = {
        "feature_extractor_type": "MobileNetV1FeatureExtractor",
        "crop_size": 192,
        "size": 224,
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    ours = MobileNetV1ImageProcessor.from_pretrained(tmp_path)
    assert ours.size == {"shortest_edge": 224} and ours.crop_size == {"height": 192, "width": 192}
    image = _photo("chelsea.png")
    theirs = _hf_processor("torchvision", **{k: v for k, v in legacy.items() if k != "feature_extractor_type"})
    assert _max_diff(ours(image)["pixel_values"], theirs(image, return_tensors="pt")["pixel_values"]) <= FLOAT_TOL


def test_config_warnings_and_errors(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"\['crop_pct'\]"):
        MobileNetV1ImageProcessor.from_dict({"crop_pct": 0.875, "image_processor_type": "MobileNetV1ImageProcessor"})
    with pytest.warns(UserWarning, match="written for 'ViTImageProcessor'"):
        MobileNetV1ImageProcessor.from_dict({"image_processor_type": "ViTImageProcessor"})
    with pytest.raises(FileNotFoundError, match="no preprocessor config at"):
        MobileNetV1ImageProcessor.from_pretrained(tmp_path / "missing")
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        MobileNetV1ImageProcessor.from_pretrained(tmp_path)


def test_save_writes_hf_keys(tmp_path: Path) -> None:
    file = MobileNetV1ImageProcessor().save_pretrained(tmp_path / "new" / "dir")
    assert file.name == "preprocessor_config.json"
    assert json.loads(file.read_text()) == {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "MobileNetV1ImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 256},
    }


# ----------------------------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------------------------
def test_post_process_known_probabilities() -> None:
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    result = post_process_image_classification(logits, top_k=2)
    assert [[(index, label) for index, label, _ in row] for row in result] == [
        [(3, "LABEL_3"), (2, "LABEL_2")],
        [(0, "LABEL_0"), (1, "LABEL_1")],
    ]
    assert [probability for _, _, probability in result[0]] == pytest.approx([0.4, 0.3])
    assert [probability for _, _, probability in result[1]] == pytest.approx([0.4, 0.3])


@pytest.mark.parametrize(("num_classes", "tabby_index"), [(1001, 282), (1000, 281)])
def test_post_process_imagenet_labels(num_classes: int, tabby_index: int) -> None:
    logits = torch.zeros(num_classes)
    logits[tabby_index] = 10.0
    logits[tabby_index + 686] = 9.0  # espresso
    (top,) = post_process_image_classification(logits, top_k=3)
    assert top[0][:2] == (tabby_index, "tabby, tabby cat")
    assert top[1][:2] == (tabby_index + 686, "espresso")
    expected = torch.softmax(logits.double(), dim=0)[tabby_index].item()
    assert top[0][2] == pytest.approx(expected, rel=1e-6)
    assert top[0][2] > top[1][2] > top[2][2]


def test_post_process_inputs_and_id2label() -> None:
    logits = np.array([[0.0, 5.0, 1.0]], dtype=np.float32)
    output = SimpleNamespace(logits=torch.from_numpy(logits))
    expected = post_process_image_classification(logits, top_k=10, id2label={"1": "cat", "2": "dog"})
    assert [(index, label) for index, label, _ in expected[0]] == [(1, "cat"), (2, "dog"), (0, "LABEL_0")]
    assert post_process_image_classification(output, top_k=10, id2label={1: "cat", 2: "dog"}) == expected
    assert MobileNetV1ImageProcessor().post_process_image_classification(logits, top_k=1)[0][0][0] == 1
    assert sum(probability for _, _, probability in expected[0]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("logits", "kwargs", "error", "match"),
    [
        (torch.zeros(2, 3, 4), {}, ValueError, r"shape \(num_classes,\) or \(batch, num_classes\), got \(2, 3, 4\)"),
        (torch.zeros(2, 0), {}, ValueError, "got \\(2, 0\\)"),
        ([0.1, 0.2], {}, TypeError, "logits must be a torch.Tensor or numpy array, got list"),
        (torch.zeros(3), {"top_k": 0}, ValueError, "top_k must be at least 1, got 0"),
        (torch.zeros(3), {"top_k": 1.5}, TypeError, "top_k must be an int"),
        (torch.zeros(3), {"id2label": ["a", "b"]}, TypeError, "id2label must be a mapping"),
    ],
)
def test_post_process_errors(logits, kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        post_process_image_classification(logits, **kwargs)
