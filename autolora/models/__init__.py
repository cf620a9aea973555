"""The pixel-space classifier (resize + normalise + backbone + fresh head) and how a run gets its model.

`create_model(arch, num_classes, input_size, weights=...)`: `arch` is a name (`archs.py`: tiny, small, torchvision,
timm, robustbench:DATASET/THREAT/NAME), None (the arch `weights` implies, else resnet18), or a model object of your
own; `weights` a file or a source (`sources/`: salman:, robustbench:, timm:, torchvision:), or "none".
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .archs import TORCHVISION, canonical_arch, split_arch
from .backbones import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, TINY_WIDTHS, BackboneSpec,
                        check_fixed_size, create_backbone, from_module)

__all__ = ["BackboneSpec", "Classifier", "Preprocess", "create_backbone", "create_model", "resolve_arch",
           "run_model", "resolve_input_size", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR_MEAN", "CIFAR_STD", "TINY_WIDTHS",
           "TORCHVISION"]
DECLARE = object()  # create_model(module, ...) without mean/std: the normalisation must be declared


def resolve_input_size(input_size, spec: BackboneSpec) -> int | None:
    """`native` -> the backbone's own size (None for tiny), `none` -> None, or an int."""
    if input_size in (None, "none"):
        return None
    if input_size == "native":
        return spec.native_size
    try:
        size = int(input_size)
    except (TypeError, ValueError):
        raise UserError(f"--input-size must be an integer, 'native' or 'none', got '{input_size}'") from None
    if size < 8:
        raise UserError(f"--input-size {size} is too small: use at least 8 pixels")
    return size


RESIZE_MODES = ("nearest", "bilinear")


class Preprocess(nn.Module):
    """Pixel-space front end: resize to the backbone's size (nearest, as the AutoLoRa paper; or bilinear, as RoLI's
    `torchvision.transforms.Resize((224, 224))` inside its model), then mean/std normalisation.

    Attacks perturb the input in [0, 1] at the data's own resolution; this layer is part of the model
    (the paper feeds 32x32 CIFAR images to 224-input ImageNet ResNets).
    """

    def __init__(self, mean, std, size: int | None, mode: str = "nearest"):
        super().__init__()
        if mode not in RESIZE_MODES:
            raise UserError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        self.size, self.mode = size, mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode,
                              **({"align_corners": False, "antialias": False} if self.mode == "bilinear" else {}))
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """h_θ = g_θ2 ∘ f_θ1 on pixel inputs in [0, 1] (paper Sec. 3.1): preprocess, backbone θ1, head θ2."""

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, num_classes: int, input_size: int | None,
                 resize: str = "nearest"):
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes
        self.input_size = input_size
        self.preprocess = Preprocess(spec.mean, spec.std, input_size, resize)
        self.backbone = backbone
        self.head = nn.Linear(spec.num_features, num_classes)

    def features(self, x):
        return self.backbone(self.preprocess(x))

    def forward(self, x):
        return self.head(self.features(x))

    # -- export in the plain model's key layout ---------------------------------------------
    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """backbone + head weights under the keys of the plain torchvision / timm / tiny model. A distilled DeiT's
        two heads both get our head's weights: in eval mode timm averages head(x_cls) and head_dist(x_dist), which
        is then our head on the averaged tokens, the features our backbone gives (timm's `forward_head`)."""
        sd = {k: v for k, v in self.backbone.state_dict().items()}
        for i, key in enumerate(self.spec.head_keys):
            sd.update({f"{key}.{k}": v if i == 0 else v.clone() for k, v in self.head.state_dict().items()})
        return sd

    def load_plain_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        prefix = self.spec.head_key + "."
        head = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        heads = tuple(k + "." for k in self.spec.head_keys)
        body = {k: v for k, v in sd.items() if not k.startswith(heads)}
        missing, unexpected = self.backbone.load_state_dict(body, strict=False)
        if missing or unexpected:
            raise UserError(f"model weights do not match arch '{self.spec.name}': missing {missing[:8]}, unexpected {unexpected[:8]}")
        self.head.load_state_dict(head)

    def meta(self) -> dict:
        """What a plain model needs besides the weights to reproduce this classifier: inputs in [0, 1], resized
        (`resize`: nearest or bilinear) to `input_size` (null: as they come), then `(x - mean) / std`; a fixed-size
        timm model (ViT) is built with `img_size`. `family` names the library that builds `arch` (robustbench: its
        model zoo, whose models normalise inside, so mean 0 and std 1 here; module: your own class). `peft` when
        adapters or prompts were added (a plain model cannot hold them; `autolora.load_model` can)."""
        return {"arch": self.spec.name, "family": self.spec.family, "num_classes": self.num_classes,
                "input_size": self.input_size, "resize": self.preprocess.mode, "input_range": [0.0, 1.0],
                "mean": list(self.spec.mean), "std": list(self.spec.std), "head_keys": list(self.spec.head_keys),
                "img_size": self.spec.img_size,
                **({"peft": added} if (added := peft_modules(self.backbone)) else {})}

    @property
    def arch(self) -> str:
        return self.spec.arch

    def set_normalisation(self, mean, std) -> None:
        """The mean and std the preprocess normalises with (and the metadata records)."""
        self.spec.mean, self.spec.std = tuple(map(float, mean)), tuple(map(float, std))
        self.preprocess.mean.copy_(torch.tensor(self.spec.mean).view_as(self.preprocess.mean))
        self.preprocess.std.copy_(torch.tensor(self.spec.std).view_as(self.preprocess.std))


def create_model(arch=None, num_classes: int = 0, input_size="native", *, weights: str | None = None,
                 trust_pickle: bool = False, cache_dir: str | None = None, head: str | None = None, mean=DECLARE,
                 std=DECLARE, resize: str = "nearest") -> Classifier:
    """The pixel-space classifier for `arch` with a fresh linear head of `num_classes`, and `weights` loaded; inputs
    are resized inside the model with `resize` (nearest or bilinear).

    `arch` is an architecture name (`archs.py`), None for the arch that `weights` implies (resnet18 without one), or
    a classifier module of your own: a copy of it becomes the backbone, its head (`head`, a dotted name, else found
    by name: fc, head, classifier, ...) replaced, and `mean` / `std` declare the normalisation its inputs need (None
    for both: it takes images in [0, 1]); its own weights are kept. `weights` is a file, a source (salman:,
    robustbench:, timm:, torchvision:; `sources/`) or "none"; its arch must be `arch` (one UserError otherwise).
    """
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    if isinstance(arch, nn.Module):
        if weights not in (None, "none"):
            raise UserError("a module of your own brings its own weights: load them into it, do not pass weights")
        if mean is DECLARE or std is DECLARE:
            raise UserError(f"declare the input normalisation of your {type(arch).__name__}: create_model(module, n, "
                            "mean=(...), std=(...)), or mean=None, std=None if it takes images in [0, 1]")
        backbone, spec = from_module(arch, head, mean, std)
        return Classifier(backbone, spec, num_classes, resolve_input_size(input_size, spec), resize)
    if head is not None or mean is not DECLARE or std is not DECLARE:
        raise UserError("head, mean and std describe a module of your own: pass the module as arch")
    arch, ref = resolve_arch(arch, weights)
    family, _ = split_arch(arch)
    img_size = None
    if family == "timm" and input_size not in (None, "none", "native"):
        img_size = resolve_input_size(input_size, BackboneSpec(arch, "timm", 0))  # ViT/DeiT: build at this size
    backbone, spec = create_backbone(arch, img_size=img_size, tag=ref.tag if ref else None)
    model = Classifier(backbone, spec, num_classes, resolve_input_size(input_size, spec), resize)
    check_fixed_size(model)
    if weights not in (None, "none"):
        from .weights import load_weights

        load_weights(model, weights, trust_pickle=trust_pickle, cache_dir=cache_dir)
    return model


def resolve_arch(arch: str | None, weights: str | None):
    """(the arch to build, the parsed `weights` source or None): `arch`, else the one `weights` implies, else resnet18;
    one UserError when `weights` are for another arch. Checks names only: nothing is built or downloaded."""
    from . import sources

    ref = sources.parse(weights) if weights not in (None, "none") else None
    if arch is None:
        return (ref.arch if ref else "resnet18"), ref
    if ref and canonical_arch(*split_arch(arch)) != ref.arch:
        raise UserError(f"weights '{weights}' are for arch '{ref.arch}' but --arch is '{arch}': pass --arch "
                        f"{ref.arch}, or leave --arch out (the weights imply it)")
    return arch, ref


def peft_modules(backbone: nn.Module) -> dict | None:
    """Adapters or prompts added to the backbone (`models.peft`), as model.safetensors records them."""
    from .peft import describe

    return describe(backbone)


def roli_head_init(head: nn.Linear) -> None:
    """RoLI's RanLI head (`src/models/mlp.py`): kaiming-normal weights (fan_out, std √(2/C)) and every bias at
    −log((1 − 0.01) / 0.01), the logit of a 1 % prior."""
    import math

    nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))


def run_model(cfg, num_classes: int, model: nn.Module | None = None) -> Classifier:
    """The classifier a training run's config asks for, with its pretrained backbone (`--weights`; `load_weights`
    logs what it loaded to the `autolora.models.weights` logger); or `model`, a Classifier of your own
    (`create_model(module, ...)`), checked against the config and the data. `head_init: roli` re-initialises the
    fresh head as RoLI's RanLI does."""
    model = _run_model(cfg, num_classes, model)
    if getattr(cfg, "head_init", "default") == "roli":
        roli_head_init(model.head)
    return model


def _run_model(cfg, num_classes: int, model: nn.Module | None) -> Classifier:
    if model is None:
        return create_model(cfg.arch, num_classes, cfg.input_size, weights=cfg.weights, trust_pickle=cfg.trust_pickle,
                            resize=getattr(cfg, "resize", "nearest"))
    if not isinstance(model, Classifier):
        raise UserError(f"model must be the classifier create_model(module, num_classes, mean=..., std=...) makes of "
                        f"your {type(model).__name__} (it declares the head and the input normalisation)")
    if model.num_classes != num_classes:
        raise UserError(f"the model has {model.num_classes} outputs but the data has {num_classes} classes: build it "
                        f"with create_model(module, {num_classes}, ...)")
    if cfg.arch not in (None, model.arch):
        raise UserError(f"--arch {cfg.arch} conflicts with the model object given ({model.arch}): leave arch out")
    if cfg.weights not in (None, "none"):
        raise UserError(f"--weights {cfg.weights} conflicts with the model object given, which brings its own "
                        "weights: leave weights out")
    return model
