"""Madry adversarial fine-tuning (Madry et al., 2018): CE(h(x̃), y) only, x̃ = PGD-k on CE (eval mode).

`--peft` chooses what trains (the head always does):
- `none`: every parameter (full fine-tuning);
- `bias`: the backbone's bias vectors only (BitFit-style; for ResNets the BN shifts, convs have no bias);
- `lora`: a low-rank adapter W + (1/r)·B·A on every Conv2d / Linear of the backbone (`--rank`,
  `--lora-filter`, A ~ N(0, `--lora-std`), B = 0), the backbone weights frozen. Unlike the released RoLI
  configs (both factors zero: only the head ever learns), B = 0 with a random A gives B a gradient at the
  first step and A from the second on. The exported model has ΔW merged into the weights.
In every variant the network trains in train mode, so BN running statistics follow the downstream data
(`--peft` restricts the parameters, not the buffers). `--method roli` = `--init roli --method madry_ft`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import UserError
from .base import AdversarialCE
from .lora import LORA_OPTIONS, BranchNet, LoRaBranch, check_lora_targets
from .vanilla_rft import table5_vanilla


def _biases(backbone: nn.Module) -> list:
    return [p for n, p in backbone.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]


class MadryFT(AdversarialCE):
    name = "madry_ft"

    @classmethod
    def defaults(cls, dataset):
        return table5_vanilla(dataset)

    @classmethod
    def options(cls, cfg):
        return ("peft", *(LORA_OPTIONS if cfg.peft == "lora" else ()))

    @classmethod
    def check_model(cls, model, cfg):
        if cfg.peft == "bias" and not _biases(model.backbone):
            raise UserError(f"--peft bias: arch '{model.spec.name}' has no bias parameters in its backbone: use "
                            "--peft lora or none")
        if cfg.peft == "lora":
            check_lora_targets(model.backbone, cfg.lora_filter, "--peft lora: --lora-filter")

    def build_net(self) -> nn.Module:
        peft = self.cfg.peft
        if peft == "none":
            return self.model
        backbone = self.model.backbone
        backbone.requires_grad_(False)
        if peft == "bias":
            self.check_model(self.model, self.cfg)
            for p in _biases(backbone):
                p.requires_grad_(True)
            return self.model
        try:
            branch = LoRaBranch(backbone, rank=self.cfg.rank, std=self.cfg.lora_std, name_filter=self.cfg.lora_filter)
        except ValueError as e:
            raise UserError(f"--peft lora: {e}") from None
        p = next(backbone.parameters())
        return BranchNet(self.model, branch.to(p.device))

    @property
    def is_lora(self) -> bool:
        return isinstance(self.net, BranchNet)

    def eval_model(self) -> nn.Module:
        return self.net if self.is_lora else self.model

    def export_model(self) -> nn.Module:
        if not self.is_lora:
            return self.model
        merged = copy.deepcopy(self.model)
        modules = dict(merged.backbone.named_modules())
        with torch.no_grad():
            for name in self.net.lora.targets:
                w = modules[name].weight
                w.add_(self.net.lora.delta(name).to(w.dtype))
        return merged

    def lora_parameters(self):
        return list(self.net.lora.parameters()) if self.is_lora else []
