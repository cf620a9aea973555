"""Samplers that make a run the same whatever the world size, --workers or a resume (torchrun DDP included).

Training: torch's DistributedSampler deals one permutation per epoch, drawn by every rank from the same seed,
padded to a multiple of the world size and dealt out round-robin (`EpochSampler`): step k of an N-rank run with
batch b sees exactly the examples that step k of a 1-process run with batch N·b sees, augmented alike
(`SeededItems`). Evaluation splits are dealt out in whole batches without padding (`ShardBatches`), so summed
counts cover every example once and equal a 1-process evaluation's.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Sampler

from ..utils import dist


class EpochSampler(Sampler):
    """Training order: torch's `DistributedSampler` (one permutation per epoch from a generator seeded with
    `seed + epoch`, padded by wrap-around to a multiple of the world size, rank r taking r, r + N, ...), yielding
    `(epoch, index)` keys for `SeededItems`. Step k of N ranks × batch b sees what step k of one process × batch
    N·b sees. The loader is built once per stage (persistent workers); `set_epoch(e)` before each epoch."""

    def __init__(self, n: int, seed: int, rank_: int | None = None, world: int | None = None):
        from torch.utils.data import DistributedSampler

        self.inner = DistributedSampler(range(n), num_replicas=dist.world_size() if world is None else world,
                                        rank=dist.rank() if rank_ is None else rank_, shuffle=True, seed=seed,
                                        drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        e = self.inner.epoch
        return ((e, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class SeededItems(Dataset):
    """`ds[i]` for a key `(epoch, i)`, drawn under torch's RNG seeded by (seed, epoch, i): an item's random
    augmentation depends on neither the process nor the worker that loads it nor that worker's history, so
    persistent workers, any --workers and any world size see the same images, and a resumed run reproduces them.
    The caller's RNG state is left as it was."""

    def __init__(self, ds, seed: int):
        self.ds, self.seed = ds, int(seed)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + i) % 2**63)
            return self.ds[i]


class ShardBatches(Sampler):
    """Evaluation batches: the dataset's batches [k·b, (k+1)·b) for k = rank, rank + N, ... (no padding). A rank's
    batches are exactly batches of a 1-process evaluation, so with per-batch seeded attacks (`evaluate`) the
    summed counts equal a 1-process evaluation's; `batch_ids()` lists the k of this rank. `keyed=True` yields
    `(epoch, index)` keys for `SeededItems` (`set_epoch(e)`), e.g. to evaluate the training split as augmented in
    epoch e."""

    def __init__(self, n: int, batch_size: int, rank_: int | None = None, world: int | None = None,
                 keyed: bool = False):
        self.n, self.batch_size = n, batch_size
        self.rank = dist.rank() if rank_ is None else rank_
        self.world = dist.world_size() if world is None else world
        self.keyed, self.epoch = keyed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_ids(self) -> range:
        return range(self.rank, math.ceil(self.n / self.batch_size), self.world)

    def __iter__(self):
        for k in self.batch_ids():
            idx = range(k * self.batch_size, min(self.n, (k + 1) * self.batch_size))
            yield [(self.epoch, i) for i in idx] if self.keyed else list(idx)

    def __len__(self) -> int:
        return len(self.batch_ids())
