"""Image pre-processing and classification post-processing for MobileNetV1.

`MobileNetV1ImageProcessor` reproduces Hugging Face transformers' MobileNetV1 image processor (transformers 5.x:
`models/mobilenet_v1/image_processing_mobilenet_v1.py`, the torchvision backend that `AutoImageProcessor` returns,
and its PIL twin `image_processing_pil_mobilenet_v1.py`; the arithmetic lives in `image_processing_backends.py` and
`image_transforms.py`) without importing transformers. Per image:

1. Convert to RGB. Grayscale is repeated to three channels; an alpha channel (RGBA, LA, PA, or a palette/colour-key
   "transparency") is composited onto white, as HF's `convert_to_rgb` does. HF's MobileNetV1 processors leave
   `do_convert_rgb` unset, and then fail on RGBA or grayscale input instead of converting it; the numbers here equal
   HF's with `do_convert_rgb=True`.
2. Resize so the shortest edge is `size["shortest_edge"]` (256), keeping the aspect ratio; the long edge is
   truncated, `int(256 * long / short)` (HF's `get_resize_output_image_size`). Antialiased bilinear resampling is
   done on uint8 by `torchvision.transforms.v2.functional.resize`, as in HF's torchvision backend; HF's PIL backend
   resizes with Pillow and differs by at most one uint8 step on some pixels.
3. Center crop to `crop_size` (224x224). The offset is rounded down, `int((H - 224) / 2)`, as HF does;
   torchvision's own `center_crop` rounds half to even and would shift odd margins by one pixel. An image smaller
   than the crop is zero-padded first with the extra pixel after (bottom/right), as HF's torchvision backend does
   (its PIL backend puts the extra pixel before).
4. Rescale by `rescale_factor` (1/255) and normalize with `image_mean` = `image_std` = 0.5: output in [-1, 1].

Float inputs are taken to hold values in [0, 1] and are multiplied by 255 first, so they give the same output as the
equivalent uint8 image (HF instead applies `rescale_factor` to floats too; call it with `do_rescale=False` there).

`preprocessor_config.json` uses HF's keys, so `transformers.AutoImageProcessor` loads ours and we load HF's.
`post_process_image_classification` turns logits into top-k `(index, label, probability)` triples.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from .labels import NUM_CHECKPOINT_LABELS, imagenet_labels

__all__ = [
    "BatchFeature",
    "ImageInput",
    "MobileNetV1ImageProcessor",
    "PREPROCESSOR_CONFIG_NAME",
    "post_process_image_classification",
]

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

SingleImage = Image.Image | np.ndarray | torch.Tensor
ImageInput = SingleImage | Sequence[SingleImage]

# Pillow's resampling codes (what HF stores under "resample") -> torchvision tensor interpolation, as HF's
# `pil_torch_interpolation_mapping`. BOX (4), HAMMING (5) and LANCZOS (1) have no tensor kernel in every supported
# torchvision release, so they are refused rather than silently replaced.
_RESAMPLE_MODES: dict[int, tvF.InterpolationMode] = {
    0: tvF.InterpolationMode.NEAREST_EXACT,  # PIL's NEAREST samples pixel centres, like NEAREST_EXACT.
    2: tvF.InterpolationMode.BILINEAR,
    3: tvF.InterpolationMode.BICUBIC,
}
_RESAMPLE_NAMES = {0: "NEAREST", 2: "BILINEAR", 3: "BICUBIC"}

# Keys of HF configs that carry no preprocessing setting (or one this class always applies).
_METADATA_KEYS = frozenset(
    {"image_processor_type", "feature_extractor_type", "processor_class", "do_convert_rgb", "default_to_square"}
)
_COMPATIBLE_TYPES = frozenset(
    {
        "MobileNetV1ImageProcessor",
        "MobileNetV1ImageProcessorPil",
        "MobileNetV1ImageProcessorFast",
        "MobileNetV1FeatureExtractor",
    }
)
# Largest resize or crop side accepted: a 16384 x 16384 RGB float32 image is 3 GiB, far beyond any MobileNet input.
_MAX_SIDE = 16384
# PIL modes whose samples do not fit in 8 bits: `convert("RGB")` would clip them instead of scaling.
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


class BatchFeature(dict[str, Any]):
    """Model inputs by name (`"pixel_values"`), with attribute access and `.to()` like HF's `BatchFeature`.

    It is a plain `dict`, so `model(**batch)` works.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no field {name!r}; fields: {sorted(self)}") from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Return a copy with every tensor moved/cast by `torch.Tensor.to(*args, **kwargs)`."""
        return BatchFeature(
            {
                key: value.to(*args, **kwargs) if isinstance(value, torch.Tensor) else value
                for key, value in self.items()
            }
        )


class MobileNetV1ImageProcessor:
    """Prepare images for MobileNetV1 exactly as Hugging Face's `MobileNetV1ImageProcessor` does.

    Attributes carry HF's names and defaults; they may be changed after construction and are checked on each call.

    Args:
        do_resize: resize before cropping.
        size: `{"shortest_edge": s}` (keep aspect ratio, short side s) or `{"height": h, "width": w}`; an int s means
            `{"shortest_edge": s}` and an `(h, w)` pair means `{"height": h, "width": w}`, as in HF's legacy configs.
        resample: Pillow resampling code: 0 NEAREST, 2 BILINEAR (default), 3 BICUBIC.
        do_center_crop: center crop after resizing.
        crop_size: `{"height": h, "width": w}`; an int c means a c x c crop.
        do_rescale: multiply by `rescale_factor` (pixel values are on the 0..255 scale before this step).
        rescale_factor: the rescale multiplier, 1/255 by default.
        do_normalize: subtract `image_mean` and divide by `image_std`, per channel.
        image_mean: one value or three (R, G, B); 0.5 by default.
        image_std: one value or three (R, G, B); 0.5 by default.
    """

    model_input_names: tuple[str, ...] = ("pixel_values",)

    def __init__(
        self,
        *,
        do_resize: bool = True,
        size: int | Sequence[int] | Mapping[str, int] | None = None,
        resample: int = 2,
        do_center_crop: bool = True,
        crop_size: int | Sequence[int] | Mapping[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
    ) -> None:
        self.do_resize = _check_flag(do_resize, "do_resize")
        self.size = _size_dict({"shortest_edge": 256} if size is None else size, "size")
        self.resample = _check_resample(resample)
        self.do_center_crop = _check_flag(do_center_crop, "do_center_crop")
        self.crop_size = _crop_size_dict({"height": 224, "width": 224} if crop_size is None else crop_size)
        self.do_rescale = _check_flag(do_rescale, "do_rescale")
        self.rescale_factor = _check_rescale_factor(rescale_factor)
        self.do_normalize = _check_flag(do_normalize, "do_normalize")
        self.image_mean = _channel_values([0.5, 0.5, 0.5] if image_mean is None else image_mean, "image_mean")
        self.image_std = _channel_values([0.5, 0.5, 0.5] if image_std is None else image_std, "image_std")
        if any(value == 0.0 for value in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")

    # ----------------------------------------------------------------------------------------------------------
    # Configuration files
    # ----------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return the settings with HF's `preprocessor_config.json` keys."""
        return {
            "crop_size": dict(self.crop_size),
            "do_center_crop": self.do_center_crop,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "MobileNetV1ImageProcessor",
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": dict(self.size),
        }

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> MobileNetV1ImageProcessor:
        """Build a processor from the contents of an HF `preprocessor_config.json` (current or legacy keys).

        Metadata keys (`image_processor_type`, `feature_extractor_type`, `processor_class`, `do_convert_rgb`,
        `default_to_square`) are accepted and ignored; any other unknown key is ignored with a warning.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping of preprocessor settings, got {type(config).__name__}")
        settings = {
            "do_resize",
            "size",
            "resample",
            "do_center_crop",
            "crop_size",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_mean",
            "image_std",
        }
        declared = config.get("image_processor_type") or config.get("feature_extractor_type")
        if declared is not None and (not isinstance(declared, str) or declared not in _COMPATIBLE_TYPES):
            warnings.warn(
                f"this preprocessor config was written for {declared!r}, not MobileNetV1; using its settings anyway",
                stacklevel=2,
            )
        unknown = sorted(set(config) - settings - _METADATA_KEYS)
        if unknown:
            warnings.warn(f"ignoring preprocessor config keys this processor does not use: {unknown}", stacklevel=2)
        # JSON null means "class default" in HF's files.
        return cls(**{key: config[key] for key in settings if config.get(key) is not None})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> MobileNetV1ImageProcessor:
        """Load `preprocessor_config.json` from a local directory, or the JSON file given directly.

        Hub model ids are not fetched (this library uses no network): download the directory first.
        """
        file = Path(path)
        if file.is_dir():
            file = file / PREPROCESSOR_CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(
                f"no preprocessor config at {file}: pass a local directory holding {PREPROCESSOR_CONFIG_NAME} or the "
                "JSON file itself (hub ids are not downloaded)"
            )
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file} is not valid JSON: {error}") from None
        except RecursionError:
            # json's C parser recurses once per nesting level: "[" * 100000 would exhaust the stack.
            raise ValueError(f"{file} is not a preprocessor config: its JSON is nested too deeply") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
        try:
            return cls.from_dict(config)
        except (TypeError, ValueError) as error:
            # A wrongly typed value in a file is a bad file (ValueError), not a wrongly typed argument.
            raise ValueError(f"{file}: {error}") from None

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write `preprocessor_config.json` (HF's keys and layout) into `directory`, creating it; return the file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / PREPROCESSOR_CONFIG_NAME
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return file

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"

    # ----------------------------------------------------------------------------------------------------------
    # Pre-processing
    # ----------------------------------------------------------------------------------------------------------
    def __call__(self, images: ImageInput, return_tensors: str | None = "pt") -> BatchFeature:
        """Preprocess one image or a batch; see `preprocess`."""
        return self.preprocess(images, return_tensors=return_tensors)

    def preprocess(self, images: ImageInput, return_tensors: str | None = "pt") -> BatchFeature:
        """Convert, resize, crop, rescale and normalize images into model inputs.

        Args:
            images: one image or a list of them. Each is a PIL image (any 8-bit mode), a numpy array (H, W) or
                (H, W, C) channels-last, or a torch tensor (H, W) or (C, H, W) channels-first, with C in 1, 3, 4
                (4 = RGBA). Arrays and tensors are uint8 (0..255) or float (0..1). A 4-D array (N, H, W, C) or
                tensor (N, C, H, W) is a batch.
            return_tensors: "pt" (a stacked float32 tensor), "np" (a stacked float32 array) or None (a list of
                float32 tensors, which may differ in size when cropping is off).

        Returns:
            `BatchFeature` with "pixel_values" of shape (B, 3, H, W) (224x224 with the defaults). Tensors stay on the
            device they came on.
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        self._check_settings()
        processed = [self._process_one(image, where) for where, image in _flatten_images(images)]
        if return_tensors is None:
            return BatchFeature(pixel_values=processed)
        shapes = {tuple(image.shape) for image in processed}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot stack images of different sizes {sorted(shapes)}; turn on do_center_crop, use a "
                "{'height', 'width'} size, or pass return_tensors=None"
            )
        pixel_values = torch.stack(processed)
        if return_tensors == "np":
            return BatchFeature(pixel_values=pixel_values.cpu().numpy())
        return BatchFeature(pixel_values=pixel_values)

    def _check_settings(self) -> None:
        """Re-validate attributes, which users may have reassigned since construction."""
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            _check_flag(getattr(self, flag), flag)
        self.size = _size_dict(self.size, "size")
        self.crop_size = _crop_size_dict(self.crop_size)
        self.resample = _check_resample(self.resample)
        self.rescale_factor = _check_rescale_factor(self.rescale_factor)
        self.image_mean = _channel_values(self.image_mean, "image_mean")
        self.image_std = _channel_values(self.image_std, "image_std")
        if any(value == 0.0 for value in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")

    def _process_one(self, image: Any, where: str) -> torch.Tensor:
        pixels = _to_rgb_tensor(image, where)  # (3, H, W), uint8 or float32 on the 0..255 scale
        if self.do_resize:
            pixels = tvF.resize(
                pixels,
                list(self._resized_size(*pixels.shape[-2:])),
                interpolation=_RESAMPLE_MODES[self.resample],
                antialias=True,
            )
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        pixels = pixels.to(torch.float32)
        if self.do_rescale:
            pixels = pixels * self.rescale_factor
        if self.do_normalize:
            pixels = tvF.normalize(pixels, self.image_mean, self.image_std)
        return pixels.contiguous()

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Output (height, width) of the resize step, with HF's rounding."""
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        new_short = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        # HF's `get_resize_output_image_size` (after torchvision v1): the long side is truncated, not rounded.
        new_long = int(new_short * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    # ----------------------------------------------------------------------------------------------------------
    # Post-processing
    # ----------------------------------------------------------------------------------------------------------
    def post_process_image_classification(
        self, logits: Any, top_k: int = 5, id2label: Mapping[int, str] | Mapping[str, str] | None = None
    ) -> list[list[tuple[int, str, float]]]:
        """Same as the module-level `post_process_image_classification`."""
        return post_process_image_classification(logits, top_k=top_k, id2label=id2label)


def post_process_image_classification(
    logits: Any, top_k: int = 5, id2label: Mapping[int, str] | Mapping[str, str] | None = None
) -> list[list[tuple[int, str, float]]]:
    """Turn classifier logits into the `top_k` most probable classes per image.

    Args:
        logits: (B, num_classes) or (num_classes,) tensor or numpy array, or a model output with a `.logits` field.
        top_k: how many classes to return per image; capped at num_classes.
        id2label: class names by index (int or str keys, as in a config's `id2label`); missing indices are named
            "LABEL_{i}". When None: the shipped checkpoint labels for 1001 classes ("background" at 0), the same
            without "background" for 1000 classes, "LABEL_{i}" otherwise.

    Returns:
        One list per image of `(class index, label, softmax probability)`, most probable first.
    """
    if hasattr(logits, "logits"):
        logits = logits.logits
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor or numpy array, got {type(logits).__name__}")
    if logits.ndim == 1:
        logits = logits.unsqueeze(0)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (num_classes,) or (batch, num_classes), got {tuple(logits.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    num_classes = logits.shape[1]
    names = _class_names(num_classes, id2label)
    probabilities = torch.softmax(logits.detach().to(device="cpu", dtype=torch.float64), dim=1)
    values, indices = probabilities.topk(min(top_k, num_classes), dim=1)
    return [
        [(index, names(index), probability) for index, probability in zip(row_indices, row_values, strict=True)]
        for row_indices, row_values in zip(indices.tolist(), values.tolist(), strict=True)
    ]


def _class_names(num_classes: int, id2label: Mapping[int, str] | Mapping[str, str] | None) -> Any:
    """Return a function index -> label for `num_classes` logits."""
    if id2label is not None:
        if not isinstance(id2label, Mapping):
            raise TypeError(f"id2label must be a mapping of class index to label, got {type(id2label).__name__}")
        table = {int(index): str(label) for index, label in id2label.items()}
    elif num_classes == NUM_CHECKPOINT_LABELS:
        table = dict(enumerate(imagenet_labels()))
    elif num_classes == NUM_CHECKPOINT_LABELS - 1:
        table = dict(enumerate(imagenet_labels()[1:]))  # ImageNet-1k without Google's "background" class
    else:
        table = {}
    return lambda index: table.get(index, f"LABEL_{index}")


# --------------------------------------------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------------------------------------------
def _flatten_images(images: Any) -> list[tuple[str, Any]]:
    """Return `(description, image)` pairs, splitting lists and 4-D batches; descriptions name each input in errors."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list; pass at least one image")
        pairs: list[tuple[str, Any]] = []
        for index, image in enumerate(images):
            if isinstance(image, (list, tuple)):
                raise TypeError(f"images[{index}] is a {type(image).__name__}; pass a flat list of images")
            pairs.extend(_split_batch(image, f"images[{index}]"))
        return pairs
    return _split_batch(images, "image")


def _split_batch(image: Any, where: str) -> list[tuple[str, Any]]:
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        if image.shape[0] == 0:
            raise ValueError(f"{where} is an empty batch of shape {tuple(image.shape)}")
        return [(f"{where}[{index}]", item) for index, item in enumerate(image)]
    return [(where, image)]


def _to_rgb_tensor(image: Any, where: str) -> torch.Tensor:
    """Return `image` as a (3, H, W) tensor, uint8 or float32 on the 0..255 scale, alpha composited onto white."""
    if isinstance(image, Image.Image):
        return _pil_to_tensor(image, where)
    if isinstance(image, np.ndarray):
        return _array_to_tensor(image, where)
    if isinstance(image, torch.Tensor):
        return _chw_to_rgb(image, where)
    raise TypeError(
        f"{where} has unsupported type {type(image).__module__}.{type(image).__qualname__}; expected a PIL image, "
        "a numpy array (H, W[, C]) or a torch tensor ([C,] H, W) (open files with PIL.Image.open first)"
    )


def _pil_to_tensor(image: Image.Image, where: str) -> torch.Tensor:
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        raise ValueError(
            f"{where} has PIL mode {image.mode!r} (more than 8 bits per sample), which converting to RGB would clip; "
            "scale it to 8 bits first or pass a float array in [0, 1]"
        )
    # As HF's `convert_to_rgb`: anything with an alpha band or a transparency key goes onto a white background.
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"{where}: cannot convert PIL mode {image.mode!r} to RGB ({error})") from error
    except OSError as error:
        # Pillow decodes lazily, so a truncated or corrupt file only fails here, with an OSError naming no image.
        raise ValueError(f"{where}: cannot decode the image, the file is truncated or corrupt ({error})") from error
    return _chw_to_rgb(torch.from_numpy(np.array(rgb)).permute(2, 0, 1), where)


def _array_to_tensor(array: np.ndarray, where: str) -> torch.Tensor:
    if array.dtype == np.uint8:
        tensor = torch.tensor(array)
    elif np.issubdtype(array.dtype, np.floating):
        tensor = torch.tensor(array, dtype=torch.float32)
    else:
        raise TypeError(
            f"{where} is a numpy array of dtype {array.dtype}; expected uint8 (0..255) or float (0..1), "
            "e.g. array.astype(np.uint8)"
        )
    if array.ndim == 3:
        if array.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"{where} is a numpy array of shape {array.shape}; numpy images are channels-last (H, W, C) with C in "
                "1, 3 or 4 (transpose a (C, H, W) array, or pass it as a torch tensor)"
            )
        tensor = tensor.permute(2, 0, 1)
    elif array.ndim != 2:
        raise ValueError(
            f"{where} is a numpy array with {array.ndim} dimensions (shape {array.shape}); expected (H, W) or (H, W, C)"
        )
    return _chw_to_rgb(tensor, where)


def _chw_to_rgb(tensor: torch.Tensor, where: str) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise TypeError(f"{where} is a tensor of dtype {tensor.dtype}; expected torch.uint8 (0..255) or float (0..1)")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    elif tensor.ndim != 3:
        raise ValueError(
            f"{where} is a tensor with {tensor.ndim} dimensions (shape {tuple(tensor.shape)}); expected (H, W) or "
            "(C, H, W), or (N, C, H, W) for a batch"
        )
    channels, height, width = tensor.shape
    if channels not in (1, 3, 4):
        raise ValueError(
            f"{where} has {channels} channels (shape {tuple(tensor.shape)}); tensors are channels-first (C, H, W) with "
            "C in 1, 3 or 4"
        )
    if height == 0 or width == 0:
        raise ValueError(f"{where} is empty: height {height}, width {width}")
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor[~finite]
            kinds = [kind for kind, found in (("NaN", torch.isnan(bad).any()), ("infinite", torch.isinf(bad).any()))
                     if bool(found)]
            raise ValueError(
                f"{where} is a float image with {bad.numel()} {' and '.join(kinds)} value(s) out of {tensor.numel()}; "
                "float images must hold finite values in [0, 1]"
            )
        low, high = tensor.min().item(), tensor.max().item()
        if not (0.0 <= low and high <= 1.0):  # also catches NaN
            raise ValueError(
                f"{where} is a float image with values in [{low}, {high}]; float images must lie in [0, 1] "
                "(pass uint8 for 0..255 data)"
            )
    if channels == 4:
        tensor = _composite_on_white(tensor)
    elif channels == 1:
        tensor = tensor.expand(3, height, width)
    if tensor.is_floating_point():
        tensor = tensor * 255.0
    return tensor.contiguous()


def _composite_on_white(rgba: torch.Tensor) -> torch.Tensor:
    """Blend straight-alpha RGBA onto an opaque white background, rounding uint8 like Pillow's `alpha_composite`."""
    rgb, alpha = rgba[:3], rgba[3:]
    if rgba.is_floating_point():
        return rgb * alpha + (1.0 - alpha)
    rgb, alpha = rgb.to(torch.int32), alpha.to(torch.int32)
    blended = rgb * alpha + 255 * (255 - alpha)
    return torch.div(blended + 127, 255, rounding_mode="floor").to(torch.uint8)


def _center_crop(image: torch.Tensor, crop_height: int, crop_width: int) -> torch.Tensor:
    """HF's torchvision-backend center crop: zero-pad (extra pixel after) if too small, offset rounded down."""
    height, width = image.shape[-2:]
    if crop_height > height or crop_width > width:
        pad_h, pad_w = max(crop_height - height, 0), max(crop_width - width, 0)
        image = tvF.pad(image, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=0)
        height, width = image.shape[-2:]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    return image[..., top : top + crop_height, left : left + crop_width]


# --------------------------------------------------------------------------------------------------------------
# Setting validation
# --------------------------------------------------------------------------------------------------------------
def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value > _MAX_SIDE:
        # Sizes come from preprocessor_config.json files too: a claimed side of 10**9 would allocate 10**18 pixels.
        raise ValueError(f"{name} must be at most {_MAX_SIDE} pixels, got {value!r}")
    return int(value)


def _size_dict(size: Any, name: str) -> dict[str, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return {"shortest_edge": _positive_int(size, name)}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": _positive_int(size[0], f"{name}[0]"), "width": _positive_int(size[1], f"{name}[1]")}
    if isinstance(size, Mapping):
        keys = set(size)
        if keys == {"shortest_edge"}:
            return {"shortest_edge": _positive_int(size["shortest_edge"], f"{name}['shortest_edge']")}
        if keys == {"height", "width"}:
            return {
                "height": _positive_int(size["height"], f"{name}['height']"),
                "width": _positive_int(size["width"], f"{name}['width']"),
            }
    raise ValueError(
        f"{name} must be {{'shortest_edge': int}}, {{'height': int, 'width': int}}, an int or an (height, width) "
        f"pair, got {size!r}"
    )


def _crop_size_dict(crop_size: Any) -> dict[str, int]:
    if isinstance(crop_size, (int, np.integer)) and not isinstance(crop_size, bool):
        side = _positive_int(crop_size, "crop_size")
        return {"height": side, "width": side}
    size = _size_dict(crop_size, "crop_size")
    if "shortest_edge" in size:
        raise ValueError(f"crop_size must be {{'height': int, 'width': int}} or an int, got {crop_size!r}")
    return size


def _check_resample(resample: Any) -> int:
    # PIL.Image.Resampling members are ints, so they pass here too.
    if (
        isinstance(resample, bool)
        or not isinstance(resample, (int, np.integer))
        or int(resample) not in _RESAMPLE_MODES
    ):
        allowed = ", ".join(f"{code} ({name})" for code, name in _RESAMPLE_NAMES.items())
        raise ValueError(f"resample must be a Pillow resampling code among {allowed}, got {resample!r}")
    return int(resample)


def _finite_float(value: Any) -> float | None:
    """``float(value)`` if that is finite, else None (ints too large for a float included: JSON allows 1e400)."""
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _check_rescale_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not value > 0:
        raise ValueError(f"rescale_factor must be a positive number, got {value!r}")
    number = _finite_float(value)
    if number is None:
        raise ValueError(f"rescale_factor must be a positive number, finite as a float, got {value!r}")
    return number


def _channel_values(values: Any, name: str) -> list[float]:
    if isinstance(values, (int, float, np.floating, np.integer)) and not isinstance(values, bool):
        values = [values] * 3
    if not isinstance(values, (list, tuple, np.ndarray)) or len(values) != 3:
        raise ValueError(f"{name} must be one number or three (R, G, B), got {values!r}")
    result = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name} must hold numbers, got {values!r}")
        number = _finite_float(value)
        if number is None:
            raise ValueError(f"{name} must hold finite numbers, got {values!r}")
        result.append(number)
    return result
