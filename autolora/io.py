"""Files that must survive crashes: atomic writes (temp file in the same directory, fsync, rename),
safe checkpoint loading (`weights_only=True`), and the exported model format (safetensors + metadata)."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

import torch

from .errors import UserError


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(obj: dict, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str) -> dict:
    """A training checkpoint, loaded with `weights_only=True` (no arbitrary unpickling)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a refusal
        raise UserError(f"refusing to load {path}: it is not a plain tensor checkpoint ({type(e).__name__}); "
                        "autolora only loads checkpoints with weights_only=True") from None


def save_model(model, path: str, extra_meta: dict | None = None) -> None:
    """Write the classifier's plain state dict (backbone + head, the torchvision/timm key layout) as safetensors."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.plain_state_dict().items()}
    meta = {k: json.dumps(v) for k, v in {**model.meta(), **(extra_meta or {})}.items()}
    with atomic_path(path) as tmp:
        save_file(sd, tmp, metadata=meta)


def load_model(path: str):
    """Rebuild the classifier saved by `save_model`; returns (model, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models import create_model

    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        sd = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a readable safetensors model file ({e})") from None
    if "arch" not in meta:
        raise UserError(f"{path} has no autolora metadata (arch, num_classes); it was not written by autolora")
    size = meta.get("input_size")
    model = create_model(meta["arch"], meta["num_classes"], "none" if size is None else size)
    model.load_plain_state_dict(sd)
    return model, meta
