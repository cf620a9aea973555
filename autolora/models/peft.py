"""RoLI's parameter-efficient fine-tuning family besides LoRA (Hua et al., CVPR 2024; `DongXzz/RoLI`
`src/models/vit_adapter`, `vit_prompt`, `vit_models.py`), on timm's ViT and Swin blocks:

- **Adapter** (Pfeiffer style, reduction 8): after each block's MLP, in series, before its residual add:
  h ← h + up(gelu(down(h))) with h the MLP's output (`adpt = up(act(down(x))); x = adpt + x; x = shortcut + x`).
  `init="learn"`: down as nn.Linear initialises it, up zero (the block starts unchanged and every tensor can learn);
  `init="authors"`: all four tensors zero, as RoLI's code (`nn.init.zeros_` on both weights and biases), where
  gelu(0) = 0 leaves only the up-projection's bias a gradient.
- **VPT-deep** (Jia et al. 2022) on a timm VisionTransformer: `tokens` learnable prompts per block, inserted after the
  prefix (class) tokens; before every later block the previous block's prompt outputs are replaced by that block's
  own prompts; the prompts are dropped before the final norm, so pooling reads the class token as usual. Init
  uniform(±√(6 / (3·patch² + dim))) (VPT's), dropout on the prompts (active in training even when the encoder is in
  eval mode, as RoLI's `PromptedSwinTransformer.train`).
- **Bias** tuning: every backbone parameter whose name contains "bias" (RoLI: `if 'bias' not in k: requires_grad =
  False`), Swin's relative_position_bias_table included.

Modules are added in place (a class swap keeps the original parameters' state-dict keys): adapters as
`<block>.mlp.adapter.*`, prompts as `vpt_prompts` on the backbone. `describe(backbone)` records them for export.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

PEFT_OPTIONS = {  # the flags each --peft mode reads (besides --peft-encoder)
    "adapter": ("adapter_reduction", "adapter_init"),
    "prompt": ("prompt_tokens", "prompt_dropout"),
}


class Adapter(nn.Module):
    """down (dim → dim/reduction), GELU, up (→ dim)."""

    def __init__(self, dim: int, reduction: int = 8, init: str = "learn"):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if init == "authors":
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)

    def forward(self, h):
        return self.up(F.gelu(self.down(h)))


class AdapterMlp:
    """Mixin swapped onto a block's MLP: its output h becomes h + adapter(h)."""

    def forward(self, x):
        h = super().forward(x)
        return h + self.adapter(h)


_SWAPPED: dict[type, type] = {}


def _with(mixin: type, cls: type) -> type:
    key = (mixin, cls)
    if key not in _SWAPPED:
        new = type(f"{mixin.__name__}_{cls.__name__}", (mixin, cls), {"__module__": __name__})
        globals()[new.__name__] = new  # picklable by name
        _SWAPPED[key] = new
    return _SWAPPED[key]


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The blocks of a timm ViT or Swin (modules with `mlp` and `norm2`), in order."""
    return [m for m in backbone.modules() if hasattr(m, "mlp") and hasattr(m, "norm2") and hasattr(m, "norm1")]


def is_vit(backbone: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(backbone, VisionTransformer)


def check(model, peft: str) -> None:
    """UserError when the backbone has no place for the PEFT mode (before anything is built)."""
    bb, arch = model.backbone, model.spec.name
    if peft == "adapter" and not transformer_blocks(bb):
        raise UserError(f"--peft adapter: arch '{arch}' has no transformer blocks (ViT/Swin) to put adapters in; "
                        "RoLI's code has no convolutional adapter: use --peft lora or bias for a conv net")
    if peft == "prompt" and not is_vit(bb):
        raise UserError(f"--peft prompt (VPT-deep) is implemented for timm VisionTransformer backbones; arch '{arch}' "
                        "is not one (Swin's window attention needs prompts in every window, which this does not do): "
                        "use --peft lora, bias or adapter")


def add_adapters(backbone: nn.Module, reduction: int, init: str) -> list[Adapter]:
    out = []
    for block in transformer_blocks(backbone):
        mlp = block.mlp
        dim = mlp.fc2.out_features if hasattr(mlp, "fc2") else block.norm2.normalized_shape[0]
        mlp.adapter = Adapter(dim, reduction, init).to(next(mlp.parameters()).device)
        mlp.__class__ = _with(AdapterMlp, type(mlp))
        out.append(mlp.adapter)
    return out


class PromptedViT:
    """Mixin swapped onto a timm VisionTransformer: VPT-deep `forward_features` (see the module docstring)."""

    def forward_features(self, x, attn_mask=None, is_causal=False):
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        p, b = self.num_prefix_tokens, x.shape[0]
        t = self.vpt_prompts.shape[1]
        for i, blk in enumerate(self.blocks):
            prompts = self.vpt_dropout(self.vpt_prompts[i]).unsqueeze(0).expand(b, -1, -1).to(x.dtype)
            rest = x[:, p:] if i == 0 else x[:, p + t:]
            x = blk(torch.cat([x[:, :p], prompts, rest], dim=1))
        x = torch.cat([x[:, :p], x[:, p + t:]], dim=1)
        return self.norm(x)


def add_prompts(backbone: nn.Module, tokens: int, dropout: float) -> nn.Parameter:
    patch = backbone.patch_embed.patch_size
    patch = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
    dim = backbone.embed_dim
    val = math.sqrt(6.0 / float(3 * patch + dim))
    backbone.vpt_prompts = nn.Parameter(torch.empty(len(backbone.blocks), tokens, dim).uniform_(-val, val))
    backbone.vpt_dropout = nn.Dropout(dropout)
    backbone.__class__ = _with(PromptedViT, type(backbone))
    return backbone.vpt_prompts


def bias_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in backbone.named_parameters() if "bias" in n]


def describe(backbone: nn.Module) -> dict | None:
    """What was added (for model.safetensors' metadata), or None for a plain backbone."""
    blocks = [b for b in transformer_blocks(backbone) if hasattr(b.mlp, "adapter")]
    if blocks:
        a = blocks[0].mlp.adapter
        return {"mode": "adapter", "hidden": a.down.out_features, "dim": a.down.in_features}
    if hasattr(backbone, "vpt_prompts"):
        return {"mode": "prompt", "tokens": int(backbone.vpt_prompts.shape[1]), "dropout": backbone.vpt_dropout.p}
    return None


def restore(backbone: nn.Module, peft: dict) -> None:
    """Re-add what `describe` recorded, so an exported model with adapters or prompts loads (`models.export`)."""
    if peft["mode"] == "adapter":
        add_adapters(backbone, max(1, peft["dim"] // peft["hidden"]), "learn")
    elif peft["mode"] == "prompt":
        add_prompts(backbone, peft["tokens"], peft["dropout"])
    else:
        raise UserError(f"unknown PEFT record {peft!r} in the model file: re-export it with autolora")
