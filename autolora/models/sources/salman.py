"""`salman:` — the adversarially robust ImageNet models of Salman et al., "Do Adversarially Robust ImageNet Models
Transfer Better?" (NeurIPS 2020), every file of Hugging Face repo `madrylab/robust-imagenet-models`.

The file names are those of microsoft/robust-models-transfer's README tables (the same names on the HF model card):
`{arch}_{l2|linf}_eps{e}.ckpt`, L2 ε as the table writes it without a trailing `.0` (`resnet18_l2_eps3.ckpt`,
`resnet50_l2_eps0.01.ckpt`), L∞ ε in units of 1/255 with one decimal (`resnet50_linf_eps4.0.ckpt`) except the
standard models `resnet18_linf_eps0.ckpt` / `resnet50_linf_eps0.ckpt` (in the repo's upload commit 19f056c, not in
the README). `wide_resnet50_2_linf_eps0` and any `wide_resnet50_4_linf_*` are not listed anywhere, so they are not
offered. A shortcut drops `.ckpt` and L∞'s `.0`: `salman:resnet50_linf_eps4`, `salman:resnet18_l2_eps3`.

The files are robustness-library checkpoints (`weights.py` reads them safely and keeps `module.model.*`). The
wide ResNets are torchvision's `wide_resnet50_2` and `wide_resnet50_4` (ResNet-50 with width_per_group 256, the
robustness library's definition); the other architectures of the README's second table were trained as
torchvision models wrapped once more (`module.model.model.*`): densenet = densenet161, mnasnet = mnasnet1_0,
mobilenet = mobilenet_v2, shufflenet = shufflenet_v2_x1_0, plus resnext50_32x4d and vgg16_bn.
"""
from __future__ import annotations

import re

from ...errors import UserError, suggest
from . import Ref
from .hub import hf_file

REPO = "madrylab/robust-imagenet-models"
EXAMPLE = "salman:resnet50_l2_eps3"

_L2_GRID = ("0", "0.01", "0.03", "0.05", "0.1", "0.25", "0.5", "1", "3", "5")
_LINF_GRID = ("0", "0.5", "1.0", "2.0", "4.0", "8.0")
# file-name arch token -> (the --arch that builds it, L2 ε as in file names, L∞ ε as in file names)
ARCHS = {
    "resnet18": ("resnet18", _L2_GRID, _LINF_GRID),
    "resnet50": ("resnet50", _L2_GRID, _LINF_GRID),
    "wide_resnet50_2": ("wide_resnet50_2", _L2_GRID, _LINF_GRID[1:]),
    "wide_resnet50_4": ("wide_resnet50_4", _L2_GRID, ()),
    "densenet": ("densenet161", ("0", "3"), ()),
    "mnasnet": ("mnasnet1_0", ("0", "3"), ()),
    "mobilenet": ("mobilenet_v2", ("0", "3"), ()),
    "resnext50_32x4d": ("resnext50_32x4d", ("0", "3"), ()),
    "shufflenet": ("shufflenet_v2_x1_0", ("0", "3"), ()),
    "vgg16_bn": ("vgg16_bn", ("0", "3"), ()),
}
_NAME = re.compile(r"^(?P<arch>[a-z0-9_]+?)_(?P<norm>l2|linf)_eps(?P<eps>\d+(?:\.\d+)?)(?:\.ckpt)?$")


def _short(eps: str) -> str:
    return eps[:-2] if eps.endswith(".0") else eps


def files() -> dict[str, str]:
    """Every shortcut name (`resnet18_l2_eps3`) and its file in REPO (`resnet18_l2_eps3.ckpt`)."""
    out = {}
    for token, (_, l2, linf) in ARCHS.items():
        for norm, grid in (("l2", l2), ("linf", linf)):
            out.update({f"{token}_{norm}_eps{_short(e)}": f"{token}_{norm}_eps{e}.ckpt" for e in grid})
    return out


def names() -> list[str]:
    return [f"salman:{n}" for n in files()]


def _grid() -> str:
    rows = {}
    for token, (_, l2, linf) in ARCHS.items():
        for norm, grid in (("l2", l2), ("linf", linf)):
            if grid:
                rows.setdefault(f"{norm} eps {', '.join(map(_short, grid))}", []).append(token)
    return "; ".join(f"{', '.join(archs)}: {grid}" for grid, archs in rows.items())


def parse(name: str) -> Ref:
    """`resnet18_l2_eps3` (also `eps3.0`, `.ckpt`, the --arch name `densenet161` for `densenet`) -> Ref."""
    text = name.strip().lower()
    m = _NAME.match(text)
    token = eps = None
    if m:
        token = next((t for t, (arch, _, _) in ARCHS.items() if m.group("arch") in (t, arch)), None)
        grid = ARCHS[token][1 if m.group("norm") == "l2" else 2] if token else ()
        eps = next((e for e in grid if float(e) == float(m.group("eps"))), None)
    if eps is None:
        raise UserError(f"unknown weights 'salman:{name}'{suggest('salman:' + text, names())}: valid names are "
                        f"salman:<arch>_<l2|linf>_eps<e> (e.g. salman:resnet18_linf_eps4, salman:resnet50_l2_eps3; L∞ "
                        f"eps in 1/255) for {_grid()}")
    stem = f"{token}_{m.group('norm')}_eps"
    return Ref("salman", stem + _short(eps), ARCHS[token][0], info={"file": f"{stem}{eps}.ckpt"})


def fetch(ref: Ref, cache_dir: str | None = None, overlay: dict | None = None) -> str:
    return hf_file(REPO, ref.info["file"], arch=ref.arch, cache_dir=cache_dir)
