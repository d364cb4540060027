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

Under `torchrun` (see docs/training_at_scale.md) every process runs `train`: one `DistributedDataParallel` model,
a `DistributedSampler` shard of every epoch per process (`sampling.ShardBatchSampler`, optionally grouped by aspect
ratio), `batch_size` per process (global batch = processes x batch_size x accumulate), rank 0 alone writing files.
The processes agree at every micro-batch on whether any of them hit a bad image or a non-finite loss, so all stop
together with one message instead of waiting for each other until the process-group timeout. The checkpoint
records `world_size`, `global_batch`, `samples_seen` and every rank's generator states; a run resumed on another
number of processes continues the schedule at the same fraction of the run (checkpoints fall on epoch boundaries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2
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
from .data import BadImageError, check_images, collate_fn, make_eval_transforms, make_train_transforms
from .datasets import DataPaths, open_split
from .distributed import (
    BACKENDS,
    DistributedContext,
    all_reduce_sum,
    barrier,
    broadcast_from_main,
    distributed_context,
    gather_to_main,
)
from .evaluate import evaluate_model
from .models import (
    BUILDERS,
    ModelSpec,
    backbone_depth_multiplier,
    build_model,
    odapi_model_spec,
    resolve_backbone_weights,
)
from .plotting import plot_history
from .sampling import ShardBatchSampler, aspect_ratio_groups

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "train", "warmup_cosine"]

logger = logging.getLogger(__name__)

HISTORY_NAME = "history.json"
PLOT_NAME = "training_curves.png"
OPTIMIZERS = ("sgd", "adamw")
# Settings that may differ between a run and its resumption: where and how it runs, not what it computes.
# The per-process batch and the accumulation are among them, so that a run resumed on another number of processes
# can keep its global batch (2 x 4 -> 1 x 8, or 1 x 4 with --accumulate 2).
_RUNTIME_FIELDS = ("output", "resume", "device", "workers", "threads", "progress", "eval_batch_size",
                   "stop_after_epoch", "epochs", "batch_size", "accumulate", "dist_backend", "dist_timeout",
                   "persistent_workers", "channels_last", "skip_bad_images")
AMP_DTYPES = ("float16", "bfloat16")


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
    data_format: str = "coco"  # "coco" or "voc" (Pascal VOC XML; see datasets.DataPaths)
    skip_bad_images: bool = False  # leave missing/unreadable images out (skip later failures) instead of stopping
    weights_backbone: str | None = "auto"  # "auto", "none" or a path (HF dir, .safetensors, frozen .pb)
    trainable_backbone_layers: int | None = 3  # pretrained only; None: the builder's default (SSDLite: all 6)
    depth_multiplier: float | None = None  # the weights' width when pretrained, else 1.0
    image_size: int = 256
    box_scales: tuple[float, float] | None = (0.07, 0.8)  # SSD default boxes; None = the builder's 0.2-0.95
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # more builder kwargs, e.g. {"score_thresh": 0.01}
    init_from: str | None = None  # an OD-API model to fine-tune (folder, .tar.gz, .pb, `mnv1 convert` folder)
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
    # Scale and throughput (see docs/training_at_scale.md). Under torchrun `batch_size` is per process: the global
    # batch is processes x batch_size x accumulate, and `lr` is used as given (scale it with the global batch).
    accumulate: int = 1  # micro-batches of batch_size per optimizer step
    augment: bool = True  # False: resize only (no photometric distortion, zoom out, crop or flip)
    sync_bn: bool = False  # BatchNorm -> SyncBatchNorm across processes (CUDA only)
    freeze_bn: bool = False  # BatchNorm normalises with its running statistics in training too (mmdet's norm_eval)
    amp_dtype: str = "float16"  # autocast dtype with --amp; bfloat16 needs no loss scaling
    channels_last: bool | None = None  # None: on CUDA only
    persistent_workers: bool = False  # keep DataLoader workers between epochs (their seeds then stay the first's)
    aspect_ratio_groups: int = 0  # FPN models: batch images of similar aspect ratio (this many bins); 0: off
    dist_backend: str | None = None  # None: nccl on CUDA, gloo on CPU
    dist_timeout: float = 900.0  # seconds a collective waits for the other processes before the job fails

    def channels_last_on(self, device: torch.device) -> bool:
        """Whether the model and images use the channels-last memory format on `device`."""
        return device.type == "cuda" if self.channels_last is None else bool(self.channels_last)

    def validate(self) -> None:
        """Raise `ValueError` naming the first setting out of range."""
        if self.model not in BUILDERS:
            raise ValueError(f"model must be one of {sorted(BUILDERS)}, got {self.model!r}")
        if self.model == "odapi" and self.init_from is None:
            raise ValueError("model 'odapi' fine-tunes an imported OD-API model: give init_from (--init-from PATH)")
        if self.init_from is not None and self.model not in ("odapi", TrainConfig.model):
            raise ValueError(f"init_from imports an OD-API SSD (model 'odapi'); it cannot initialise {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        positive_ints = ("epochs", "batch_size", "image_size", "eval_batch_size", "accumulate")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("workers", "eval_interval", "seed", "aspect_ratio_groups"):
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
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {AMP_DTYPES}, got {self.amp_dtype!r}")
        if self.dist_backend is not None and self.dist_backend not in BACKENDS:
            raise ValueError(f"dist_backend must be one of {BACKENDS}, got {self.dist_backend!r}")
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            raise ValueError(f"dist_timeout must be a finite number of seconds > 0, got {self.dist_timeout!r}")

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
    world_size: int = 1  # processes that trained it


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
    if config.init_from is not None:  # the architecture is the imported model's (models.odapi_model_spec)
        return odapi_model_spec(config.init_from, categories, label_to_cat_id, config.model_kwargs,
                                depth_multiplier=config.depth_multiplier, image_size=config.image_size)
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

    Under `torchrun` every process calls this: it opens the process group (`distributed.distributed_context`),
    trains its shard of every epoch in one `DistributedDataParallel` model, and returns the same `TrainResult`
    on every rank; rank 0 alone writes the files.

    Args:
        config: the settings.
        given: names of the settings the caller chose (the CLI's flags); None: those where `config` differs from
            `TrainConfig()`. On resume, the checkpoint's settings are used, except the runtime ones (`epochs`,
            `device`, `workers`, `threads`, `eval_batch_size`, `stop_after_epoch`, `progress`, `batch_size`,
            `accumulate`, the `dist_*` settings, ...) that were given.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite on some rank (the last checkpoint is left as it was).
        BadImageError: an image failed to decode on some rank (without `skip_bad_images`); every rank stops.
        ValueError / FileNotFoundError: bad settings or data.
    """
    with distributed_context(config.device, backend=config.dist_backend, timeout_s=config.dist_timeout) as context:
        return _train(config, given, context)


def _train(config: TrainConfig, given: Collection[str] | None, context: DistributedContext) -> TrainResult:
    start_time = time.perf_counter()
    output = Path(config.output)
    try:  # the same settings and files on every rank: every rank fails alike here, and one message is enough
        setup = _set_up(config, given, context)
    except (ValueError, FileNotFoundError) as error:
        error.every_rank = True  # type: ignore[attr-defined]
        raise
    config, device, spec, model, train_set, val_set = (setup[k] for k in ("config", "device", "spec", "model",
                                                                          "train_set", "val_set"))
    checkpoint = setup["checkpoint"]
    main = context.is_main
    use_amp = device.type == "cuda" if config.amp is None else bool(config.amp)
    amp_dtype = getattr(torch, config.amp_dtype)
    model_without_ddp = model
    if context.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = DistributedSampler(train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                 seed=config.seed * 100_003, drop_last=True)
    shard = len(sampler)
    batch_size = min(config.batch_size, shard)
    group_ids = None
    if config.aspect_ratio_groups:
        group_ids = aspect_ratio_groups([(train_set.coco.imgs[i]["width"], train_set.coco.imgs[i]["height"])
                                         for i in train_set.ids], config.aspect_ratio_groups)
    batch_sampler = ShardBatchSampler(sampler, batch_size, group_ids)
    # drop_last: a batch of 1 breaks BatchNorm on 1x1 maps, and every rank must run the same number of steps.
    steps_per_epoch = len(batch_sampler) // config.accumulate
    if steps_per_epoch < 1:
        error = ValueError(f"{len(train_set)} training images are too few for {context.world_size} processes x batch "
                           f"{batch_size} x accumulate {config.accumulate}")
        error.every_rank = True  # type: ignore[attr-defined]
        raise error
    global_batch = context.world_size * batch_size * config.accumulate
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps)
    optimizer = _make_optimizer(config, model_without_ddp)
    schedule = warmup_cosine(total_steps, warmup_steps, config.min_lr_ratio)
    scheduler = LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    history: dict[str, Any] = {"steps": [], "epochs": [], "evals": []}
    epoch = global_step = samples_seen = 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        epoch, global_step, history = checkpoint["epoch"], checkpoint["global_step"], checkpoint["history"]
        saved_world = checkpoint.get("world_size", 1)
        saved_batch = checkpoint.get("global_batch", checkpoint["args"]["batch_size"])
        samples_seen = checkpoint.get("samples_seen", global_step * saved_batch)
        # Checkpoints fall on epoch boundaries, so the schedule continues at `epoch` epochs' worth of samples: the
        # same step as before when the global batch is unchanged, its equivalent in the new steps when it changed.
        _set_schedule_position(scheduler, epoch * steps_per_epoch)
        if saved_batch != global_batch:
            logger.info("resuming with a global batch of %d (%d processes) instead of %d (%d processes): the "
                        "schedule continues at epoch %d of %d", global_batch, context.world_size, saved_batch,
                        saved_world, epoch, config.epochs)
        rng_states = checkpoint.get("rng_per_rank") or [checkpoint["rng"]]
        if len(rng_states) == context.world_size:
            restore_rng_state(rng_states[context.rank])
        else:  # each rank's random streams restart from the seed, its rank and the epoch
            seed_everything(_rank_seed(config.seed, context.rank) + epoch)
        del checkpoint  # its tensors are copied into the model and optimizer
    trainable = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    logger.info(
        "%s (%s, %d classes, %.2fM trainable parameters) on %s%s: %d images, %d steps/epoch x %d epochs, "
        "batch %d%s, %s lr %g", config.model, _describe_backbone(spec), spec.num_classes, trainable / 1e6,
        f"{context.world_size} processes ({context.backend}, {device.type})" if context.enabled else device,
        f" with mixed precision ({config.amp_dtype})" if use_amp else "", len(train_set), steps_per_epoch,
        config.epochs, global_batch,
        f" (= {context.world_size} x {batch_size} x {config.accumulate} accumulated)" if global_batch != batch_size
        else "", config.optimizer, config.lr,
    )

    checkpoint_path = output / CHECKPOINT_NAME
    plot_path = output / PLOT_NAME
    final_metrics = history["evals"][-1] if history["evals"] else None
    run_args = {**config.to_dict(), "data_paths": setup["data_paths"].to_dict()}
    parameters = [p for p in model_without_ddp.parameters() if p.requires_grad]
    bar = tqdm(total=total_steps, initial=epoch * steps_per_epoch, unit="step", dynamic_ncols=True,
               disable=not (config.progress and main), desc=f"epoch {epoch + 1}/{config.epochs}")
    persistent = config.persistent_workers and config.workers > 0
    loader = None
    stopped_early = False
    try:
        while epoch < config.epochs:
            batch_sampler.set_epoch(epoch)
            if loader is None or not persistent:
                # The DataLoader workers' seeds come from this generator: the same for an epoch whether or not the
                # run was resumed before it (persistent workers keep the seeds of the epoch they started in).
                generator = torch.Generator().manual_seed(_rank_seed(config.seed * 100_003 + epoch, context.rank))
                loader = DataLoader(train_set, batch_sampler=batch_sampler, num_workers=config.workers,
                                    collate_fn=collate_fn, generator=generator, pin_memory=device.type == "cuda",
                                    persistent_workers=persistent)
            model.train()
            if config.freeze_bn:
                _freeze_batch_norm(model_without_ddp)
            bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
            epoch_loss, trained_steps, epoch_start, epoch_cpu = 0.0, 0, time.perf_counter(), time.process_time()
            batches = iter(loader)
            min_images = min(2, config.batch_size)  # BatchNorm in training needs two values per channel
            for _ in range(steps_per_epoch):
                optimizer.zero_grad(set_to_none=True)
                step_loss, skip_update = 0.0, False
                for micro in range(config.accumulate):
                    batch = _next_batch(batches, context, global_step + 1, epoch + 1, min_images)
                    if batch is None or skip_update:  # read the step's other micro-batches all the same
                        skip_update = True
                        continue
                    images, targets = batch
                    # Images stay (C, H, W): the detector stacks them, and a convolution with channels-last weights
                    # computes in channels-last whatever its input's layout.
                    images = [image.to(device, non_blocking=True) for image in images]
                    targets = _to_device(targets, device)
                    last_micro = micro == config.accumulate - 1
                    # DDP averages the gradients over the ranks at the backward of the last micro-batch only.
                    sync = contextlib.nullcontext() if last_micro or not context.enabled else model.no_sync()
                    with sync:
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                            losses = model(images, targets)
                        loss = sum(losses.values())
                        loss_value = all_reduce_sum(context, [float(loss.detach())])[0] / context.world_size
                        if not math.isfinite(loss_value):
                            _raise_non_finite(context, losses, loss_value, global_step + 1, epoch + 1,
                                              scheduler.get_last_lr()[0], checkpoint_path)
                        scaler.scale(loss / config.accumulate).backward()
                    step_loss += loss_value / config.accumulate
                if skip_update:  # every rank skips this update together; the schedule moves on as planned
                    scheduler.step()
                    global_step += 1
                    samples_seen += global_batch
                    bar.update(1)
                    continue
                if config.clip_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                global_step += 1
                samples_seen += global_batch
                epoch_loss += step_loss
                trained_steps += 1
                history["steps"].append({"step": global_step, "epoch": epoch + 1, "loss": step_loss, "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
            del batches
            epoch += 1
            epoch_record = {"epoch": epoch, "step": global_step, "loss": epoch_loss / max(trained_steps, 1),
                            "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - epoch_start,
                            "cpu_seconds": time.process_time() - epoch_cpu}
            if config.skip_bad_images:  # images that passed the scan but failed to decode, over all ranks so far
                epoch_record["skipped_images"] = int(all_reduce_sum(context, [float(train_set.skipped_images)])[0])
            history["epochs"].append(epoch_record)
            logger.info("epoch %d/%d: mean loss %.4f in %.0f s%s", epoch, config.epochs, epoch_record["loss"],
                        epoch_record["seconds"], f"; {epoch_record['skipped_images']} undecodable images skipped so far"
                        if epoch_record.get("skipped_images") else "")
            evaluated = val_set is not None and (epoch % config.eval_interval == 0 or epoch == config.epochs)
            if evaluated:
                metrics = evaluate_model(model_without_ddp, val_set, spec.label_to_cat_id, device=device,
                                         batch_size=config.eval_batch_size, workers=config.workers,
                                         progress=config.progress and main, context=context)
                final_metrics = {"epoch": epoch, "step": global_step, **metrics}
                history["evals"].append(final_metrics)
                per_category = ", ".join(f"{name} {v['AP50']:.2f}" for name, v in metrics["per_category"].items())
                logger.info("epoch %d: val AP %.3f, AP50 %.3f (AP50 by category: %s; %.0f s)", epoch, metrics["AP"],
                            metrics["AP50"], per_category, metrics["seconds"])
            rng_states = _gather_rng_states(context)
            if main:
                assert rng_states is not None
                save_checkpoint(checkpoint_path, {
                    "version": CHECKPOINT_VERSION,
                    "model": model_without_ddp.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "global_step": global_step,
                    "samples_seen": samples_seen,
                    "world_size": context.world_size,
                    "global_batch": global_batch,
                    "rng": rng_states[0],
                    "rng_per_rank": rng_states,
                    "args": run_args,
                    "history": history,
                    "model_spec": spec.to_dict(),
                })
                _write_json(output / HISTORY_NAME, history)
            stop = config.stop_after_epoch is not None and config.stop_after_epoch <= epoch < config.epochs
            if main and (evaluated or stop or epoch == config.epochs):  # a plot costs a second or two of CPU
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
        if main:
            export_safetensors(model_without_ddp, weights, spec.to_dict())
    barrier(context)  # every rank returns once the files are written
    return TrainResult(output=output, checkpoint=checkpoint_path, weights=weights, plot=plot_path, history=history,
                       epoch=epoch, global_step=global_step, seconds=time.perf_counter() - start_time,
                       final_metrics=final_metrics, completed=not stopped_early, world_size=context.world_size)


def _set_up(config: TrainConfig, given: Collection[str] | None, context: DistributedContext) -> dict[str, Any]:
    """Settings (merged with the checkpoint's on resume), data and model, the same on every rank."""
    output = Path(config.output)
    resume_path = find_resume_checkpoint(config.resume, output)
    checkpoint: dict[str, Any] | None = None
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path)
        config = _merge_resumed_config(config, checkpoint["args"], given)
        logger.info("resuming %s from epoch %d, step %d (written by %d processes)", resume_path, checkpoint["epoch"],
                    checkpoint["global_step"], checkpoint.get("world_size", 1))
    config.validate()
    if config.init_from is not None:
        config = dataclasses.replace(config, model="odapi")
    device = context.device
    if context.is_main:
        output.mkdir(parents=True, exist_ok=True)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    use_amp = device.type == "cuda" if config.amp is None else bool(config.amp)
    if use_amp and device.type != "cuda":
        raise ValueError("mixed precision (--amp) needs a CUDA device")
    if config.sync_bn and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA (SyncBatchNorm runs on GPUs only); on CPU use --freeze-bn, or leave "
                         "BatchNorm per process")
    if config.aspect_ratio_groups and config.model == "ssdlite":
        raise ValueError("--aspect-ratio-groups is for the FPN models, which keep the aspect ratio; SSDLite resizes "
                         "every image to a square")
    seed_everything(config.seed)  # the same initial weights on every rank (DDP checks that they agree)

    data_paths = DataPaths.resolve(config.data_root, config.train_images, config.train_annotations,
                                   config.val_images, config.val_annotations, data_format=config.data_format)
    masks = config.model == "maskrcnn"
    skip = config.skip_bad_images
    train_set = open_split(data_paths, "train", _train_transforms(config), masks=masks, skip_bad_images=skip)
    val_set = open_split(data_paths, "val", make_eval_transforms(), skip_bad_images=skip) if config.eval_interval \
        else None
    _check_images_once(context, [train_set, val_set], skip)  # one message listing every missing/unreadable file
    if val_set is not None and val_set.label_to_cat_id != train_set.label_to_cat_id:
        raise ValueError(f"{val_set.annotation_file} and {train_set.annotation_file} have different categories")

    if checkpoint is not None:
        spec = ModelSpec.from_dict(checkpoint["model_spec"])
        if spec.label_to_cat_id != train_set.label_to_cat_id:
            raise ValueError(f"{resume_path} was trained on other categories than {train_set.annotation_file}")
    else:
        spec = _model_spec(config, list(train_set.categories), dict(train_set.label_to_cat_id))
    # A resumed OD-API fine-tuning takes every weight from the checkpoint, without reading the imported files again.
    model = build_model(spec.for_inference() if checkpoint is not None and spec.builder == "odapi" else spec)
    spec.kwargs["depth_multiplier"] = backbone_depth_multiplier(model)  # evaluate/predict rebuild without weights
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    if config.sync_bn:  # frozen BatchNorms are not BatchNorm modules and stay frozen
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if config.channels_last_on(device):
        model.to(memory_format=torch.channels_last)
    if context.rank:  # augmentations and samplers in this process draw other numbers than rank 0's
        seed_everything(_rank_seed(config.seed, context.rank))
    return {"config": config, "device": device, "spec": spec, "model": model, "train_set": train_set,
            "val_set": val_set, "checkpoint": checkpoint, "resume_path": resume_path, "data_paths": data_paths}


def _check_images_once(context: DistributedContext, datasets: list[Any], skip: bool) -> None:
    """`data.check_images` on rank 0 alone (one scan, not one per process), its verdict sent to every rank.

    The other ranks wait for it in a collective, so a scan must end within `--dist-timeout`. They leave out the
    images rank 0 left out, so every rank holds the same dataset and the sampler's shards stay disjoint.
    """
    datasets = [dataset for dataset in datasets if dataset is not None]
    if not context.enabled:
        check_images(datasets, skip_bad_images=skip)
        return
    verdict: tuple[str | None, list[list[int]]] | None = None
    if context.is_main:
        before = [set(dataset.ids) for dataset in datasets]
        try:
            check_images(datasets, skip_bad_images=skip)
            verdict = (None, [sorted(ids - set(dataset.ids)) for ids, dataset in zip(before, datasets, strict=True)])
        except BadImageError as error:
            verdict = (str(error), [])
    verdict = broadcast_from_main(context, verdict)
    assert verdict is not None
    message, excluded = verdict
    if message is not None:
        raise BadImageError(message)
    if not context.is_main:
        for dataset, image_ids in zip(datasets, excluded, strict=True):
            dataset.skip_bad_images = skip
            if image_ids:
                dataset.exclude_images(image_ids)


def _gather_rng_states(context: DistributedContext) -> list[dict[str, Any]] | None:
    """Every rank's generator states, on rank 0 (None elsewhere), to save in the checkpoint."""
    if not context.enabled:
        return [capture_rng_state()]
    # all_gather_object cannot pickle the generators' byte tensors in this torch; send them as torch.save bytes.
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    gathered = gather_to_main(context, buffer.getvalue())
    if gathered is None:
        return None
    return [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


def _freeze_batch_norm(model: nn.Module) -> None:
    """Every BatchNorm in eval mode: it normalises with its running statistics and no longer updates them, so a
    sample's output does not depend on the others in its batch (small per-process batches, or CPU, where
    SyncBatchNorm is not available); the affine weights still train."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each rank; rank 0 keeps `seed`, so one process runs as it always did."""
    return seed + 1_000_003 * rank


def _train_transforms(config: TrainConfig) -> Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]:
    """The SSD augmentation recipe, or (`augment=False`) the resize alone; with aspect-ratio grouping the images
    keep their aspect ratio and the detector's own transform resizes them (`min_size`/`max_size`)."""
    if config.augment:
        steps = list(make_train_transforms(config.image_size, zoom_out=config.zoom_out,
                                           hflip_prob=config.hflip_prob).transforms)
    else:
        steps = [v2.ToImage(), v2.Resize((config.image_size, config.image_size), antialias=True),
                 v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(), v2.ToDtype(torch.float32, scale=True)]
    if config.aspect_ratio_groups:
        steps = [step for step in steps if not isinstance(step, v2.Resize)]
    return v2.Compose(steps)


def _set_schedule_position(scheduler: LambdaLR, step: int) -> None:
    """Put the learning-rate schedule at `step` (and the optimizer's learning rates with it)."""
    scheduler.last_epoch = step
    lrs = [base * scheduler.lr_lambdas[0](step) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports, as LambdaLR.step() sets it


def _next_batch(batches: Iterator[Any], context: DistributedContext, step: int, epoch: int, min_images: int) -> Any:
    """The next batch of this rank, once every rank has one: a bad image anywhere stops every rank together.

    Without that agreement a rank whose loader failed would leave the others waiting in DDP's gradient
    all-reduce until the process-group timeout, and the loader's exception never reaches the user with a worker
    traceback. When `skip_bad_images` left a batch on any rank with fewer than `min_images` images (none, or one
    where BatchNorm needs two), every rank gets None and skips that update together: taking the next batch
    instead would run out of batches before the epoch's last step.
    """
    failure = None
    batch: Any = None
    try:
        batch = next(batches)
    except BadImageError as error:
        failure = str(error)
    empty = failure is None and len(batch[0]) < min_images
    flags = all_reduce_sum(context, [float(failure is not None), float(empty)])
    if flags[0]:
        where = f"step {step}, epoch {epoch}"
        if context.enabled:
            messages = gather_to_main(context, failure)
            if messages is not None:
                failure = "; ".join(f"rank {rank}: {text}" for rank, text in enumerate(messages) if text)
            where += "; every rank stopped"
        error = BadImageError(f"{failure} ({where}). Fix or remove the file, or train with --skip-bad-images")
        error.every_rank = True  # type: ignore[attr-defined]
        raise error
    if flags[1]:
        logger.warning("step %d: --skip-bad-images left a batch with fewer than %d images; every rank skips this "
                       "update", step, min_images)
        return None
    return batch


def _raise_non_finite(context: DistributedContext, losses: dict[str, torch.Tensor], loss_value: float, step: int,
                      epoch: int, lr: float, checkpoint_path: Path) -> None:
    """Raise `NonFiniteLossError` on every rank (they all see the NaN mean), naming the ranks and their terms."""
    terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    gathered = gather_to_main(context, terms) if context.enabled else [terms]
    if context.enabled and gathered is not None:
        terms = "; ".join(f"rank {rank}: {text}" for rank, text in enumerate(gathered))
    error = NonFiniteLossError(
        f"non-finite loss {loss_value} at step {step} (epoch {epoch}, lr {lr:.3g}): {terms}. Training stopped; the "
        f"last checkpoint is {checkpoint_path if checkpoint_path.exists() else 'not written yet'}. Try a lower --lr."
    )
    error.every_rank = True  # type: ignore[attr-defined]
    raise error


def _describe_backbone(spec: ModelSpec) -> str:
    width = spec.kwargs.get("depth_multiplier")
    pretrained = "ImageNet-pretrained" if spec.kwargs.get("weights_backbone") else "random init"
    if spec.builder == "odapi":
        pretrained = "OD-API import"
    return f"MobileNetV1 {width if width is not None else 1.0:.2f}, {pretrained}"
