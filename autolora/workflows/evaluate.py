"""`evaluate_run(run_dir)`: re-evaluate a finished run's best model, on its own test split or on another copy of
the data (classes matched by folder name), and `write_eval`, which saves the figures (after the caller has shown
them: a read-only run directory still gives its figures)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

from ..config import TrainConfig, load_yaml
from ..engine.rundir import RunDir
from ..utils import dist
from ..utils.fileio import atomic_write_json
from ..errors import UserError
from ..eval import check_sizes, eval_batch_size, evaluate, run_attacks
from ..attacks.registry import parse_attacks


def evaluate_run(run_dir: str, *, attacks=None, limit: int | None = None, dataset: str | None = None,
                 data_dir: str | None = None, device: str = "auto", batch_size: int | None = None,
                 progress: bool | None = None, write: bool = True, out: str | None = None, model=None) -> dict:
    """Re-evaluate a run's best model; returns the figures (`test_<attack>`, named by what ran) and writes them to
    `out` (default RUN_DIR/eval.json, or eval_<dataset>.json on another copy of the data) unless `write=False`.

    By default (its attacks, batch `eval_batch_size`, its seed) the figures are the run's own final evaluation.
    Under torchrun each rank evaluates its share of the batches and the counts are summed (the same figures as one
    process); rank 0 writes the file. Writing into the run directory locks it for the whole evaluation. A run of a
    module of your own needs `model`, a fresh instance of its class (`load_model`)."""
    check_sizes(256 if batch_size is None else batch_size, limit)
    dev = dist.resolve_device(device)
    target = out or default_eval_path(run_dir, dataset or data_dir)
    with (output_lock(run_dir, target) if write else contextlib.nullcontext()):
        with dist.process_group(dev):
            dist.setup_groups()
            res = _evaluate_run(run_dir, attacks, limit, dataset, data_dir, dev, batch_size, progress, model)
        if write:
            write_eval(res, target)
    return res


def default_eval_path(run_dir: str, other_data: str | None) -> str:
    """RUN_DIR/eval.json, or RUN_DIR/eval_<dataset>.json for an evaluation on another copy of the data."""
    return os.path.join(run_dir, "eval.json" if not other_data else f"eval_{os.path.basename(str(other_data))}.json")


@contextlib.contextmanager
def output_lock(run_dir: str, target: str):
    """Lock the run directory while an evaluation that writes into it runs (rank 0; a training or another evaluation
    of it is then an error naming its PID). Nothing to lock for a file written elsewhere, or a read-only directory
    without a lock file (the write then fails with the advice to pass --out FILE)."""
    lock = None
    inside = os.path.realpath(os.path.dirname(os.path.abspath(target))) == os.path.realpath(run_dir)
    if inside and dist.is_launched_rank0() and os.path.isdir(run_dir):
        from ..utils.lock import lock_dir

        try:
            lock = lock_dir(run_dir)
        except (PermissionError, FileNotFoundError):
            lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def write_eval(res: dict, path: str) -> str | None:
    """Write the figures of `evaluate_run` to `path`, atomically, on rank 0; a place that cannot be written is one
    UserError that says where else to write (--out FILE)."""
    if not dist.is_main():
        return None
    try:
        atomic_write_json(path, res)
    except UserError as e:
        raise UserError(f"{e}; pass --out FILE somewhere writable to save the figures") from None
    return path


def _evaluate_run(run_dir, attacks, limit, dataset, data_dir, dev, batch_size, progress, module=None) -> dict:
    from ..data import build_test_set, run_data, split_seed_of
    from ..models.export import load_model

    run = RunDir(run_dir)
    if not os.path.exists(run.file("config.yaml")):
        raise UserError(f"{run_dir} is not an autolora run directory (no config.yaml)")
    cfg = TrainConfig.from_saved(load_yaml(run.file("config.yaml")), run.file("config.yaml"))
    model, meta = load_model(run.file("model.safetensors"), model=module)
    model.to(dev)
    classes = meta.get("classes")
    attacks = run_attacks(cfg) if attacks is None else parse_attacks(attacks, cfg.eval_steps)
    batch_size = eval_batch_size(cfg) if batch_size is None else batch_size
    if dataset or data_dir:
        test = build_test_set(dataset or cfg.dataset, data_dir or cfg.data_dir, run_classes=classes,
                              limit_eval=limit or cfg.limit_eval, seed=split_seed_of(cfg),
                              test_fraction=cfg.test_fraction, skip_bad_images=cfg.skip_bad_images)
    else:
        data = run_data(dataclasses.replace(cfg, limit_eval=limit or cfg.limit_eval))
        if list(data.classes) != list(classes):
            raise UserError(f"the data's classes differ from the run's: {data.classes} vs {classes}")
        test = data.test
    progress = (progress if progress is not None else sys.stderr.isatty()) and dist.is_main()
    res = evaluate(model, test, attacks=attacks, eps=cfg.eps, step_size=cfg.step_size, batch_size=batch_size,
                   device=dev, progress=progress, desc="eval", all_reduce=dist.is_dist(), seed=cfg.seed,
                   keep=cfg.pgd_keep)
    out = {f"test_{k}": v for k, v in res.items()}
    out.update({"num_test": len(test), "dataset": dataset or cfg.dataset, "data_dir": data_dir or cfg.data_dir,
                "data": "own" if not (dataset or data_dir) else "other"})
    return out
