"""Exclusive locks on run directories (and other outputs): `fcntl.flock` on a lock file.

The kernel releases a flock when its process dies, so a run killed with SIGKILL leaves no stale lock and
`--resume` works at once; a second process that wants the same directory gets one error naming the PID that
holds it. The lock file stays (it is tiny and part of the run directory): removing it would let a process that
opened the old file and one that creates a new file both believe they hold the lock.
"""
from __future__ import annotations

import errno
import os
import socket
import time

from ..errors import UserError

LOCK_NAME = ".lock"


_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_inherited() -> None:
    """In a forked child (e.g. a DataLoader worker): close the copies of the parent's lock descriptors, so that a
    child outliving a killed parent does not keep its run directory locked (closing a copy leaves the parent's
    lock held; `flock(LOCK_UN)` would not)."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


class Locked(UserError):
    """Another live process holds the lock."""


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return "another process"
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if "pid" not in fields:
        return "another process"
    host = fields.get("host")
    return f"process {fields['pid']}" + (f" on {host}" if host and host != socket.gethostname() else "")


class FileLock:
    """An exclusive, non-blocking flock on `path` (created when missing); `what` names the locked thing in the
    error, e.g. "run directory runs/a". Use as a context manager or call `acquire` / `release`."""

    def __init__(self, path: str, what: str):
        self.path, self.what, self.fd = path, what, None

    def acquire(self) -> "FileLock":
        import fcntl

        if self.fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise
            fd = os.open(self.path, os.O_RDONLY)  # a read-only directory whose lock file exists: lock it anyway
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Locked(f"{self.what} is in use by {_holder(self.path)} (lock {self.path}): wait for it to "
                             "finish or stop it, then run again") from None
            raise
        self.fd = fd
        _HELD.add(fd)
        try:  # who holds it, for the error message of the next process
            os.ftruncate(fd, 0)
            os.write(fd, f"pid={os.getpid()} host={socket.gethostname()} since={int(time.time())}\n".encode())
        except OSError:
            pass  # read-only: the lock still holds, only its note is missing
        return self

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_dir(path: str, what: str | None = None) -> FileLock:
    """Lock directory `path` (its `.lock` file); Locked names the holder's PID when another process has it."""
    return FileLock(os.path.join(path, LOCK_NAME), what or f"run directory {path}").acquire()
