"""Atomic file writes and the checks before writing: what must survive a crash or a full disk.

Writes go to a temp file beside the target, are fsync'd and renamed over it (`atomic_path`); a failed write is one
`WriteFailed` that names the file and the cause (disk full), and the previous version of the file is kept.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager

from ..errors import UserError


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
