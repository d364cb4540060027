"""TF Object Detection API models in the `mnv1` commands: `detect --weights` draws their boxes, `convert` writes them
as ``model.safetensors`` + ``config.json``.

Thin over `mnv1_backbone.detection.odapi`: `from_tf_object_detection` reads a model folder, a model-zoo
``.tar.gz``, a checkpoint prefix or a frozen graph; `ODAPISSDDetector.from_pretrained` reads what `convert` (its
`save_pretrained`) wrote. Boxes are drawn with torchvision's `draw_bounding_boxes`, captioned with the label map's
names and the scores.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path
from typing import Any

from .._io import collect_images
from ._common import CLIError, read_image

__all__ = ["add_model_options", "is_odapi_model", "load_odapi", "run_convert", "run_detect"]



def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that decide how an OD-API model is read (`detect --weights` and `convert`)."""
    parser.add_argument("--legacy-anchor-order", action="store_true",
                        help="OD-API models: the interpolated anchor right after aspect ratio 1.0, as OD-API code "
                        "before November 2017 did (the model zoo's *_11_06_2017 releases)")
    parser.add_argument("--label-map", metavar="PBTXT",
                        help="OD-API models: a label_map.pbtxt for the class names (default: one beside the model, "
                        "else COCO's names for 90-class models, else class_N)")


def is_odapi_model(path: str | Path) -> bool:
    """Whether `path` is a TF Object Detection API model (what `convert` converts with the OD-API reader): a
    folder or archive holding ``pipeline.config``, a graph or checkpoint prefix beside one, a graph with OD-API
    node names, or a converted folder."""
    path = Path(path)
    if path.is_dir():
        return (path / "pipeline.config").is_file() or _is_converted(path)
    if path.is_file() and path.name.lower().endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(path) as tar:
                return any(Path(member.name).name == "pipeline.config" for member in tar)
        except (tarfile.TarError, OSError, EOFError):
            return False  # a corrupt archive: the caller's reader says what is wrong with it
    if path.is_file() and path.suffix == ".pb" and _names_box_predictor(path):
        return True  # an OD-API graph without its pipeline.config: the reader infers what the graph tells
    return (path.parent / "pipeline.config").is_file()


def _names_box_predictor(graph: Path) -> bool:
    """Whether a GraphDef file names OD-API ``BoxPredictor`` nodes (a classifier's graph has none)."""
    import mmap

    with open(graph, "rb") as file:
        if file.seek(0, 2) == 0:
            return False
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"BoxPredictor") >= 0


def _is_converted(folder: Path) -> bool:
    from ..detection.odapi import CONFIG_NAME, MODEL_TYPE

    config = folder / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False


def load_odapi(path: str | Path, *, legacy_anchor_order: bool = False, label_map: str | None = None,
               score_thresh: float | None = None) -> Any:
    """An `ODAPISSDDetector` from an OD-API model or a folder `convert` wrote, in eval mode."""
    from ..detection.odapi import ODAPISSDDetector, from_tf_object_detection, read_label_map

    path = Path(path)
    if not path.exists():
        raise CLIError(f"weights not found: {path}")
    if path.is_dir() and _is_converted(path) and not (path / "pipeline.config").is_file():
        model = ODAPISSDDetector.from_pretrained(path)
        if legacy_anchor_order and not model.legacy_anchor_order:
            raise CLIError(f"{path} was converted without --legacy-anchor-order; the anchor order is fixed when a "
                           "model is converted")
        labels = read_label_map(label_map) if label_map else model.id2label
        # A new detector around the loaded network applies the overrides, as from_tf_object_detection does.
        return ODAPISSDDetector(model.config, model.network, legacy_anchor_order=model.legacy_anchor_order,
                                clip_before_nms=model.clip_before_nms, id2label=labels,
                                score_thresh=score_thresh).eval()
    overrides = {} if score_thresh is None else {"score_thresh": score_thresh}
    return from_tf_object_detection(path, legacy_anchor_order=legacy_anchor_order, label_map=label_map, **overrides)


def draw_detections(image: Any, detection: dict[str, Any], id2label: dict[int, str]) -> tuple[Any, list[dict]]:
    """`image` (uint8 (3, H, W)) with every detection drawn and captioned "name score"; and the detections as
    ``{"label", "category", "score", "box_xyxy"}`` dicts."""
    from mnv1_backbone.detection.drawing import draw_detection_boxes

    boxes, scores = detection["boxes"].detach().cpu(), detection["scores"].detach().cpu().tolist()
    labels = detection["labels"].cpu().tolist()
    names = [id2label.get(label, f"class_{label}") for label in labels]
    found = [{"label": label, "category": name, "score": round(score, 4), "box_xyxy": [round(v, 1) for v in box]}
             for label, name, score, box in zip(labels, names, scores, boxes.tolist(), strict=True)]
    captions = [f"{name} {score:.2f}" for name, score in zip(names, scores, strict=True)]
    return draw_detection_boxes(image, boxes, labels, captions), found


def run_detect(args: argparse.Namespace) -> int:
    """`mnv1 detect --weights MODEL IMAGE... --out DIR`: every image's detections scoring at least
    `--score-thresh`, drawn into DIR/<name>.png, listed in DIR/predictions.json and printed."""
    import torch
    from torchvision.transforms.v2 import functional as F

    images = collect_images(args.images)
    for path in images:  # fail on a bad image before reading the model (not kept: a folder may be large)
        read_image(str(path))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    model = load_odapi(args.weights, legacy_anchor_order=args.legacy_anchor_order, label_map=args.label_map,
                       score_thresh=args.score_threshold).to(args.device)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, list[dict[str, Any]]] = {}
    written: list[Path] = []
    for path in images:
        image = F.pil_to_tensor(read_image(str(path)).convert("RGB"))
        with torch.inference_mode():
            detection = model([F.to_dtype(image, torch.float32, scale=True).to(args.device)])[0]
        drawn, found = draw_detections(image, detection, model.id2label)
        target = out / f"{path.stem}.png"
        if target in written:  # the same name in two folders
            target = out / f"{path.stem}_{len(written)}.png"
        F.to_pil_image(drawn).save(target)
        written.append(target)
        report[str(path)] = found
    (out / "predictions.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for (image_name, found), png in zip(report.items(), written, strict=True):
        print(f"{image_name}: {len(found)} detection{'s' if len(found) != 1 else ''} >= {args.score_threshold:g} "
              f"-> {png}")
        for item in found:
            box = ", ".join(f"{v:.1f}" for v in item["box_xyxy"])
            print(f"  {item['category']:<20} {item['score']:.3f}  [{box}]")
    print(f"wrote {len(written)} image{'s' if len(written) != 1 else ''} and {out / 'predictions.json'}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """`mnv1 convert OD-API-MODEL DST`: ``model.safetensors`` + ``config.json`` that
    `ODAPISSDDetector.from_pretrained` reads without any TF file; loaded back and checked before reporting."""
    import torch

    from ..detection.odapi import ODAPISSDDetector

    dst = Path(args.dst)
    model = load_odapi(args.src, legacy_anchor_order=args.legacy_anchor_order, label_map=args.label_map)
    model.save_pretrained(dst)
    loaded = ODAPISSDDetector.from_pretrained(dst)  # what was written must be what the loader reads
    same = loaded.config == model.config and torch.equal(loaded.anchors, model.anchors) and all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))
    if not same:  # pragma: no cover - save_pretrained and from_pretrained are each other's inverse
        raise CLIError(f"{dst}: the converted model does not read back as written")
    config = model.config
    fe = config.feature_extractor
    parameters = sum(p.numel() for p in model.parameters())
    files = ", ".join(sorted(p.name for p in dst.iterdir() if p.is_file()))
    print(f"wrote {dst}: {files}")
    legacy, clip = ("yes" if flag else "no" for flag in (model.legacy_anchor_order, model.clip_before_nms))
    print(f"OD-API {fe.type}, depth multiplier {fe.depth_multiplier:g}, {config.image_height}x{config.image_width}, "
          f"{config.num_classes} classes, {model.anchors.shape[0]} anchors, legacy anchor order {legacy}, clip "
          f"before NMS {clip}, {parameters:,} parameters")
    return 0
