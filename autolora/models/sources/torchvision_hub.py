"""`torchvision:ARCH.WEIGHTS` — torchvision's weight enums (`torchvision.models.get_model_weights(ARCH)[WEIGHTS]`,
e.g. `torchvision:resnet50.IMAGENET1K_V2`; `DEFAULT` and a bare `torchvision:ARCH` are the enum's default).

The file is the enum's url in torch hub's cache, `$TORCH_HOME/hub/checkpoints/<file name of the url>`, downloaded
there with `torch.hub.download_url_to_file` and the file name's hash prefix checked (as torchvision's builders do
through `load_state_dict_from_url`), and read by autolora's safe loader: `load_state_dict_from_url` itself would
unpickle with weights_only=False. All these weights take ImageNet's mean and std.
"""
from __future__ import annotations

from ...errors import UserError, suggest
from ..archs import TORCHVISION_REFUSED, canonical_arch, torchvision_names
from . import Ref
from .hub import torch_hub_file

EXAMPLE = "torchvision:resnet50.IMAGENET1K_V2"


def parse(name: str) -> Ref:
    import torchvision

    arch, _, tag = name.strip().partition(".")
    archs = [a for a in torchvision_names() if a != "wide_resnet50_4" and a not in TORCHVISION_REFUSED]
    if arch not in archs:
        raise UserError(f"unknown weights 'torchvision:{name}': torchvision has no classification model "
                        f"'{arch}'{suggest(arch, archs)}; e.g. {EXAMPLE}")
    enum = torchvision.models.get_model_weights(arch)
    tags = [t for t in enum.__members__]
    if (tag or "DEFAULT") not in tags:
        raise UserError(f"unknown weights 'torchvision:{name}'{suggest(tag, tags)}: {arch}'s weights are "
                        f"{', '.join(tags)}")
    weights = enum[tag or "DEFAULT"]
    return Ref("torchvision", f"{arch}.{weights.name}", canonical_arch("torchvision", arch),
               info={"url": weights.url})


def fetch(ref: Ref, cache_dir: str | None = None, overlay: dict | None = None) -> str:
    return torch_hub_file(ref.info["url"])
