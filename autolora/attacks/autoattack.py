"""The official AutoAttack (Croce & Hein 2020) via pyautoattack, under the L∞ or the L2 norm, in its versions:
standard (APGD-CE, APGD-T, FAB-T, Square), plus (also APGD-DLR and FAB, 5 restarts) and rand (APGD-CE and APGD-DLR
with 20-sample EOT, for randomised defences).

`autoattack(model, x, y, eps=..., norm=..., version=...)` returns the adversarial images of one batch;
`autolora.eval` counts them.
"""
from __future__ import annotations

import contextlib
import logging
import sys

import torch
import torch.nn as nn

from ..errors import UserError
from .base import Attack, autocast_context
from ..utils.pixels import resolution_of
from .norms import check_norm, check_version, resolve_budget

AA_SEED = 0  # AutoAttack reseeds its sub-attacks with this seed: results are reproducible
AA_LOGGER = "auto-attack"
AA_NORM = {"linf": "Linf", "l2": "L2"}  # pyautoattack's names


@contextlib.contextmanager
def _no_param_grads(model: nn.Module):
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


class _Relay(logging.Handler):
    """Passes AutoAttack's progress records ("robust accuracy after APGD-CE: ...") to a callback."""

    def __init__(self, fn):
        super().__init__(logging.DEBUG)
        self.fn = fn

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(("initial accuracy", "robust accuracy after")):
            self.fn(msg)


@contextlib.contextmanager
def _aa_quiet(progress=None):
    """AutoAttack logs every attack and per-batch accuracy through its logger: silenced while it runs, but for its
    progress records, which go to `progress(message)` when given."""
    logger = logging.getLogger(AA_LOGGER)
    saved = logger.level, logger.propagate, logger.handlers[:]
    logger.handlers, logger.propagate = [_Relay(progress) if progress else logging.NullHandler()], False
    logger.setLevel(logging.DEBUG if progress else logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]


def rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


@contextlib.contextmanager
def _aa_context(model: nn.Module, device: torch.device, autocast_dtype, progress):
    """Where pyautoattack runs: parameters without requires_grad, autograd on, the caller's autocast replaced, torch's
    RNG forked (AutoAttack reseeds), its logger silenced (progress relayed), the trace function kept."""
    saved_trace = sys.gettrace()  # AutoAttack's dynamic-defence check calls sys.settrace(None)
    try:
        with _no_param_grads(model), torch.inference_mode(False), autocast_context(device.type, autocast_dtype), \
                torch.random.fork_rng(devices=rng_devices(device), device_type="cuda"), _aa_quiet(progress):
            yield
    finally:
        sys.settrace(saved_trace)


def _adversary(model: nn.Module, x: torch.Tensor, *, eps: float, norm: str, version: str, device: torch.device):
    """pyautoattack's AutoAttack, fitted to the model's number of classes (see `autoattack`)."""
    try:
        from pyautoattack import AutoAttack as _AA
    except ImportError as e:  # pragma: no cover
        raise UserError("the 'aa' attack needs AutoAttack: pip install pyautoattack") from e
    with torch.no_grad():
        n_cls = int(model(x[:1].to(device)).shape[-1])
    adversary = _AA(model, norm=AA_NORM[check_norm(norm)], eps=float(eps), version=check_version(version),
                    seed=AA_SEED, device=device)
    adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, n_cls - 1)
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, n_cls - 1)
    too_few = {"apgd-t": 4, "apgd-dlr": 3}  # the (targeted) DLR loss reads the 4th (3rd) largest logit
    adversary.attacks_to_run = [a for a in adversary.attacks_to_run if n_cls >= too_few.get(a, 0)]
    return adversary


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
               version: str = "standard", batch_size: int = 256, device="cpu",
               autocast_dtype: torch.dtype | None = None, progress=None) -> torch.Tensor:
    """x_adv from the official AutoAttack via pyautoattack (`AutoAttack(model, norm='Linf'|'L2', eps=...,
    version=...)`, `run_standard_evaluation`).

    Deterministic (fixed seed; torch's global RNG state is restored afterwards). With fewer than 10
    classes the targeted attacks use every other class as a target (n_cls - 1); with fewer than 4
    classes APGD-T (its targeted DLR loss needs 4 logits), with fewer than 3 APGD-DLR, is left out. The model must
    already be in eval mode; its parameters get no .grad. `x`, `y` may live on the CPU: batches move to `device`.
    `progress(message)`, when given, receives AutoAttack's own progress records (accuracy after each attack).
    """
    device = torch.device(device)
    if len(y) == 0:
        return x
    with _aa_context(model, device, autocast_dtype, progress):
        x, y = x.detach().clone(), y.detach().clone()
        adversary = _adversary(model, x, eps=eps, norm=norm, version=version, device=device)
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv.detach()


def cost_estimate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, version: str,
                  n_images: int, device, autocast_dtype: torch.dtype | None = None, scale: int = 20) -> float:
    """A rough forecast of AutoAttack's seconds on `n_images` images in batches like `x` (the first batch): its
    attacks with 1/`scale` of their iterations and queries, timed on `x` (1/`scale` of a batch's cost), times `scale`
    and the number of batches. What does not shrink with the budget (checks, set-up) is counted `scale` times, and
    the shortened attacks break fewer images early, so it errs on the high side (README, "Evaluate", gives
    measurements)."""
    import time

    device = torch.device(device)
    m = max(1, len(y))
    with _aa_context(model, device, autocast_dtype, None):
        xs, ys = x.detach().clone(), y.detach().clone()
        adversary = _adversary(model, xs, eps=eps, norm=norm, version=version, device=device)
        for attack in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
            attack.n_iter = max(1, attack.n_iter // scale)
        adversary.square.n_queries = max(1, adversary.square.n_queries // scale)
        t0 = time.perf_counter()
        adversary.run_standard_evaluation(xs, ys, batch_size=m)
        seconds = time.perf_counter() - t0
    return seconds * scale * n_images / m


class AutoAttack(Attack):
    """The official AutoAttack (`autoattack`) as an `Attack`: `AutoAttack(model, eps=8/255, norm="linf",
    version="standard")(x, y)` gives the adversarial images; the base class puts the model in eval mode and restores
    every submodule's mode. `eps` None: the norm's default for the images' resolution, as `PGD` (L∞ 8/255; L2 0.5 up
    to 64 px a side, 3.0 above). `progress(message)` receives AutoAttack's progress records."""

    def __init__(self, model: nn.Module, eps: float | None = None, norm: str = "linf", version: str = "standard",
                 batch_size: int = 256, device=None, autocast_dtype: torch.dtype | None = None, progress=None):
        super().__init__(model, autocast_dtype)
        self.eps, self.batch_size, self.device = None if eps is None else float(eps), int(batch_size), device
        self.norm, self.version, self.progress = check_norm(norm), check_version(version), progress

    def budget(self, x: torch.Tensor) -> float:
        """eps for images like `x`: the given one, else the norm's default for their resolution."""
        return resolve_budget(self.norm, self.eps, None, resolution_of(*x.shape[-2:]))[0]

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = self.budget(x)
        if eps == 0:  # nothing can change: the clean images
            return x
        return autoattack(self.model, x, y, eps=eps, norm=self.norm, version=self.version,
                          batch_size=self.batch_size, device=self.device if self.device is not None else x.device,
                          autocast_dtype=self.autocast_dtype, progress=self.progress)

