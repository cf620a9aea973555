"""Backbones by name and the pixel-space classifier (resize + normalise + backbone + fresh head).

Names: `resnet18`, `resnet50` (torchvision), `tiny` / `small` (CIFAR ResNets for CPU work) and any
timm model name (`vit_small_patch16_224`, `deit_tiny_patch16_224`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, suggest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


@dataclass
class BackboneSpec:
    """What the classifier needs to know about a backbone."""

    name: str
    family: str  # "torchvision" | "timm" | "tiny"
    num_features: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    native_size: int | None = 224  # the input size it was pretrained at (None: any)
    head_keys: tuple = ("fc",)  # prefixes of the plain model's classification head(s) in its state dict

    @property
    def head_key(self) -> str:
        """The main head's prefix (`fc`, `head`); distilled DeiTs also have `head_dist`."""
        return self.head_keys[0]


TINY_WIDTHS = {"tiny": (16, 32, 64), "small": (32, 64, 128)}
TORCHVISION = ("resnet18", "resnet50")


def create_backbone(name: str, img_size: int | None = None) -> tuple[nn.Module, BackboneSpec]:
    """A randomly initialised backbone that maps images to pooled features, and its spec.

    The backbone's state-dict keys equal the plain torchvision / timm model's keys without the
    classification head, so their checkpoints load into it unchanged. `img_size` is passed to timm models
    with a fixed input size (ViT/DeiT); pretrained weights for another size then fail to load, by name.
    """
    if name in TINY_WIDTHS:
        from .tiny import TinyResNet

        net = TinyResNet(TINY_WIDTHS[name])
        return net, BackboneSpec(name, "tiny", net.num_features, CIFAR_MEAN, CIFAR_STD, None, ("fc",))
    if name in TORCHVISION:
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        num_features = net.fc.in_features
        net.fc = nn.Identity()
        return net, BackboneSpec(name, "torchvision", num_features)
    try:
        import timm
    except ImportError as e:  # pragma: no cover
        raise UserError(f"arch '{name}' needs timm: pip install timm") from e
    if not timm.is_model(name):
        raise UserError(
            f"unknown arch '{name}'{suggest(name, list(TINY_WIDTHS) + list(TORCHVISION) + timm.list_models())}: "
            "use tiny, small, resnet18, resnet50 or a timm model name"
        )
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": img_size} if img_size else {}))
    except TypeError:  # a model without a fixed input size
        net = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = net.pretrained_cfg or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    head = cfg.get("classifier", "head")  # a tuple for distilled DeiTs: ("head", "head_dist")
    return net, BackboneSpec(
        name, "timm", net.num_features, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
        size, tuple(head) if isinstance(head, (tuple, list)) else (head,),
    )


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
        """What a plain torchvision / timm model needs besides the weights to reproduce this classifier: inputs in
        [0, 1], resized (`resize`: nearest or bilinear) to `input_size` (null: as they come), then `(x - mean) / std`;
        `peft` when adapters or prompts were added (a plain model cannot hold them; `autolora.load_model` can)."""
        return {"arch": self.spec.name, "family": self.spec.family, "num_classes": self.num_classes,
                "input_size": self.input_size, "resize": self.preprocess.mode, "input_range": [0.0, 1.0],
                "mean": list(self.spec.mean), "std": list(self.spec.std), "head_keys": list(self.spec.head_keys),
                **({"peft": added} if (added := peft_modules(self.backbone)) else {})}


def create_model(arch: str, num_classes: int, input_size="native", resize: str = "nearest") -> Classifier:
    """Build the pixel-space classifier for `arch` with a fresh linear head of `num_classes` (inputs resized inside
    the model with `resize`: nearest or bilinear)."""
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    img_size = None
    if arch not in TINY_WIDTHS and arch not in TORCHVISION and input_size not in (None, "none", "native"):
        img_size = resolve_input_size(input_size, BackboneSpec(arch, "timm", 0))  # ViT/DeiT: build at this size
    backbone, spec = create_backbone(arch, img_size=img_size)
    return Classifier(backbone, spec, num_classes, resolve_input_size(input_size, spec), resize)


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


def run_model(cfg, num_classes: int) -> Classifier:
    """The classifier a training run's config asks for, with its pretrained backbone (`--weights`;
    `load_weights` logs what it loaded to the `autolora.models.weights` logger)."""
    model = create_model(cfg.arch, num_classes, cfg.input_size, getattr(cfg, "resize", "nearest"))
    if getattr(cfg, "head_init", "default") == "roli":
        roli_head_init(model.head)
    if cfg.weights:
        from .weights import load_weights

        load_weights(model, cfg.weights, trust_pickle=cfg.trust_pickle)
    return model
