"""Progress of a long loop: a tqdm bar on a terminal, else one "batch i/n, ETA" line per step on stderr (logs)."""
from __future__ import annotations

import sys
import time


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class Progress:
    """`update(postfix)` after each of `total` steps; `note(message)` for a line between them. Disabled: silent.
    On a terminal (stderr is a TTY) a tqdm bar; otherwise lines `desc: batch i/n (p %), t elapsed, ETA t; postfix`."""

    def __init__(self, enabled: bool, total: int | None, desc: str, stream=None):
        self.enabled, self.total, self.desc = bool(enabled), total, desc
        self.stream = stream or sys.stderr
        self.done, self.t0 = 0, time.monotonic()
        self.bar = None
        if self.enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, file=self.stream)

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"{self.desc}: {message}", file=self.stream)
        else:
            print(f"{self.desc}: {message}", file=self.stream, flush=True)

    def update(self, postfix: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(postfix)
            return
        elapsed = time.monotonic() - self.t0
        line = f"batch {self.done}/{self.total if self.total else '?'}"
        if self.total:
            eta = elapsed / self.done * (self.total - self.done)
            line += f" ({100 * self.done / self.total:.0f} %), {duration(elapsed)} elapsed, ETA {duration(eta)}"
        self.note(line + (f"; {postfix}" if postfix else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
