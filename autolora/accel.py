"""Speed switches of a training run, shared by the trainer and `bench/throughput.py`.

- `amp`: bf16 autocast for the training step, the training attack included (`Attack.autocast_dtype`). The
  backbone's first convolution (stem conv / patch embedding) stays fp32: the input perturbation moves pixels
  in [0, 1] by 2/255 per step, and bf16 keeps 8 significant bits, so rounding the normalised input before the
  first layer would erase part of it (and of the input gradient). Losses are computed in fp32 (`losses.py`).
  Evaluation (validation, AutoLoRa's SA pass, test) always runs in fp32.
- `channels_last`: NHWC memory format for conv nets (model and input batches).
- `compile`: `torch.compile` of the training forward (the DDP wrapper under torchrun) and of the model the
  training attack runs, so the attack's k forward + input-backward passes run compiled too.

Defaults (`resolve_runtime`, written resolved into RUN_DIR/config.yaml): channels_last on for conv nets on
every device; amp on for CUDA, off on CPU. Measured on the development CPU (AMD EPYC, AVX2, no AVX512-BF16 /
AMX; bench/results/throughput_formats_*_cpu.md), a vanilla RFT step with PGD-10 was 10-25x *slower* under bf16
autocast than in fp32 (bf16 convolutions are emulated there), and channels_last made the fp32 step 1.15-1.3x
faster (tiny and resnet18). A CPU with native bf16 (AMX) may differ: `--amp` turns it on, and
`python bench/throughput.py --formats` re-measures.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import distributed as D


# ------------------------------------------------------------------------------------------------
# fp32 first layer under autocast
# ------------------------------------------------------------------------------------------------
class FP32FirstLayer:
    """Mixin for the first conv: under autocast it runs in fp32 (input and weight), autocast switched off."""

    def forward(self, x):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class FP32Conv2d(FP32FirstLayer, nn.Conv2d):
    pass


_FP32_CLASSES: dict[type, type] = {nn.Conv2d: FP32Conv2d}


def _fp32_class(cls: type) -> type:
    if cls not in _FP32_CLASSES:
        new = type(f"FP32{cls.__name__}", (FP32FirstLayer, cls), {"__module__": __name__})
        globals()[new.__name__] = new  # picklable by name
        _FP32_CLASSES[cls] = new
    return _FP32_CLASSES[cls]


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first Conv2d of the backbone in registration order (stem conv, ViT patch embedding)."""
    root = getattr(model, "backbone", model)
    return next((m for m in root.modules() if isinstance(m, nn.Conv2d)), None)


def keep_first_conv_fp32(model: nn.Module) -> nn.Module | None:
    """Make the backbone's first conv run in fp32 under autocast (in place: its class is swapped for a subclass
    with the same parameters and state-dict keys). Returns the layer, or None if the backbone has no conv."""
    conv = first_conv(model)
    if conv is not None and not isinstance(conv, FP32FirstLayer):
        conv.__class__ = _fp32_class(type(conv))
    return conv


# ------------------------------------------------------------------------------------------------
# defaults
# ------------------------------------------------------------------------------------------------
def is_conv_net(model: nn.Module) -> bool:
    """More than one Conv2d in the backbone (a ViT's patch embedding alone does not count)."""
    root = getattr(model, "backbone", model)
    return sum(isinstance(m, nn.Conv2d) for m in root.modules()) > 1


def default_amp(device: torch.device) -> bool:
    return device.type == "cuda"


def default_channels_last(device: torch.device, model: nn.Module) -> bool:
    return is_conv_net(model)  # faster on CUDA and, measured, on the CPU too (see the module docstring)


def resolve_runtime(cfg, device: torch.device, model: nn.Module):
    """`cfg` with `amp` and `channels_last` filled in for this device and model (None -> the default)."""
    import dataclasses

    return dataclasses.replace(
        cfg,
        amp=default_amp(device) if cfg.amp is None else bool(cfg.amp),
        channels_last=default_channels_last(device, model) if cfg.channels_last is None else bool(cfg.channels_last),
    )


# ------------------------------------------------------------------------------------------------
# per-stage set-up of a method
# ------------------------------------------------------------------------------------------------
def prepare_method(method, device: torch.device, *, amp: bool, channels_last: bool, compile: bool = False,
                   sync_bn: bool = False) -> None:
    """Put `method` on `device` with the run's switches: fp32 first conv and bf16 training attack under amp,
    channels_last, SyncBatchNorm (CUDA DDP only), DDP wrapping of `method.net` as `method.fwd` under torchrun,
    and torch.compile. The attack keeps running the *unwrapped* eval model (no DDP hooks in its k passes)."""
    if amp:
        keep_first_conv_fp32(method.model)
        method.attack.autocast_dtype = torch.bfloat16
    if sync_bn and D.is_dist():
        nn.SyncBatchNorm.convert_sync_batchnorm(method.net)
    method.net.to(device)
    if channels_last:
        method.net.to(memory_format=torch.channels_last)
    fwd = method.net
    if D.is_dist():
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Two forwards (natural + adversarial) before one backward work with the default reducer: each
        # parameter's gradient is accumulated over both uses before its hook fires, and every trainable
        # parameter is reached (AutoLoRa's natural path reaches A, B and the head; the adversarial one θ).
        fwd = DDP(method.net, device_ids=[device.index] if device.type == "cuda" else None,
                  gradient_as_bucket_view=True)
    if compile:
        fwd = torch.compile(fwd)
        method.attack.model = torch.compile(method.attack.model)
    method.fwd = fwd
