"""The whole demo in one call: synthetic data, training, COCO evaluation and prediction pictures.

`run_demo` is what `python -m detection_demo` (no arguments) runs, in about 11 minutes on two idle CPU cores (the
training thread's CPU time is ~95 s per epoch; 15.7 minutes measured while other jobs held part of the CPU):

1. `synthetic.generate_dataset` writes 600 train / 100 val images of 256x256 under `<output>/data` (kept if an
   identical dataset is already there);
2. `train.train` with `TrainConfig`'s defaults and `DEMO_RECIPE` into `<output>/train` (checkpoint,
   `model.safetensors`, `history.json`, `training_curves.png`);
3. `evaluate.evaluate_checkpoint` on the val split into `<output>/train/eval_val.json`;
4. `predict.predict_images` on the first few val images into `<output>/predictions/*.png`.

Why this recipe (the budget is ~10 CPU-minutes of training; the target AP50 >= 0.5 on the val split):

- SSDLite, the cheapest of the builders (no FPN, no 256-channel heads), at 256 px, the images' own size.
- The ImageNet-pretrained MobileNetV1 1.0 (Google's frozen graph; see `models.default_backbone_weights`): with it
  AP50 passes 0.5 after four epochs; from random initialisation a detector needs far more (torchvision trains its
  SSDLite for 600 epochs). The 1.0 width is fixed by the weights (a step of 8 images costs ~1.4 CPU-seconds).
- `trainable_backbone_layers=3`: stem and blocks 1-3 (the 128 and 64 px maps) stay frozen, as torchvision does for
  its FPN detectors. Their backward pass is the expensive one: a step costs ~30% less than with all six stages.
- Default boxes scaled 0.07-0.8 of the input instead of torchvision's 0.2-0.95 (made for COCO's objects): here
  object diameters are 5% to 60% of the image and ~45% of the objects are COCO-"small"; the first level's boxes
  are 18 px instead of 51 px.
- AdamW, lr 1.5e-3, half an epoch of linear warm-up, cosine to 2%, weight decay 1e-4 (not on biases and norms),
  gradients clipped at norm 10; batch 8 for 6 epochs (450 steps): for a fixed number of images seen, more and
  smaller steps converge faster in a short run, and BatchNorm is still fine at 8.
  Measured val AP50 (seed 0): 0.17, 0.53, 0.63 after epochs 2, 4, 6 of this recipe (since the epoch order comes
  from `DistributedSampler`; 0.19, 0.51, 0.59 before); earlier runs gave 0.64 with 7 epochs and 0.68 with 8 (each
  ~1.6 CPU-minutes more), should a slower machine need the margin or a faster one afford it.
- Light augmentation: the SSD IoU crop, flips and photometric distortion, zoom out only up to 1.5x (torchvision's
  4x shrinks the small shapes to nothing and suits 600-epoch schedules).
- One compute thread and one DataLoader worker (`DEMO_RECIPE`). Augmenting a 256 px image costs ~36 ms of CPU,
  a fifth of a step, which the worker takes off the compute thread. Two compute threads may be faster on an idle
  machine (not measured: this one never was), but when another process holds a core, OpenMP's threads wait for
  each other at every operator: a step took 9.7 s instead of 1.4 s here. `--threads 2` overrides.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .distributed import resolve_device
from .evaluate import evaluate_checkpoint
from .predict import predict_images
from .synthetic import generate_dataset
from .train import TrainConfig, train

__all__ = ["DEMO_DATASET", "DEMO_RECIPE", "run_demo"]

logger = logging.getLogger(__name__)

#: The synthetic dataset the demo generates.
DEMO_DATASET: dict[str, Any] = {"num_train": 600, "num_val": 100, "image_size": (256, 256), "seed": 0}
#: `TrainConfig` settings of the demo run beyond its defaults (which are the demo's recipe already).
DEMO_RECIPE: dict[str, Any] = {"threads": 1, "workers": 1}
NUM_PREDICTION_IMAGES = 6
#: Lower than `predict`'s 0.5: after a few minutes of training, SSD's softmax scores of correct boxes are often 0.3-0.5.
PREDICTION_SCORE_THRESHOLD = 0.3


def run_demo(output: str | Path = "demo_output", *, device: str = "auto", workers: int | None = None,
             threads: int | None = None, progress: bool = True, resume: bool = True,
             **overrides: Any) -> dict[str, Any]:
    """Generate, train, evaluate and predict under `output`; return the paths and numbers (see module docstring).

    Args:
        output: the demo's folder.
        resume: continue a demo run interrupted in `output` (`--resume auto`); a finished run is trained no more.
        **overrides: `TrainConfig` settings replacing the recipe's (e.g. `epochs=1` for a quick look).
    """
    output = Path(output)
    device = str(resolve_device(device))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dataset = generate_dataset(output / "data", **DEMO_DATASET)
    timings["data"] = time.perf_counter() - start

    settings = {**DEMO_RECIPE, "data_root": str(output / "data"), "output": str(output / "train"),
                "device": device, "progress": progress, "resume": "auto" if resume else None, **overrides}
    if workers is not None:
        settings["workers"] = workers
    if threads is not None:
        settings["threads"] = threads
    config = TrainConfig(**settings)
    step = time.perf_counter()
    result = train(config)
    timings["train"] = time.perf_counter() - step

    step = time.perf_counter()
    metrics, metrics_path = evaluate_checkpoint(result.checkpoint, split="val", device=device,
                                                batch_size=config.eval_batch_size, workers=config.workers,
                                                progress=progress)
    timings["evaluate"] = time.perf_counter() - step

    step = time.perf_counter()
    val_images = sorted(Path(dataset["val"]["image_dir"]).glob("*.jpg"))[:NUM_PREDICTION_IMAGES]
    pictures = predict_images(result.checkpoint, val_images, output / "predictions", device=device,
                              score_threshold=PREDICTION_SCORE_THRESHOLD)
    timings["predict"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - start
    return {
        "data_root": output / "data",
        "train": result,
        "metrics": metrics,
        "metrics_path": metrics_path,
        "pictures": pictures,
        "timings": timings,
    }
