"""Architecture names: which library builds an `--arch` name, and the one spelling a run records.

`--arch` takes
* `tiny`, `small`: the CIFAR ResNets of `tiny.py`, for CPU work;
* a name of `TORCHVISION`: torchvision's builder (`wide_resnet50_4`: ResNet-50 with width_per_group 256, as the
  robustness library defines it for Salman et al.'s models);
* any other timm model name (`vit_small_patch16_224`, `deit_tiny_patch16_224`, ...), then a torchvision
  classification model that timm does not have (`vit_b_16`); `timm:NAME` / `torchvision:NAME` choose the library
  where both have NAME (`torchvision:efficientnet_b0`, `timm:resnet50`);
* `robustbench:DATASET/THREAT/NAME`: an architecture of RobustBench's model zoo (`sources/robustbench.py`);
* `module:QUALNAME`: what a run records for a model object of your own (`create_model(module, ...)`); never built
  from the name.

A name with a timm pretrained tag (`vit_tiny_patch16_224.augreg_in21k`) is refused: `--arch` builds random weights,
`--weights timm:NAME.TAG` loads the tag's.
"""
from __future__ import annotations

from ..errors import UserError, suggest

TINY = ("tiny", "small")
# plain names that torchvision builds (before timm): the ResNets and every architecture of Salman et al.'s models
TORCHVISION = ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet50_4", "resnext50_32x4d", "densenet161",
               "mnasnet1_0", "mobilenet_v2", "shufflenet_v2_x1_0", "vgg16_bn")
PREFIXES = ("timm", "torchvision", "robustbench", "module")
# torchvision classifiers whose forward is not `head(features(x))` in training mode
TORCHVISION_REFUSED = {"googlenet": "its auxiliary classifiers", "inception_v3": "its auxiliary classifier"}


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(set(torchvision.models.list_models(module=torchvision.models)) | {"wide_resnet50_4"})


def split_arch(arch: str) -> tuple[str, str]:
    """(family, name) of an --arch string: family is tiny, torchvision, timm, robustbench or module. tiny, torchvision
    and timm names are checked here (an unknown one is an error with "did you mean"); robustbench names where the
    zoo is read, module names are only recorded."""
    arch = str(arch).strip()
    prefix, sep, rest = arch.partition(":")
    if sep and prefix in PREFIXES:
        family, name = prefix, rest.strip()
    elif arch in TINY:
        return "tiny", arch
    elif arch in TORCHVISION:
        return "torchvision", arch
    else:
        family, name = None, arch
    if family in ("robustbench", "module"):
        if not name:
            raise UserError(f"--arch {arch} names no model: e.g. robustbench:imagenet/Linf/Salman2020Do_R18")
        return family, name
    if family in (None, "timm"):
        import timm

        if timm.is_model(name) and "." in name:
            raise UserError(f"--arch {arch} names timm's pretrained weights '{name}', which --arch never loads (it "
                            f"builds random weights): pass --weights timm:{name} (the arch follows from it), or --arch "
                            f"{name.split('.')[0]} for a random backbone")
        if timm.is_model(name):
            return "timm", name
    if family in (None, "torchvision") and name in torchvision_names():
        if name in TORCHVISION_REFUSED:
            raise UserError(f"--arch {arch}: torchvision's {name} is not supported ({TORCHVISION_REFUSED[name]} make "
                            "its training forward return several outputs): choose another architecture")
        return "torchvision", name
    import timm

    known = list(TINY) + torchvision_names() + timm.list_models()
    raise UserError(f"unknown arch '{arch}'{suggest(name, known)}: use tiny, small, a torchvision or timm model name "
                    "(timm:NAME / torchvision:NAME to choose the library), or robustbench:DATASET/THREAT/NAME")


def canonical_arch(family: str, name: str) -> str:
    """The spelling a run records: the plain name where `split_arch` gives it this family, else `family:name`."""
    if family in ("robustbench", "module"):
        return f"{family}:{name}"
    if family == "tiny" or (family == "torchvision" and name in TORCHVISION):
        return name
    try:
        return name if split_arch(name) == (family, name) else f"{family}:{name}"
    except UserError:
        return f"{family}:{name}"
