"""Adversarial linear probing (Madry-style; stage 1 of RoLI, Hua et al., CVPR 2024).

The backbone is frozen (no gradient) and kept in eval mode, so its BN statistics never change; only the
linear head θ2 trains, on CE(h(x̃), y) with x̃ = PGD-k on CE (eval mode). The trainer keeps the head of the
epoch with the best validation PGD-10 accuracy; with `--init roli` the next stage starts from it.
"""
import torch.nn as nn

from .base import AdversarialCE
from .vanilla_rft import table5_vanilla


class LinearProbe(AdversarialCE):
    name = "linear_probe"

    @classmethod
    def defaults(cls, dataset):
        return table5_vanilla(dataset)

    def build_net(self) -> nn.Module:
        self.model.backbone.requires_grad_(False)
        return self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.head.parameters())

    def train_mode(self) -> None:
        self.net.train()
        self.model.backbone.eval()  # frozen features: running statistics used, never updated
