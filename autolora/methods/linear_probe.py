"""Adversarial linear probing (Madry-style; stage 1 of RoLI, Hua et al., CVPR 2024).

The backbone is frozen (no gradient) and kept in eval mode, so its BN statistics never change; only the
linear head θ2 trains, on CE(h(x̃), y) with x̃ = PGD-k on CE (eval mode). The trainer keeps the head of the
epoch with the best validation PGD-10 accuracy; with `--init roli` the next stage starts from it.
"""
import torch.nn as nn

from ..losses import ce
from .base import Method, correct


class LinearProbe(Method):
    name = "linear_probe"

    def build_net(self) -> nn.Module:
        self.model.backbone.requires_grad_(False)
        return self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.head.parameters())

    def train_mode(self) -> None:
        self.net.train()
        self.model.backbone.eval()  # frozen features: running statistics used, never updated

    def training_step(self, x, y):
        x_adv = self.attack(x, y)
        logits = self.fwd(x_adv)
        loss = ce(logits, y)
        return {"loss": loss, "ce_adv": loss.detach(), "correct_adv": correct(logits, y)}
