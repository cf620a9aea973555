"""The method interface: a method owns its trainable module and its loss; the one trainer owns the loop.

A method exposes
- `net`: the nn.Module holding every trainable parameter (the classifier, plus e.g. the LoRa branch); the
  trainer may wrap it for DDP and sets `fwd` to the wrapper, so steps call `self.fwd(...)`;
- `training_step(x, y)` -> dict with a differentiable `loss` and detached statistics (timm's "task" style);
- `on_epoch_start(ctx)` -> dict of per-epoch records (e.g. AutoLoRa's λ);
- `eval_model()`: the plain classifier used for validation, test and export (no branch, no frozen BN);
- `grad_similarity(x, y)`: the paper's diagnostic (Eq. 3 / 8), or None.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..attacks import PGD
from ..losses import ce


class Method:
    name = "base"
    default_lr_schedule = "step"

    def __init__(self, model: nn.Module, cfg):
        model.requires_grad_(True)  # a previous stage (e.g. linear probing) may have frozen parts
        self.model = model
        self.cfg = cfg
        self.net = self.build_net()
        self.fwd = self.net
        self.attack = PGD(self.eval_model(), eps=cfg.eps, alpha=cfg.step_size, steps=cfg.train_steps)

    # -- structure -----------------------------------------------------------------------------
    def build_net(self) -> nn.Module:
        return self.model

    def eval_model(self) -> nn.Module:
        return self.model

    def export_model(self) -> nn.Module:
        """The classifier whose `plain_state_dict()` is written to model.safetensors."""
        return self.eval_model()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def train_mode(self) -> None:
        self.net.train()

    # -- per epoch / per step ------------------------------------------------------------------
    def on_epoch_start(self, ctx) -> dict:
        return {}

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Method state beyond `net`'s weights that a resumed run needs (e.g. the current λ)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # -- diagnostics ---------------------------------------------------------------------------
    def gradsim_objectives(self, x, y):
        """(natural objective, adversarial objective) whose θ1-gradients the GS diagnostic compares."""
        return None

    def grad_similarity(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """cos(∇θ1 natural objective, ∇θ1 adversarial objective) on one batch (AutoLoRa paper Eq. 3, 8).

        Computed in train mode, as the training step sees the objectives, with every BN buffer restored
        afterwards; θ1 = the backbone parameters that require gradients. None if the method defines no pair."""
        params = [p for p in self.model.backbone.parameters() if p.requires_grad]
        with preserved_buffers(self.net):
            self.train_mode()
            pair = self.gradsim_objectives(x, y)
            if pair is None or not params:
                return None
            nat, adv = pair
            g_nat = torch.autograd.grad(nat, params, retain_graph=True, allow_unused=True)
            g_adv = torch.autograd.grad(adv, params, allow_unused=True)
        flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                     for g, p in zip(gs, params)])
        return torch.nn.functional.cosine_similarity(flat(g_nat), flat(g_adv), dim=0).item()


class AdversarialCE(Method):
    """Madry et al. (2018): CE(h(x̃), y) only, x̃ = PGD-k on CE in eval mode. Linear probing and Madry
    fine-tuning differ only in what trains (their `build_net` / `trainable_parameters`)."""

    def training_step(self, x, y):
        logits = self.fwd(self.attack(x, y))
        loss = ce(logits, y)
        return {"loss": loss, "ce_adv": loss.detach(), "correct_adv": correct(logits, y)}


@contextmanager
def preserved_buffers(module: nn.Module):
    """Run a block and then restore every buffer (BN running statistics, counters) of `module`."""
    saved = {n: b.clone() for n, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in module.named_buffers():
                b.copy_(saved[n])


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).sum().detach()
