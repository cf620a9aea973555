"""The run directory and the files that must survive crashes.

Run directory (the contract later tools rely on; `RunDir`):
  config.yaml          resolved config            metrics.jsonl   one JSON object per epoch
  results.json         test and best-epoch figures  model.safetensors  best model (`models.export`)
  split.json           how the data was split      train.log       the log (`RunLog`)
  checkpoints/last.pt  everything needed to resume  checkpoints/best*.pt  best epoch of each stage
  tensorboard/         --tensorboard scalars (`Scalars`)

Writes are atomic (temp file in the same directory, fsync, rename; `atomic_path`), a failed write is one
`WriteFailed` that names the file and the cause (disk full), and checkpoints load with `weights_only=True`.

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
import logging
import logging.handlers
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager

import torch

from ..errors import UserError
from . import runtime as D


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


# ------------------------------------------------------------------------------------------------
# the run directory, its log and its scalars
# ------------------------------------------------------------------------------------------------
class RunDir:
    def __init__(self, path: str):
        self.path = path
        self.ckpt_dir = os.path.join(path, "checkpoints")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def last(self) -> str:
        return os.path.join(self.ckpt_dir, "last.pt")

    def best(self, stage: str) -> str:
        return os.path.join(self.ckpt_dir, "best.pt" if stage == "main" else f"best_{stage}.pt")

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """The checks of `prepare`, without touching anything (train() runs them before building data)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"run directory {self.path} is a file, not a directory: choose another --out")
        check_writable(self.path, "--resume" if resume else "--out")
        if resume:
            if not os.path.exists(self.file("config.yaml")):
                raise UserError(f"--resume {self.path}: no config.yaml there, so there is no run to resume")
        elif os.path.isdir(self.path) and os.listdir(self.path) and not overwrite:
            raise UserError(f"run directory {self.path} exists and is not empty: pass --resume to continue it, "
                            "--overwrite to replace it, or choose another --out")

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Create the run directory; `overwrite` empties an existing one, `resume` keeps it (minus the temp
        files of atomic writes that a killed process left behind)."""
        self.check(resume=resume, overwrite=overwrite)
        exists = os.path.isdir(self.path) and os.listdir(self.path)
        if D.is_main():
            if exists and not resume:
                shutil.rmtree(self.path)
            if resume:
                for d in (self.path, self.ckpt_dir):
                    for name in os.listdir(d) if os.path.isdir(d) else []:
                        if name.startswith(".") and name.endswith(".tmp"):
                            os.unlink(os.path.join(d, name))
            os.makedirs(self.ckpt_dir, exist_ok=True)


LOG = logging.getLogger("autolora")


class RunLog:
    """The run's log, through stdlib logging: records of the `autolora` logger and its children (e.g.
    `autolora.models.weights`' loading messages) go to stdout (unless quiet) and RUN_DIR/train.log, on rank 0 only.
    Records made before the run directory exists (it is created only once the data and the model were built
    without error) wait in memory until `release()`. `close()` detaches everything (several runs may share a
    process)."""

    FORMAT = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")

    def __init__(self, path: str, quiet: bool = False):
        self.path, self.handlers = path, []
        self.saved = LOG.level, LOG.propagate
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
        self.held = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        if D.is_main():
            if not quiet:
                self._add(logging.StreamHandler(sys.stdout))
            self._add(self.held)

    def _add(self, h: logging.Handler) -> None:
        h.setFormatter(self.FORMAT)
        LOG.addHandler(h)
        self.handlers.append(h)

    def release(self) -> None:
        """Open train.log (append) and write the held records into it."""
        if self.held not in self.handlers:
            return
        fh = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        fh.setFormatter(self.FORMAT)
        self.held.setTarget(fh)
        self.held.flush()
        LOG.removeHandler(self.held)
        self.handlers.remove(self.held)
        self._add(fh)

    def __call__(self, msg: str) -> None:
        LOG.info(msg)

    def close(self) -> None:
        for h in self.handlers:
            LOG.removeHandler(h)
            h.close()
        self.handlers = []
        LOG.setLevel(self.saved[0])
        LOG.propagate = self.saved[1]


class Scalars:
    """`--tensorboard`: each epoch's numeric metrics (the metrics.jsonl row) as TensorBoard scalars in
    RUN_DIR/tensorboard, tagged `<stage>/<metric>`, step = epochs trained so far over all stages (rank 0)."""

    def __init__(self, run_dir: str, on: bool):
        self.writer = None
        if on and D.is_main():
            self.writer = self.writer_class()(os.path.join(run_dir, "tensorboard"))

    @staticmethod
    def writer_class():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'autolora[tensorboard]'") from None
        return SummaryWriter

    def add(self, row: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch",):
                self.writer.add_scalar(f"{row['stage']}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
