"""How a run runs: its device, seeds and RNG states (exact resume), torchrun DDP, and its speed switches.

Devices and seeds: `resolve_device`, `seed_everything`, `set_deterministic`, `seed_worker`, `get_rng_state` /
`set_rng_state` (in a form `torch.load(weights_only=True)` accepts).

DDP (torchrun). Process group set-up, data sharding, rank-0 side effects and cross-rank sums
(so every rank takes the same decisions).

`torchrun --nproc_per_node N -m autolora train ...` (or multi-node, via torchrun's rendezvous) sets WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR/PORT; `process_group(device)` then initialises the default group (nccl on CUDA,
gloo on CPU; each process on cuda:LOCAL_RANK), which lives as long as the process. A second, CPU (gloo) group
with a long timeout carries Python objects and the waits of ranks 1.. while rank 0 alone does long work (a
download, writing the run directory), so those waits do not hit the default group's (NCCL) timeout.

Data: the training split is shuffled by torch's DistributedSampler, one permutation per epoch that every rank
draws from the same seed, padded to a multiple of the world size and dealt out round-robin (`EpochSampler`): step
k of an N-rank run with batch b sees exactly the examples that step k of a 1-process run with batch N·b sees,
augmented alike (`SeededItems`). Evaluation splits are dealt out in whole batches without padding
(`ShardBatches`), so summed counts cover every example once and equal a 1-process evaluation's.

Speed switches. Shared by the trainer and `bench/throughput.py`:

- `amp`: bf16 autocast for the training step, the training attack included (`Attack.autocast_dtype`). The
  backbone's first convolution (stem conv / patch embedding) stays fp32: the input perturbation moves pixels
  in [0, 1] by 2/255 per step, and bf16 keeps 8 significant bits, so rounding the normalised input before the
  first layer would erase part of it (and of the input gradient). Losses are computed in fp32 (`methods/losses.py`).
  Evaluation (validation, AutoLoRa's SA pass, test) always runs in fp32.
- `channels_last`: NHWC memory format for conv nets (model and input batches).
- `compile`: `torch.compile` of the training forward (the DDP wrapper under torchrun) and of the model the
  training attack runs, so the attack's k forward + input-backward passes run compiled too.

Defaults (`resolve_runtime`, written resolved into RUN_DIR/config.yaml): channels_last on for conv nets on
every device; amp on for CUDA, off on CPU. Measured on the development CPU (AMD EPYC, AVX2, no AVX512-BF16 /
AMX; bench/results/throughput_formats_*_cpu.md), a vanilla RFT step with PGD-10 was 10-25x *slower* under bf16
autocast than in fp32 (bf16 convolutions are emulated there), and channels_last made the fp32 step 1.15-1.3x
faster (tiny and resnet18). A CPU with native bf16 (AMX) may differ: `--amp` turns it on, and
`python bench/throughput.py --formats` re-measures.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset, Sampler

from ..errors import UserError


# ------------------------------------------------------------------------------------------------
# devices, seeds, RNG
# ------------------------------------------------------------------------------------------------

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

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """`--deterministic`: deterministic kernels (cuDNN, cuBLAS workspace) and no benchmarking."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: derive Python / NumPy seeds from the worker's torch seed."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def get_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states, in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------
# torchrun DDP
# ------------------------------------------------------------------------------------------------
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
    summed counts equal a 1-process evaluation's; `batch_ids()` lists the k of this rank. `keyed=True` yields
    `(epoch, index)` keys for `SeededItems` (`set_epoch(e)`), e.g. to evaluate the training split as augmented in
    epoch e."""

    def __init__(self, n: int, batch_size: int, rank_: int | None = None, world: int | None = None,
                 keyed: bool = False):
        self.n, self.batch_size = n, batch_size
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
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


# ------------------------------------------------------------------------------------------------
# speed switches: fp32 first layer under autocast, defaults, per-stage set-up of a method
# ------------------------------------------------------------------------------------------------
class FP32FirstLayer:
    """Mixin for the first conv: under autocast it runs in fp32 (input and weight), autocast switched off."""

    def forward(self, x):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class FP32Conv2d(FP32FirstLayer, nn.Conv2d):
    pass


_FP32_CLASSES: dict[type, type] = {nn.Conv2d: FP32Conv2d}


def _fp32_class(cls: type) -> type:
    if cls not in _FP32_CLASSES:
        new = type(f"FP32{cls.__name__}", (FP32FirstLayer, cls), {"__module__": __name__})
        globals()[new.__name__] = new  # picklable by name
        _FP32_CLASSES[cls] = new
    return _FP32_CLASSES[cls]


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first Conv2d of the backbone in registration order (stem conv, ViT patch embedding)."""
    root = getattr(model, "backbone", model)
    return next((m for m in root.modules() if isinstance(m, nn.Conv2d)), None)


def keep_first_conv_fp32(model: nn.Module) -> nn.Module | None:
    """Make the backbone's first conv run in fp32 under autocast (in place: its class is swapped for a subclass
    with the same parameters and state-dict keys). Returns the layer, or None if the backbone has no conv."""
    conv = first_conv(model)
    if conv is not None and not isinstance(conv, FP32FirstLayer):
        conv.__class__ = _fp32_class(type(conv))
    return conv


def is_conv_net(model: nn.Module) -> bool:
    """More than one Conv2d in the backbone (a ViT's patch embedding alone does not count)."""
    root = getattr(model, "backbone", model)
    return sum(isinstance(m, nn.Conv2d) for m in root.modules()) > 1


def resolve_runtime(cfg, device: torch.device, model: nn.Module):
    """`cfg` with `amp` and `channels_last` filled in for this device and model (None -> the default)."""
    import dataclasses

    # amp: on for CUDA; channels_last: on for conv nets, measured faster on CUDA and on the CPU too (module doc)
    return dataclasses.replace(
        cfg,
        amp=device.type == "cuda" if cfg.amp is None else bool(cfg.amp),
        channels_last=is_conv_net(model) if cfg.channels_last is None else bool(cfg.channels_last),
    )


def prepare_method(method, device: torch.device, *, amp: bool, channels_last: bool, compile: bool = False,
                   sync_bn: bool = False) -> None:
    """Put `method` on `device` with the run's switches: fp32 first conv and bf16 training attack under amp,
    channels_last, SyncBatchNorm (CUDA DDP only), DDP wrapping of `method.net` as `method.fwd` under torchrun,
    and torch.compile. The attack keeps running the *unwrapped* eval model (no DDP hooks in its k passes)."""
    if amp:
        keep_first_conv_fp32(method.model)
        method.attack.autocast_dtype = torch.bfloat16
    if sync_bn and is_dist():
        nn.SyncBatchNorm.convert_sync_batchnorm(method.net)
    method.net.to(device)
    if channels_last:
        method.net.to(memory_format=torch.channels_last)
    fwd = method.net
    if is_dist():
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Two forwards (natural + adversarial) before one backward work with the default reducer: each
        # parameter's gradient is accumulated over both uses before its hook fires, and every trainable
        # parameter is reached (AutoLoRa's natural path reaches A, B and the head; the adversarial one θ).
        fwd = DDP(method.net, device_ids=[device.index] if device.type == "cuda" else None,
                  gradient_as_bucket_view=True)
    if compile:
        fwd = torch.compile(fwd)
        method.attack.model = torch.compile(method.attack.model)
    method.fwd = fwd
