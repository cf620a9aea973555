"""Where pretrained weights come from: `--weights SOURCE:NAME`, one module per source.

* `salman.py`, `salman:resnet50_l2_eps3` (extra hub): Hugging Face `madrylab/robust-imagenet-models`, the HF cache;
* `robustbench.py`, `robustbench:imagenet/Linf/Salman2020Do_R18` (extra robustbench): Google Drive, RobustBench's
  `<model_dir>/<dataset>/<threat>/<name>.pt`;
* `timm_hub.py`, `timm:vit_base_patch16_224.augreg_in21k_ft_in1k` (extra hub): the tag's Hugging Face repo (HF
  cache) or url (torch hub cache);
* `torchvision_hub.py`, `torchvision:resnet50.IMAGENET1K_V2`: the weight enum's url, `$TORCH_HOME/hub/checkpoints/`.

Each module has `parse(name) -> Ref` (a wrong name is one error with "did you mean" from the source's own list),
`fetch(ref, cache_dir, overlay) -> path` (the file in the source's own layout, downloaded there by the source's own
downloader when missing; a failed download is one error naming the file and where to put it) and, where the
source's files need it, `prepare(ref, state_dict, model) -> state_dict` (the source's key conventions). The file
itself is always read by `weights.py`'s safe loader (weights_only=True and its allowlist), never by the source.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ref:
    """A parsed `--weights SOURCE:NAME`."""

    source: str  # salman | robustbench | timm | torchvision
    name: str  # the name after the colon, normalised
    arch: str  # the --arch the weights are for (`archs.canonical_arch`)
    tag: str | None = None  # timm: the pretrained tag, whose config (mean, std) the backbone is built with
    info: dict = field(default_factory=dict)  # the source's own details (file name, url, gdrive id, ...)

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def _modules() -> dict:
    from . import robustbench, salman, timm_hub, torchvision_hub

    return {"salman": salman, "robustbench": robustbench, "timm": timm_hub, "torchvision": torchvision_hub}


def parse(text: str | None) -> Ref | None:
    """The Ref of a `--weights` source, or None when `text` is not one (a file path)."""
    prefix, sep, name = str(text or "").partition(":")
    module = _modules().get(prefix.strip().lower()) if sep else None
    return module.parse(name) if module is not None else None


def names() -> list[str]:
    """The source prefixes: salman, robustbench, timm, torchvision."""
    return list(_modules())


def examples() -> list[str]:
    """One example name per source (for messages; `--help` lists the same)."""
    return [m.EXAMPLE for m in _modules().values()]


def fetch(ref: Ref, cache_dir: str | None = None, overlay: dict | None = None) -> str:
    """The local file of `ref`, downloaded into the source's own cache when it is not there."""
    return _modules()[ref.source].fetch(ref, cache_dir=cache_dir, overlay=overlay)


def prepare(ref: Ref, sd: dict, model) -> dict:
    """`sd` (read from the source's file) in the key layout of `model.backbone`'s architecture, with its head."""
    hook = getattr(_modules()[ref.source], "prepare", None)
    return hook(ref, sd, model) if hook else sd
