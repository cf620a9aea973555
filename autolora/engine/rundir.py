"""The run directory and the files that must survive crashes.

Run directory (the contract later tools rely on; `RunDir`):
  config.yaml          resolved config            metrics.jsonl   one JSON object per epoch
  results.json         test and best-epoch figures  model.safetensors  best model (`models.export`)
  split.json           how the data was split      train.log       the log (`RunLog`)
  checkpoints/last.pt  everything needed to resume  checkpoints/best*.pt  best epoch of each stage
  tensorboard/         --tensorboard scalars (`Scalars`)

Writes are atomic (temp file in the same directory, fsync, rename; `atomic_path`), a failed write is one
`WriteFailed` that names the file and the cause (disk full), and checkpoints load with `weights_only=True`.

Test-only faults for the crash-safety tests live in `engine.faults`.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import logging.handlers
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

import torch

from ..errors import UserError
from . import runtime as D
from .faults import fault_armed, maybe_fault


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


# ------------------------------------------------------------------------------------------------
# the run directory, its log and its scalars
# ------------------------------------------------------------------------------------------------
# what a run directory may hold: everything autolora writes there (and the benchmarks' per-run AA file)
RUN_FILES = {"config.yaml", "metrics.jsonl", "results.json", "model.safetensors", "split.json", "train.log",
             "checkpoints", "tensorboard", ".lock", "FAILED.json", "aa_subset.json"}


def is_run_file(name: str) -> bool:
    """Whether `name` (an entry of a run directory) is something autolora writes there."""
    return name in RUN_FILES or (name.startswith("eval") and name.endswith(".json")) or \
        (name.startswith(".") and name.endswith(".tmp"))


def _contains(outer: str, inner: str) -> bool:
    outer, inner = os.path.realpath(outer), os.path.realpath(inner)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


class RunDir:
    """A run directory and its lifecycle, so that a failed or concurrent start never loses data:

    1. `check` (no side effects): the place can be written, is not a symlink, does not hold the run's inputs, and is
       free (new), a run (resume), or a run directory that `--overwrite` may replace (only autolora's files);
    2. `lock_existing`: an existing directory is locked now (another process training it is an error naming its PID);
    3. the caller validates everything else (data, weights, methods) and then calls `open`: a new run's directory is
       created and locked; `--overwrite` builds the new run beside the old one in `.NAME.autolora-new-PID`;
    4. `commit` once the run has something to keep (its first checkpoint, or results.json): an overwrite swaps the new
       directory in (two renames) and deletes the old run; before that a failure (`abort`) removes only what this
       run made (a new run's files, the staging directory) and leaves any old run as it was;
    5. `close` releases the lock (the kernel does that when the process dies, so a killed run resumes at once).
    """

    def __init__(self, path: str):
        self.final = path
        self.path = path
        self.lock = None
        self.old_lock = None
        self.staging = None
        self.created = False
        self.committed = False

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.path, "checkpoints")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def last(self) -> str:
        return os.path.join(self.ckpt_dir, "last.pt")

    def best(self, stage: str) -> str:
        return os.path.join(self.ckpt_dir, "best.pt" if stage == "main" else f"best_{stage}.pt")

    # -- 1. checks ---------------------------------------------------------------------------------
    def check(self, *, resume: bool, overwrite: bool, inputs: dict | None = None) -> None:
        """Everything about the location, without touching anything. `inputs` maps a flag to a path the run reads
        (--data-dir, --weights, --config): the run directory must not be or hold one of them."""
        p, flag = self.final, "--resume" if resume else "--out"
        if os.path.islink(p):
            target = os.readlink(p)
            raise UserError(f"{flag} {p} is a symbolic link (to {target}"
                            + ("" if os.path.exists(p) else ", which does not exist")
                            + "): pass the directory itself, not a link to it")
        if os.path.exists(p) and not os.path.isdir(p):
            raise UserError(f"run directory {p} is a file, not a directory: choose another {flag}")
        for what, path in (inputs or {}).items():
            if path and os.path.exists(path) and _contains(p, path):
                raise UserError(f"{flag} {p} {'is' if os.path.realpath(path) == os.path.realpath(p) else 'contains'} "
                                f"{what} {path}: a run directory must not hold the run's inputs (--overwrite or a "
                                "failed start could delete them): choose another --out")
        check_writable(p, flag)
        if resume:
            if not os.path.exists(self.file("config.yaml")):
                raise UserError(f"--resume {p}: no config.yaml there, so there is no run to resume")
            return
        entries = self._entries()
        if entries and not overwrite:
            raise UserError(f"run directory {p} exists and is not empty: pass --resume to continue it, "
                            "--overwrite to replace it, or choose another --out")
        if entries and overwrite:
            foreign = sorted(e for e in entries if not is_run_file(e))
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise UserError(f"--overwrite {p}: the directory holds files that autolora did not write ({shown}); "
                                "--overwrite only replaces a run directory: move them away or choose another --out")

    def _entries(self) -> list[str]:
        """What the directory holds besides an empty lock file's name and a killed write's temp files."""
        if not os.path.isdir(self.final):
            return []
        return [e for e in os.listdir(self.final) if e != ".lock" and not (e.startswith(".") and e.endswith(".tmp"))]

    # -- 2. lock an existing directory -------------------------------------------------------------
    def lock_existing(self) -> None:
        """Lock an existing run directory now (resume, overwrite): a second process fails here, naming the first."""
        if os.path.isdir(self.final) and self.old_lock is None:
            from ..utils.lock import lock_dir

            self.old_lock = lock_dir(self.final)

    # -- 3. open -----------------------------------------------------------------------------------
    def open(self, *, resume: bool, overwrite: bool) -> None:
        """After every check passed: create (new), stage (overwrite) or clean up (resume) the directory, locked."""
        from ..utils.lock import lock_dir

        if resume:
            self.lock, self.old_lock = self.old_lock or lock_dir(self.final), None
            for d in (self.final, self.ckpt_dir):
                for name in os.listdir(d) if os.path.isdir(d) else []:
                    if name.startswith(".") and name.endswith(".tmp"):
                        os.unlink(os.path.join(d, name))
            self.committed = True  # a resumed run keeps everything, whatever happens
        elif self._entries() and overwrite:
            self._remove_stale_staging()
            parent, name = os.path.split(os.path.abspath(self.final))
            self.staging = os.path.join(parent, f".{name}.autolora-new-{os.getpid()}")
            os.makedirs(self.staging)
            self.path = self.staging
            self.lock = lock_dir(self.staging, f"run directory {self.final}")
        else:
            self.created = not os.path.exists(self.final)
            os.makedirs(self.final, exist_ok=True)
            self.lock, self.old_lock = self.old_lock or lock_dir(self.final), None
            if self._entries():  # made by someone else between the check and now
                raise UserError(f"run directory {self.final} was filled by another process meanwhile: choose "
                                "another --out")
        os.makedirs(self.ckpt_dir, exist_ok=True)

    def _remove_stale_staging(self) -> None:
        """Staging directories of earlier overwrites of this run that were killed before they committed."""
        from ..utils.lock import Locked, lock_dir

        parent, name = os.path.split(os.path.abspath(self.final))
        for entry in os.listdir(parent):
            if entry.startswith(f".{name}.autolora-new-"):
                stale = os.path.join(parent, entry)
                try:
                    with lock_dir(stale):
                        shutil.rmtree(stale)
                except (Locked, OSError):
                    pass  # another process is using it, or it is gone

    # -- 4. commit / abort -------------------------------------------------------------------------
    def commit(self) -> None:
        """The run has something to keep: an overwrite's staging directory replaces the old run (two renames; the
        old run is deleted after). Idempotent."""
        if self.committed:
            return
        self.committed = True
        if self.staging is None:
            return
        parent, name = os.path.split(os.path.abspath(self.final))
        trash = os.path.join(parent, f".{name}.autolora-old-{os.getpid()}")
        os.rename(self.final, trash)
        os.rename(self.staging, self.final)
        self.path, self.staging = self.final, None
        shutil.rmtree(trash, ignore_errors=True)
        if self.old_lock is not None:
            self.old_lock.release()
            self.old_lock = None

    def abort(self) -> None:
        """Before `commit`: remove what this run made (the staging directory, or a new run's directory) and leave
        everything else, an old run included, as it was."""
        if self.committed:
            return
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.path, self.staging = self.final, None
        elif self.lock is not None:  # a new run: its directory (if this run created it) or its files
            if self.created:
                shutil.rmtree(self.final, ignore_errors=True)
            else:
                for e in os.listdir(self.final):
                    if e != ".lock":
                        target = os.path.join(self.final, e)
                        shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.unlink(target)
        self.committed = True  # nothing left to undo

    def close(self) -> None:
        for lk in (self.lock, self.old_lock):
            if lk is not None:
                lk.release()
        self.lock = self.old_lock = None


LOG = logging.getLogger("autolora")


class RunLog:
    """The run's log, through stdlib logging: records of the `autolora` logger and its children (e.g.
    `autolora.models.weights`' loading messages) go to stdout (unless quiet) and RUN_DIR/train.log, on rank 0 only.
    Records made before the run directory exists (it is created only once the data and the model were built
    without error) wait in memory until `release()`. `close()` detaches everything (several runs may share a
    process)."""

    FORMAT = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")

    def __init__(self, run, quiet: bool = False):
        self.run, self.handlers, self.quiet = run, [], quiet
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
        fh = logging.FileHandler(self.run.file("train.log"), mode="a", encoding="utf-8")
        fh.setFormatter(self.FORMAT)
        self.held.setTarget(fh)
        self.held.flush()
        LOG.removeHandler(self.held)
        self.handlers.remove(self.held)
        self._add(fh)

    def __call__(self, msg: str) -> None:
        LOG.info(msg)

    def warn(self, msg: str) -> None:
        """One `autolora: warning: ...` line on stderr (also when quiet), and the same in train.log."""
        from ..errors import warn

        if D.is_main():
            warn(msg)
            for h in self.handlers:
                if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler):
                    h.handle(LOG.makeRecord(LOG.name, logging.WARNING, "", 0, "warning: " + msg, None, None))

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
