"""Command line: `python -m detection_demo [train|evaluate|predict|demo] ...`; no arguments runs the demo.

    python -m detection_demo [--output DIR]                    # synthetic data -> train -> evaluate -> pictures
    python -m detection_demo train --data-root DIR --output runs/x [--model fcos] [--resume auto] ...
    python -m detection_demo train --train-images coco/train2017 \\
        --train-annotations coco/annotations/instances_train2017.json \\
        --val-images coco/val2017 --val-annotations coco/annotations/instances_val2017.json ...
    python -m detection_demo evaluate --checkpoint runs/x/checkpoint_last.pt [--split val] [--output m.json]
    python -m detection_demo predict img1.jpg folder/ --checkpoint runs/x/checkpoint_last.pt --out pics/
    torchrun --standalone --nproc_per_node 4 -m detection_demo train ...      # DDP, one process per GPU
    torchrun --standalone --nproc_per_node 4 -m detection_demo evaluate ...   # sharded evaluation

Errors (bad arguments, missing files, a non-finite loss, a bad image) print one message to stderr and exit with
status 1; under torchrun rank 0 prints it once when every rank stopped for the same reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed
from tqdm.contrib.logging import logging_redirect_tqdm

from .distributed import BACKENDS, CollectiveError, env_rank
from .models import BUILDERS
from .train import AMP_DTYPES, OPTIMIZERS, NonFiniteLossError, TrainConfig

logger = logging.getLogger("detection_demo")

_DEFAULTS = TrainConfig()


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _box_scales(text: str) -> tuple[float, float] | None:
    if text.lower() == "none":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'SMALLEST,LARGEST' or 'none', got {text!r}") from None
    return low, high


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _add_runtime_arguments(parser: argparse.ArgumentParser, workers: int, suppress: bool = False) -> None:
    """--device, --workers, --threads, --no-progress, --verbose; with `suppress`, unset ones stay out of `args`."""
    unset = argparse.SUPPRESS if suppress else None
    parser.add_argument("--device", default=unset or "auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=unset or workers,
                        help=f"DataLoader worker processes (default {workers})")
    parser.add_argument("--threads", type=int, default=unset, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=unset or True,
                        help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", default=unset or False, help="debug logging")


def _add_data_arguments(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    group = parser.add_argument_group("data (a COCO-style root, or the four paths of a COCO 2017 layout)")
    group.argument_default = argparse.SUPPRESS if suppress else None
    group.add_argument("--data-root", help="folder with train/, val/ and annotations/instances_{train,val}.json")
    group.add_argument("--train-images", help="training image folder, e.g. coco/train2017")
    group.add_argument("--train-annotations", help="e.g. coco/annotations/instances_train2017.json")
    group.add_argument("--val-images", help="validation image folder, e.g. coco/val2017")
    group.add_argument("--val-annotations", help="e.g. coco/annotations/instances_val2017.json")
    group.add_argument("--data-format", choices=("coco", "voc"),
                       help="coco (default) or voc: a Pascal VOC root (Annotations/, JPEGImages/, "
                            "ImageSets/Main/{train,val}.txt); the annotation paths are then image-set lists")


def _add_recipe_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The `train` flags, one per `TrainConfig` field. Unset flags stay out of `args` (argparse.SUPPRESS) and take
    `TrainConfig`'s defaults, so that `train` knows which settings were given: on `--resume` only those count."""

    def add(group: argparse._ArgumentGroup, flag: str, help: str, **kwargs: Any) -> None:
        name = flag.lstrip("-").replace("-", "_")
        default = getattr(defaults, name, None)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        suffix = f" (default {shown})" if default not in (None, {}) else ""
        group.add_argument(flag, default=argparse.SUPPRESS, help=help + suffix, **kwargs)

    model = parser.add_argument_group("model")
    add(model, "--model", "detector", choices=sorted(BUILDERS))
    add(model, "--weights-backbone", "'auto' (ImageNet MobileNetV1 1.0 if installed), 'none', or an HF dir, "
        ".safetensors or frozen .pb")
    add(model, "--trainable-backbone-layers", "backbone stages (0-6) trained, from the top; default the builder's",
        type=int)
    add(model, "--depth-multiplier", "backbone width; default the pretrained weights' width, else 1.0",
        type=_optional_float)
    add(model, "--image-size", "input side in pixels", type=int)
    add(model, "--box-scales", "SSDLite default-box scales as fractions of the input, or 'none' for the "
        "builder's 0.2,0.95", type=_box_scales, metavar="SMALL,LARGE")
    add(model, "--init-from", "fine-tune a TF Object Detection API SSD-MobileNetV1 (model folder, .tar.gz, frozen "
        ".pb or `mnv1 convert` folder); implies --model odapi", metavar="PATH")
    add(model, "--model-kwargs", 'more builder kwargs as JSON, e.g. \'{"score_thresh": 0.01}\'', type=_json_object)

    optim = parser.add_argument_group("optimisation")
    add(optim, "--epochs", "training epochs", type=int)
    add(optim, "--batch-size", "images per step", type=int)
    add(optim, "--optimizer", "optimizer", choices=OPTIMIZERS)
    add(optim, "--lr", "peak learning rate", type=float)
    add(optim, "--momentum", "SGD momentum (Nesterov)", type=float)
    add(optim, "--weight-decay", "weight decay (not on biases and norms)", type=float)
    add(optim, "--warmup-epochs", "linear warm-up length in epochs", type=float)
    add(optim, "--min-lr-ratio", "final learning rate of the cosine / peak", type=float)
    add(optim, "--clip-grad-norm", "gradient norm clip, 0 = off", type=float)
    add(optim, "--zoom-out", "largest SSD zoom-out augmentation factor, 1 = off", type=float)
    add(optim, "--hflip-prob", "horizontal flip probability", type=float)
    add(optim, "--amp", "mixed precision; default on CUDA only", action=argparse.BooleanOptionalAction)
    add(optim, "--seed", "seed of every random generator", type=int)

    run = parser.add_argument_group("run")
    add(run, "--output", "run folder")
    add(run, "--resume", "continue a run: its checkpoint, or 'auto' for <output>/checkpoint_last.pt if it exists; "
        "the checkpoint's settings are kept, except --epochs and the runtime flags given", metavar="PATH|auto")
    add(run, "--eval-interval", "evaluate on val every N epochs and after the last; 0 = never", type=int)
    add(run, "--eval-batch-size", "images per evaluation batch", type=int)
    add(run, "--stop-after-epoch", "end this run after that epoch; continue it with --resume", type=int)
    add(run, "--skip-bad-images", "leave missing or unreadable images out (and skip images that fail to decode "
        "later, counted) instead of stopping with a list of them", action=argparse.BooleanOptionalAction)

    scale = parser.add_argument_group("scale and throughput (torchrun: see docs/training_at_scale.md)")
    add(scale, "--accumulate", "micro-batches per optimizer step (gradient accumulation); global batch = "
        "processes x --batch-size x this", type=int)
    add(scale, "--augment", "SSD augmentation; --no-augment resizes only", action=argparse.BooleanOptionalAction)
    add(scale, "--sync-bn", "BatchNorm statistics over all processes (SyncBatchNorm, CUDA only; frozen BatchNorm "
        "stays frozen)", action="store_true")
    add(scale, "--freeze-bn", "BatchNorm uses its running statistics in training too (small batches, CPU)",
        action="store_true")
    add(scale, "--amp-dtype", "autocast dtype with --amp", choices=AMP_DTYPES)
    add(scale, "--channels-last", "channels-last memory format; default on CUDA only",
        action=argparse.BooleanOptionalAction)
    add(scale, "--persistent-workers", "keep DataLoader workers alive between epochs (a resumed run then draws "
        "other augmentations than an uninterrupted one)", action="store_true")
    add(scale, "--aspect-ratio-groups", "FPN models: batch images of similar aspect ratio, in this many bins, "
        "keeping each image's aspect ratio; 0 = off", type=int)
    _add_dist_arguments(scale, suppress=True)


def _add_dist_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser, suppress: bool = False) -> None:
    """--dist-backend and --dist-timeout (read under torchrun only)."""
    unset = argparse.SUPPRESS if suppress else None
    group.add_argument("--dist-backend", choices=BACKENDS, default=unset,
                       help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on CPU)")
    group.add_argument("--dist-timeout", type=float, default=unset or _DEFAULTS.dist_timeout, metavar="SECONDS",
                       help="how long a process waits for the others in a collective before the job fails "
                            f"(default {_DEFAULTS.dist_timeout:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detection_demo",
        description="Train, evaluate and run MobileNetV1 detectors on COCO-format data. Without a command: the "
                    "demo (synthetic data, training, evaluation, pictures).",
    )
    commands = parser.add_subparsers(dest="command", metavar="{train,evaluate,predict,demo}")

    train = commands.add_parser("train", help="train a detector", description="Train a detector on COCO-format data.")
    _add_data_arguments(train, suppress=True)
    _add_recipe_arguments(train, _DEFAULTS)
    _add_runtime_arguments(train, _DEFAULTS.workers, suppress=True)

    evaluate = commands.add_parser("evaluate", help="COCO mAP of a checkpoint",
                                   description="COCOeval (bbox) of a checkpoint on a split; prints and writes JSON.")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint_last.pt or model.safetensors")
    evaluate.add_argument("--split", choices=("val", "train"), default="val")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--output", help="metrics JSON (default: eval_<split>.json beside the checkpoint)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    _add_runtime_arguments(evaluate, 0)
    _add_dist_arguments(evaluate)

    predict = commands.add_parser("predict", help="draw detections on images",
                                  description="Draw a checkpoint's detections on images into PNG files.")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument("--checkpoint", required=True, help="checkpoint_last.pt or model.safetensors")
    predict.add_argument("--out", required=True, help="folder for the PNG files")
    predict.add_argument("--score-threshold", type=float, default=0.5, help="default %(default)s")
    _add_runtime_arguments(predict, 0)

    demo = commands.add_parser("demo", help="the whole demo (the default command)",
                               description="Generate synthetic data, train, evaluate and draw predictions.")
    demo.add_argument("--output", default="demo_output", help="demo folder (default %(default)s)")
    demo.add_argument("--epochs", type=int, help="override the recipe's epochs (for a quick look)")
    demo.add_argument("--fresh", action="store_true", help="train from scratch even if a run is in the folder")
    _add_runtime_arguments(demo, _DEFAULTS.workers)
    return parser


def _data_paths_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) for name in ("data_root", "train_images", "train_annotations", "val_images",
                                                "val_annotations"))


def _run_train(args: argparse.Namespace) -> None:
    from .train import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    result = train(TrainConfig(**given), given=set(given))
    _print_train_result(result)


def _print_train_result(result: Any) -> None:
    if env_rank() != 0:  # every rank returns the same result; rank 0 reports it
        return
    print(f"\ntrained {result.epoch} epochs ({result.global_step} steps) in {result.seconds / 60:.1f} min")
    if result.final_metrics:
        print(f"val AP {result.final_metrics['AP']:.3f}, AP50 {result.final_metrics['AP50']:.3f} "
              f"(epoch {result.final_metrics['epoch']})")
    print(f"checkpoint:     {result.checkpoint}")
    if result.weights:
        print(f"weights:        {result.weights}")
    else:
        print(f"not finished:   continue with --resume {result.checkpoint}")
    print(f"training curve: {result.plot}")


def _run_evaluate(args: argparse.Namespace) -> None:
    from .datasets import DataPaths
    from .distributed import distributed_context
    from .evaluate import evaluate_checkpoint, format_metrics

    paths = None
    if _data_paths_given(args):
        paths = DataPaths.resolve(args.data_root, args.train_images, args.train_annotations, args.val_images,
                                  args.val_annotations, data_format=args.data_format or "coco")
    with distributed_context(args.device, backend=args.dist_backend, timeout_s=args.dist_timeout) as context:
        metrics, path = evaluate_checkpoint(args.checkpoint, split=args.split, data_paths=paths, output=args.output,
                                            device=str(context.device), batch_size=args.batch_size,
                                            workers=args.workers, progress=args.progress, context=context)
    if not context.is_main:
        return
    print(f"COCO bbox evaluation of {args.checkpoint} on {metrics['annotation_file']}:")
    print(format_metrics(metrics))
    print(f"\nmetrics: {path}")


def _run_predict(args: argparse.Namespace) -> None:
    from .predict import predict_images

    written = predict_images(args.checkpoint, args.images, args.out, score_threshold=args.score_threshold,
                             device=_device(args.device))
    print(f"{len(written)} pictures in {Path(args.out)}/ (detections in {Path(args.out) / 'predictions.json'})")


def _run_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo
    from .evaluate import format_metrics

    overrides = {"epochs": args.epochs} if args.epochs else {}
    summary = run_demo(args.output, device=args.device, workers=args.workers, threads=args.threads,
                       progress=args.progress, resume=not args.fresh, **overrides)
    result, timings = summary["train"], summary["timings"]
    print("\nCOCO bbox evaluation on the synthetic val split:")
    print(format_metrics(summary["metrics"]))
    print(f"\ndone in {timings['total'] / 60:.1f} min (data {timings['data']:.0f} s, training "
          f"{timings['train']:.0f} s, evaluation {timings['evaluate']:.0f} s, pictures {timings['predict']:.0f} s)")
    print(f"dataset:        {summary['data_root']}")
    print(f"checkpoint:     {result.checkpoint}")
    print(f"weights:        {result.weights}")
    print(f"training curve: {result.plot}")
    print(f"metrics:        {summary['metrics_path']}")
    print(f"pictures:       {summary['pictures'][0].parent}/ ({len(summary['pictures'])} PNG files)")


def _device(device: str) -> str:
    from .distributed import resolve_device

    return str(resolve_device(device))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]  # `python -m detection_demo [demo options]`
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:  # pycocotools and PIL are chatty at debug level only, but torch warns about workers
        logging.getLogger("PIL").setLevel(logging.WARNING)
    rank = env_rank()
    if rank != 0 and not verbose:  # under torchrun rank 0 logs the run; the others only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    handlers = {"train": _run_train, "evaluate": _run_evaluate, "predict": _run_predict, "demo": _run_demo}
    if args.command is None:
        parser.print_help()
        return 1
    try:
        with logging_redirect_tqdm():
            handlers[args.command](args)
    except (NonFiniteLossError, ValueError, FileNotFoundError) as error:
        # Errors every rank raised alike (bad settings, a NaN or bad image agreed on) are printed once, by rank 0;
        # an error of one rank alone is printed by that rank.
        if rank == 0 or not getattr(error, "every_rank", False):
            prefix = f"error (rank {rank}): " if rank and os.environ.get("WORLD_SIZE", "1") != "1" else "error: "
            print(f"{prefix}{error}", file=sys.stderr)
        else:  # torchrun stops the job when the first process exits: leave rank 0 the time to print the message
            time.sleep(2.0)
        return 1
    except (CollectiveError, torch.distributed.DistError) as error:
        # Another process died or timed out (--dist-timeout); torchrun's summary below says which one.
        text = str(error).strip()
        print(f"error (rank {rank}): {text.splitlines()[0] if text else type(error).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted; continue with --resume auto", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
