"""FGSM with a random start (Wong, Rice, Kolter, "Fast is better than free", ICLR 2020)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Attack
from .norms import default_eps
from .pgd import check_budget


class FGSMRS(Attack):
    """L∞ FGSM-RS: δ ~ U[-eps, eps] (kept inside [0, 1] around x), one signed-gradient step of size `step_size`
    (default 1.25·eps, the paper's choice) on cross-entropy, projection onto the eps-ball and [0, 1].

    One forward/backward per batch: the fast adversarial-training attack of `autolora pretrain --attack fgsm_rs`.
    The random start draws from torch's global RNG.
    """

    def __init__(self, model: nn.Module, eps: float | None = None, step_size: float | None = None,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__(model, autocast_dtype)
        eps = default_eps("linf", "low") if eps is None else eps  # None: L∞'s default, as PGD's
        step_size = 1.25 * eps if step_size is None else step_size
        check_budget(eps, 1.0 if eps == 0 and step_size == 0 else step_size, 1)  # eps 0: the default step is 0, unused
        self.eps = float(eps)
        self.step_size = float(step_size)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return x
        delta = torch.empty_like(x).uniform_(-self.eps, self.eps)
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        loss = F.cross_entropy(self.model(x + delta).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [delta])
        delta = (delta.detach() + self.step_size * grad.sign()).clamp_(-self.eps, self.eps)
        return (x + delta).clamp_(0, 1).detach()
