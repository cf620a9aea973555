"""The low-rank (LoRa) branch of AutoLoRa (Xu et al., ICLR 2024, Sec. 4.1) and its functional natural path.

Every Conv2d and Linear of the backbone (optionally narrowed by a regex on module names) gets factors
A ∈ R^{(r·kh)×(C_in/g·kw)} and B ∈ R^{(C_out·kh)×(r·kh)} (loralib's convolution factorisation: the kernel is
viewed as a (C_out·kh)×(C_in/g·kw) matrix), ΔW = (1/r)·(B·A) reshaped to the kernel. A ~ N(0, σ) and B = 0
(Algorithm 1, line 3), so at start the natural path equals the backbone; σ = 1 as in the authors' code
(`nn.init.normal_(self.lora_A_nat)`, scaling `lora_alpha / r_nat` with lora_alpha = 1).

The natural path evaluates the *same* backbone module with weights θ̄1 + ΔW through
`torch.func.functional_call`: every backbone parameter (conv/linear weights, biases, BN affine) is replaced by
its detached value, plus ΔW on the target weights. Gradients of the natural path therefore reach A, B (and
the head, which is outside the backbone) and never θ1; the plain forward has no branch at all, so the
adversarial path never touches A, B. No `requires_grad` toggling; works inside DDP because the branch's
parameters live in the wrapped module.
"""
from __future__ import annotations

import contextlib
import math
import re

import torch
import torch.nn as nn
from torch.func import functional_call


LORA_OPTIONS = ("rank", "lora_filter", "lora_std")  # the flags of a LoRa branch (AutoLoRa's and a LoRA adapter's)
LORA_ADAPTER_OPTIONS = (*LORA_OPTIONS, "lora_alpha", "lora_init", "lora_qkv")  # --peft lora's, besides


def check_lora_targets(backbone: nn.Module, name_filter: str | None, flag: str) -> None:
    """UserError when no Conv2d/Linear of `backbone` matches `name_filter` (before anything is built)."""
    from ..errors import UserError

    if not lora_targets(backbone, name_filter):
        names = [n for n, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise UserError(f"{flag} {name_filter!r} matches no Conv2d/Linear layer of the backbone (its {len(names)} "
                        f"layers are named like {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}): fix the "
                        "regular expression, or leave it out to cover every layer")


def lora_targets(backbone: nn.Module, name_filter: str | None = None) -> list[str]:
    """Names of the Conv2d / Linear modules of `backbone` that get a branch."""
    pat = re.compile(name_filter) if name_filter else None
    return [n for n, m in backbone.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and (pat is None or pat.search(n))]


def _qv_blocks(name: str, weight: torch.Tensor):
    """[("__q", (0, d)), ("__v", (2d, 3d))] for a fused qkv Linear (out = 3·d), else None."""
    if weight.dim() != 2 or not name.endswith("qkv") or weight.shape[0] % 3:
        return None
    d = weight.shape[0] // 3
    return [("__q", (0, d)), ("__v", (2 * d, 3 * d))]


def _factor_shapes(weight: torch.Tensor, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    if weight.dim() == 2:  # Linear: W is (out, in)
        out_f, in_f = weight.shape
        return (rank, in_f), (out_f, rank)
    c_out, c_in_g, kh, kw = weight.shape
    return (rank * kh, c_in_g * kw), (c_out * kh, rank * kh)


class LoRaBranch(nn.Module):
    """Factors A, B for each target layer; `delta(name)` gives ΔW in the target weight's shape.

    `alpha`: ΔW = (alpha / r) · BA (AutoLoRa's authors: alpha 1, i.e. 1/r; RoLI: alpha = r = 16, scale 1). `init`:
    A ~ N(0, std) (AutoLoRa's authors) or kaiming-uniform with a = √5 (loralib, RoLI's RanLI-LoRA); B = 0 either way.
    `qkv="qv"`: on a fused query-key-value projection (a Linear named `...qkv`, ViT/Swin attention) only the query
    and value rows get factors, as RoLI's `LoraWindowAttention` (query_lora, value_lora); the key rows stay as they
    are."""

    def __init__(self, backbone: nn.Module, rank: int = 8, std: float = 1.0, name_filter: str | None = None,
                 alpha: float = 1.0, init: str = "normal", qkv: str = "all"):
        super().__init__()
        self.rank = rank
        self.scaling = alpha / rank
        self.targets = lora_targets(backbone, name_filter)
        if not self.targets:
            raise ValueError(f"no Conv2d/Linear layer of the backbone matches the LoRa filter {name_filter!r}")
        modules = dict(backbone.named_modules())
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.shapes, self.row_blocks = {}, {}
        for name in self.targets:
            w = modules[name].weight
            blocks = _qv_blocks(name, w) if qkv == "qv" else None
            self.shapes[name] = tuple(w.shape)
            for part, rows in ([("", None)] if blocks is None else blocks):
                shape = w if rows is None else w[rows[0]:rows[1]]
                a_shape, b_shape = _factor_shapes(shape, rank)
                key = self.key(name) + part
                a = torch.empty(a_shape)
                if init == "kaiming":
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                else:
                    a.normal_(0, std)
                self.A[key] = nn.Parameter(a)
                self.B[key] = nn.Parameter(torch.zeros(b_shape))
            if blocks is not None:
                self.row_blocks[name] = blocks

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "__")

    def delta(self, name: str) -> torch.Tensor:
        k = self.key(name)
        if name not in self.row_blocks:
            return (self.B[k] @ self.A[k]).view(self.shapes[name]) * self.scaling
        out = self.B[k + "__q"].new_zeros(self.shapes[name])
        for part, (lo, hi) in self.row_blocks[name]:
            out[lo:hi] = self.B[k + part] @ self.A[k + part]
        return out * self.scaling

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @contextlib.contextmanager
    def fixed_params(self):
        """While parameters cannot change (the k steps of an attack, which needs input gradients only),
        `natural_params` merges θ̄1 + BA once, without autograd, and reuses it. Entered by `Attack`."""
        self._fixed, self._cache = True, None
        try:
            yield
        finally:
            self._fixed, self._cache = False, None

    def natural_params(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        """θ̄1 + BA for every backbone parameter (built once per forward call: one per training step; once per
        attack inside `fixed_params`)."""
        if getattr(self, "_fixed", False):
            if self._cache is None:
                with torch.no_grad():
                    self._cache = self._merge(backbone)
            return self._cache
        return self._merge(backbone)

    def _merge(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        params = {n: p.detach() for n, p in backbone.named_parameters()}
        for name in self.targets:
            w = name + ".weight"
            params[w] = params[w] + self.delta(name).to(params[w].dtype)
        return params


def branch_forward(model: nn.Module, branch: LoRaBranch, x: torch.Tensor) -> torch.Tensor:
    """h_{θ̄1+BA, θ2}(x): the classifier's preprocess, its backbone with the branch's weights, its head.
    Shared by AutoLoRa's natural path and Madry fine-tuning's LoRA adapter."""
    params = branch.natural_params(model.backbone)  # merged once per call
    return model.head(natural_features(model.backbone, params, model.preprocess(x)))


class BranchNet(nn.Module):
    """A classifier and its LoRa branch; `forward` runs h_{θ̄1+BA, θ2} (`branch_forward`). Madry fine-tuning's
    LoRA adapter as is; AutoLoRa's net adds the plain adversarial path."""

    def __init__(self, model: nn.Module, branch: LoRaBranch):
        super().__init__()
        self.model = model
        self.lora = branch

    def forward(self, x):
        return branch_forward(self.model, self.lora, x)


def natural_features(backbone: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f_{θ̄1+BA}(x): the backbone run with the natural-path parameters; buffers (BN statistics) are the module's own."""
    return functional_call(backbone, params, (x,), strict=False)
