"""Attack base class: owns the model's mode switching and the grad / autocast / inference contexts.

Threat model in pixel space: inputs are images in [0, 1] (normalisation lives inside the model),
budgets (eps, step sizes) are in the same units.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put `model` in eval mode; restore every submodule's own `training` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """autocast at `dtype`, or autocast switched off (so a caller's autocast does not leak in)."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


@contextlib.contextmanager
def fixed_params(model: nn.Module):
    """Modules that derive weights from parameters (a LoRa branch's θ + BA, `methods.lora.LoRaBranch.fixed_params`)
    build them once for the whole attack: parameters cannot change during it."""
    with contextlib.ExitStack() as stack:
        for m in model.modules():
            fw = getattr(m, "fixed_params", None)
            if callable(fw):
                stack.enter_context(fw())
        yield


class Attack:
    """Base: runs the model in eval mode during the attack and restores every submodule's previous
    training flag afterwards (even on exceptions); gradients are taken w.r.t. the input only
    (torch.autograd.grad on the input), so parameters' .grad and BN running buffers are untouched.

    Works when called under `torch.no_grad()` or `torch.inference_mode()`, and for models whose
    parameters do or do not require grad. Forwards run in fp32 unless `autocast_dtype` is given
    (e.g. torch.bfloat16): the caller's autocast context is not inherited.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.autocast_dtype = autocast_dtype

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for the batch (x in [0, 1], integer labels y), detached."""
        with eval_mode(self.model), fixed_params(self.model), torch.inference_mode(False), torch.enable_grad(), \
                autocast_context(x.device.type, self.autocast_dtype):
            # clone outside inference mode: inference tensors cannot take part in autograd
            x = x.detach().clone()
            y = y.detach().clone()
            x_adv = self.perturb(x, y)
        return x_adv.detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Subclasses implement; called under eval mode + torch.enable_grad()."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k != "model")
        return f"{type(self).__name__}({fields})"
