"""The speed switches' defaults (`resolve_runtime`, written resolved into RUN_DIR/config.yaml): amp (bf16 autocast in
training, the first conv kept fp32, evaluation always fp32) on for CUDA, off on CPU; channels_last on for conv
nets on every device; compile off. `bench/throughput.py --formats` measures them (bench/results/)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..models.precision import is_conv_net


def resolve_runtime(cfg, device: torch.device, model: nn.Module):
    """`cfg` with `amp` and `channels_last` filled in for this device and model (None -> the default)."""
    # amp: on for CUDA; channels_last: on for conv nets
    return dataclasses.replace(
        cfg,
        amp=device.type == "cuda" if cfg.amp is None else bool(cfg.amp),
        channels_last=is_conv_net(model) if cfg.channels_last is None else bool(cfg.channels_last),
    )
