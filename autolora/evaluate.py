"""Clean, PGD-k and AutoAttack accuracy of a pixel-space classifier (inputs in [0, 1], L∞ threat model).

Accuracies are computed from integer (correct, total) counts (`count_correct`), so a distributed caller
can all-reduce the counts of its shards before dividing.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .attacks import PGD
from .attacks.base import autocast_context, eval_mode
from .attacks.pgd import check_budget
from .errors import UserError, suggest

ATTACK_CHOICES = ("clean", "pgd10", "pgd20", "pgd50", "aa")
ALIASES = {"sa": "clean", "natural": "clean", "autoattack": "aa", "pgd": "pgd10"}
AA_SEED = 0  # AutoAttack reseeds its sub-attacks with this seed: results are reproducible
AA_LOGGER = "auto-attack"

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


# -- attack names ------------------------------------------------------------------------------


def parse_attacks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """"clean,pgd10,aa" -> ["clean", "pgd10", "aa"]; `pgdN` for any N >= 1; duplicates dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name)
        m = re.fullmatch(r"pgd-?(\d+)", name)
        if m:
            steps = int(m.group(1))
            if steps < 1:
                raise UserError(f"attack '{item}' needs at least 1 step: use e.g. pgd10")
            name = f"pgd{steps}"
        elif name not in ("clean", "aa"):
            raise UserError(
                f"unknown attack '{str(item).strip()}'{suggest(name, ATTACK_CHOICES)}: "
                "use clean, pgdN (e.g. pgd10, pgd20) or aa, comma-separated"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise UserError("no attacks given: use e.g. --attacks clean,pgd10,aa")
    return names


def result_key(name: str) -> str:
    """Key of an attack's accuracy in the result: 'sa' (clean), 'pgdN' or 'aa'."""
    return "sa" if name == "clean" else name


# -- data --------------------------------------------------------------------------------------


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict) and "image" in batch and "label" in batch:
        x, y = batch["image"], batch["label"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise UserError(f"evaluation data must yield (image, label) pairs, got {type(batch).__name__}")
    x, y = torch.as_tensor(x), torch.as_tensor(y).long()
    if not x.is_floating_point():
        raise UserError(f"evaluation images must be float tensors in [0, 1], got dtype {x.dtype}")
    return x, y


def _check_range(x: torch.Tensor) -> None:
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise UserError(
            f"evaluation images must be in [0, 1] (pixel space; normalisation is inside the model), "
            f"got values in [{lo:.3g}, {hi:.3g}]"
        )


def _loader(data, batch_size: int, limit: int | None) -> tuple[Iterable, int | None]:
    """An iterable of batches for `data` (Dataset or DataLoader) and the number of batches if known."""
    if isinstance(data, DataLoader):
        n = None
        try:
            n = len(data)
            if limit is not None and data.batch_size:
                n = min(n, math.ceil(limit / data.batch_size))
        except TypeError:
            pass
        return data, n
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        if limit is not None and hasattr(data, "__len__") and limit < len(data):
            data = Subset(data, range(limit))
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
        try:
            return loader, len(loader)
        except TypeError:
            return loader, None
    raise UserError(f"evaluation data must be a Dataset or DataLoader, got {type(data).__name__}")


def _batches(data, batch_size: int, limit: int | None) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """(x, y) CPU batches of the first `limit` examples, and the number of batches if known."""
    loader, n = _loader(data, batch_size, limit)

    def gen():
        seen = 0
        if limit is not None and limit <= 0:
            return
        for batch in loader:
            x, y = _split_batch(batch)
            if limit is not None and seen + len(y) > limit:
                x, y = x[: limit - seen], y[: limit - seen]
            _check_range(x)
            seen += len(y)
            yield x, y
            if limit is not None and seen >= limit:
                return

    return gen(), n


# -- counting ----------------------------------------------------------------------------------


def _count(model: nn.Module, batches: Batches, attack=None, *, device="cpu", chunk: int = 256,
           autocast_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(correct, total) of `model` on `batches`, on attack(x, y) when an attack is given.

    The model is used as it is (the caller sets eval mode); predictions are made in chunks of `chunk`.
    """
    device = torch.device(device)
    correct = total = 0
    for x, y in batches:
        if attack is not None:
            x = attack(x.to(device), y.to(device))
        with torch.inference_mode(), autocast_context(device.type, autocast_dtype):
            for i in range(0, len(y), chunk):
                pred = model(x[i:i + chunk].to(device)).argmax(1)
                correct += int((pred == y[i:i + chunk].to(device)).sum())
        total += len(y)
    return correct, total


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters' requires_grad off (restored after): AutoAttack's FAB calls .backward(), which
    would otherwise accumulate into parameters' .grad."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _AAProgress(logging.Handler):
    """Turns AutoAttack's log records into a tqdm bar over its attacks (or swallows them)."""

    def __init__(self, bar):
        super().__init__(logging.DEBUG)
        self.bar = bar

    def emit(self, record):
        if self.bar is None:
            return
        msg = record.getMessage()
        if msg.startswith("running "):
            self.bar.set_postfix_str(msg[len("running "):])
        elif msg.startswith("robust accuracy after"):
            self.bar.update(1)
            self.bar.set_postfix_str(msg[len("robust accuracy after "):].split(" (")[0])
        elif msg.startswith("no robust datapoints left"):
            self.bar.update(self.bar.total - self.bar.n)
        elif record.levelno >= logging.WARNING:
            self.bar.write(f"AutoAttack: {msg}")


@contextlib.contextmanager
def _aa_logging(bar):
    logger = logging.getLogger(AA_LOGGER)
    saved = logger.level, logger.propagate, logger.handlers[:]
    handler = _AAProgress(bar)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG if bar is not None else logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, batch_size: int = 256,
               device="cpu", bar=None, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x_adv from the official standard AutoAttack (L∞; APGD-CE, APGD-T, FAB-T, Square) via pyautoattack.

    Deterministic (fixed seed; torch's global RNG state is restored afterwards). With fewer than 10
    classes the targeted attacks use every other class as a target (n_cls - 1), and with fewer than 4
    classes APGD-T (its targeted DLR loss needs 4 logits) is left out. The model must already be in
    eval mode; its parameters get no .grad. `x`, `y` may live on the CPU: batches move to `device`.
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:  # pragma: no cover
        raise UserError("the 'aa' attack needs AutoAttack: pip install pyautoattack") from e
    device = torch.device(device)
    if len(y) == 0:
        return x
    saved_trace = sys.gettrace()  # AutoAttack's dynamic-defence check calls sys.settrace(None)
    try:
        with _frozen(model), torch.inference_mode(False), autocast_context(device.type, autocast_dtype), \
                torch.random.fork_rng(devices=_rng_devices(device), device_type="cuda"), \
                _aa_logging(bar):
            x, y = x.detach().clone(), y.detach().clone()
            with torch.no_grad():
                n_cls = int(model(x[:1].to(device)).shape[-1])
            adversary = AutoAttack(model, norm="Linf", eps=float(eps), version="standard", seed=AA_SEED, device=device)
            adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, n_cls - 1)
            adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, n_cls - 1)
            if n_cls < 4:
                adversary.attacks_to_run = [a for a in adversary.attacks_to_run if a != "apgd-t"]
            if bar is not None:
                bar.reset(total=len(adversary.attacks_to_run))
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        sys.settrace(saved_trace)
    return x_adv.detach()


def _bar(progress: bool, **kw):
    """A tqdm bar when progress is wanted and stderr is a terminal, else None."""
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(leave=False, dynamic_ncols=True, **kw)


def count_correct(model: nn.Module, data, *, attacks=("clean", "pgd10", "aa"), eps: float = 8 / 255,
                  alpha: float = 2 / 255, batch_size: int = 256, device="cpu", limit: int | None = None,
                  progress: bool = False, desc: str = "eval",
                  autocast_dtype: torch.dtype | None = None, all_reduce: bool = False) -> dict[str, tuple[int, int]]:
    """(correct, total) per requested attack, keyed like `evaluate`'s result; see `evaluate`.

    `all_reduce=True` (torchrun DDP): every rank passes its own shard of the data (`distributed.ShardSampler`)
    and gets the counts summed over all ranks, so every rank sees the same figures for the whole split; a
    collective call, all ranks must make it."""
    names = parse_attacks(attacks)
    check_budget(eps, alpha, 0)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise UserError(f"limit must be a non-negative integer, got {limit}")
    device = torch.device(device)
    counts = {result_key(n): [0, 0] for n in names}
    pgds = {n: PGD(model, eps=eps, alpha=alpha, steps=int(n[3:]), autocast_dtype=autocast_dtype)
            for n in names if n.startswith("pgd")}
    need_aa = "aa" in names and eps > 0  # with eps = 0 AutoAttack cannot change anything: aa = clean
    xs, ys = [], []
    with eval_mode(model):
        batches, n_batches = _batches(data, batch_size, limit)
        bar = _bar(progress, total=n_batches, desc=desc, unit="batch")
        try:
            for x, y in batches:
                for name in names:
                    if name == "aa" and need_aa:
                        xs.append(x.cpu())
                        ys.append(y.cpu())
                        continue
                    c, t = _count(model, [(x, y)], pgds.get(name), device=device, chunk=batch_size,
                                  autocast_dtype=autocast_dtype)
                    counts[result_key(name)][0] += c
                    counts[result_key(name)][1] += t
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(" ".join(f"{k} {c / t:.1%}" for k, (c, t) in counts.items() if t))
        finally:
            if bar is not None:
                bar.close()
        if need_aa and ys:
            with torch.inference_mode(False):
                x_all, y_all = torch.cat(xs), torch.cat(ys)
            del xs, ys
            bar = _bar(progress, total=4, desc=f"{desc} autoattack", unit="attack")
            try:
                x_adv = autoattack(model, x_all, y_all, eps=eps, batch_size=batch_size, device=device, bar=bar,
                                   autocast_dtype=autocast_dtype)
            finally:
                if bar is not None:
                    bar.close()
            counts["aa"] = list(_count(model, [(x_adv, y_all)], device=device, chunk=batch_size,
                                       autocast_dtype=autocast_dtype))
    if all_reduce:
        from . import distributed as D

        keys = list(counts)
        flat = D.all_reduce_sum(*[v for k in keys for v in counts[k]], device=device)
        counts = {k: [int(round(flat[2 * i])), int(round(flat[2 * i + 1]))] for i, k in enumerate(keys)}
    return {k: (c, t) for k, (c, t) in counts.items()}


def evaluate(model: nn.Module, data, *, attacks=("clean", "pgd10", "aa"), eps: float = 8 / 255,
             alpha: float = 2 / 255, batch_size: int = 256, device="cpu", limit: int | None = None,
             progress: bool = False, desc: str = "eval",
             autocast_dtype: torch.dtype | None = None, all_reduce: bool = False) -> dict[str, float | None]:
    """Accuracies as fractions in [0,1] keyed 'sa', 'pgd10' (or 'pgdN'), 'aa'; attacks not requested are absent.
    `data` is a Dataset or DataLoader of (x in [0,1], y). Model is put in eval mode and its mode restored.

    - 'sa': clean accuracy (under inference mode);
    - 'pgdN': accuracy under L∞ PGD with N steps of size `alpha`, budget `eps`, random start;
    - 'aa': accuracy under the official standard AutoAttack (pyautoattack) at `eps`, run on the whole
      (limited) set at once (it is collected on the CPU), deterministic.
    `attacks` is a list or a comma-separated string (see `parse_attacks`). `limit` keeps the first
    `limit` examples. The model is not moved: it must already be on `device`; the data is moved there.
    A value is None when there were no examples. With `autocast_dtype` (e.g. torch.bfloat16) forwards
    run under autocast; by default they run in fp32 whatever the caller's autocast context.
    `all_reduce=True`: `data` is this rank's shard and the counts are summed over the DDP ranks (see
    `count_correct`); `limit` then applies per shard.
    """
    counts = count_correct(model, data, attacks=attacks, eps=eps, alpha=alpha, batch_size=batch_size, device=device,
                           limit=limit, progress=progress, desc=desc, autocast_dtype=autocast_dtype,
                           all_reduce=all_reduce)
    return {k: (c / t if t else None) for k, (c, t) in counts.items()}
