"""torchrun DDP helpers: process group set-up, data sharding, rank-0 side effects and cross-rank sums
(so every rank takes the same decisions).

`torchrun --nproc_per_node N -m autolora train ...` (or multi-node, via torchrun's rendezvous) sets WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR/PORT; `process_group(device)` then initialises the default group (nccl on CUDA,
gloo on CPU; each process on cuda:LOCAL_RANK) and destroys it at the end. A second, CPU (gloo) group with a
long timeout carries Python objects and the waits of ranks 1.. while rank 0 alone does long work (the final
test evaluation with AutoAttack), so those waits do not hit the default group's (NCCL) timeout.

Data: the training split is shuffled by torch's DistributedSampler, one permutation per epoch that every rank
draws from the same seed, padded to a multiple of the world size and dealt out round-robin (`EpochSampler`): step
k of an N-rank run with batch b sees exactly the examples that step k of a 1-process run with batch N·b sees,
augmented alike (`SeededItems`). Evaluation splits are dealt out in whole batches without padding
(`ShardBatches`), so summed counts cover every example once and equal a 1-process evaluation's.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

LONG_TIMEOUT = datetime.timedelta(hours=72)
_OBJ_GROUP = None  # gloo group for objects and long waits (see module doc)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_launched_rank0() -> bool:
    """Rank 0 of a torchrun launch, or a plain process (after the process group is gone)."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(name: str) -> torch.device:
    """`runtime.resolve_device`, plus: a CUDA run under torchrun uses cuda:LOCAL_RANK (one GPU per process)."""
    from .errors import UserError
    from .runtime import resolve_device as _resolve

    dev = _resolve(name)
    if dev.type == "cuda" and launched_by_torchrun():
        if name.startswith("cuda:"):
            raise UserError(f"--device {name} names one GPU, but torchrun starts one process per GPU: "
                            "use --device cuda (each process takes cuda:LOCAL_RANK)")
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    return dev


@contextlib.contextmanager
def process_group(device: torch.device):
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1) and not yet
    initialised: nccl for a CUDA device, gloo otherwise (env:// rendezvous); destroy it on exit. A no-op for
    a single process, or when the caller already initialised a group (it then stays the caller's)."""
    global _OBJ_GROUP
    created = False
    if launched_by_torchrun() and not is_dist():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kw)
        created = True
    try:
        yield
    finally:
        if created and is_dist():
            _OBJ_GROUP = None
            dist.destroy_process_group()


def _obj_group():
    """The gloo group with a long timeout (created on first use: a collective call, all ranks must make it)."""
    global _OBJ_GROUP
    if _OBJ_GROUP is None:
        _OBJ_GROUP = dist.new_group(backend="gloo", timeout=LONG_TIMEOUT)
    return _OBJ_GROUP


def setup_groups() -> None:
    """Create the helper group now (every rank, same point), so later rank-0-only stretches cannot deadlock it."""
    if is_dist():
        _obj_group()


def barrier() -> None:
    """All ranks meet (gloo, long timeout: a rank may wait here while rank 0 works alone)."""
    if is_dist():
        dist.barrier(group=_obj_group())


def broadcast_object(obj=None, src: int = 0):
    """`obj` from rank `src` on every rank (identity without DDP)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_obj_group())
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without DDP)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_obj_group())
    return out


def all_reduce_sum(*values: float | int, device=None) -> list[float]:
    """Sum numbers over ranks (identity without DDP). Integer counts stay exact (float64 up to 2**53)."""
    if not is_dist():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=device if device is not None and dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy `module`'s buffers (BN running statistics) from rank `src` to every rank. DDP broadcasts them at the
    start of each forward, so after an epoch's last forward the ranks' statistics differ by one local update:
    this makes evaluation and checkpoints see rank 0's model on every rank."""
    if not is_dist():
        return
    nccl = dist.get_backend() == "nccl"
    with torch.no_grad():
        for b in module.buffers():
            if nccl and b.device.type == "cuda":
                dist.broadcast(b, src)
            else:
                t = b.detach().cpu().clone() if nccl else b
                dist.broadcast(t, src, group=_obj_group() if nccl else None)
                if t is not b:
                    b.copy_(t)


# ------------------------------------------------------------------------------------------------
# samplers
# ------------------------------------------------------------------------------------------------
class EpochSampler(Sampler):
    """Training order: torch's `DistributedSampler` (one permutation per epoch from a generator seeded with
    `seed + epoch`, padded by wrap-around to a multiple of the world size, rank r taking r, r + N, ...), yielding
    `(epoch, index)` keys for `SeededItems`. Step k of N ranks × batch b sees what step k of one process × batch
    N·b sees. The loader is built once per stage (persistent workers); `set_epoch(e)` before each epoch."""

    def __init__(self, n: int, seed: int, rank_: int | None = None, world: int | None = None):
        from torch.utils.data import DistributedSampler

        self.inner = DistributedSampler(range(n), num_replicas=world_size() if world is None else world,
                                        rank=rank() if rank_ is None else rank_, shuffle=True, seed=seed,
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
    summed counts equal a 1-process evaluation's; `batch_ids()` lists the k of this rank."""

    def __init__(self, n: int, batch_size: int, rank_: int | None = None, world: int | None = None):
        self.n, self.batch_size = n, batch_size
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def batch_ids(self) -> range:
        return range(self.rank, math.ceil(self.n / self.batch_size), self.world)

    def __iter__(self):
        for k in self.batch_ids():
            yield list(range(k * self.batch_size, min(self.n, (k + 1) * self.batch_size)))

    def __len__(self) -> int:
        return len(self.batch_ids())
