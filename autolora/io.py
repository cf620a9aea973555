"""Files that must survive crashes: atomic writes (temp file in the same directory, fsync, rename),
safe checkpoint loading (`weights_only=True`), and the exported model format (safetensors + metadata).

Test-only fault injection (`fault_armed` / `maybe_fault`): the environment variable AUTOLORA_FAULT names
points where the process kills itself with SIGKILL (no cleanup, no atexit), so the crash-safety tests can
die at exact places: `kill_at_step:STAGE:EPOCH:STEP` (before that training step), `kill_in_checkpoint_write:
STAGE:EPOCH` (last.pt's temp file half written, before the rename), `kill_after_checkpoint:STAGE:EPOCH`
(last.pt in place, best.pt and metrics.jsonl not yet), `kill_before_stage:STAGE` (between RoLI stages),
`disk_full_in_checkpoint_write:STAGE:EPOCH` (last.pt's write fails with ENOSPC),
`kill_in_final_eval` (model.safetensors written, results.json not), and `nan_loss:STAGE:EPOCH:STEP` (that
step's loss becomes NaN). Several points: comma-separated. Unset in normal use: then it costs one dict lookup.
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import tempfile
from contextlib import contextmanager

import torch

from .errors import UserError


class WriteFailed(UserError):
    """A file could not be written (disk full, quota, file size limit, I/O error); the previous version of
    the file, if any, is untouched."""


def write_failed(path: str, e: OSError) -> WriteFailed:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return WriteFailed(f"could not write {path}: {'the disk is full' if full else 'write failed'} "
                       f"({e.strerror or e}); the previous version of the file is kept")


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`. An OSError while
    writing (e.g. no space left) removes the temporary file and becomes one `WriteFailed`."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
        os.close(fd)
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
    except OSError as e:
        raise write_failed(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def append_line(path: str, line: str) -> None:
    """Append one line (e.g. to metrics.jsonl); an OSError becomes `WriteFailed`."""
    try:
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError as e:
        raise write_failed(path, e) from None


def check_writable(path: str, flag: str = "--out") -> None:
    """UserError unless `path` (a directory to create or fill) can be written: the nearest existing ancestor must
    be a directory in which a file can be created. Run before any work starts, so a bad output location fails
    at once instead of after training."""
    target = os.path.abspath(os.path.expanduser(str(path)))
    anc = target
    while not os.path.exists(anc) and os.path.dirname(anc) != anc:
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise UserError(f"{flag} {path}: {anc} is a file, not a directory: choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".autolora-write-check-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {anc} ({e.strerror or e}): choose a writable location "
                        f"for {flag}") from None


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


FAULT_ENV = "AUTOLORA_FAULT"


def fault_armed(point: str, *where) -> bool:
    """True when AUTOLORA_FAULT names `point:where...` (test-only, see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    return bool(spec) and ":".join([point, *map(str, where)]) in spec.split(",")


def maybe_fault(point: str, *where) -> None:
    """SIGKILL this process here when AUTOLORA_FAULT names `point:where...` (test-only)."""
    if fault_armed(point, *where):
        os.kill(os.getpid(), signal.SIGKILL)


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
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.plain_state_dict().items()}
    meta = {k: json.dumps(v) for k, v in {**model.meta(), **(extra_meta or {})}.items()}
    blob = _canonical_safetensors(save(sd, metadata=meta))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob)


def _canonical_safetensors(blob: bytes) -> bytes:
    """safetensors writes its metadata map in hash (random) order: sort it, so that the same model always
    gives the same bytes (a resumed or repeated run's model.safetensors is compared bitwise)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    h += b" " * (-len(h) % 8)  # the format pads the header with spaces to 8 bytes
    return len(h).to_bytes(8, "little") + h + blob[8 + n:]


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
    _check_model_meta(path, meta)
    size = meta.get("input_size")
    model = create_model(meta["arch"], meta["num_classes"], "none" if size is None else size)
    head = model.spec.head_key + ".weight"
    if head in sd and tuple(sd[head].shape) != tuple(model.head.weight.shape):
        raise UserError(f"{path}: the head has {sd[head].shape[0]} outputs but the file's metadata says "
                        f"{meta['num_classes']} classes ({len(meta.get('classes') or [])} class names): the file is "
                        "inconsistent; re-export it with autolora (or retrain)")
    try:
        model.load_plain_state_dict(sd)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{path} does not fit arch '{meta['arch']}' with {meta['num_classes']} classes: "
                        f"{str(e).strip().splitlines()[-1].strip()}") from None
    return model, meta


def _check_model_meta(path: str, meta: dict) -> None:
    """The metadata fields `load_model` relies on have the types `save_model` writes; else one UserError."""
    def need(ok, what):
        if not ok:
            raise UserError(f"{path} is not an autolora model file: its metadata {what}; re-export the model with "
                            "autolora (or retrain)")

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    need(isinstance(meta["arch"], str) and meta["arch"], f"names no architecture (arch {meta['arch']!r})")
    n = meta.get("num_classes")
    need(is_int(n) and n >= 2, f"has num_classes {n!r}, not an integer >= 2")
    size = meta.get("input_size")
    need(size is None or (is_int(size) and size >= 8), f"has input_size {size!r}, not null or an integer >= 8")
    classes = meta.get("classes")
    need(classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
                             and len(classes) == n), f"has classes {str(classes)[:80]!r}, not a list of {n} names")
