"""Odd image files through the image processor and the ``classify`` command line.

Real photos (``tests/data/chelsea.png``) are written to disk as grayscale, grayscale + alpha, RGBA, palette with a
transparent colour, 16-bit PNG, CMYK JPEG, EXIF-rotated JPEG, a 1x1 image, a 12000x12000 image, a PNG header
claiming 50000x50000 pixels and truncated JPEGs, then read back the way users read them (``PIL.Image.open``).

What is guaranteed (docs/robustness.md):

- 8-bit modes give exactly what Hugging Face's processor gives with ``do_convert_rgb=True`` (alpha composited on
  white; HF's MobileNetV1 processors without it fail on these modes).
- EXIF orientation is *not* applied by the processor, as HF's image processors do not apply it either: they take
  pixels, and only ``transformers.image_utils.load_image`` (what HF pipelines call on a path) runs
  ``ImageOps.exif_transpose``. Callers who want upright pixels call ``ImageOps.exif_transpose`` first. The
  ``classify`` command reads files, so it behaves like ``load_image`` and turns them upright
  (`test_cli_applies_exif_orientation`).
- 16-bit images are refused with a ValueError (converting them to RGB would clip, not scale); truncated files
  give a ValueError naming the image; non-finite float pixels give a ValueError naming NaN or infinity.
- A 12000x12000 image is processed with peak memory bounded by a constant per pixel (about 11 bytes measured);
  Pillow's ``Image.MAX_IMAGE_PIXELS`` guard warns above 89 megapixels and refuses twice that when the file is
  opened, before anything is decoded.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mnv1_backbone.image_processing import MobileNetV1ImageProcessor

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
FLOAT_TOL = 1e-5
CAT_LABELS = {"tabby, tabby cat", "tiger cat", "Egyptian cat", "tabby", "Persian cat", "lynx, catamount"}


def _photo() -> Image.Image:
    with Image.open(DATA / "chelsea.png") as image:
        return image.convert("RGB")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _gray_png(width: int, height: int, *, pixel_rows: int | None = None) -> bytes:
    """An 8-bit grayscale PNG built row by row (no full-size buffer): a diagonal ramp. ``pixel_rows`` < height
    writes only that many rows, so the header claims more pixels than the file holds."""
    row_values = (np.arange(width) % 251).astype(np.uint8).tobytes()
    compressor = zlib.compressobj(1)
    parts = [compressor.compress(b"\0" + row_values) for _ in range(height if pixel_rows is None else pixel_rows)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> dict[str, Path]:
    """The odd files, written once per module."""
    directory = tmp_path_factory.mktemp("odd_images")
    photo = _photo()
    files: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        files[name] = directory / name
        image.save(files[name], **kwargs)

    save("gray.png", photo.convert("L"))
    save("gray_alpha.png", photo.convert("LA"))
    rgba = photo.convert("RGBA")
    alpha = np.linspace(0, 255, rgba.width, dtype=np.uint8)[None, :].repeat(rgba.height, axis=0)
    rgba.putalpha(Image.fromarray(alpha))
    save("rgba.png", rgba)
    palette = photo.quantize(64)
    save("palette.png", palette, transparency=3)
    save("cmyk.jpg", photo.convert("CMYK"), quality=95)
    save("tiny.png", Image.new("RGB", (1, 1), (200, 10, 30)))
    sixteen = (np.asarray(photo.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    save("gray16.png", Image.fromarray(sixteen))

    # EXIF orientation 6 ("rotate 90 degrees clockwise to display"): the stored pixels are the photo turned
    # counter-clockwise, so ImageOps.exif_transpose gives the upright photo back.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", photo.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes(), quality=95)
    with Image.open(files["exif_rotated.jpg"]) as image:
        stored = image.convert("RGB")
        upright = ImageOps.exif_transpose(image).convert("RGB")
    save("exif_stored_pixels.png", stored)  # lossless references with exactly the decoded pixels
    save("exif_upright_pixels.png", upright)

    save("photo.jpg", photo, quality=90)
    jpeg = files["photo.jpg"].read_bytes()
    files["truncated_half.jpg"] = directory / "truncated_half.jpg"
    files["truncated_half.jpg"].write_bytes(jpeg[: len(jpeg) // 2])
    files["truncated_end.jpg"] = directory / "truncated_end.jpg"
    files["truncated_end.jpg"].write_bytes(jpeg[:-2])  # only the end-of-image marker is missing
    files["bomb.png"] = directory / "bomb.png"
    files["bomb.png"].write_bytes(_gray_png(50_000, 50_000, pixel_rows=0))  # 2.5 gigapixels claimed in 80 bytes
    return files


def _open(path: Path) -> Image.Image:
    return Image.open(path)  # lazily, as users do: decoding happens inside the processor


def _hf_pixels(image: Image.Image) -> torch.Tensor:
    module = pytest.importorskip("transformers.models.mobilenet_v1")
    processor = module.MobileNetV1ImageProcessor()
    return processor(image, return_tensors="pt", do_convert_rgb=True)["pixel_values"]


# ---------------------------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["gray.png", "gray_alpha.png", "rgba.png", "palette.png", "cmyk.jpg", "tiny.png", "exif_rotated.jpg"]
)
def test_odd_files_give_what_hf_gives(odd_files, name: str) -> None:
    ours = MobileNetV1ImageProcessor()(_open(odd_files[name]))["pixel_values"]
    assert ours.shape == (1, 3, 224, 224) and torch.isfinite(ours).all()
    assert (ours - _hf_pixels(_open(odd_files[name]))).abs().max().item() <= FLOAT_TOL


def test_modes_are_read_as_expected(odd_files) -> None:
    expected = {"gray.png": "L", "gray_alpha.png": "LA", "rgba.png": "RGBA", "palette.png": "P", "cmyk.jpg": "CMYK",
                "gray16.png": "I;16"}
    assert {name: _open(odd_files[name]).mode for name in expected} == expected
    assert "transparency" in _open(odd_files["palette.png"]).info


def test_grayscale_is_repeated_to_three_equal_channels(odd_files) -> None:
    pixels = MobileNetV1ImageProcessor()(_open(odd_files["gray.png"]))["pixel_values"][0]
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


def test_transparent_pixels_become_white(odd_files) -> None:
    # The alpha ramp is 0 at the left edge: those pixels are composited onto white, i.e. 1.0 after normalizing.
    processor = MobileNetV1ImageProcessor(do_resize=False, do_center_crop=False)
    pixels = processor(_open(odd_files["rgba.png"]))["pixel_values"][0]
    assert torch.allclose(pixels[:, :, 0], torch.ones(3, pixels.shape[1]))


def test_one_pixel_image_fills_the_crop_with_its_colour(odd_files) -> None:
    pixels = MobileNetV1ImageProcessor()(_open(odd_files["tiny.png"]))["pixel_values"][0]
    expected = torch.tensor([200, 10, 30], dtype=torch.float32) / 255 * 2 - 1
    assert torch.allclose(pixels, expected[:, None, None].expand(3, 224, 224), atol=1e-6)


def test_exif_orientation_is_not_applied_as_in_hf(odd_files) -> None:
    processor = MobileNetV1ImageProcessor()
    tagged = processor(_open(odd_files["exif_rotated.jpg"]))["pixel_values"]
    stored = processor(_open(odd_files["exif_stored_pixels.png"]))["pixel_values"]
    upright = processor(_open(odd_files["exif_upright_pixels.png"]))["pixel_values"]
    assert torch.equal(tagged, stored)  # the pixels as stored ...
    assert not torch.allclose(tagged, upright, atol=0.1)  # ... not turned upright
    # Callers who want upright pixels turn them first, as transformers' load_image does.
    turned = processor(ImageOps.exif_transpose(_open(odd_files["exif_rotated.jpg"])))["pixel_values"]
    assert torch.equal(turned, upright)


def test_16_bit_image_is_refused_not_clipped(odd_files) -> None:
    with pytest.raises(ValueError, match=r"image has PIL mode 'I;16' \(more than 8 bits per sample\)"):
        MobileNetV1ImageProcessor()(_open(odd_files["gray16.png"]))
    # The documented way in: scale to [0, 1] floats.
    array = np.asarray(_open(odd_files["gray16.png"]), dtype=np.float32) / 65535
    pixels = MobileNetV1ImageProcessor()(array)["pixel_values"]
    eight_bit = MobileNetV1ImageProcessor()(_open(odd_files["gray.png"]))["pixel_values"]
    assert (pixels - eight_bit).abs().max().item() < 0.02  # the same photo, to within rounding


def test_truncated_jpeg_is_a_clear_error(odd_files) -> None:
    for name in ("truncated_half.jpg", "truncated_end.jpg"):
        with pytest.raises(ValueError, match=r"images\[1\]: cannot decode the image, the file is truncated"):
            MobileNetV1ImageProcessor()([_open(odd_files["photo.jpg"]), _open(odd_files[name])])


def test_decompression_bomb_header_is_refused_before_decoding(odd_files) -> None:
    assert odd_files["bomb.png"].stat().st_size < 1024
    with pytest.raises(Image.DecompressionBombError, match="2500000000 pixels"):
        Image.open(odd_files["bomb.png"])


def _clear_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_12000_square_image_memory_is_bounded(tmp_path) -> None:
    side = 12_000
    path = tmp_path / "huge.png"
    path.write_bytes(_gray_png(side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = Image.open(path)  # 144 megapixels: over Pillow's warning threshold, under its hard limit
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    before = _status_bytes("VmRSS")
    if not _clear_peak_rss():
        pytest.skip("cannot reset the peak RSS counter here")
    pixels = MobileNetV1ImageProcessor()(image)["pixel_values"]
    peak = _status_bytes("VmHWM") - before
    assert pixels.shape == (1, 3, 224, 224) and torch.isfinite(pixels).all()
    # Decoding (1 byte/pixel), RGB (3), its numpy copy (3), the channels-first tensor (3) and the resize: ~11 B/px.
    assert peak < 16 * side * side, f"peak {peak / 1e6:.0f} MB for {side * side / 1e6:.0f} megapixels"


# ---------------------------------------------------------------------------------------------------------------
# Non-finite float inputs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
@pytest.mark.parametrize("kind", ["numpy", "torch", "batch"])
def test_non_finite_float_pixels_are_named(value: float, word: str, kind: str) -> None:
    array = np.full((32, 40, 3), 0.5, dtype=np.float32)
    array[3, 4, 1] = value
    if kind == "numpy":
        image, where = array, "image"
    elif kind == "torch":
        image, where = torch.from_numpy(array).permute(2, 0, 1), "image"
    else:
        image, where = torch.from_numpy(np.stack([np.full_like(array, 0.25), array])).permute(0, 3, 1, 2), r"image\[1\]"
    with pytest.raises(ValueError, match=rf"{where} is a float image with 1 {word} value\(s\) out of 3840"):
        MobileNetV1ImageProcessor()(image)


def test_nan_and_inf_together_are_both_named() -> None:
    array = np.full((8, 8), 0.5, dtype=np.float64)
    array[0, 0], array[1, 1] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"2 NaN and infinite value\(s\)"):
        MobileNetV1ImageProcessor()(array)


# ---------------------------------------------------------------------------------------------------------------
# Reduced precision: float16 / bfloat16 CPU inference against float32, real weights, real photos
# ---------------------------------------------------------------------------------------------------------------
# Documented in docs/robustness.md; measured (torch 2.x, x86 CPU): float16 0.07 max |logit diff| and 0.005 max
# |probability diff|, bfloat16 0.74 and 0.03, top-1 unchanged for both photos. The bounds leave ~3x headroom.
PRECISION_TOLERANCES = {
    torch.float16: {"logit": 0.25, "probability": 0.02, "same_top5": True},
    torch.bfloat16: {"logit": 2.0, "probability": 0.1, "same_top5": False},
}


@pytest.fixture(scope="module")
def real_logits() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from mnv1_backbone import MobileNetV1ForImageClassification
    from mnv1_backbone.pretrained import find_bundled_frozen_graph

    graph = find_bundled_frozen_graph()
    if graph is None:
        pytest.skip("the real frozen graph is not installed (pip install --no-deps nudity==0.2.3)")
    model = MobileNetV1ForImageClassification.from_tf(graph).eval()
    photos = [Image.open(DATA / "chelsea.png"), Image.open(DATA / "coffee.png")]
    pixels = MobileNetV1ImageProcessor()(photos)["pixel_values"]
    with torch.inference_mode():
        return model, pixels, model(pixels).logits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_reduced_precision_cpu_inference_stays_within_tolerance(real_logits, dtype: torch.dtype) -> None:
    import copy

    model, pixels, reference = real_logits
    low = copy.deepcopy(model).to(dtype)
    with torch.inference_mode():
        logits = low(pixels.to(dtype)).logits
    assert logits.dtype == dtype
    logits = logits.float()
    tolerance = PRECISION_TOLERANCES[dtype]
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().max().item() <= tolerance["logit"]
    assert (logits.softmax(-1) - reference.softmax(-1)).abs().max().item() <= tolerance["probability"]
    assert logits.argmax(-1).tolist() == reference.argmax(-1).tolist() == [282, 968]  # tiger cat, espresso
    if tolerance["same_top5"]:
        assert [set(row) for row in logits.topk(5).indices.tolist()] == [
            set(row) for row in reference.topk(5).indices.tolist()
        ]


# ---------------------------------------------------------------------------------------------------------------
# The command line, through a subprocess
# ---------------------------------------------------------------------------------------------------------------
def _frozen_graph() -> Path:
    if not (ROOT / "mnv1_backbone" / "cli" / "__init__.py").exists():
        pytest.skip("mnv1_backbone/cli/ is not there yet")
    from mnv1_backbone.pretrained import find_bundled_frozen_graph

    graph = find_bundled_frozen_graph()
    if graph is None:
        pytest.skip("the real frozen graph is not installed (pip install --no-deps nudity==0.2.3)")
    return graph


def _classify(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mnv1_backbone", "classify", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


CLI_IMAGES = ["gray.png", "gray_alpha.png", "rgba.png", "palette.png", "cmyk.jpg", "tiny.png", "exif_rotated.jpg",
              "exif_stored_pixels.png", "exif_upright_pixels.png"]


@pytest.fixture(scope="module")
def cli_results(odd_files) -> dict[str, list[dict]]:
    """One ``classify --json`` run over every odd file that should classify: {file name: predictions}."""
    graph = _frozen_graph()
    done = _classify(*(str(odd_files[name]) for name in CLI_IMAGES), "--weights", str(graph), "--json")
    assert done.returncode == 0, done.stderr
    return {Path(result["image"]).name: result["predictions"] for result in json.loads(done.stdout)}


def test_cli_classifies_odd_images(cli_results) -> None:
    assert sorted(cli_results) == sorted(CLI_IMAGES)
    for name in ("gray.png", "gray_alpha.png", "rgba.png", "palette.png", "cmyk.jpg", "exif_upright_pixels.png"):
        assert cli_results[name][0]["label"] in CAT_LABELS, (name, cli_results[name][:2])
    tiny = cli_results["tiny.png"]
    assert len(tiny) == 5 and 0 < sum(p["probability"] for p in tiny) <= 1 + 1e-6


def test_cli_applies_exif_orientation(cli_results) -> None:
    """`mnv1 classify` reads files as transformers' load_image does: upright, as the EXIF tag says."""
    assert cli_results["exif_rotated.jpg"] == cli_results["exif_upright_pixels.png"]


def test_cli_refuses_a_decompression_bomb_in_one_line(odd_files, capsys) -> None:
    from mnv1_backbone import cli

    assert cli.main(["classify", str(odd_files["bomb.png"]), "--weights", "unused"]) == 1
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and "Traceback" not in error
    assert "bomb.png" in error and "2500000000 pixels" in error


def test_cli_truncated_jpeg_is_one_line_error(odd_files) -> None:
    done = _classify(str(odd_files["truncated_half.jpg"]), "--weights", str(_frozen_graph()))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "truncated_half.jpg" in done.stderr and "truncated" in done.stderr


def test_odd_file_helpers_are_real_files(odd_files) -> None:
    # Guards the fixture: every file decodes as written, except the deliberately broken ones.
    for name, path in odd_files.items():
        if name.startswith(("truncated", "bomb")):
            continue
        with Image.open(path) as image:
            image.load()
    assert io.BytesIO(odd_files["bomb.png"].read_bytes()).getbuffer().nbytes < 1024
