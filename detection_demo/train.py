"""The training loop: any `mnv1_backbone.detection` builder on a COCO-format dataset, resumable and reproducible.

`TrainConfig` holds every setting (the CLI's `train` flags); `train(config)` runs it:

- SGD (momentum, Nesterov) or AdamW, without weight decay on biases and normalisation weights; the learning rate
  warms up linearly, then follows a cosine to `min_lr_ratio * lr` at the last step (`warmup_cosine`);
- gradient clipping by global norm; mixed precision (`torch.autocast` + `GradScaler`) on CUDA, off on CPU;
- one tqdm bar over the whole run with the loss, learning rate and ETA;
- COCO evaluation (bbox mAP) of the val split every `eval_interval` epochs and after the last;
- after every epoch an atomic checkpoint (`checkpoint_last.pt`; see `checkpoint`), `history.json` and the
  `training_curves.png` plot; at the end `model.safetensors` (the builder's `weights=` reads it);
- `resume` ("auto" or a path) restores model, optimizer, scheduler, scaler, counters, history and every random
  generator, so a resumed run continues exactly as the uninterrupted one would have (the epoch order comes from
  a generator seeded with `seed + epoch`);
- a loss that is NaN or infinite stops the run with `NonFiniteLossError`, naming the step and the loss terms.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from mnv1_backbone._io import atomic_write_text

from .checkpoint import (
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    SAFETENSORS_NAME,
    capture_rng_state,
    export_safetensors,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .data import collate_fn, make_eval_transforms, make_train_transforms
from .datasets import DataPaths, open_split
from .evaluate import evaluate_model
from .models import BUILDERS, ModelSpec, backbone_depth_multiplier, build_model, resolve_backbone_weights
from .plotting import plot_history

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "train", "warmup_cosine"]

logger = logging.getLogger(__name__)

HISTORY_NAME = "history.json"
PLOT_NAME = "training_curves.png"
OPTIMIZERS = ("sgd", "adamw")
# Settings that may differ between a run and its resumption: where and how it runs, not what it computes.
_RUNTIME_FIELDS = ("output", "resume", "device", "workers", "threads", "progress", "eval_batch_size",
                   "stop_after_epoch", "epochs")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch, the step and every loss term."""


@dataclass
class TrainConfig:
    """Settings of a training run; the `train` command's flags, with the same names.

    The defaults are the `python -m detection_demo` recipe (see `demo.py` for why): SSDLite at 256 px on the
    ImageNet-pretrained MobileNetV1 1.0, AdamW with warm-up and cosine decay.
    """

    output: str = "runs/detection"
    model: str = "ssdlite"
    data_root: str | None = None
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    weights_backbone: str | None = "auto"  # "auto", "none" or a path (HF dir, .safetensors, frozen .pb)
    trainable_backbone_layers: int | None = 3  # pretrained only; None: the builder's default (SSDLite: all 6)
    depth_multiplier: float | None = None  # the weights' width when pretrained, else 1.0
    image_size: int = 256
    box_scales: tuple[float, float] | None = (0.07, 0.8)  # SSD default boxes; None = the builder's 0.2-0.95
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # more builder kwargs, e.g. {"score_thresh": 0.01}
    epochs: int = 6
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 1.5e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.02
    clip_grad_norm: float = 10.0  # 0 disables
    zoom_out: float = 1.5  # largest SSD zoom-out factor; 1 disables
    hflip_prob: float = 0.5
    amp: bool | None = None  # None: on CUDA only
    eval_interval: int = 2  # epochs; also after the last one; 0: never
    eval_batch_size: int = 16
    workers: int = 1
    threads: int | None = None  # torch intra-op threads; None: torch's default
    seed: int = 0
    device: str = "auto"
    resume: str | None = None  # "auto" or a checkpoint path
    stop_after_epoch: int | None = None  # end this run after that epoch (resume later)
    progress: bool = True

    def validate(self) -> None:
        """Raise `ValueError` naming the first setting out of range."""
        if self.model not in BUILDERS:
            raise ValueError(f"model must be one of {sorted(BUILDERS)}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        positive_ints = ("epochs", "batch_size", "image_size", "eval_batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("workers", "eval_interval", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        checks: list[tuple[str, bool]] = [
            ("weight_decay", self.weight_decay >= 0),
            ("momentum", 0 <= self.momentum < 1),
            ("warmup_epochs", self.warmup_epochs >= 0),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1),
            ("clip_grad_norm", self.clip_grad_norm >= 0),
            ("zoom_out", self.zoom_out >= 1),
            ("hflip_prob", 0 <= self.hflip_prob <= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name} out of range: {getattr(self, name)!r}")
        if self.image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {self.image_size}")
        if self.stop_after_epoch is not None and self.stop_after_epoch < 1:
            raise ValueError(f"stop_after_epoch must be >= 1, got {self.stop_after_epoch}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("box_scales") is not None:
            values["box_scales"] = tuple(values["box_scales"])
        return cls(**values)


@dataclass
class TrainResult:
    """Where a run put its files, and what it measured."""

    output: Path
    checkpoint: Path
    weights: Path | None  # model.safetensors; None when the run stopped early (stop_after_epoch)
    plot: Path
    history: dict[str, Any]
    epoch: int  # epochs completed
    global_step: int
    seconds: float
    final_metrics: dict[str, Any] | None  # the last evaluation, if any
    completed: bool  # all epochs done


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float,
                  warmup_start: float = 0.001) -> Callable[[int], float]:
    """Learning-rate factor of step `s`: linear from `warmup_start` to 1 over `warmup_steps`, then a cosine down to
    `min_ratio` at `total_steps` (and `min_ratio` beyond it)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start + (1.0 - warmup_start) * step / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA's included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def find_resume_checkpoint(resume: str | None, output: Path) -> Path | None:
    """The checkpoint `resume` names: "auto" = `<output>/checkpoint_last.pt` if it exists; a path must exist."""
    if resume is None:
        return None
    if resume == "auto":
        path = output / CHECKPOINT_NAME
        if path.is_file():
            return path
        logger.info("--resume auto: no %s yet, starting a new run", path)
        return None
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
    return path


def _merge_resumed_config(config: TrainConfig, saved: dict[str, Any], given: Collection[str] | None) -> TrainConfig:
    """The saved run's settings, with the runtime settings in `given` taken from `config`.

    `given` None means the settings where `config` differs from `TrainConfig()`. Other settings given that differ
    from the checkpoint's are ignored, with a warning.
    """
    defaults = TrainConfig()
    if given is None:
        given = {f.name for f in dataclasses.fields(TrainConfig)
                 if getattr(config, f.name) != getattr(defaults, f.name)}
    resumed = TrainConfig.from_dict(saved)
    resumed.output, resumed.resume = config.output, config.resume
    ignored = []
    for name in sorted(given):
        mine, theirs = getattr(config, name), getattr(resumed, name)
        if name in _RUNTIME_FIELDS:
            setattr(resumed, name, mine)
        elif mine != theirs:
            ignored.append(f"{name}={mine!r} (checkpoint: {theirs!r})")
    if ignored:
        logger.warning("resuming: the checkpoint's settings are kept; ignored %s", ", ".join(ignored))
    if resumed.epochs != saved["epochs"]:
        logger.warning("resuming with epochs=%d instead of %d: the cosine schedule is stretched to the new length",
                       resumed.epochs, saved["epochs"])
    return resumed


def _model_spec(config: TrainConfig, categories: list[str], label_to_cat_id: dict[int, int]) -> ModelSpec:
    weights_backbone = resolve_backbone_weights(config.weights_backbone, config.depth_multiplier)
    kwargs: dict[str, Any] = dict(config.model_kwargs)
    if weights_backbone is not None:
        kwargs["weights_backbone"] = str(weights_backbone)
        if config.trainable_backbone_layers is not None:
            kwargs["trainable_backbone_layers"] = config.trainable_backbone_layers
    elif config.trainable_backbone_layers not in (None, TrainConfig.trainable_backbone_layers):
        logger.warning("--trainable-backbone-layers has no effect without pretrained weights: all layers train")
    if config.depth_multiplier is not None:
        kwargs["depth_multiplier"] = config.depth_multiplier
    if config.model == "ssdlite":
        kwargs["size"] = config.image_size
    else:  # the R-CNN transform resizes the shorter side to min_size; the images are square already
        kwargs.setdefault("min_size", config.image_size)
        kwargs.setdefault("max_size", config.image_size)
    box_scales = config.box_scales if config.model == "ssdlite" else None
    return ModelSpec(config.model, kwargs, categories, label_to_cat_id, box_scales)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only, not on biases and normalisation weights (torchvision's
    `--norm-weight-decay 0`)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = _parameter_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def _to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets]


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def train(config: TrainConfig, *, given: Collection[str] | None = None) -> TrainResult:
    """Run (or resume) the training `config` describes; see the module docstring.

    Args:
        config: the settings.
        given: names of the settings the caller chose (the CLI's flags); None: those where `config` differs from
            `TrainConfig()`. On resume, the checkpoint's settings are used, except the runtime ones (`epochs`,
            `device`, `workers`, `threads`, `eval_batch_size`, `stop_after_epoch`, `progress`) that were given.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the last checkpoint is left as it was).
        ValueError / FileNotFoundError: bad settings or data.
    """
    start_time = time.perf_counter()
    output = Path(config.output)
    resume_path = find_resume_checkpoint(config.resume, output)
    checkpoint: dict[str, Any] | None = None
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path)
        config = _merge_resumed_config(config, checkpoint["args"], given)
        logger.info("resuming %s from epoch %d, step %d", resume_path, checkpoint["epoch"], checkpoint["global_step"])
    config.validate()
    output.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    use_amp = device.type == "cuda" if config.amp is None else bool(config.amp)
    if use_amp and device.type != "cuda":
        raise ValueError("mixed precision (--amp) needs a CUDA device")
    seed_everything(config.seed)

    data_paths = DataPaths.resolve(config.data_root, config.train_images, config.train_annotations,
                                   config.val_images, config.val_annotations)
    masks = config.model == "maskrcnn"
    train_set = open_split(data_paths, "train", make_train_transforms(config.image_size, zoom_out=config.zoom_out,
                                                                      hflip_prob=config.hflip_prob), masks=masks)
    val_set = open_split(data_paths, "val", make_eval_transforms()) if config.eval_interval else None
    if val_set is not None and val_set.label_to_cat_id != train_set.label_to_cat_id:
        raise ValueError(f"{val_set.annotation_file} and {train_set.annotation_file} have different categories")

    if checkpoint is not None:
        spec = ModelSpec.from_dict(checkpoint["model_spec"])
        if spec.label_to_cat_id != train_set.label_to_cat_id:
            raise ValueError(f"{resume_path} was trained on other categories than {train_set.annotation_file}")
    else:
        spec = _model_spec(config, list(train_set.categories), dict(train_set.label_to_cat_id))
    model = build_model(spec)
    spec.kwargs["depth_multiplier"] = backbone_depth_multiplier(model)  # evaluate/predict rebuild without weights
    model.to(device)

    batch_size = min(config.batch_size, len(train_set))
    steps_per_epoch = len(train_set) // batch_size  # drop_last: a batch of 1 breaks BatchNorm on 1x1 maps
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps)
    optimizer = _make_optimizer(config, model)
    scheduler = LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps, config.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    history: dict[str, Any] = {"steps": [], "epochs": [], "evals": []}
    epoch = global_step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        epoch, global_step, history = checkpoint["epoch"], checkpoint["global_step"], checkpoint["history"]
        restore_rng_state(checkpoint["rng"])
        del checkpoint  # its tensors are copied into the model and optimizer
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "%s (%s, %d classes, %.2fM trainable parameters) on %s%s: %d images, %d steps/epoch x %d epochs, "
        "batch %d, %s lr %g", config.model, _describe_backbone(spec), spec.num_classes, trainable / 1e6, device,
        " with mixed precision" if use_amp else "", len(train_set), steps_per_epoch, config.epochs, batch_size,
        config.optimizer, config.lr,
    )

    checkpoint_path = output / CHECKPOINT_NAME
    plot_path = output / PLOT_NAME
    final_metrics = history["evals"][-1] if history["evals"] else None
    run_args = {**config.to_dict(), "data_paths": data_paths.to_dict()}
    parameters = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total_steps, initial=global_step, unit="step", dynamic_ncols=True, disable=not config.progress,
               desc=f"epoch {epoch + 1}/{config.epochs}")
    stopped_early = False
    try:
        while epoch < config.epochs:
            # The shuffling order and the DataLoader workers' seeds come from this generator: the same for an
            # epoch whether or not the run was resumed before it.
            generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                                num_workers=config.workers, collate_fn=collate_fn, generator=generator,
                                pin_memory=device.type == "cuda")
            model.train()
            bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
            epoch_loss, epoch_start, epoch_cpu = 0.0, time.perf_counter(), time.process_time()
            for images, targets in loader:
                images = [image.to(device, non_blocking=True) for image in images]
                targets = _to_device(targets, device)
                with torch.autocast(device.type, enabled=use_amp):
                    losses = model(images, targets)
                loss = sum(losses.values())
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
                    raise NonFiniteLossError(
                        f"non-finite loss {loss_value} at step {global_step + 1} (epoch {epoch + 1}, lr "
                        f"{scheduler.get_last_lr()[0]:.3g}): {terms}. Training stopped; the last checkpoint is "
                        f"{checkpoint_path if checkpoint_path.exists() else 'not written yet'}. Try a lower --lr."
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.clip_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                global_step += 1
                epoch_loss += loss_value
                history["steps"].append({"step": global_step, "epoch": epoch + 1, "loss": loss_value, "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
            epoch += 1
            epoch_record = {"epoch": epoch, "step": global_step, "loss": epoch_loss / max(steps_per_epoch, 1),
                            "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - epoch_start,
                            "cpu_seconds": time.process_time() - epoch_cpu}
            history["epochs"].append(epoch_record)
            logger.info("epoch %d/%d: mean loss %.4f in %.0f s", epoch, config.epochs, epoch_record["loss"],
                        epoch_record["seconds"])
            evaluated = val_set is not None and (epoch % config.eval_interval == 0 or epoch == config.epochs)
            if evaluated:
                metrics = evaluate_model(model, val_set, spec.label_to_cat_id, device=device,
                                         batch_size=config.eval_batch_size, workers=config.workers,
                                         progress=config.progress)
                final_metrics = {"epoch": epoch, "step": global_step, **metrics}
                history["evals"].append(final_metrics)
                per_category = ", ".join(f"{name} {v['AP50']:.2f}" for name, v in metrics["per_category"].items())
                logger.info("epoch %d: val AP %.3f, AP50 %.3f (AP50 by category: %s; %.0f s)", epoch, metrics["AP"],
                            metrics["AP50"], per_category, metrics["seconds"])
            save_checkpoint(checkpoint_path, {
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "rng": capture_rng_state(),
                "args": run_args,
                "history": history,
                "model_spec": spec.to_dict(),
            })
            _write_json(output / HISTORY_NAME, history)
            stop = config.stop_after_epoch is not None and config.stop_after_epoch <= epoch < config.epochs
            if evaluated or stop or epoch == config.epochs:  # a plot costs a second or two of CPU
                plot_history(history, plot_path, title=f"{config.model}, {_describe_backbone(spec)}")
            if stop:
                logger.info("stopping after epoch %d as asked; continue with --resume %s", epoch, checkpoint_path)
                stopped_early = True
                break
    finally:
        bar.close()

    weights = None
    if not stopped_early:
        weights = output / SAFETENSORS_NAME
        export_safetensors(model, weights, spec.to_dict())
    return TrainResult(output=output, checkpoint=checkpoint_path, weights=weights, plot=plot_path, history=history,
                       epoch=epoch, global_step=global_step, seconds=time.perf_counter() - start_time,
                       final_metrics=final_metrics, completed=not stopped_early)


def _describe_backbone(spec: ModelSpec) -> str:
    width = spec.kwargs.get("depth_multiplier")
    pretrained = "ImageNet-pretrained" if spec.kwargs.get("weights_backbone") else "random init"
    return f"MobileNetV1 {width if width is not None else 1.0:.2f}, {pretrained}"
