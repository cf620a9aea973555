"""Training checkpoints: written atomically (`save_checkpoint`), read with `weights_only=True` (`load_checkpoint`),
so a crafted file cannot run code and a damaged one is reported as such."""
from __future__ import annotations

import errno
import io
import os

import torch

from ..errors import UserError
from ..utils.fileio import atomic_path
from .faults import fault_armed, maybe_fault


def save_checkpoint(obj: dict, path: str, *, fault_where: tuple = ()) -> None:
    """torch.save `obj` atomically; `fault_where` (stage, epoch) names it for the test-only faults
    `kill_in_checkpoint_write` and `disk_full_in_checkpoint_write`. The bytes are serialised in memory first and
    written with Python's file API, so a full disk surfaces as `WriteFailed` with its errno (torch's own writer
    reports only "iostream error")."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if fault_where and fault_armed("kill_in_checkpoint_write", *fault_where):
                f.write(data[: len(data) // 2])  # half the bytes on disk, then die before the rename
                f.flush()
                os.fsync(f.fileno())
                maybe_fault("kill_in_checkpoint_write", *fault_where)
            if fault_where and fault_armed("disk_full_in_checkpoint_write", *fault_where):
                f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write(data)


def load_checkpoint(path: str) -> dict:
    """A training checkpoint, loaded with `weights_only=True` (no arbitrary unpickling). A file that asks for
    objects outside the allowlist is refused as unsafe; a file that cannot be read at all (truncated, empty,
    random bytes) is reported as damaged, with the way to recover."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) and ("GLOBAL" in str(e) or "Unsupported global" in str(e)):
            raise UserError(f"refusing to load {path}: it asks for Python objects beyond tensors, which could run code "
                            "(autolora only loads checkpoints with weights_only=True); it was not written by "
                            "autolora: remove it") from None
        raise _damaged(path, e) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, EOF, random bytes
        raise _damaged(path, e) from None
    if not isinstance(ck, dict):
        raise _damaged(path, TypeError(f"a {type(ck).__name__}, not a checkpoint"))
    return ck


def _damaged(path: str, e: Exception) -> UserError:
    name = os.path.basename(path)
    fix = ("start the run again (--overwrite); its best epoch so far is in checkpoints/best.pt"
           if name == "last.pt" else "start the run again (--overwrite)")
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    return UserError(f"checkpoint {path} is damaged and cannot be read ({reason}): a disk or copy problem, or an "
                     f"interrupted copy; {fix}")
