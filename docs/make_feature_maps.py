"""Draw `docs/images/feature_maps.png`: the feature maps of a real photo through Google's ImageNet MobileNetV1.

The photo is `tests/data/chelsea.png` (CC0, from scikit-image), resized so its short side is 224 and not
cropped; the weights are Google's `mobilenet_v1_1.0_224` frozen graph shipped by the `nudity` wheel
(`pip install --no-deps nudity==0.2.3`, found by `mnv1_backbone.pretrained.find_bundled_frozen_graph`).
The top row shows each tapped map's mean activation over its channels, the bottom row its channel whose
activation varies most over the image, each at its own resolution (stride 2 to 32), so the loss of
detail with depth is visible. Colours are stretched between each map's 1st and 99th percentile.

Run from the repository root (needs matplotlib, in the `docs` and `demo` extras):

    python docs/make_feature_maps.py                 # writes docs/images/feature_maps.png
    python docs/make_feature_maps.py /tmp/maps.png   # somewhere else
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from mnv1_backbone import MobileNetV1Backbone, MobileNetV1ImageProcessor
from mnv1_backbone.pretrained import find_bundled_frozen_graph

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "chelsea.png"
DEFAULT_OUTPUT = ROOT / "docs" / "images" / "feature_maps.png"
TAPS = (1, 3, 5, 11, 13)  # strides 2, 4, 8, 16, 32


def compute_maps(photo: Path = PHOTO) -> tuple[torch.Tensor, list[tuple[str, int, torch.Tensor]]]:
    """The preprocessed photo (3, H, W) in [-1, 1] and (name, stride, map (C, h, w)) for each tap."""
    graph = find_bundled_frozen_graph()
    if graph is None:
        raise SystemExit("the real weights are missing: pip install --no-deps nudity==0.2.3")
    backbone = MobileNetV1Backbone.from_tf(graph, out_indices=TAPS).eval()
    processor = MobileNetV1ImageProcessor(size={"shortest_edge": 224}, do_center_crop=False)
    with Image.open(photo) as image:
        pixels = processor(image)["pixel_values"]
    with torch.no_grad():
        features = backbone(pixels)
    maps = [(info.name, info.stride, features[info.name][0]) for info in backbone.feature_info]
    return pixels[0], maps


def draw(output: Path = DEFAULT_OUTPUT, photo: Path = PHOTO) -> Path:
    """Compute the maps and write the figure to `output` (PNG); return the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    pixels, maps = compute_maps(photo)
    columns = len(maps) + 1
    figure, axes = plt.subplots(2, columns, figsize=(2.6 * columns, 4.4), dpi=110, layout="constrained")
    image = ((pixels.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(f"input {pixels.shape[1]}x{pixels.shape[2]}", fontsize=9)
    axes[1, 0].axis("off")
    axes[1, 0].text(0.0, 0.5, "top: mean over channels\nbottom: the channel that\nvaries most over the image\n\n"
                    "Google's ImageNet\nMobileNetV1 1.0", fontsize=8, va="center")
    for column, (name, stride, feature) in enumerate(maps, start=1):
        channel = int(feature.flatten(1).std(dim=1).argmax())
        for row, (values, label) in enumerate(((feature.mean(0), "mean"), (feature[channel], f"channel {channel}"))):
            low, high = torch.quantile(values.flatten(), torch.tensor([0.01, 0.99])).tolist()
            axes[row, column].imshow(values.numpy(), cmap="viridis", interpolation="nearest", vmin=low,
                                     vmax=max(high, low + 1e-6))
            title = f"{name}\nstride {stride}, {feature.shape[0]}x{feature.shape[1]}x{feature.shape[2]}"
            axes[row, column].set_title(title if row == 0 else label, fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    plt.close(figure)
    return output


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT))
