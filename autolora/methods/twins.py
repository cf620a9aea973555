"""TWINS-TRADES (Liu et al., CVPR 2023; AutoLoRa paper Eq. 2, the TRADES version the paper compares with).

Every BatchNorm2d of the backbone becomes a `DualBN`: two copies of the pretrained layer, each with its own
trainable affine parameters,
- `frz`: always normalises with the pretrained running statistics, which are never updated (bit-identical
  through training);
- `ada`: an ordinary batch norm (batch statistics in training, running statistics updated and used in eval).

In training the batch is split: the first ⌊B/2⌋ examples go through the frozen branch, the rest through the
adaptive one (one forward; every BN layer splits the batch at the same index); the adversarial forward comes first,
then the natural one, as in the authors' script. Loss, as in the authors' code:

    γ·CE(f_frz(x₁), y₁) + CE(f_ada(x₂), y₂) + (β/B)·[γ·KL_sum(p_frz(x₁) ‖ p_frz(x̃₁)) + KL_sum(p_ada(x₂) ‖ p_ada(x̃₂))]

with β = 6 (`--beta`), γ from Table 5 (`--gamma`), B the whole batch, x̃ = PGD-k on CE against the adaptive
network in eval mode. Validation, attacks and the exported model use the adaptive branch only; the export is a
plain classifier (the adaptive BN layers put back as BatchNorm2d), so model.safetensors loads into the plain
torchvision / timm / tiny model.

Odd batches: the adaptive half holds the extra example. A batch of fewer than 3 examples goes wholly through
the adaptive branch (a 1-example adaptive half would break train-mode batch norm on 1×1 feature maps).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import UserError
from .losses import ce_rows, kl_rows
from .base import Method, correct


class DualBN(nn.Module):
    """A frozen-statistics branch and an adaptive branch of one pretrained BatchNorm2d.

    `split = k` sends samples [0, k) through `frz` and [k, B) through `ada`; `split = None` (the default,
    also in eval) uses `ada` for everything."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        if not bn.track_running_stats or bn.running_mean is None:
            raise UserError("TWINS needs the pretrained running statistics of every BatchNorm2d; "
                            "this backbone's batch norm does not track them")
        self.frz = copy.deepcopy(bn)
        self.ada = copy.deepcopy(bn)
        self.frz.eval()
        self.split: int | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.frz.train(False)  # eval-mode BN: normalise with running statistics, never update them
        return self

    def _frozen(self, x):
        if self.frz.training:  # someone set the flag directly; the frozen branch never runs in train mode
            self.frz.train(False)
        return self.frz(x)

    def forward(self, x):
        k = self.split
        if k is None or k <= 0:
            return self.ada(x)
        if k >= x.shape[0]:
            return self._frozen(x)
        return torch.cat([self._frozen(x[:k]), self.ada(x[k:])], 0)


def convert_dual_bn(module: nn.Module) -> int:
    """Replace every BatchNorm2d under `module` by a DualBN (idempotent); returns the number of DualBN layers."""
    n = 0
    for name, child in module.named_children():
        if isinstance(child, DualBN):
            n += 1
        elif isinstance(child, nn.BatchNorm2d):
            setattr(module, name, DualBN(child))
            n += 1
        else:
            n += convert_dual_bn(child)
    return n


def revert_dual_bn(module: nn.Module) -> None:
    """Put each DualBN's adaptive branch back in its place (in place)."""
    for name, child in module.named_children():
        if isinstance(child, DualBN):
            setattr(module, name, child.ada)
        else:
            revert_dual_bn(child)


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.BatchNorm2d, DualBN)) for m in module.modules())


class TwinsNet(nn.Module):
    """The classifier with dual BN; `forward(x, split=k)` routes [0, k) through the frozen branch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _duals(self):
        return [m for m in self.model.modules() if isinstance(m, DualBN)]

    def forward(self, x, split: int | None = None):
        duals = self._duals()
        for m in duals:
            m.split = split
        try:
            return self.model(x)
        finally:
            for m in duals:
                m.split = None


def split_point(batch: int) -> int:
    """Number of examples for the frozen branch: ⌊B/2⌋, or 0 for batches of fewer than 3."""
    return batch // 2 if batch >= 3 else 0


# Appendix A, Table 5 of the AutoLoRa paper: (η0, weight decay, γ) of TWINS per dataset.
TABLE5_TWINS = {
    "cifar10": (1e-2, 1e-4, 1.0), "cifar100": (1e-2, 1e-4, 1.0), "dtd": (1e-3, 1e-4, 1.0),
    "dogs120": (3e-3, 1e-4, 1.0), "cub200": (1e-2, 1e-4, 3.0), "caltech256": (3e-3, 1e-4, 1.0),
}


class Twins(Method):
    name = "twins"

    @classmethod
    def defaults(cls, dataset):
        lr, wd, gamma = TABLE5_TWINS.get(dataset, (1e-2, 1e-4, 1.0))
        return {"lr": lr, "weight_decay": wd, "gamma": gamma, "lr_schedule": "step"}

    @classmethod
    def options(cls, cfg):
        return ("beta", "gamma")

    @classmethod
    def check_model(cls, model: nn.Module, cfg=None) -> None:
        if not has_batchnorm(model.backbone):
            arch = getattr(getattr(model, "spec", None), "name", "this backbone")
            raise UserError(f"TWINS needs batch normalisation, but arch '{arch}' has no BatchNorm2d layer "
                            "(ViT/DeiT use LayerNorm): use vanilla_rft, autolora or madry_ft with this backbone")

    def build_net(self):
        self.check_model(self.model, self.cfg)
        convert_dual_bn(self.model.backbone)
        return TwinsNet(self.model)

    @property
    def gamma(self) -> float:
        return 1.0 if self.cfg.gamma is None else float(self.cfg.gamma)

    def _losses(self, nat, adv, y):
        """Per-example terms of the TWINS-TRADES loss: (natural, adversarial before β) vectors whose sums are the
        natural objective γ·CE_frz + CE_ada (each CE a mean over its half) and the adversarial one
        (γ·KL_frz + KL_ada) / B, plus the four batch terms for logging."""
        b = y.numel()
        k = split_point(b)
        g = self.gamma
        ce_i, kl_i = ce_rows(nat, y), kl_rows(adv, nat)
        w_nat = torch.cat([torch.full((k,), g / max(k, 1)), torch.full((b - k,), 1.0 / (b - k))]).to(ce_i)
        w_adv = torch.cat([torch.full((k,), g / b), torch.full((b - k,), 1.0 / b)]).to(kl_i)
        zero = torch.zeros((), device=nat.device)
        terms = (ce_i[:k].mean() if k else zero, ce_i[k:].mean(), kl_i[:k].sum() if k else zero, kl_i[k:].sum())
        return w_nat * ce_i, w_adv * kl_i, terms

    def training_step(self, x, y):
        k = split_point(y.numel())
        x_adv = self.attack(x, y)  # PGD against the adaptive network in eval mode
        # the authors' order (train-TWINS-TRADES.py: `outputs = model(images)` before `model(nature_images)`): the
        # adaptive BN's running statistics see the adversarial half first, then the natural one
        adv = self.fwd(x_adv, split=k)
        nat = self.fwd(x, split=k)
        nat_rows, adv_rows, (ce_frz, ce_ada, kl_frz, kl_ada) = self._losses(nat, adv, y)
        loss = nat_rows.sum() + self.cfg.beta * adv_rows.sum()
        return {"loss": loss, "ce_frz": ce_frz.detach(), "ce_ada": ce_ada.detach(), "kl_frz": kl_frz.detach(),
                "kl_ada": kl_ada.detach(), "correct_nat": correct(nat, y), "correct_adv": correct(adv, y)}

    def gradsim_objectives(self, x, y):
        """Eq. 4: the natural CE terms vs the KL terms of both branches, w.r.t. the backbone θ1
        (γ weights the frozen branch's terms, as in the loss)."""
        k = split_point(y.numel())
        x_adv = self.attack(x, y)
        self.train_mode()
        adv = self.net(x_adv, split=k)
        nat = self.net(x, split=k)
        nat_rows, adv_rows, _ = self._losses(nat, adv, y)
        return nat_rows, adv_rows

    def eval_model(self) -> nn.Module:
        return self.model  # DualBN defaults to the adaptive branch

    def export_model(self) -> nn.Module:
        plain = copy.deepcopy(self.model)
        revert_dual_bn(plain.backbone)
        return plain
