"""The run's log (`RunLog`: stdout and RUN_DIR/train.log, warnings on stderr) and its TensorBoard scalars
(`Scalars`), on rank 0."""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from ..errors import UserError
from ..utils import dist


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
        if dist.is_main():
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

        if dist.is_main():
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
        if on and dist.is_main():
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
