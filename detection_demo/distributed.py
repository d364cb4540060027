"""torch.distributed for the demo: the process group `torchrun` describes, and the few collectives training uses.

`torchrun` (`python -m torch.distributed.run`) starts one process per device and tells each its place through the
environment: `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`. `distributed_context` reads it,
opens the process group (`nccl` on CUDA, `gloo` on CPU, or the backend asked for) with a bounded timeout, pins the
process to the device of its local rank, and closes the group on the way out. Without `torchrun`, or with one
process, it opens nothing and every helper below is the one-process identity, so the training loop has one code
path. The collectives are torch's own (`all_reduce`, `all_gather_object`, `broadcast_object_list`); nothing here
launches processes or talks over sockets itself.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "BACKENDS",
    "CollectiveError",
    "DistributedContext",
    "all_reduce_sum",
    "barrier",
    "broadcast_from_main",
    "distributed_context",
    "env_rank",
    "gather_to_main",
    "resolve_device",
]

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")
T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective failed: another process of the job died, or did not answer within the process-group timeout."""


@contextmanager
def _collective(context: DistributedContext, what: str) -> Iterator[None]:
    """Turn the backend's error (gloo: "Connection closed by peer", a timeout) into one clear `CollectiveError`."""
    try:
        yield
    except RuntimeError as error:
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise CollectiveError(f"{what} failed on rank {context.rank}: another process of the job stopped or did not "
                              f"answer in time (--dist-timeout); the backend said: {first_line}") from error


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among `world_size` processes and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: one process, no process group

    @property
    def enabled(self) -> bool:
        """More than one process: gradients, metrics and errors go through collectives."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and draws progress bars."""
        return self.rank == 0


def env_rank() -> int:
    """This process's global rank as `torchrun` set it (0 outside `torchrun`); readable before any group exists."""
    return int(os.environ.get("RANK", "0") or 0)


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when there is one), or the device named, refused clearly when CUDA is asked for but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


@contextmanager
def distributed_context(device: str = "auto", *, backend: str | None = None,
                        timeout_s: float = 900.0) -> Iterator[DistributedContext]:
    """The process group of this `torchrun` job (or none), open for the duration of the `with` block.

    Args:
        device: "auto", "cpu", "cuda" (or "cuda:N" for one process). Under `torchrun` each process takes the GPU
            of its `LOCAL_RANK`, so an explicit index is refused there.
        backend: "nccl" or "gloo"; None: `nccl` on CUDA, `gloo` on CPU.
        timeout_s: how long a collective may wait for the other ranks before it fails (a dead or stuck rank
            then ends the job instead of hanging it).

    A group opened elsewhere (`dist.init_process_group` before this call) is used as it is and left open.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"dist_backend must be one of {BACKENDS}, got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"dist_timeout must be > 0 seconds, got {timeout_s!r}")
    world_size = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    if world_size <= 1:
        yield DistributedContext(device=resolve_device(device))
        return

    rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if device not in ("auto", "cuda"):
            raise ValueError(f"under torchrun every process uses the GPU of its LOCAL_RANK; give --device cuda, "
                             f"not {device!r} (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                             f"start at most that many processes per machine (--nproc_per_node)")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    chosen = backend or ("nccl" if resolved.type == "cuda" else "gloo")
    if chosen == "nccl" and resolved.type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices; use --dist-backend gloo on CPU")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=resolved if resolved.type == "cuda" else None)
        logger.debug("rank %d/%d: process group %s on %s", rank, world_size, chosen, resolved)
    context = DistributedContext(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                                 device=resolved, backend=dist.get_backend())
    try:
        yield context
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(context: DistributedContext, values: list[float]) -> list[float]:
    """The sums of `values` over all ranks (float64; NaN anywhere gives NaN), the values themselves in one process."""
    if not context.enabled:
        return list(values)
    # nccl reduces device tensors only; gloo host ones.
    device = context.device if context.backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    with _collective(context, "all_reduce"):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_to_main(context: DistributedContext, value: T) -> list[T] | None:
    """Every rank's `value`, in rank order, on rank 0 (`all_gather_object`); None on the other ranks."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    with _collective(context, "all_gather_object"):
        dist.all_gather_object(gathered, value)
    return gathered if context.is_main else None


def broadcast_from_main(context: DistributedContext, value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not context.enabled:
        return value
    box: list[Any] = [value if context.is_main else None]
    with _collective(context, "broadcast_object_list"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if context.enabled:
        with _collective(context, "barrier"):
            dist.barrier()
