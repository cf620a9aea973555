"""torchrun DDP and devices: the process group, rank and world size, and the collectives every layer uses.

`torchrun --nproc_per_node N -m autolora train ...` (or multi-node, via torchrun's rendezvous) sets WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR/PORT; `process_group(device)` then initialises the default group (nccl on CUDA,
gloo on CPU; each process on cuda:LOCAL_RANK), which lives as long as the process. A second, CPU (gloo) group
with a long timeout carries Python objects and the waits of ranks 1.. while rank 0 alone does long work (a
download, writing the run directory), so those waits do not hit the default group's (NCCL) timeout.
`resolve_device` maps --device to a torch device (cuda:LOCAL_RANK under torchrun).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from ..errors import UserError

LONG_TIMEOUT = datetime.timedelta(hours=72)
_OBJ_GROUP = None  # gloo group for objects and long waits (see the module doc)


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`; anything else is one UserError. Under torchrun a
    CUDA run uses cuda:LOCAL_RANK (one GPU per process)."""
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(name))
        except (RuntimeError, TypeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise UserError(f"--device {name!r} is not a device autolora runs on: use auto, cpu, cuda or cuda:N")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was requested but CUDA is not available on this machine: use --device cpu "
                            "or auto")
    if dev.type == "cuda" and launched_by_torchrun():
        if str(name).startswith("cuda:"):
            raise UserError(f"--device {name} names one GPU, but torchrun starts one process per GPU: "
                            "use --device cuda (each process takes cuda:LOCAL_RANK)")
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    return dev


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
    """Rank 0 of a torchrun launch, or a plain process (from the environment: valid with or without a group)."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: torch.device):
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1) and not yet
    initialised: nccl for a CUDA device, gloo otherwise (env:// rendezvous). A no-op for a single process, or
    when a group exists. The group then lives as long as the process (destroyed at exit): a second `train` or
    `evaluate_run` in the same process reuses it, as a fresh env:// rendezvous on the same port would hang."""
    if launched_by_torchrun() and not is_dist():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kw)
        atexit.register(_destroy_group)
    yield


def _destroy_group() -> None:
    global _OBJ_GROUP
    if is_dist():
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
