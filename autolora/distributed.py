"""torchrun DDP helpers: rank-0 side effects and cross-rank sums (so every rank takes the same decisions)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def all_reduce_sum(*values: float | int, device=None) -> list[float]:
    """Sum numbers over ranks (identity without DDP)."""
    if not is_dist():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=device if device is not None and dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()
