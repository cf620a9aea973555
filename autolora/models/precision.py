"""The fp32 first layer under bf16 autocast, and what counts as a conv net (for channels_last).

Under `--amp` the backbone's first convolution (stem conv / ViT patch embedding) stays fp32: the input
perturbation moves pixels in [0, 1] by 2/255 per step, and bf16 keeps 8 significant bits, so rounding the
normalised input before the first layer would erase part of it (and of the input gradient).
"""
from __future__ import annotations

import torch
import torch.nn as nn


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


def is_conv_net(model: nn.Module) -> bool:
    """More than one Conv2d in the backbone (a ViT's patch embedding alone does not count)."""
    root = getattr(model, "backbone", model)
    return sum(isinstance(m, nn.Conv2d) for m in root.modules()) > 1


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated and slow."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without these probes: assume emulation
        return False
