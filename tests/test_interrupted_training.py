"""Training interrupted the hard way: SIGKILL mid-epoch, then ``--resume``.

- `test_sigkill_mid_epoch_then_resume_equals_uninterrupted`: ``python -m detection_demo train`` is killed with
  SIGKILL in the middle of an epoch; its checkpoint loads; ``--resume auto`` finishes the run; the final weights,
  every step's loss and the optimizer state equal, bit for bit, those of an uninterrupted run with the same seed on
  CPU (with the default DataLoader worker process, so the workers' random augmentations are covered too).
- `test_checkpoint_is_complete_whenever_the_writer_is_killed`: a process writing checkpoints in a loop is killed
  at random moments; the checkpoint on disk always loads and is one whole version, never a mix or a prefix.
- `test_diverging_training_stops_with_a_clear_message`: a learning rate of 1e30 makes the loss NaN for real (no
  patched model); the command stops with exit status 1 and names the step and the loss terms.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detection_demo import checkpoint as checkpoint_io
from mnv1_backbone._io import atomic_write

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--image-size", "64", "--depth-multiplier", "0.25", "--batch-size", "2", "--workers", "1", "--threads", "1",
         "--no-progress", "--weights-backbone", "none", "--eval-interval", "0", "--seed", "5"]
EPOCHS = 3


def _train_command(data_root: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "detection_demo", "train", "--data-root", str(data_root), "--output", str(output),
            "--epochs", str(EPOCHS), *FLAGS, *extra]


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(data_root: Path, tmp_path: Path) -> None:
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    # Both runs start together (one thread each) to save wall time; only the second one is killed.
    straight = subprocess.Popen(_train_command(data_root, straight_dir), cwd=REPO, env=_environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_train_command(data_root, killed_dir), cwd=REPO, env=_environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        checkpoint = killed_dir / checkpoint_io.CHECKPOINT_NAME
        deadline = time.monotonic() + 300
        while not checkpoint.exists():  # epoch 1 is done and saved: the run is now inside epoch 2
            assert victim.poll() is None, f"the run ended before its first checkpoint: {victim.communicate()[1]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.01)
        time.sleep(0.1)  # a few of epoch 2's four steps
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL

    # What the kill left: a checkpoint that loads, of a finished epoch, and no exported weights.
    state = checkpoint_io.load_checkpoint(checkpoint)
    assert 1 <= state["epoch"] < EPOCHS and state["global_step"] == 4 * state["epoch"]
    assert not (killed_dir / checkpoint_io.SAFETENSORS_NAME).exists()

    resumed = subprocess.run(_train_command(data_root, killed_dir, "--resume", "auto"), cwd=REPO,
                             env=_environment(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from epoch {state['epoch']}, step {state['global_step']}" in resumed.stderr
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    ours = load_file(killed_dir / checkpoint_io.SAFETENSORS_NAME)
    reference = load_file(straight_dir / checkpoint_io.SAFETENSORS_NAME)
    assert sorted(ours) == sorted(reference)
    different = [name for name in reference if not torch.equal(ours[name], reference[name])]
    assert not different, f"resumed weights differ from the uninterrupted run's in {different[:5]}"
    history = [json.loads((d / "history.json").read_text()) for d in (killed_dir, straight_dir)]
    assert [s["loss"] for s in history[0]["steps"]] == [s["loss"] for s in history[1]["steps"]]
    assert len(history[0]["steps"]) == 4 * EPOCHS
    final = [checkpoint_io.load_checkpoint(d / checkpoint_io.CHECKPOINT_NAME) for d in (killed_dir, straight_dir)]
    for index, slot in final[1]["optimizer"]["state"].items():
        for name, value in slot.items():
            torch.testing.assert_close(final[0]["optimizer"]["state"][index][name], value, rtol=0, atol=0)


def _writer_loop(path: Path, weight: torch.Tensor) -> None:
    """Child process: write checkpoint versions 0, 1, 2, ... forever. No large tensor op runs here: the parent's
    OpenMP pool does not survive fork(), so the 8 MB tensor is made before forking and only serialized here."""
    version = 0
    while True:
        checkpoint_io.save_checkpoint(path, {
            "version": checkpoint_io.CHECKPOINT_VERSION,
            "model": {"weight": weight, "tag": torch.tensor([version])},
            "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {},
            "epoch": version,
            "global_step": version,
            "rng": {},
            "args": {},
            "history": {"steps": list(range(version % 1000))},
            "model_spec": {},
        })
        version += 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_checkpoint_is_complete_whenever_the_writer_is_killed(tmp_path: Path) -> None:
    path = tmp_path / checkpoint_io.CHECKPOINT_NAME
    weight = torch.arange(2_000_000, dtype=torch.float32)  # 8 MB a version: most kills land inside a write
    delays = random.Random(0)
    kills_inside_a_write = 0
    for _ in range(5):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns; it is killed
            try:
                _writer_loop(path, weight)
            finally:
                os._exit(1)
        try:
            deadline = time.monotonic() + 120
            while not path.exists():
                assert time.monotonic() < deadline, "the writer wrote nothing in 120 s"
                time.sleep(0.005)
            time.sleep(delays.uniform(0.05, 0.4))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        pattern = f".{checkpoint_io.CHECKPOINT_NAME}.{pid}.*.tmp"
        kills_inside_a_write += bool(list(tmp_path.glob(pattern)))
        state = checkpoint_io.load_checkpoint(path)  # never raises: the file is always one whole version
        version = state["global_step"]
        assert state["epoch"] == version and len(state["history"]["steps"]) == version % 1000
        assert state["model"]["tag"].tolist() == [version] and torch.equal(state["model"]["weight"], weight)
        path.unlink()  # the next writer starts from version 0 again
    # Kills did land inside writes (each left its temporary file, never taken for the checkpoint); each writer
    # removed those of the killed writers before it, so at most the last one's is left, until the next write.
    assert kills_inside_a_write, "no kill landed inside a write; the test did not test atomicity"
    assert len(list(tmp_path.glob(f".{checkpoint_io.CHECKPOINT_NAME}.*.tmp"))) <= 1
    atomic_write(path, lambda tmp: tmp.write_bytes(b"next"))  # the next write cleans up after SIGKILL
    assert not list(tmp_path.glob(f".{checkpoint_io.CHECKPOINT_NAME}.*.tmp"))


@pytest.mark.slow
def test_diverging_training_stops_with_a_clear_message(data_root: Path, tmp_path: Path, capsys) -> None:
    from detection_demo.__main__ import main

    output = tmp_path / "diverged"
    threads = torch.get_num_threads()
    try:
        code = main(["train", "--data-root", str(data_root), "--output", str(output), "--epochs", "2", *FLAGS,
                     "--workers", "0", "--lr", "1e30", "--clip-grad-norm", "0"])
    finally:
        torch.set_num_threads(threads)  # --threads 1 set it for this whole process
    assert code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite loss nan at step 3 (epoch 1, lr 1e+30)" in message
    assert "bbox_regression=nan" in message and "classification=nan" in message and "Try a lower --lr" in message
    assert not (output / checkpoint_io.CHECKPOINT_NAME).exists()
    assert not (output / checkpoint_io.SAFETENSORS_NAME).exists()
