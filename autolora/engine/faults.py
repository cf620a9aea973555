"""Test-only fault injection, for the crash-safety tests that must kill a real process at an exact point.

The environment variable AUTOLORA_FAULT names points where the process kills itself with SIGKILL (no cleanup, no
atexit), as `kill -9` or an OOM kill would: `kill_at_step:STAGE:EPOCH:STEP` (before that training step),
`kill_in_checkpoint_write:STAGE:EPOCH` (last.pt's temp file half written, before the rename),
`kill_after_checkpoint:STAGE:EPOCH` (last.pt in place, best.pt and metrics.jsonl not yet), `kill_before_stage:STAGE`
(between RoLI stages), `disk_full_in_checkpoint_write:STAGE:EPOCH` (last.pt's write fails with ENOSPC),
`kill_in_final_eval` (model.safetensors written, results.json not), `nan_loss:STAGE:EPOCH:STEP` (that step's
loss becomes NaN), and `wait_at_step:STAGE:EPOCH:STEP` (pause there: `maybe_wait`). Several points: comma-separated. Unset in normal use: then it costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "AUTOLORA_FAULT"


def fault_armed(point: str, *where) -> bool:
    """True when AUTOLORA_FAULT names `point:where...`."""
    spec = os.environ.get(FAULT_ENV)
    return bool(spec) and ":".join([point, *map(str, where)]) in spec.split(",")


def maybe_fault(point: str, *where) -> None:
    """SIGKILL this process here when AUTOLORA_FAULT names `point:where...`."""
    if fault_armed(point, *where):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_wait(point: str, *where) -> None:
    """Pause here when AUTOLORA_FAULT names `point:where...` (`wait_at_step:STAGE:EPOCH:STEP`): create
    $AUTOLORA_FAULT_FLAG.waiting, then wait until $AUTOLORA_FAULT_FLAG exists (at most 120 s), so a test can act
    while this process holds its run directory."""
    if not fault_armed(point, *where):
        return
    import time

    flag = os.environ["AUTOLORA_FAULT_FLAG"]
    open(flag + ".waiting", "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)
