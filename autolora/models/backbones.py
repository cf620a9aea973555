"""Backbones: an architecture without its classification head, and the spec the classifier needs.

A backbone maps images to pooled features. Its state-dict keys are the plain model's keys without the head, so a
source's checkpoints load into it unchanged (`weights.py`), and its Conv2d / Linear layers are what the LoRa branch
covers. The head comes off by name: timm's `num_classes=0`; for torchvision, RobustBench and your own models the
final Linear of the head (`split_head`: `fc`, `classifier.6`, `model.head.fc`, ...) becomes nn.Identity.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn as nn

from ..errors import UserError, suggest
from .archs import canonical_arch, split_arch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the model normalises itself (RobustBench) or takes [0, 1]

TINY_WIDTHS = {"tiny": (16, 32, 64), "small": (32, 64, 128)}
# where classifiers keep their head (a Linear, or a container whose last Linear is the head)
HEAD_NAMES = ("fc", "head", "heads", "classifier", "linear", "logits", "last_linear")


@dataclass
class BackboneSpec:
    """What the classifier needs to know about a backbone."""

    name: str  # the builder's name: resnet18, vit_tiny_patch16_224, imagenet/Linf/Salman2020Do_R18, pkg.MyNet
    family: str  # "tiny" | "torchvision" | "timm" | "robustbench" | "module"
    num_features: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    native_size: int | None = 224  # the input size it was pretrained at (None: any)
    head_keys: tuple = ("fc",)  # prefixes of the plain model's classification head(s) in its state dict
    img_size: int | None = None  # the input size a fixed-size timm model (ViT, Swin) was built for

    @property
    def head_key(self) -> str:
        """The main head's prefix (`fc`, `head`); distilled DeiTs also have `head_dist`."""
        return self.head_keys[0]

    @property
    def arch(self) -> str:
        """The `--arch` string that builds this backbone (`archs.canonical_arch`)."""
        return canonical_arch(self.family, self.name)


def create_backbone(arch: str, img_size: int | None = None, *,
                    tag: str | None = None) -> tuple[nn.Module, BackboneSpec]:
    """A randomly initialised backbone for `arch` (see `archs.py`) and its spec.

    `img_size` is passed to timm models with a fixed input size (ViT/DeiT/Swin); `tag` picks the timm pretrained
    config (mean, std) of `--weights timm:NAME.TAG`.
    """
    family, name = split_arch(arch)
    if family == "tiny":
        from .tiny import TinyResNet

        net = TinyResNet(TINY_WIDTHS[name])
        return net, BackboneSpec(name, "tiny", net.num_features, CIFAR_MEAN, CIFAR_STD, None, ("fc",))
    if family == "torchvision":
        import torchvision

        if name == "wide_resnet50_4":  # robustness/imagenet_models/resnet.py: width_per_group = 64 * 4
            net = torchvision.models.resnet50(weights=None, width_per_group=64 * 4)
        else:
            net = torchvision.models.get_model(name, weights=None)
        head, num_features = split_head(net)
        return net, BackboneSpec(name, "torchvision", num_features, head_keys=(head,))
    if family == "timm":
        return _timm_backbone(name, img_size, tag)
    if family == "robustbench":
        from .sources import robustbench

        net, native_size = robustbench.zoo_model(name)
        head, num_features = split_head(net, where=f"RobustBench model {name}")
        return net, BackboneSpec(name, "robustbench", num_features, *NO_NORMALISATION, native_size, (head,))
    raise UserError(f"arch '{arch}' is a model object of your own: pass the object itself (create_model(module, ...), "
                    "train(cfg, out, model=...)), not its name")


def _timm_backbone(name: str, img_size: int | None, tag: str | None):
    import timm

    full = f"{name}.{tag}" if tag else name
    try:
        net = timm.create_model(full, pretrained=False, num_classes=0, **({"img_size": img_size} if img_size else {}))
    except TypeError:  # a model without a fixed input size
        net, img_size = timm.create_model(full, pretrained=False, num_classes=0), None
    cfg = net.pretrained_cfg or {}
    head = cfg.get("classifier", "head")  # a tuple for distilled DeiTs: ("head", "head_dist")
    return net, BackboneSpec(
        name, "timm", net.num_features, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
        cfg.get("input_size", (3, 224, 224))[-1], tuple(head) if isinstance(head, (tuple, list)) else (head,),
        img_size,
    )


def from_module(module: nn.Module, head: str | None, mean, std) -> tuple[nn.Module, BackboneSpec]:
    """A copy of your own classifier `module` as a backbone: its head (`head`, a dotted module name, else the first
    of HEAD_NAMES it has) replaced by nn.Identity, so the head must be the last step of its forward. `mean`/`std`
    are the normalisation its inputs need (None: it takes images in [0, 1] or normalises them itself)."""
    net = copy.deepcopy(module)
    head, num_features = split_head(net, head, where=f"module {type(module).__qualname__}")
    if (mean is None) != (std is None):
        raise UserError("declare both mean and std (or neither: the module takes images in [0, 1])")
    mean, std = NO_NORMALISATION if mean is None else (tuple(map(float, mean)), tuple(map(float, std)))
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    return net, BackboneSpec(name, "module", num_features, mean, std, None, (head,))


def split_head(net: nn.Module, head: str | None = None, where: str = "the model") -> tuple[str, int]:
    """Replace the classification head of `net` by nn.Identity, in place: the module named `head`, else the first of
    HEAD_NAMES (also inside a `model` wrapper, as RobustBench's `normalize`/`model` pair). A container stands for its
    last Linear (vgg's `classifier` -> `classifier.6`). Returns (the head's dotted name, its in_features)."""
    modules = dict(net.named_modules())
    if head is None:
        head = next((p + n for p in ("", "model.") for n in HEAD_NAMES if p + n in modules), None)
        if head is None:
            raise UserError(f"no classification head found in {where} (none of {', '.join(HEAD_NAMES)}): name its "
                            "final Linear layer (head='classifier.2')")
    if head not in modules:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise UserError(f"{where} has no module '{head}'{suggest(head, linears)}: name its final Linear layer")
    if not isinstance(modules[head], nn.Linear):
        linears = [n for n, m in modules[head].named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UserError(f"the head '{head}' of {where} is a {type(modules[head]).__name__} without a Linear layer: "
                            "a classifier's head must end in nn.Linear")
        head = f"{head}.{linears[-1]}"
    layer = modules[head]
    parent, _, leaf = head.rpartition(".")
    setattr(modules[parent] if parent else net, leaf, nn.Identity())
    return head, layer.in_features


def check_fixed_size(model) -> None:
    """UserError when the classifier resizes its inputs to another size than its backbone was built for (a
    RobustBench zoo ViT/Swin is built at 224 by the zoo; timm archs are built at --input-size). Inputs that are not
    resized (--input-size none) are the data's business."""
    if model.input_size is None:
        return
    for name, m in model.backbone.named_modules():
        size = getattr(m, "img_size", None) if getattr(m, "strict_img_size", False) else None
        if size is not None and tuple(size) != (model.input_size,) * 2:
            raise UserError(f"arch '{model.spec.arch}' takes {size[0]}x{size[1]} inputs ({name or 'the backbone'} "
                            f"is built for them), not --input-size {model.input_size}: pass --input-size "
                            f"{size[0]} (or native)")
