"""Training and evaluation under torchrun (DDP on CPU with gloo), and the pieces they are made of.

The multi-process tests start `python -m torch.distributed.run --standalone --nproc_per_node 2 -m detection_demo`
on a tiny synthetic dataset (12 train / 5 val images of 128 px, models at 64 px, width 0.25, random init):

- `test_two_processes_equal_one_process`: with the same seed and data, augmentation off and BatchNorm frozen
  (RetinaNet, whose loss is a mean over images), 2 processes x batch 2 == 1 process x batch 4 == 1 process x
  batch 2 with `--accumulate 2`: the same loss at every step and the same final weights, to float32 rounding.
  The same holds for a run stopped after epoch 1 by 2 processes and finished by 1 (`--resume auto`, batch 4),
  and for one finished by 2 processes again. This proves the sharding, the gradient averaging, the schedule
  and the resumption across world sizes.
- `test_sharded_evaluation_equals_one_process`: the evaluation inside the 2-process training and a 2-process
  `evaluate` (5 images in 3 batches: rank 1's shard is padded with a duplicate batch) give exactly the 12 numbers
  of a one-process `evaluate` of the same checkpoint.
- `test_killed_rank_ends_the_job`: SIGKILL on rank 1 mid-training ends torchrun with a non-zero status within the
  process-group timeout, and the last checkpoint still loads (this run also takes the channels-last path, the
  default on CUDA, which CPU runs otherwise skip).
- `test_ctrl_c_stops_every_rank_and_keeps_the_checkpoint`: SIGINT to torchrun's process group (Ctrl-C) ends the
  job within seconds, no worker left, rank 0's one line says how to continue (torchrun then prints its own
  SignalException traceback, which is torchrun's), the checkpoint loads.
- `test_a_failure_on_one_rank_stops_every_rank_with_one_message`: a NaN loss on rank 1 only, and a bad image in
  rank 0's loader only, make both ranks raise at the same step (the training loop's agreement functions under a
  real 2-process group); rank 0's message names every rank's loss terms or the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler
from torchvision.transforms.v2.functional import pil_to_tensor

from detection_demo import checkpoint as checkpoint_io
from detection_demo.__main__ import main
from detection_demo.data import COCO_STAT_NAMES, BadImageError
from detection_demo.distributed import DistributedContext, distributed_context
from detection_demo.sampling import ShardBatchSampler, aspect_ratio_groups
from detection_demo.train import TrainConfig, _next_batch

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL, EPOCHS = 12, 5, 2
# RetinaNet normalises its loss per image, so a batch's loss is the mean of its images' losses whatever the split
# into processes or micro-batches; BatchNorm frozen and no augmentation make each image's loss independent of
# the others and of any random draw. score_thresh 0.001 keeps detections of the barely trained model for COCOeval.
EQUIVALENCE_FLAGS = ["--epochs", str(EPOCHS), "--model", "retinanet", "--model-kwargs", '{"score_thresh": 0.001}',
                     "--image-size", "64", "--depth-multiplier", "0.25", "--weights-backbone", "none",
                     "--freeze-bn", "--no-augment", "--optimizer", "sgd", "--lr", "0.01", "--warmup-epochs", "0.5",
                     "--workers", "0", "--threads", "1", "--no-progress", "--seed", "3"]


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "detection_demo", *args]


def _one_process(*args: str) -> list[str]:
    return [sys.executable, "-m", "detection_demo", *args]


def _run_all(commands: dict[str, list[str]], timeout: float = 300) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands side by side (each process uses one thread); fail naming the first that failed."""
    started = {name: subprocess.Popen(command, cwd=REPO, env=_environment(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for name, command in commands.items()}
    finished = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=timeout)
        finished[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    for name, result in finished.items():
        assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
    return finished


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detection_demo.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=(128, 128), seed=0, workers=1)
    return root


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The equivalence runs; two phases of processes side by side to keep the wall time down."""
    base = tmp_path_factory.mktemp("runs")
    out = {name: base / name for name in ("ddp", "single", "accumulate", "split_to_one", "split_to_two", "eval")}
    data = ["--data-root", str(data_root)]
    _run_all({
        # The 2-process run also evaluates after its last epoch (sharded) for the evaluation test.
        "ddp": _torchrun("train", *data, "--output", str(out["ddp"]), *EQUIVALENCE_FLAGS, "--batch-size", "2",
                         "--eval-interval", str(EPOCHS), "--eval-batch-size", "2"),
        "single": _one_process("train", *data, "--output", str(out["single"]), *EQUIVALENCE_FLAGS, "--batch-size", "4",
                               "--eval-interval", "0"),
        "accumulate": _one_process("train", *data, "--output", str(out["accumulate"]), *EQUIVALENCE_FLAGS,
                                   "--batch-size", "2", "--accumulate", "2", "--eval-interval", "0"),
        "split": _torchrun("train", *data, "--output", str(out["split_to_one"]), *EQUIVALENCE_FLAGS, "--batch-size",
                           "2", "--eval-interval", "0", "--stop-after-epoch", "1"),
    })
    out["split_to_two"].mkdir()
    for name in (checkpoint_io.CHECKPOINT_NAME, "history.json"):
        (out["split_to_two"] / name).write_bytes((out["split_to_one"] / name).read_bytes())
    checkpoint = str(out["ddp"] / checkpoint_io.CHECKPOINT_NAME)
    annotations = _annotations_from_detections(out["ddp"] / checkpoint_io.CHECKPOINT_NAME, data_root, out["eval"])
    val = ["--val-images", str(data_root / "val"), "--val-annotations", str(annotations),
           "--train-images", str(data_root / "train"), "--train-annotations", str(annotations)]
    _run_all({
        "resume 2 -> 1": _one_process("train", "--data-root", "ignored", "--output", str(out["split_to_one"]),
                                      "--resume", "auto", "--batch-size", "4", "--threads", "1", "--no-progress"),
        "resume 2 -> 2": _torchrun("train", "--data-root", "ignored", "--output", str(out["split_to_two"]),
                                   "--resume", "auto", "--threads", "1", "--no-progress"),
        "sharded evaluate": _torchrun("evaluate", "--checkpoint", checkpoint, *val, "--output",
                                      str(out["eval"] / "sharded.json"), "--batch-size", "2", "--threads", "1",
                                      "--no-progress"),
    })
    return out


def _annotations_from_detections(checkpoint: Path, data_root: Path, folder: Path) -> Path:
    """A val annotation file whose boxes are the model's own 3 best detections per image (one process).

    After a few steps of training from scratch every COCO number on the real boxes is 0, and equal zeros would
    prove nothing; on these boxes AP is high and moves with any detection that is lost or counted twice.
    """
    from detection_demo.evaluate import _without_background
    from detection_demo.models import load_trained_model

    model, spec, _ = load_trained_model(checkpoint, "cpu")
    data = json.loads((data_root / "annotations" / "instances_val.json").read_text())
    annotations = []
    with torch.inference_mode():
        for image in data["images"]:
            with Image.open(data_root / "val" / image["file_name"]) as file:
                pixels = pil_to_tensor(file.convert("RGB")).float() / 255
            output = _without_background(model([pixels])[0])
            for box, label in zip(output["boxes"][:3].tolist(), output["labels"][:3].tolist(), strict=True):
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "iscrowd": 0,
                                    "category_id": spec.label_to_cat_id[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": (x2 - x1) * (y2 - y1)})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "instances_val_from_detections.json"
    path.write_text(json.dumps({**data, "annotations": annotations}))
    return path


def _losses(run: Path) -> list[float]:
    return [step["loss"] for step in json.loads((run / "history.json").read_text())["steps"]]


@pytest.mark.slow
def test_two_processes_equal_one_process(runs: dict[str, Path]) -> None:
    steps = EPOCHS * NUM_TRAIN // 4  # global batch 4 in every run
    reference = _losses(runs["single"])
    reference_weights = load_file(runs["single"] / checkpoint_io.SAFETENSORS_NAME)
    assert len(reference) == steps
    for name in ("ddp", "accumulate", "split_to_one", "split_to_two"):
        # A loss is a mean of 4 float32 image losses, summed in another order: float32 rounding of ~3 is 2.4e-7.
        torch.testing.assert_close(torch.tensor(_losses(runs[name])), torch.tensor(reference), rtol=1e-6, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
        weights = load_file(runs[name] / checkpoint_io.SAFETENSORS_NAME)
        assert sorted(weights) == sorted(reference_weights)
        for key, value in reference_weights.items():
            torch.testing.assert_close(weights[key], value, msg=lambda m, key=key, name=name: f"{name} {key}: {m}")

    ddp = checkpoint_io.load_checkpoint(runs["ddp"] / checkpoint_io.CHECKPOINT_NAME)
    assert ddp["world_size"] == 2 and ddp["global_batch"] == 4
    assert ddp["global_step"] == steps and ddp["samples_seen"] == EPOCHS * NUM_TRAIN
    assert len(ddp["rng_per_rank"]) == 2
    resumed = checkpoint_io.load_checkpoint(runs["split_to_one"] / checkpoint_io.CHECKPOINT_NAME)
    assert resumed["world_size"] == 1 and resumed["global_step"] == steps and resumed["epoch"] == EPOCHS
    # Only rank 0 wrote: one checkpoint, no temporary files of a second writer.
    assert not list(runs["ddp"].glob(".*.tmp"))


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(runs: dict[str, Path]) -> None:
    from detection_demo.datasets import DataPaths
    from detection_demo.evaluate import evaluate_checkpoint

    checkpoint = runs["ddp"] / checkpoint_io.CHECKPOINT_NAME
    annotations = runs["eval"] / "instances_val_from_detections.json"
    data_root = Path(checkpoint_io.load_checkpoint(checkpoint)["args"]["data_paths"]["val_images"]).parent
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_real, _ = evaluate_checkpoint(checkpoint, batch_size=2, progress=False,
                                             output=runs["eval"] / "single_real.json")
        paths = DataPaths(data_root / "train", annotations, data_root / "val", annotations)
        single, _ = evaluate_checkpoint(checkpoint, data_paths=paths, batch_size=2, progress=False,
                                        output=runs["eval"] / "single.json")
    finally:
        torch.set_num_threads(threads)
    sharded = json.loads((runs["eval"] / "sharded.json").read_text())
    assert 0.3 < single["AP"] < 1 and single["num_detections"] > 0  # numbers that move with any lost detection
    assert {name: sharded[name] for name in COCO_STAT_NAMES} == {name: single[name] for name in COCO_STAT_NAMES}
    assert sharded["num_detections"] == single["num_detections"]
    assert sharded["per_category"] == single["per_category"]
    # The evaluation inside the 2-process training, on the real boxes (all zeros so early), and its count.
    in_training = checkpoint_io.load_checkpoint(checkpoint)["history"]["evals"][-1]
    assert {name: in_training[name] for name in COCO_STAT_NAMES} == {
        name: single_real[name] for name in COCO_STAT_NAMES}
    assert in_training["num_detections"] == single_real["num_detections"] > 0


def _worker_pids(parent: int) -> dict[int, int]:
    """Rank -> pid of torchrun's worker processes (children of `parent` with RANK in their environment)."""
    found = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        variables = dict(entry.split(b"=", 1) for entry in environ if b"=" in entry)
        if b"RANK" in variables:
            found[int(variables[b"RANK"])] = int(child)
    return found


@contextlib.contextmanager
def _training_job(data_root: Path, output: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, dict[int, int]]]:
    """A long 2-process training, in its own process group (as a terminal's job), once its first checkpoint is
    written: (torchrun's process, rank -> worker pid). The whole group is killed on the way out if still running."""
    command = _torchrun("train", "--data-root", str(data_root), "--output", str(output), "--epochs", "100",
                        "--image-size", "64", "--depth-multiplier", "0.25", "--weights-backbone", "none",
                        "--batch-size", "2", "--workers", "0", "--threads", "1", "--no-progress",
                        "--eval-interval", "0", *flags)
    job = subprocess.Popen(command, cwd=REPO, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (output / checkpoint_io.CHECKPOINT_NAME).exists():
            assert job.poll() is None, f"the job ended before its first checkpoint: {job.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        workers = _worker_pids(job.pid)
        assert sorted(workers) == [0, 1]
        yield job, workers
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
def test_killed_rank_ends_the_job(data_root: Path, tmp_path: Path) -> None:
    output, timeout = tmp_path / "killed", 30
    with _training_job(data_root, output, "--dist-timeout", str(timeout), "--channels-last") as (job, workers):
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        job.communicate(timeout=timeout + 30)
    assert job.returncode != 0
    assert time.monotonic() - killed_at < timeout + 30
    state = checkpoint_io.load_checkpoint(output / checkpoint_io.CHECKPOINT_NAME)
    assert state["world_size"] == 2 and state["epoch"] >= 1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
def test_ctrl_c_stops_every_rank_and_keeps_the_checkpoint(data_root: Path, tmp_path: Path) -> None:
    """Ctrl-C in the terminal (SIGINT to torchrun's whole process group) ends the job within seconds: no worker is
    left behind, rank 0 says how to continue, once, and the last checkpoint loads."""
    output = tmp_path / "interrupted"
    with _training_job(data_root, output, "--dist-timeout", "30") as (job, workers):
        os.killpg(job.pid, signal.SIGINT)
        interrupted_at = time.monotonic()
        _, stderr = job.communicate(timeout=60)
    assert job.returncode != 0
    assert time.monotonic() - interrupted_at < 30, "the job took more than 30 s to stop"
    assert not [pid for pid in workers.values() if Path(f"/proc/{pid}").exists()], "a worker outlived the job"
    assert stderr.count("interrupted; continue with --resume auto") == 1, stderr[-3000:]
    state = checkpoint_io.load_checkpoint(output / checkpoint_io.CHECKPOINT_NAME)
    assert state["world_size"] == 2 and state["epoch"] >= 1


_AGREEMENT_SCRIPT = """
import json, math, os
from pathlib import Path
import torch
from detection_demo.data import BadImageError
from detection_demo.distributed import all_reduce_sum, distributed_context
from detection_demo.train import NonFiniteLossError, _next_batch, _raise_non_finite

def outcome(call):
    try:
        call()
    except (NonFiniteLossError, BadImageError) as error:
        return [type(error).__name__, str(error), getattr(error, "every_rank", False)]
    return None

with distributed_context("cpu", timeout_s=30) as context:
    loss = float("nan") if context.rank == 1 else 2.5  # a NaN on rank 1 only
    mean = all_reduce_sum(context, [loss])[0] / context.world_size
    terms = {"classification": torch.tensor(loss), "bbox_regression": torch.tensor(0.5)}
    nan = outcome(lambda: math.isfinite(mean) or _raise_non_finite(context, terms, mean, 7, 2, 0.1, Path("x.pt")))

    def batches():  # rank 0's loader fails, rank 1's does not
        if context.rank == 0:
            raise BadImageError("/data/img7.jpg: image file is truncated")
        yield [torch.zeros(3, 4, 4)], [{}]

    bad = outcome(lambda: _next_batch(batches(), context, 3, 1, 1))
    # One file per rank: two ranks printing to torchrun's shared stdout can interleave within a line.
    with open(os.path.join(os.environ["REPORT_DIR"], f"rank{context.rank}.json"), "w") as report:
        json.dump({"rank": context.rank, "nan": nan, "bad": bad}, report)
"""


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank_with_one_message(tmp_path: Path) -> None:
    script = tmp_path / "agree.py"
    script.write_text(_AGREEMENT_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**_environment(), "REPORT_DIR": str(tmp_path)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = {report["rank"]: report for report in (json.loads(path.read_text())
                                                     for path in sorted(tmp_path.glob("rank*.json")))}
    assert sorted(reports) == [0, 1]
    for report in reports.values():  # both ranks stop, at the same step, with an error the CLI prints once
        assert report["nan"][0] == "NonFiniteLossError" and report["nan"][2]
        assert report["bad"][0] == "BadImageError" and report["bad"][2]
    nan, bad = reports[0]["nan"][1], reports[0]["bad"][1]  # rank 0's message is the one printed
    assert nan.startswith("non-finite loss nan at step 7 (epoch 2, lr 0.1): rank 0: classification=2.5")
    assert "rank 1: classification=nan, bbox_regression=0.5" in nan
    assert bad.startswith("rank 0: /data/img7.jpg: image file is truncated (step 3, epoch 1; every rank stopped)")


# ------------------------------------------------------------------------------------------------------------------
# One process: the pieces
# ------------------------------------------------------------------------------------------------------------------


def test_shard_batches_cover_each_image_once_per_epoch() -> None:
    dataset = list(range(23))
    groups = aspect_ratio_groups([(640, 480) if i % 3 else (480, 640) for i in dataset], 2)
    for group_ids in (None, groups):
        seen: list[int] = []
        for rank in range(2):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=7, drop_last=True)
            batches = ShardBatchSampler(sampler, 3, group_ids)
            batches.set_epoch(1)
            listed = list(batches)
            assert len(listed) == len(batches) == 11 // 3 and all(len(batch) == 3 for batch in listed)
            seen += [index for batch in listed for index in batch]
        assert len(seen) == len(set(seen)) == 18  # 22 of 23 images shared by 2 ranks, 11 each, 9 of them batched
    # Grouped batches hold one aspect ratio while the epoch has enough of it.
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=7, drop_last=True)
    first = list(ShardBatchSampler(sampler, 3, groups))[:4]
    assert all(len({groups[i] for i in batch}) == 1 for batch in first)


def test_aspect_ratio_groups() -> None:
    assert aspect_ratio_groups([(100, 100), (200, 100), (100, 200), (1000, 10), (10, 1000)], 4) == [2, 3, 0, 3, 0]
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        aspect_ratio_groups([(1, 1)], 0)


def test_one_process_opens_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_context("cpu") as context:
        assert not context.enabled and context.is_main and context.device == torch.device("cpu")
    with pytest.raises(ValueError, match="dist_backend must be one of"):
        with distributed_context("cpu", backend="mpi"):
            pass


def test_bad_image_in_a_batch_stops_with_one_message() -> None:
    def batches():
        yield [torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)], [{}, {}]
        yield [], []  # every image of this batch was skipped (--skip-bad-images)
        yield [torch.ones(3, 8, 8)], [{}]  # one image left: too few for BatchNorm when batches hold 2
        yield [torch.ones(3, 8, 8), torch.ones(3, 8, 8)], [{}, {}]
        raise BadImageError("/data/img7.jpg: image file is truncated")

    context = DistributedContext()
    iterator = batches()
    assert _next_batch(iterator, context, 1, 1, 2)[0][0].sum() == 0
    assert _next_batch(iterator, context, 2, 1, 2) is None  # the update is skipped, not the next batch taken
    assert _next_batch(iterator, context, 3, 1, 2) is None
    assert _next_batch(iterator, context, 4, 1, 2)[0][0].sum() == 3 * 64
    with pytest.raises(BadImageError, match=r"^/data/img7.jpg: image file is truncated \(step 5, epoch 1\)\. Fix"):
        _next_batch(iterator, context, 5, 1, 2)


def test_cli_refuses_sync_bn_on_cpu(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--data-root", str(data_root), "--output", str(tmp_path / "x"), "--device", "cpu",
                 "--sync-bn", "--weights-backbone", "none", "--depth-multiplier", "0.25", "--no-progress"])
    assert code == 1
    assert "--sync-bn needs CUDA" in capsys.readouterr().err


def test_train_config_validates_scale_settings() -> None:
    for field, value, message in (("accumulate", 0, "accumulate must be an int >= 1"),
                                  ("amp_dtype", "float8", "amp_dtype must be one of"),
                                  ("dist_timeout", 0.0, "dist_timeout must be"),
                                  ("aspect_ratio_groups", -1, "aspect_ratio_groups must be an int >= 0")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{field: value}).validate()
