"""The method interface: a method owns its trainable module and its loss; the one trainer owns the loop.

A method exposes
- `net`: the nn.Module holding every trainable parameter (the classifier, plus e.g. the LoRa branch); the
  trainer may wrap it for DDP and sets `fwd` to the wrapper, so steps call `self.fwd(...)`;
- `training_step(x, y)` -> dict with a differentiable `loss` and detached statistics (timm's "task" style);
- `on_epoch_start(ctx)` -> dict of per-epoch records (e.g. AutoLoRa's λ);
- `eval_model()`: the plain classifier used for validation, test and export (no branch, no frozen BN);
- `grad_similarity(x, y, per_example)`: the paper's diagnostic (Eq. 3, 4, 8), or None.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..attacks.registry import train_attack
from ..models.precision import keep_first_conv_fp32
from ..utils import dist
from .losses import ce


class Method:
    """A robust fine-tuning method. Besides the loss it declares what it needs from a run's config:

    - `defaults(dataset)`: its presets (lr, weight_decay, lr_schedule, ...) for a dataset, filled in where the user
      gave none (`autolora.methods.resolve_config`); the base gives η0 = 0.01, weight decay 1e-4, the step schedule;
    - `options(cfg)`: the method-specific flags it reads (e.g. TWINS' gamma); a method-specific flag that a run's
      method does not read is refused, so it cannot be ignored silently;
    - `check_model(model, cfg)`: refuse a model it cannot train (TWINS without batch norm, a LoRa filter that
      matches nothing), before the run directory is touched;
    - `lora_parameters()`: the parameters of a low-rank branch, if any (counted in results.json).
    """

    name = "base"
    default_lr_schedule = "step"

    @classmethod
    def defaults(cls, dataset: str) -> dict:
        return {"lr": 1e-2, "weight_decay": 1e-4, "lr_schedule": cls.default_lr_schedule}

    @classmethod
    def options(cls, cfg) -> tuple[str, ...]:
        return ()

    @classmethod
    def check_model(cls, model: nn.Module, cfg) -> None:
        pass

    def __init__(self, model: nn.Module, cfg):
        model.requires_grad_(True)  # a previous stage (e.g. linear probing) may have frozen parts
        self.model = model
        self.cfg = cfg
        self.net = self.build_net()
        self.fwd = self.net
        self.attack = train_attack(cfg.train_attack, self.eval_model(), eps=cfg.eps, step_size=cfg.step_size,
                                   steps=cfg.train_steps, norm=cfg.norm, keep=cfg.pgd_keep)

    # -- structure -----------------------------------------------------------------------------
    def build_net(self) -> nn.Module:
        return self.model

    def eval_model(self) -> nn.Module:
        return self.model

    def export_model(self) -> nn.Module:
        """The classifier whose `plain_state_dict()` is written to model.safetensors."""
        return self.eval_model()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]

    def lora_parameters(self) -> list[nn.Parameter]:
        """The parameters of a low-rank branch (AutoLoRa's, or a LoRA adapter); none by default."""
        return []

    def train_mode(self) -> None:
        self.net.train()

    def prepare(self, device: torch.device, *, amp: bool = False, channels_last: bool = False, compile: bool = False,
                sync_bn: bool = False) -> None:
        """Put the method on `device` with the run's switches: fp32 first conv and bf16 training attack under amp,
        channels_last, SyncBatchNorm (CUDA DDP only), DDP wrapping of `net` as `fwd` under torchrun, and
        torch.compile. The attack keeps running the *unwrapped* eval model (no DDP hooks in its k passes)."""
        if amp:
            keep_first_conv_fp32(self.model)
            self.attack.autocast_dtype = torch.bfloat16
        if sync_bn and dist.is_dist():
            nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        self.net.to(device)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        fwd = self.net
        if dist.is_dist():
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Two forwards (natural + adversarial) before one backward work with the default reducer: each
            # parameter's gradient is accumulated over both uses before its hook fires, and every trainable
            # parameter is reached (AutoLoRa's natural path reaches A, B and the head; the adversarial one θ).
            fwd = DDP(self.net, device_ids=[device.index] if device.type == "cuda" else None,
                      gradient_as_bucket_view=True)
        if compile:
            fwd = torch.compile(fwd)
            self.attack.model = torch.compile(self.attack.model)
        self.fwd = fwd

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
        """(natural objective, adversarial objective) whose θ1-gradients the GS diagnostic compares, each as a
        vector of per-example terms whose sum is the batch objective (up to a positive factor); None if the
        method defines no pair."""
        return None

    def grad_similarity(self, x: torch.Tensor, y: torch.Tensor, per_example: bool = False):
        """The paper's gradient similarity (Eq. 3, 4, 8): cos(∇θ1 natural objective, ∇θ1 adversarial objective).

        `per_example=False`: one cosine of the batch-objective gradients (a float). `per_example=True`: the
        cosine of each example's own two gradients (a list of floats; the paper averages these over the
        data), computed with batched vector-Jacobian products, B× the backward work of the batch form.
        Both run in train mode, as the training step sees the objectives (batch statistics, so an example's
        terms depend on its batch), with every BN buffer restored afterwards; θ1 = the backbone parameters
        that require gradients. None if the method defines no pair."""
        params = [p for p in self.model.backbone.parameters() if p.requires_grad]
        with preserved_buffers(self.net):
            self.train_mode()
            pair = self.gradsim_objectives(x, y)
            if pair is None or not params:
                return None
            nat, adv = pair
            if per_example:
                return per_example_cosines(nat, adv, params).tolist()
            g_nat = torch.autograd.grad(nat.sum(), params, retain_graph=True, allow_unused=True)
            g_adv = torch.autograd.grad(adv.sum(), params, allow_unused=True)
        flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                     for g, p in zip(gs, params)])
        return torch.nn.functional.cosine_similarity(flat(g_nat), flat(g_adv), dim=0).item()


def per_example_cosines(nat: torch.Tensor, adv: torch.Tensor, params, chunk: int = 16) -> torch.Tensor:
    """cos(∇ nat[i], ∇ adv[i]) w.r.t. `params` for every example i of the per-example loss vectors `nat`, `adv`
    (one graph). Per-example gradients come from `autograd.grad(..., is_grads_batched=True)` with one-hot
    grad_outputs, `chunk` examples at a time (memory: chunk × |params| per objective)."""
    n = nat.numel()
    eye = torch.eye(n, device=nat.device, dtype=nat.dtype)
    dot, nn_, aa = (torch.zeros(n, dtype=torch.float64, device=nat.device) for _ in range(3))
    for i in range(0, n, chunk):
        go = eye[i:i + chunk]
        g_nat = torch.autograd.grad(nat, params, grad_outputs=go, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
        g_adv = torch.autograd.grad(adv, params, grad_outputs=go, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
        for a, b in zip(g_nat, g_adv):
            a = a.flatten(1).double() if a is not None else None
            b = b.flatten(1).double() if b is not None else None
            if a is not None:
                nn_[i:i + chunk] += (a * a).sum(1)
            if b is not None:
                aa[i:i + chunk] += (b * b).sum(1)
            if a is not None and b is not None:
                dot[i:i + chunk] += (a * b).sum(1)
    return (dot / (nn_ * aa).sqrt().clamp_min(1e-30)).float()


class AdversarialCE(Method):
    """Madry et al. (2018): CE(h(x̃), y) only, x̃ = the training attack (PGD-k, or FGSM-RS) in eval mode. Linear
    probing, Madry fine-tuning and adversarial pre-training differ only in what trains and where it starts."""

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
