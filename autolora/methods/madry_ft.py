"""Madry adversarial fine-tuning (Madry et al., 2018): CE(h(x̃), y) only, x̃ = PGD-k on CE (eval mode), and RoLI's
parameter-efficient family (Hua et al., CVPR 2024; `DongXzz/RoLI` `vit_models.py`).

`--peft` chooses what trains (the head always does):
- `none`: every parameter (full fine-tuning; the encoder in train mode);
- `lora`: W + (α/r)·B·A on every Conv2d / Linear of the backbone (`--rank`, `--lora-alpha`, `--lora-filter`,
  `--lora-qkv qv` for the query and value rows only, `--lora-init`), the backbone weights frozen. RoLI's released
  RoLI-LoRA configs set ZEROINIT (A = B = 0), which never learns: both factors then get a zero gradient, so only the
  head trains; here B = 0 with a random A (N(0, σ), or kaiming-uniform as their RanLI-LoRA), so B learns from the
  first step and A from the second. The exported model has ΔW merged into the weights;
- `bias`: every backbone parameter whose name contains "bias" (BN shifts of a ResNet; Swin's
  relative_position_bias_table too);
- `adapter` / `prompt`: RoLI's Pfeiffer adapters and VPT-deep (`models.peft`), exported with their modules.
With a PEFT mode the frozen encoder runs in eval mode in training (`--peft-encoder eval`, RoLI's `froze_enc`): batch
norm uses its running statistics and dropout is off (prompt dropout stays on); `--peft-encoder train` lets BN
statistics follow the downstream data. `--method roli` = `--init roli --method madry_ft`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import UserError
from ..models import peft as P
from .base import AdversarialCE
from .lora import LORA_ADAPTER_OPTIONS, BranchNet, LoRaBranch, check_lora_targets
from .vanilla_rft import table5_vanilla


class MadryFT(AdversarialCE):
    name = "madry_ft"

    @classmethod
    def defaults(cls, dataset):
        return table5_vanilla(dataset)

    @classmethod
    def options(cls, cfg):
        if cfg.peft == "none":
            return ("peft",)
        extra = LORA_ADAPTER_OPTIONS if cfg.peft == "lora" else P.PEFT_OPTIONS.get(cfg.peft, ())
        return ("peft", "peft_encoder", *extra)

    @classmethod
    def check_model(cls, model, cfg):
        if cfg.peft == "bias" and not P.bias_parameters(model.backbone):
            raise UserError(f"--peft bias: arch '{model.spec.name}' has no bias parameters in its backbone: use "
                            "--peft lora or none")
        if cfg.peft == "lora":
            check_lora_targets(model.backbone, cfg.lora_filter, "--peft lora: --lora-filter")
        P.check(model, cfg.peft)

    def build_net(self) -> nn.Module:
        cfg, backbone = self.cfg, self.model.backbone
        if cfg.peft == "none":
            return self.model
        self.check_model(self.model, cfg)
        backbone.requires_grad_(False)
        if cfg.peft == "bias":
            for p in P.bias_parameters(backbone):
                p.requires_grad_(True)
            return self.model
        if cfg.peft == "adapter":
            for a in P.add_adapters(backbone, cfg.adapter_reduction, cfg.adapter_init):
                a.requires_grad_(True)
            return self.model
        if cfg.peft == "prompt":
            P.add_prompts(backbone, cfg.prompt_tokens, cfg.prompt_dropout).requires_grad_(True)
            return self.model
        branch = LoRaBranch(backbone, rank=cfg.rank, std=cfg.lora_std, name_filter=cfg.lora_filter,
                            alpha=1.0 if cfg.lora_alpha is None else cfg.lora_alpha, init=cfg.lora_init,
                            qkv=cfg.lora_qkv)
        p = next(backbone.parameters())
        return BranchNet(self.model, branch.to(p.device))

    def train_mode(self) -> None:
        self.net.train()
        if self.cfg.peft != "none" and self.cfg.peft_encoder == "eval":
            self.model.backbone.eval()
            dropout = getattr(self.model.backbone, "vpt_dropout", None)
            if dropout is not None:
                dropout.train()

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
