"""L∞ projected gradient descent (Madry et al., 2018)."""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .base import Attack


def check_budget(eps, step_size, steps) -> None:
    """UserError unless 0 <= eps <= 1, 0 < step_size <= 1 and steps is an integer >= 0 (pixel units)."""
    if not isinstance(eps, numbers.Real) or eps != eps or eps < 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    if eps > 1:
        raise UserError(f"eps {eps} is above 1: eps is in pixel units of images in [0, 1], e.g. 8/255 = {8 / 255:.4f}")
    if not isinstance(step_size, numbers.Real) or step_size != step_size or step_size <= 0:
        raise UserError(f"the attack step size must be > 0, got {step_size}")
    if step_size > 1:
        raise UserError(f"step size {step_size} is above 1: it is in pixel units of images in [0, 1], e.g. 2/255 = "
                        f"{2 / 255:.4f}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise UserError(f"the number of attack steps must be an integer >= 0, got {steps}")


KEEP = ("last", "best_batch", "best_example")


class PGD(Attack):
    """L∞ PGD (Madry et al. 2018): uniform random start in [-eps, eps], `steps` signed-gradient ascent steps of
    size `step_size` on cross-entropy, projection onto the eps-ball and [0,1].

    `keep` chooses the iterate returned among x_0 (the start) … x_K: `last` (x_K), `best_batch` (the one of the
    highest batch-mean loss, RoLI's `adv_generator(..., use_best=True)`, whose loss is a batch mean, so the whole
    batch is swapped; ties keep the earlier) or `best_example` (each example's highest-loss iterate).
    The random start draws from torch's global RNG, so `torch.manual_seed` makes the attack reproducible.
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, autocast_dtype: torch.dtype | None = None, keep: str = "last"):
        super().__init__(model, autocast_dtype)
        check_budget(eps, step_size, steps)
        if keep not in KEEP:
            raise UserError(f"PGD keep must be one of {', '.join(KEEP)}, got {keep!r}")
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.random_start = bool(random_start)
        self.keep = keep

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return x
        x_adv = x
        if self.random_start:
            x_adv = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp_(0, 1)
        if self.keep != "last":
            return self._best(x, x_adv, y)
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            # summed loss: the per-example gradient sign is the same as for the mean, without the 1/N scale
            loss = F.cross_entropy(self.model(x_adv).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = self._step(x, x_adv, grad)
        return x_adv.detach()

    def _step(self, x, x_adv, grad):
        x_adv = x_adv.detach() + self.step_size * grad.sign()
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp_(0, 1)

    def _best(self, x, x_adv, y):
        """The same steps, keeping the highest-loss iterate among x_0 … x_K (`keep`)."""
        best = best_loss = None
        for k in range(self.steps + 1):
            x_adv = x_adv.detach().requires_grad_(k < self.steps)
            with torch.set_grad_enabled(k < self.steps):
                losses = F.cross_entropy(self.model(x_adv).float(), y, reduction="none")
            best, best_loss = self._better(x_adv.detach(), losses.detach(), best, best_loss)
            if k < self.steps:
                (grad,) = torch.autograd.grad(losses.sum(), [x_adv])
                x_adv = self._step(x, x_adv, grad)
        return best

    def _better(self, x_adv, losses, best, best_loss):
        if best is None:
            return x_adv.clone(), losses.clone()
        if self.keep == "best_batch":
            return (x_adv.clone(), losses.clone()) if losses.mean() > best_loss.mean() else (best, best_loss)
        swap = losses > best_loss
        best[swap], best_loss[swap] = x_adv[swap], losses[swap]
        return best, best_loss
