"""The run directory and its lifecycle (`RunDir`): checked before anything is touched, locked while in use,
replaced by --overwrite only at the new run's first checkpoint, and cleaned of what a failed start made.

Run directory (the contract later tools rely on):
  config.yaml          resolved config            metrics.jsonl   one JSON object per epoch
  results.json         test and best-epoch figures  model.safetensors  best model (`models.export`)
  split.json           how the data was split      train.log       the log (`engine.runlog.RunLog`)
  checkpoints/last.pt  everything needed to resume  checkpoints/best*.pt  best epoch of each stage
  tensorboard/         --tensorboard scalars        .lock           the flock of the process using it
"""
from __future__ import annotations

import os
import shutil

from ..errors import UserError
from ..utils.fileio import check_writable


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
            if self.old_lock is None:  # filled since `check` (another process's new run): theirs, unless free
                self.old_lock = lock_dir(self.final)
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
