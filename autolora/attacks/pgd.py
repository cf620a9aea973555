"""Projected gradient descent under the L∞ or the L2 norm (Madry et al., ICLR 2018).

The arithmetic follows torchattacks' `PGD` and `PGDL2` (Harry24k/adversarial-attacks-pytorch 3.5.1) expression by
expression, random draws included, so the same model, images and seed give the same adversarial images
(tests/test_attacks.py checks it against a recorded fixture).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..utils.pixels import resolution_of
from .base import Attack
from .norms import check_norm, resolve_budget

L2_DIV = 1e-10  # torchattacks' eps_for_division in the gradient's normalisation


def check_budget(eps, step_size, steps, norm: str = "linf") -> None:
    """UserError unless eps >= 0, step_size > 0 (both at most 1 under L∞: pixel units of images in [0, 1]) and steps
    is an integer >= 0; None for eps or step_size is "the default", not checked."""
    linf = check_norm(norm) == "linf"
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v and abs(v) != float("inf")  # noqa: E731
    if eps is not None:
        if not real(eps) or eps < 0:
            raise UserError(f"eps must be a number >= 0, got {eps}")
        if linf and eps > 1:
            raise UserError(f"eps {eps} is above 1: an L∞ eps is in pixel units of images in [0, 1], e.g. 8/255 = "
                            f"{8 / 255:.4f}")
    if step_size is not None:
        if not real(step_size) or step_size <= 0:
            raise UserError(f"the attack step size must be > 0, got {step_size}")
        if linf and step_size > 1:
            raise UserError(f"step size {step_size} is above 1: it is in pixel units of images in [0, 1], e.g. 2/255 "
                            f"= {2 / 255:.4f}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise UserError(f"the number of attack steps must be an integer >= 0, got {steps}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


# per norm: the random start, the ascent step and the projection of delta onto the eps-ball
def _start_linf(x, eps):
    return torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), min=0, max=1)


def _start_l2(x, eps):
    """A direction uniform on the sphere, a radius uniform in [0, eps] (torchattacks' PGDL2 draw)."""
    delta = torch.empty_like(x).normal_()
    n = _col(_rows(delta).norm(p=2, dim=1))
    r = torch.zeros_like(n).uniform_(0, 1)
    delta *= r / n * eps
    return torch.clamp(x + delta, min=0, max=1)


def _step_linf(grad):
    return grad.sign()


def _step_l2(grad):
    return grad / _col(torch.norm(_rows(grad), p=2, dim=1) + L2_DIV)


def _project_linf(delta, eps):
    return torch.clamp(delta, min=-eps, max=eps)


def _project_l2(delta, eps):
    norms = torch.norm(_rows(delta), p=2, dim=1)
    return delta * _col(torch.min(eps / norms, torch.ones_like(norms)))


_GEOMETRY = {"linf": (_start_linf, _step_linf, _project_linf), "l2": (_start_l2, _step_l2, _project_l2)}
KEEP = ("last", "best_batch", "best_example")


class PGD(Attack):
    """PGD-`steps` on the mean cross-entropy (Madry et al. 2018), under `norm` "linf" or "l2":

    - L∞: random start uniform in [-eps, eps]; steps of `step_size` along the gradient's sign;
    - L2: random start inside the L2 ball (a uniform direction, a radius uniform in [0, eps]: torchattacks' PGDL2
      draw; Madry et al.'s `robustness` library starts on the sphere); steps of `step_size` along the L2-normalised
      gradient;
    - after each step: projection onto the eps-ball around x, then onto [0, 1].

    `atk = PGD(model, eps=8/255, step_size=2/255, steps=10, norm="linf")`, `x_adv = atk(x, y)` (x in [0, 1]). `eps`
    None: the norm's default for the images' resolution (L∞ 8/255; L2 0.5 up to 64 px a side, 3.0 above);
    `step_size` None: eps/4. `restarts` R > 1: R random starts, an example keeps the first that fools the model
    (the later ones attack only the examples still classified correctly), so an example counts as robust only if it
    survives every restart. `keep` chooses the iterate returned among x_0 (the start) … x_K: `last` (x_K),
    `best_batch` (the one of the highest batch-mean loss, RoLI's `adv_generator(..., use_best=True)`, whose loss is
    a batch mean, so the whole batch is swapped; ties keep the earlier) or `best_example` (each example's
    highest-loss iterate). The random draws come from torch's global RNG: `torch.manual_seed` makes it
    reproducible. The model runs in eval mode; its mode, parameters' .grad and BN buffers are left as they were.
    """

    def __init__(self, model: nn.Module, eps: float | None = None, step_size: float | None = None, steps: int = 10,
                 norm: str = "linf", random_start: bool = True, restarts: int = 1,
                 autocast_dtype: torch.dtype | None = None, keep: str = "last"):
        super().__init__(model, autocast_dtype)
        self.norm = check_norm(norm)
        check_budget(eps, step_size, steps, self.norm)
        if isinstance(restarts, bool) or not isinstance(restarts, numbers.Integral) or restarts < 1:
            raise UserError(f"restarts must be an integer >= 1, got {restarts}")
        if restarts > 1 and not random_start:
            raise UserError("restarts > 1 need the random start: without it every restart is the same attack")
        self.eps = None if eps is None else float(eps)
        self.step_size = None if step_size is None else float(step_size)
        self.steps = int(steps)
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        if keep not in KEEP:
            raise UserError(f"PGD keep must be one of {', '.join(KEEP)}, got {keep!r}")
        self.keep = keep

    def budget(self, x: torch.Tensor) -> tuple[float, float]:
        """(eps, step size) for images like `x`: the given ones, else the norm's defaults for their resolution."""
        return resolve_budget(self.norm, self.eps, self.step_size, resolution_of(*x.shape[-2:]))

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps, step = self.budget(x)
        if eps == 0:
            return x
        x_adv = self._run(x, y, eps, step)
        for _ in range(self.restarts - 1):
            with torch.no_grad():
                alive = self.model(x_adv).argmax(1) == y
            if not bool(alive.any()):
                break
            x_adv[alive] = self._run(x[alive], y[alive], eps, step)
        return x_adv

    def _run(self, x: torch.Tensor, y: torch.Tensor, eps: float, step: float) -> torch.Tensor:
        start = _GEOMETRY[self.norm][0]
        x_adv = start(x, eps).detach() if self.random_start else x.clone().detach()
        if self.keep != "last":
            return self._best(x, x_adv, y, eps, step)
        for _ in range(self.steps):
            x_adv.requires_grad = True
            loss = F.cross_entropy(self.model(x_adv).float(), y)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = self._step(x, x_adv, grad, eps, step)
        return x_adv

    def _step(self, x, x_adv, grad, eps: float, step: float) -> torch.Tensor:
        _, ascent, project = _GEOMETRY[self.norm]
        x_adv = x_adv.detach() + step * ascent(grad)
        return torch.clamp(x + project(x_adv - x, eps), min=0, max=1).detach()

    def _best(self, x, x_adv, y, eps: float, step: float) -> torch.Tensor:
        """The same steps, keeping the highest-loss iterate among x_0 … x_K (`keep`)."""
        best = best_loss = None
        for k in range(self.steps + 1):
            x_adv = x_adv.detach().requires_grad_(k < self.steps)
            with torch.set_grad_enabled(k < self.steps):
                losses = F.cross_entropy(self.model(x_adv).float(), y, reduction="none")
            best, best_loss = self._better(x_adv.detach(), losses.detach(), best, best_loss)
            if k < self.steps:
                (grad,) = torch.autograd.grad(losses.mean(), [x_adv])
                x_adv = self._step(x, x_adv, grad, eps, step)
        return best

    def _better(self, x_adv, losses, best, best_loss):
        if best is None:
            return x_adv.clone(), losses.clone()
        if self.keep == "best_batch":  # on the device: no host sync per PGD iteration (ties keep the earlier)
            better = losses.mean() > best_loss.mean()
            return torch.where(better, x_adv, best), torch.where(better, losses, best_loss)
        swap = losses > best_loss
        best[swap], best_loss[swap] = x_adv[swap], losses[swap]
        return best, best_loss
