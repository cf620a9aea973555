"""The official standard AutoAttack (Croce & Hein 2020: APGD-CE, APGD-T, FAB-T, Square) via pyautoattack, L∞.

`autoattack(model, x, y, eps=...)` returns the adversarial images of one batch; `autolora.eval` counts them.
"""
from __future__ import annotations

import contextlib
import logging
import sys

import torch
import torch.nn as nn

from ..errors import UserError
from .base import Attack, autocast_context

AA_SEED = 0  # AutoAttack reseeds its sub-attacks with this seed: results are reproducible
AA_LOGGER = "auto-attack"


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


@contextlib.contextmanager
def _aa_quiet():
    """AutoAttack logs every attack and per-batch accuracy through its logger: silenced while it runs."""
    logger = logging.getLogger(AA_LOGGER)
    saved = logger.level, logger.propagate, logger.handlers[:]
    logger.handlers, logger.propagate = [logging.NullHandler()], False
    logger.setLevel(logging.CRITICAL + 1)
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


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, batch_size: int = 256,
               device="cpu", autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
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
        with _no_param_grads(model), torch.inference_mode(False), autocast_context(device.type, autocast_dtype), \
                torch.random.fork_rng(devices=rng_devices(device), device_type="cuda"), \
                _aa_quiet():
            x, y = x.detach().clone(), y.detach().clone()
            with torch.no_grad():
                n_cls = int(model(x[:1].to(device)).shape[-1])
            adversary = AutoAttack(model, norm="Linf", eps=float(eps), version="standard", seed=AA_SEED, device=device)
            adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, n_cls - 1)
            adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, n_cls - 1)
            if n_cls < 4:
                adversary.attacks_to_run = [a for a in adversary.attacks_to_run if a != "apgd-t"]
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        sys.settrace(saved_trace)
    return x_adv.detach()


class AutoAttack(Attack):
    """The official standard AutoAttack (`autoattack`) as an `Attack`: `AutoAttack(model, eps=8/255)(x, y)` gives the
    adversarial images; the base class puts the model in eval mode and restores every submodule's mode."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, batch_size: int = 256, device=None,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__(model, autocast_dtype)
        self.eps, self.batch_size, self.device = float(eps), int(batch_size), device

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:  # nothing can change: the clean images
            return x
        return autoattack(self.model, x, y, eps=self.eps, batch_size=self.batch_size,
                          device=self.device if self.device is not None else x.device,
                          autocast_dtype=self.autocast_dtype)
