"""Batches for training: one rank's shard of a shuffled epoch, optionally grouped by image aspect ratio.

`torch.utils.data.DistributedSampler` shards the epoch (every rank draws the same permutation from `seed + epoch`
and takes every `world_size`-th index from its rank on), and `ShardBatchSampler` cuts that shard into batches.
With `group_ids` it batches like torchvision's detection references (`GroupedBatchSampler`, which is not an
importable API there, so this is our own): an index waits in the bucket of its group until the bucket holds a batch,
so the images of a batch have similar aspect ratios and the detector pads them little. At the end of the epoch the
leftovers fill the remaining batches in the shard's order, so every epoch has the same number of batches as without
grouping (`len(shard) // batch_size`), which keeps the ranks in step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from torch.utils.data import DistributedSampler, Sampler

__all__ = ["ShardBatchSampler", "aspect_ratio_groups"]


def aspect_ratio_groups(sizes: Sequence[tuple[int, int]], num_groups: int) -> list[int]:
    """Group id of each image from its `(width, height)`: `num_groups` bins of log2(width / height), even in log
    space over [1/2, 2] with the outermost bins open (a 4:3 photo and a 3:2 photo share a bin when num_groups is 2).

    Reading the sizes from the annotation file costs no image decoding.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    groups = []
    for width, height in sizes:
        log_ratio = math.log2(width / height)  # 0: square; +1: twice as wide as high
        position = (min(max(log_ratio, -1.0), 1.0) + 1.0) / 2.0 * num_groups
        groups.append(min(int(position), num_groups - 1))
    return groups


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices of this rank's `DistributedSampler` shard, grouped when `group_ids` is given.

    Incomplete last batches are dropped (a batch of one breaks BatchNorm), so all ranks run the same number of
    steps. Call `set_epoch` before each epoch, as with `DistributedSampler`.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, group_ids: Sequence[int] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if group_ids is not None and len(group_ids) != len(sampler.dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(group_ids)} group ids for {len(sampler.dataset)} images")  # type: ignore[arg-type]
        self.sampler = sampler
        self.batch_size = batch_size
        self.group_ids = list(group_ids) if group_ids is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        count = len(indices) // self.batch_size
        if self.group_ids is None:
            for start in range(0, count * self.batch_size, self.batch_size):
                yield indices[start:start + self.batch_size]
            return
        buckets: dict[int, list[int]] = {}
        used: set[int] = set()  # positions in `indices` already batched
        emitted = 0
        for position, index in enumerate(indices):
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(position)
            if len(bucket) == self.batch_size:
                yield [indices[p] for p in bucket]
                used.update(bucket)
                bucket.clear()
                emitted += 1
                if emitted == count:
                    return
        leftovers = [p for p in range(len(indices)) if p not in used]
        for start in range(0, (count - emitted) * self.batch_size, self.batch_size):
            yield [indices[p] for p in leftovers[start:start + self.batch_size]]
