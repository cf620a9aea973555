"""torchrun DDP helpers: process group set-up, data sharding, rank-0 side effects and cross-rank sums
(so every rank takes the same decisions).

`torchrun --nproc_per_node N -m autolora train ...` (or multi-node, via torchrun's rendezvous) sets WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR/PORT; `process_group(device)` then initialises the default group (nccl on CUDA,
gloo on CPU; each process on cuda:LOCAL_RANK) and destroys it at the end. A second, CPU (gloo) group with a
long timeout carries Python objects and the waits of ranks 1.. while rank 0 alone does long work (the final
test evaluation with AutoAttack), so those waits do not hit the default group's (NCCL) timeout.

Data: the training split is shuffled by one permutation per epoch that every rank draws from the same
generator, padded to a multiple of the world size and dealt out round-robin (`ShuffleShardSampler`): step k of
an N-rank run with batch b sees exactly the examples that step k of a 1-process run with batch N·b sees.
Evaluation splits are dealt out without padding (`ShardSampler`), so summed counts cover every example once.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

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
class ShardSampler(Sampler):
    """Evaluation shard: indices rank, rank + N, rank + 2N, ... of the dataset, no padding (counts summed over
    ranks cover every example exactly once)."""

    def __init__(self, n: int, rank_: int | None = None, world: int | None = None):
        self.n = n
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def __iter__(self):
        yield from range(self.rank, self.n, self.world)

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class ShuffleShardSampler(Sampler):
    """Training shard of an epoch: `torch.randperm(n, generator)` (the same permutation on every rank, and the
    one a 1-process DataLoader with that generator draws), padded by wrap-around to a multiple of the world
    size so every rank makes the same number of steps, then indices rank, rank + N, ... of it."""

    def __init__(self, n: int, generator: torch.Generator, rank_: int | None = None, world: int | None = None):
        self.n = n
        self.generator = generator
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        self.per_rank = math.ceil(n / self.world) if n else 0

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        total = self.per_rank * self.world
        while len(perm) < total:
            perm += perm[: total - len(perm)]
        yield from perm[self.rank:total:self.world]

    def __len__(self) -> int:
        return self.per_rank
