"""TWINS-AT (Liu et al., CVPR 2023; `ziquanliu/CVPR2023-TWINS` `train-TWINS-AT.py`): the dual-BN network of TWINS
(`methods.twins`) trained with Madry's objective instead of TRADES. The batch is attacked as a whole (PGD on CE
against the adaptive network in eval mode) and split in halves: the first through the frozen-statistics BN, the
rest through the adaptive one, both adversarial:

    γ·CE(f_frz(x̃₁), y₁) + CE(f_ada(x̃₂), y₂)        (each CE a mean over its half; `--gamma`, Table 5 by default)

as `loss = args.lambda_twins * loss_main + loss_aux` with `loss_main` the frozen ("fixed bn") half. Validation,
attacks and export use the adaptive branch, as for TWINS-TRADES.
"""
from __future__ import annotations

import torch

from .base import correct
from .losses import ce
from .twins import Twins, split_point


class TwinsAT(Twins):
    name = "twins_at"

    @classmethod
    def options(cls, cfg):
        return ("gamma",)

    def training_step(self, x, y):
        k = split_point(y.numel())
        x_adv = self.attack(x, y)
        out = self.fwd(x_adv, split=k)
        zero = torch.zeros((), device=out.device)
        ce_frz = ce(out[:k], y[:k]) if k else zero
        ce_ada = ce(out[k:], y[k:])
        loss = self.gamma * ce_frz + ce_ada
        return {"loss": loss, "ce_frz": ce_frz.detach(), "ce_ada": ce_ada.detach(), "correct_adv": correct(out, y)}

    def gradsim_objectives(self, x, y):
        return None  # one (adversarial) objective: no natural / adversarial pair to compare
