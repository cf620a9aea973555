"""Evaluation: clean, PGD-k and AutoAttack accuracy of a pixel-space classifier (inputs in [0, 1]; the L∞ or the L2
threat model), `evaluate(model, x, y)` or `evaluate(model, data)`. (`autolora.workflows.evaluate.evaluate_run`
re-evaluates a finished run.)

Accuracies are computed from integer (correct, total) counts (`count_correct`), so a distributed caller
can all-reduce the counts of its shards before dividing.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .attacks.autoattack import rng_devices
from .attacks.base import autocast_context, eval_mode
from .attacks.norms import check_norm, resolve_budget
from .attacks.pgd import check_budget
from .attacks.registry import aa_version as version_of, eval_attack, label, parse_attacks, result_key
from .data.samplers import ShardBatches
from .errors import UserError
from .utils import dist
from .utils.pixels import resolution_of
from .utils.progress import Progress

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


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


def eval_loader(ds: Dataset, batch_size: int, *, workers: int = 0, pin_memory: bool = False,
                shard: bool = False, keyed: bool = False) -> DataLoader:
    """A DataLoader of `ds` in batches [k·b, (k+1)·b); `shard=True` (torchrun): this rank's batches
    (`data.samplers.ShardBatches`; `keyed`: `(epoch, index)` keys for a `SeededItems` dataset). Workers, when any,
    persist across iterations (e.g. validation every epoch). The loader has its own generator, so iterating it
    draws nothing from the global RNG (which the training attacks use): --workers does not change a run."""
    sampler = ShardBatches(len(ds), batch_size, *((None, None) if shard else (0, 1)), keyed=keyed)
    return DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, generator=torch.Generator(),
                      **({"prefetch_factor": 4} if workers else {}))


def _batches(data, batch_size: int, limit: int | None, shard: bool):
    """(k, x, y) CPU batches of the first `limit` examples, k the batch's index in a 1-process evaluation, and
    the number of batches. A Dataset is cut in batches [k·b, (k+1)·b) (this rank's under `shard`); a DataLoader of
    `eval_loader` keeps its batch ids; any other DataLoader is taken as it comes (k = 0, 1, ...)."""
    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        if limit is not None and hasattr(data, "__len__") and limit < len(data):
            data = Subset(data, range(limit))
        loader = eval_loader(data, batch_size, shard=shard)
    else:
        raise UserError(f"evaluation data must be a Dataset or DataLoader, got {type(data).__name__}")
    sampler = loader.batch_sampler if isinstance(loader.batch_sampler, ShardBatches) else None
    if shard and sampler is None:
        raise ValueError("a sharded evaluation needs a Dataset or an eval_loader(..., shard=True)")
    ids = sampler.batch_ids() if sampler is not None else None
    if isinstance(data, DataLoader) and limit is not None and sampler is not None and sampler.world > 1:
        raise ValueError("limit with a sharded eval_loader: pass the Dataset (or a Subset) instead")
    try:
        n = len(loader)
        if limit is not None and isinstance(data, DataLoader) and data.batch_sampler is not None:
            n = min(n, math.ceil(limit / (sampler.batch_size if sampler is not None else loader.batch_size or 1)))
    except TypeError:
        n = None

    def gen():
        seen = 0
        if limit is not None and limit <= 0:
            return
        for j, batch in enumerate(loader):
            x, y = _split_batch(batch)
            if limit is not None and seen + len(y) > limit:  # a Dataset was cut to `limit` already
                x, y = x[: limit - seen], y[: limit - seen]
            _check_range(x)
            seen += len(y)
            yield (ids[j] if ids is not None else j), x, y
            if limit is not None and seen >= limit:
                return

    return gen(), n


# -- counting ----------------------------------------------------------------------------------


class NonFiniteOutputs(UserError):
    """The model's logits hold NaN or inf: its accuracy would be a meaningless argmax of garbage."""


def _count(model: nn.Module, batches: Batches, attack=None, *, device="cpu", chunk: int = 256,
           autocast_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(correct, total) of `model` on `batches`, on attack(x, y) when an attack is given.

    The model is used as it is (the caller sets eval mode); predictions are made in chunks of `chunk`. Logits that
    are not finite (NaN weights) are an error, not a prediction: argmax of NaN is class 0.
    """
    device = torch.device(device)
    correct = total = 0
    for x, y in batches:
        if attack is not None:
            x = attack(x.to(device), y.to(device))
        with torch.inference_mode(), autocast_context(device.type, autocast_dtype):
            for i in range(0, len(y), chunk):
                logits = model(x[i:i + chunk].to(device))
                if not bool(torch.isfinite(logits).all()):
                    raise NonFiniteOutputs("the model's outputs are not finite (NaN or inf) on the evaluation images: "
                                           "its weights are damaged (e.g. a diverged run): evaluate another checkpoint "
                                           "or retrain")
                correct += int((logits.argmax(1) == y[i:i + chunk].to(device)).sum())
        total += len(y)
    return correct, total


def batch_seed(seed: int, k: int) -> int:
    """The RNG seed of evaluation batch k (PGD's random start)."""
    return (int(seed) * 1_000_003 + int(k)) % 2**63


def as_data(data, y=None):
    """`evaluate`'s data: images and labels as tensors (`x, y` or a pair `(x, y)`) become a TensorDataset; a Dataset
    or DataLoader is taken as it is."""
    if isinstance(data, torch.Tensor):
        if y is None:
            raise UserError("evaluate(model, x, y): images x were given without their labels y")
        y = torch.as_tensor(y)
        if len(y) != len(data):
            raise UserError(f"evaluate(model, x, y): {len(data)} images but {len(y)} labels")
        return TensorDataset(data, y)
    if y is not None:
        raise UserError("evaluate(model, data, y): labels y go with a tensor of images x; a Dataset or DataLoader "
                        "holds its own labels")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
            and data[0].dim() == 4:
        return as_data(*data)
    return data


def resolve_device(model: nn.Module, device) -> torch.device:
    """`auto`: the device of the model's parameters (the model is not moved), else the CLI's rule (CUDA when
    available); any other value as `utils.dist.resolve_device` takes it."""
    if str(device) != "auto":
        return device if isinstance(device, torch.device) else dist.resolve_device(str(device))
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return dist.resolve_device("auto")


def _aa_estimate(model, x, y, names, *, eps, norm, n_images, device, autocast_dtype, report) -> None:
    """Say what AutoAttack will cost before it starts (`attacks.autoattack.cost_estimate`)."""
    from .attacks.autoattack import cost_estimate
    from .utils.progress import duration

    for name in names:
        version = version_of(name)
        if version is not None and eps > 0:
            seconds = cost_estimate(model, x, y, eps=eps, norm=norm, version=version, n_images=n_images,
                                    device=device, autocast_dtype=autocast_dtype)
            report(f"AutoAttack ({version}) on {n_images} images: at most about {duration(seconds)} (its attacks "
                   f"shortened 20× timed on the first batch of {len(y)}, scaled up: a forecast on the high side)")


def count_correct(model: nn.Module, data, y=None, *, attacks=("clean", "pgd", "aa"), eps: float | None = None,
                  step_size: float | None = None, steps: int = 10, norm: str = "linf", restarts: int = 1,
                  aa_version: str = "standard", batch_size: int = 256, device="auto", limit: int | None = None,
                  progress: bool = False, desc: str = "eval", autocast_dtype: torch.dtype | None = None,
                  all_reduce: bool = False, seed: int = 0, keep: str = "last") -> dict[str, tuple[int, int]]:
    """(correct, total) per requested attack, keyed like `evaluate`'s result; see `evaluate`.

    Batch k is attacked under torch's RNG seeded by (seed, k) (forked: the caller's RNG stream is untouched) and
    AutoAttack runs batch by batch with its fixed seed, so a batch's figures depend only on its images.
    `all_reduce=True` (torchrun DDP): `data` is the whole split (a Dataset, or an `eval_loader(..., shard=True)`);
    each rank evaluates its batches (`data.samplers.ShardBatches`) and gets the counts summed over all ranks, which
    equal a 1-process evaluation's; a collective call, every rank must make it."""
    norm = check_norm(norm)
    names = parse_attacks(attacks, steps, restarts=restarts, version=aa_version)
    check_budget(eps, step_size, 0, norm)
    check_sizes(batch_size, limit)
    data = as_data(data, y)
    device = resolve_device(model, device)
    counts = {result_key(n): [0, 0] for n in names}
    with eval_mode(model):
        batches, n_batches = _batches(data, batch_size, limit, shard=all_reduce)
        with Progress(progress, n_batches, desc) as bar:
            # eps / step None: each attack takes the norm's defaults for the images' resolution (`budget`)
            attackers = {n: eval_attack(n, model, eps=eps, step_size=step_size, norm=norm, batch_size=batch_size,
                                        device=device, autocast_dtype=autocast_dtype,
                                        progress=bar.note if progress else None, keep=keep) for n in names}
            for i, (k, x, y_) in enumerate(batches):
                if progress and i == 0:
                    aa_eps = resolve_budget(norm, eps, None, resolution_of(*x.shape[-2:]))[0]
                    _aa_estimate(model, x, y_, names, eps=aa_eps, norm=norm, device=device, report=bar.note,
                                 n_images=_total(data, limit, n_batches, len(y_)), autocast_dtype=autocast_dtype)
                with torch.random.fork_rng(devices=rng_devices(device), device_type=device.type):
                    torch.manual_seed(batch_seed(seed, k))
                    for name in names:
                        c, t = _count(model, [(x, y_)], attackers[name], device=device, chunk=batch_size,
                                      autocast_dtype=autocast_dtype)
                        counts[result_key(name)][0] += c
                        counts[result_key(name)][1] += t
                bar.update(" ".join(f"{label(k_)} {c / t:.1%}" for k_, (c, t) in counts.items() if t))
    if all_reduce:
        keys = list(counts)
        flat = dist.all_reduce_sum(*[v for k in keys for v in counts[k]], device=device)
        counts = {k: [int(round(flat[2 * i])), int(round(flat[2 * i + 1]))] for i, k in enumerate(keys)}
    return {k: (c, t) for k, (c, t) in counts.items()}


def _total(data, limit, n_batches, batch_size) -> int:
    """How many images this process will evaluate (for the estimate): the data's (up to `limit`), and at most its
    own batches' worth (`batch_size`: the first batch's), which is its share in a sharded evaluation."""
    try:
        n = len(data.dataset) if isinstance(data, DataLoader) else len(data)
    except TypeError:
        n = None
    if limit is not None:
        n = limit if n is None else min(n, limit)
    if n_batches is not None:
        n = n_batches * batch_size if n is None else min(n, n_batches * batch_size)
    return batch_size if n is None else n


def evaluate(model: nn.Module, data, y=None, *, attacks=("clean", "pgd", "aa"), eps: float | None = None,
             step_size: float | None = None, steps: int = 10, norm: str = "linf", restarts: int = 1,
             aa_version: str = "standard", batch_size: int = 256, device="auto", limit: int | None = None,
             progress: bool = False, desc: str = "eval", autocast_dtype: torch.dtype | None = None,
             all_reduce: bool = False, seed: int = 0, keep: str = "last", alpha=None) -> dict[str, float | None]:
    """Accuracies as fractions in [0,1] keyed 'sa', 'pgd10' (or 'pgdN', 'pgdN_rR'), 'aa' (or 'aa_plus', 'aa_rand');
    attacks not requested are absent. `evaluate(model, x, y)` with tensors (images in [0, 1], N×C×H×W, and integer
    labels), or `evaluate(model, data)` with a Dataset or DataLoader of (x, y) pairs. The model is put in eval mode
    and its mode restored.

    - 'sa': clean accuracy (under inference mode);
    - 'pgdN': accuracy under PGD (`norm` "linf" or "l2", `attacks.PGD`) with N steps of size `step_size`, budget
      `eps`, random start (`pgd` in `attacks` is PGD with `steps` steps); with `restarts` R > 1 an example counts as
      robust only if it survives all R random starts ('pgdN_rR');
    - 'aa': accuracy under the official AutoAttack (pyautoattack) at `eps` under `norm`, in `aa_version` standard,
      plus or rand, batch by batch, deterministic.
    `eps` None: the norm's default for the images' resolution (L∞ 8/255; L2 0.5 up to 64 px a side, 3.0 above);
    `step_size` None: eps/4. `attacks` is a list or a comma-separated string (see `parse_attacks`). `limit` keeps the
    first `limit` examples. `device` "auto" is the model's device; the model is not moved, the data is moved there.
    A value is None when there were no examples. With `autocast_dtype` (e.g. torch.bfloat16) forwards run under
    autocast; by default they run in fp32 whatever the caller's autocast context. Batch k's attacks draw from an RNG
    seeded by (`seed`, k), so the figures are reproducible and do not depend on the caller's RNG. `keep`: which PGD
    iterate counts (`attacks.PGD`; RoLI's runs keep the highest batch-mean loss). `progress`: a bar
    on a terminal, else "batch i/n, ETA" lines on stderr, and AutoAttack's estimated cost before it starts.
    `all_reduce=True` (torchrun): every rank passes the whole split and evaluates its share of the batches; the
    counts are summed, so every rank gets the 1-process figures (see `count_correct`).
    """
    if alpha is not None:
        raise UserError("evaluate(alpha=...) is ambiguous: the PGD step is step_size=; AutoLoRa's sharpening α is the "
                        "config's sharpen_alpha")
    counts = count_correct(model, data, y, attacks=attacks, eps=eps, step_size=step_size, steps=steps, norm=norm,
                           restarts=restarts, aa_version=aa_version, batch_size=batch_size, device=device,
                           limit=limit, progress=progress, desc=desc, autocast_dtype=autocast_dtype,
                           all_reduce=all_reduce, seed=seed, keep=keep)
    return {k: (c / t if t else None) for k, (c, t) in counts.items()}


def eval_batch_size(cfg) -> int:
    """The evaluation batch of a run (validation, test, `evaluate_run`'s default): attacks are seeded per batch."""
    return max(cfg.batch_size, 256)


def run_attacks(cfg) -> list[str]:
    """A run's test attacks: its --eval-attacks, `pgd` being PGD-<eval-steps>."""
    return parse_attacks(cfg.eval_attacks, cfg.eval_steps)


def check_sizes(batch_size, limit) -> None:
    """One UserError for a batch size or limit that is not a positive integer."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not is_int(batch_size) or batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and (not is_int(limit) or limit < 1):
        raise UserError(f"--limit must be >= 1 (images to evaluate), got {limit}")
