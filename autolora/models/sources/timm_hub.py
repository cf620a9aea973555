"""`timm:NAME[.TAG]` — timm's pretrained weights, e.g. `timm:vit_base_patch16_224.augreg_in21k_ft_in1k` (no TAG:
timm's default tag for NAME).

The tag's pretrained config says where the weights are, in timm's order: a `file` (set through
`pretrained_cfg_overlay=dict(file=...)` of the Python API), else its Hugging Face repo (`hf_hub_id`, the file
`hf_hub_filename` or `model.safetensors`, else `pytorch_model.bin`, as timm's `load_state_dict_from_hf`), else its
`url` (torch hub's cache, as timm's `download_cached_file`). The file is read by autolora's safe loader and given to
`timm.create_model(NAME.TAG, pretrained=True, pretrained_cfg_overlay=dict(state_dict=...))` with the tag's own
number of classes, so timm applies the model's checkpoint filter (a ViT's position embeddings resampled to the
built input size, older layouts converted) and loads strictly; the head is then dropped. The backbone takes the
tag's mean and std.
"""
from __future__ import annotations

import dataclasses
import os

from ...errors import UserError, suggest
from ..archs import canonical_arch
from . import Ref
from .hub import hf_file, reason, torch_hub_file

EXAMPLE = "timm:vit_base_patch16_224.augreg_in21k_ft_in1k"


def parse(name: str) -> Ref:
    import timm
    from timm.models import get_pretrained_cfg

    full = name.strip()
    base, _, tag = full.partition(".")
    if not timm.is_model(base):
        raise UserError(f"unknown weights 'timm:{name}': timm has no model '{base}'"
                        f"{suggest(base, timm.list_models())}; e.g. {EXAMPLE}")
    tags = timm.list_pretrained(f"{base}.*")
    if not tags:
        raise UserError(f"timm has no pretrained weights for '{base}': pass --arch {base} for a random backbone, "
                        "or another model")
    if not tag:  # timm's default tag: the one whose config get_pretrained_cfg(base) gives
        default = get_pretrained_cfg(base)
        full = next((t for t in tags if get_pretrained_cfg(t) == default), tags[0])
    elif full not in tags:
        raise UserError(f"unknown weights 'timm:{name}'{suggest(full, tags)}: {base}'s pretrained tags are "
                        f"{', '.join(t.split('.', 1)[1] for t in tags)}")
    return Ref("timm", full, canonical_arch("timm", base), tag=full.split(".", 1)[1])


def _cfg(ref: Ref, overlay: dict | None):
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(ref.name)
    return dataclasses.replace(cfg, **overlay) if overlay else cfg


def fetch(ref: Ref, cache_dir: str | None = None, overlay: dict | None = None) -> str:
    cfg = _cfg(ref, overlay)
    if cfg.file:
        if not os.path.isfile(cfg.file):
            raise UserError(f"timm weights file '{cfg.file}' not found: pass an existing file")
        return cfg.file
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        return hf_file(repo, cfg.hf_hub_filename or "model.safetensors", arch=ref.arch, cache_dir=cache_dir,
                       revision=revision or None, fallback=None if cfg.hf_hub_filename else "pytorch_model.bin")
    if cfg.url and not cfg.custom_load:
        return torch_hub_file(cfg.url)
    raise UserError(f"timm's weights '{ref.name}' are only published as {cfg.url or 'nothing'}, which needs timm's "
                    "own .npz loader: choose another tag")


def prepare(ref: Ref, sd: dict, model) -> dict:
    """timm's filter and strict load of `sd` into NAME.TAG built like `model.backbone`; its state dict (with head)."""
    import timm

    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    cfg = _cfg(ref, None)
    size = {"img_size": model.spec.img_size} if model.spec.img_size else {}
    try:
        net = timm.create_model(ref.name, pretrained=True, num_classes=cfg.num_classes, **size,
                                pretrained_cfg_overlay=dict(state_dict=sd, file=None))
    except RuntimeError as e:  # load_state_dict(strict=True): "Error(s) in loading ...:\n\tMissing key(s) ..."
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:300] or reason(e)
        raise UserError(f"weights '{ref}' do not fit timm's {ref.name}: {detail}") from None
    return net.state_dict()
