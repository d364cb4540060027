"""COCO evaluation of a detector: inference over a split, COCOeval (bbox), a printable table and a JSON report.

`detect_dataset` runs a detector over a `CocoDetectionDataset` (original image sizes; the detectors resize
internally and return boxes in the original pixels) and returns COCO result dicts, with contiguous labels mapped
back to COCO category ids. `evaluate_model` scores them with `data.evaluate_coco` (the 12 standard numbers and AP
per category). `evaluate_checkpoint` is the `evaluate` command: rebuild from a checkpoint, evaluate, write JSON.

Sharded evaluation (under `torchrun`, given a `distributed.DistributedContext`): the split is cut into the batches
one process would run, and `DistributedSampler(shuffle=False)` deals those batches to the ranks, without the
duplicates it pads the last round with; the detections go to rank 0 (`all_gather_object`), which puts them back in
the dataset's order, runs COCOeval once and sends the numbers to every rank. Sharding whole batches rather than
images matters: every image is detected in the same batch as in one process, and kernels pick their algorithm by
batch size, so sharding images changed a few near-threshold detections in our tests. So the numbers equal those of
a one-process `evaluate` with the same batch size on the same kind of device (tested exactly, all 12).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .data import (
    COCO_STAT_NAMES,
    CocoDetectionDataset,
    collate_fn,
    detections_to_coco,
    evaluate_coco,
    make_eval_transforms,
)
from .datasets import DataPaths, open_split
from .distributed import DistributedContext, broadcast_from_main, gather_to_main
from .models import ModelSpec, load_trained_model

__all__ = ["detect_dataset", "evaluate_checkpoint", "evaluate_model", "format_metrics"]

logger = logging.getLogger(__name__)

_STAT_DESCRIPTIONS = {
    "AP": "AP   @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "AP50": "AP   @[IoU=0.50      | area=   all | maxDets=100]",
    "AP75": "AP   @[IoU=0.75      | area=   all | maxDets=100]",
    "APs": "AP   @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "APm": "AP   @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "APl": "AP   @[IoU=0.50:0.95 | area= large | maxDets=100]",
    "AR1": "AR   @[IoU=0.50:0.95 | area=   all | maxDets=  1]",
    "AR10": "AR   @[IoU=0.50:0.95 | area=   all | maxDets= 10]",
    "AR100": "AR   @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "ARs": "AR   @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "ARm": "AR   @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "ARl": "AR   @[IoU=0.50:0.95 | area= large | maxDets=100]",
}


def check_labels(spec: ModelSpec, dataset: CocoDetectionDataset) -> None:
    """Raise `ValueError` unless `dataset` maps categories to labels as the model was trained with."""
    if dict(dataset.label_to_cat_id) != spec.label_to_cat_id or list(dataset.categories) != spec.categories:
        raise ValueError(
            f"{dataset.annotation_file}: categories {dataset.categories[1:]} (ids {sorted(dataset.cat_id_to_label)}) "
            f"differ from the model's {spec.categories[1:]} (ids {sorted(spec.label_to_cat_id.values())})"
        )


@torch.inference_mode()
def detect_dataset(
    model: nn.Module,
    dataset: CocoDetectionDataset,
    label_to_cat_id: Mapping[int, int],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = True,
    context: DistributedContext | None = None,
) -> list[dict[str, Any]]:
    """Run `model` (put in eval mode) over `dataset` (with eval transforms) and return COCO result dicts.

    With a `context` of several processes each rank runs its shard and rank 0 returns the detections of the whole
    dataset, in the dataset's order; the other ranks return an empty list.
    """
    device = torch.device(device)
    model.eval()
    batches = [list(range(start, min(start + batch_size, len(dataset)))) for start in range(0, len(dataset),
                                                                                           batch_size)]
    if context is not None and context.enabled:
        sampler = DistributedSampler(batches, num_replicas=context.world_size, rank=context.rank, shuffle=False)
        # Position k of this rank's list is position rank + k * world_size of the padded round; those past the end
        # repeat the first batches and would count their detections twice.
        batches = [batches[i] for k, i in enumerate(sampler) if context.rank + k * context.world_size < len(batches)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn)
    per_image: list[tuple[int, list[dict[str, Any]]]] = []
    for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            outputs = model(images)
        for output, target in zip(outputs, targets, strict=True):
            output = _without_background(output)
            per_image.append((target["image_id"], detections_to_coco([output], [target["image_id"]], label_to_cat_id)))
    if context is not None and context.enabled:
        gathered = gather_to_main(context, per_image)
        if gathered is None:
            return []
        found = {image_id: detections for shard_results in gathered for image_id, detections in shard_results}
        order = {image_id: position for position, image_id in enumerate(getattr(dataset, "ids", sorted(found)))}
        per_image = sorted(found.items(), key=lambda item: order[item[0]])
    return [detection for _, detections in per_image for detection in detections]


def _without_background(output: Mapping[str, Any]) -> dict[str, Any]:
    """The detections of classes other than 0: RetinaNet and FCOS score the background column like a class (a
    sigmoid per class), and with a low `score_thresh` it reaches the output; it is no category to evaluate."""
    labels = output["labels"]
    keep = labels != 0
    if bool(keep.all()):
        return dict(output)
    return {name: value[keep] if isinstance(value, torch.Tensor) and value.shape[:1] == labels.shape else value
            for name, value in output.items()}


def evaluate_model(
    model: nn.Module,
    dataset: CocoDetectionDataset,
    label_to_cat_id: Mapping[int, int],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = True,
    context: DistributedContext | None = None,
) -> dict[str, Any]:
    """COCO bbox metrics of `model` on `dataset`: `data.evaluate_coco`'s dict plus `num_detections` and `seconds`.

    With a `context` of several processes: sharded (see `detect_dataset`), COCOeval on rank 0, the same metrics
    returned on every rank.
    """
    start = time.perf_counter()
    detections = detect_dataset(model, dataset, label_to_cat_id, device=device, batch_size=batch_size,
                                workers=workers, progress=progress, context=context)
    metrics: dict[str, Any] | None = None
    if context is None or context.is_main:
        metrics = evaluate_coco(dataset.coco, detections)
        metrics["num_detections"] = len(detections)
        metrics["seconds"] = time.perf_counter() - start
    if context is not None:
        metrics = broadcast_from_main(context, metrics)
    assert metrics is not None
    return metrics


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """The 12 COCO numbers as COCOeval prints them, then a per-category AP / AP50 table."""
    lines = [f" {_STAT_DESCRIPTIONS[name]} = {metrics[name]:6.3f}   ({name})" for name in COCO_STAT_NAMES]
    if "VOC_AP50" in metrics:
        lines.append(f" Pascal VOC mAP @[ IoU=0.50 ] (area under the precision envelope) = {metrics['VOC_AP50']:6.3f}"
                     "   (VOC_AP50)")
    per_category = metrics.get("per_category", {})
    if per_category:
        width = max(len("category"), *(len(name) for name in per_category))
        voc = all("VOC_AP50" in value for value in per_category.values())
        lines += ["", f" {'category':<{width}}  {'AP':>6}  {'AP50':>6}" + ("  VOC AP50" if voc else ""),
                  " " + "-" * (width + (26 if voc else 16))]
        lines += [f" {name:<{width}}  {value['AP']:6.3f}  {value['AP50']:6.3f}"
                  + (f"  {value['VOC_AP50']:8.3f}" if voc else "") for name, value in per_category.items()]
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    split: str = "val",
    data_paths: DataPaths | None = None,
    output: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = True,
    context: DistributedContext | None = None,
) -> tuple[dict[str, Any], Path]:
    """The `evaluate` command: rebuild the checkpoint's model, evaluate it on `split`, write the metrics as JSON.

    Args:
        checkpoint: a training checkpoint (`checkpoint_last.pt`) or an exported `model.safetensors`.
        split: "val" or "train".
        data_paths: where the split is; default the paths the checkpoint was trained with (a `.pt` checkpoint).
        output: JSON file to write; default `eval_<split>.json` beside the checkpoint.
        context: under `torchrun`, shard the images over the processes (rank 0 writes the JSON).

    Returns:
        The metrics (see `evaluate_model`, plus `checkpoint`, `split`, `annotation_file`) and the JSON path.
    """
    checkpoint = Path(checkpoint)
    model, spec, args = load_trained_model(checkpoint, device)
    if data_paths is None:
        if not args.get("data_paths"):
            raise ValueError(f"{checkpoint} does not record its data; give --data-root or the image/annotation paths")
        data_paths = DataPaths(**{name: Path(value) for name, value in args["data_paths"].items()})
    dataset = open_split(data_paths, split, make_eval_transforms())
    check_labels(spec, dataset)
    main = context is None or context.is_main
    metrics = evaluate_model(model, dataset, spec.label_to_cat_id, device=device, batch_size=batch_size,
                             workers=workers, progress=progress and main, context=context)
    metrics = {"checkpoint": str(checkpoint), "split": split, "annotation_file": str(dataset.annotation_file),
               **metrics}
    output = Path(output) if output is not None else checkpoint.parent / f"eval_{split}.json"
    if main:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics, output
