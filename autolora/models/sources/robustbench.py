"""`robustbench:DATASET/THREAT/NAME` — a model of RobustBench's model zoo (Croce et al., 2021), e.g.
`robustbench:imagenet/Linf/Salman2020Do_R18`, `robustbench:imagenet/Linf/Liu2023Comprehensive_Swin-B`,
`robustbench:cifar10/L2/Rebuffi2021Fixing_70_16_cutmix_extra`. As `--arch` (without `--weights`) it builds the
zoo's architecture with random weights.

With the `robustbench` package (extra `robustbench`) the zoo is the package's own `model_dicts`: the architecture
is the entry's builder, and the file is RobustBench's `<model_dir>/<dataset>/<threat>/<NAME>.pt`, downloaded when
missing by RobustBench's own downloader (`robustbench.utils.download_gdrive_new`: gdown, Google Drive). model_dir
is $AUTOLORA_ROBUSTBENCH_DIR, else `models` (RobustBench's default `./models`), so an existing RobustBench model
directory is used as it is. Importing robustbench 1.1.1 needs two things that `_package` provides or names:
`autoattack` (fra31's package, which pyautoattack ships as `pyautoattack`: aliased in sys.modules) and
`pkg_resources` (setuptools < 81, which the extra pins).

Without the package, `BUILTIN` has the ImageNet L∞ entries of robustbench 1.1.1's `model_zoo/imagenet.py` that
this project needs: Salman et al.'s ResNets and the Swin / ConvNeXt of Liu et al. (2023) that RoLI fine-tunes,
with the same builders and Google Drive ids; a missing file is then one error naming the Drive file and the path.

Either way the file is read by autolora's safe loader (never by robustbench's own torch.load) and its keys cleaned
as `robustbench.utils.load_model` does (`prepare`). The models keep their own input normalisation (RobustBench's
`normalize` module, or their own inside): the classifier's preprocess only resizes.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn

from ...errors import UserError, suggest
from . import Ref
from .hub import reason

EXAMPLE = "robustbench:imagenet/Linf/Salman2020Do_R18"
DATASETS = {"cifar10": (10, 32), "cifar100": (100, 32), "imagenet": (1000, 224)}  # classes, input size
THREATS = ("Linf", "L2", "corruptions", "corruptions_3d")
MU, SIGMA = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's (backbones.IMAGENET_*: importing it would be a cycle)
# robustbench/utils.py load_model (v1.1.1): ImageNet Swins saved in timm's old layout, models it does not re-wrap
SWIN_OLD_LAYOUT = ("Liu2023Comprehensive_Swin-B", "Liu2023Comprehensive_Swin-L", "Mo2022When_Swin-B",
                   "RodriguezMunoz2024Characterizing_Swin-B", "RodriguezMunoz2024Characterizing_Swin-L")
NOT_WRAPPED = ("Singh2023Revisiting_ConvNeXt-T-ConvStem", "Singh2023Revisiting_ViT-B-ConvStem",
               "Singh2023Revisiting_ConvNeXt-S-ConvStem", "Singh2023Revisiting_ConvNeXt-B-ConvStem",
               "Singh2023Revisiting_ConvNeXt-L-ConvStem", "Peng2023Robust", "Chen2024Data_WRN_50_2",
               "Xu2024MIMIR_Swin-B", "Xu2024MIMIR_Swin-L")
# name -> (library, architecture, Google Drive id) of robustbench 1.1.1's imagenet Linf entries
BUILTIN = {
    "Salman2020Do_R50": ("torchvision", "resnet50", "1TmT5oGa1UvVjM3d-XeSj_XmKqBNRUg8r"),
    "Salman2020Do_R18": ("torchvision", "resnet18", "1OThCOQCOxY6lAgxZxgiK3YuZDD7PPfPx"),
    "Salman2020Do_50_2": ("torchvision", "wide_resnet50_2", "1OT7xaQYljrTr3vGbM37xK9SPoPJvbSKB"),
    "Engstrom2019Robustness": ("torchvision", "resnet50", "1T2Fvi1eCJTeAOEzrH_4TAIwO8HTOYVyn"),
    "Liu2023Comprehensive_ConvNeXt-B": ("timm", "convnext_base", "10-nSm-qUftvfKXHeOAakBQl8rxm-jCbk"),
    "Liu2023Comprehensive_ConvNeXt-L": ("timm", "convnext_large", "1dIPLNfdQtAnqZrKPyuy3_zDI-FVgJ2FH"),
    "Liu2023Comprehensive_Swin-B": ("timm", "swin_base_patch4_window7_224", "1-4mtxQCkThJUVdS3wvQ6NnmMZuySqR3c"),
    "Liu2023Comprehensive_Swin-L": ("timm", "swin_large_patch4_window7_224", "1-57sQfcrsDsslfDR18nRD7FnpQmsSBk7"),
}


class ImageNormalizer(nn.Module):
    """RobustBench's `ImageNormalizer` (model_zoo/architectures/utils_architectures.py): (x - mean) / std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _builtin(library: str, arch: str) -> nn.Module:
    """RobustBench's `normalize_model(<arch>, mu, sigma)`: Sequential(normalize, model)."""
    if library == "timm":
        import timm

        net = timm.create_model(arch, pretrained=False)
    else:
        import torchvision

        net = torchvision.models.get_model(arch, weights=None)
    return nn.Sequential(OrderedDict([("normalize", ImageNormalizer(MU, SIGMA)), ("model", net)]))


@functools.lru_cache(maxsize=1)
def _package():
    """robustbench's (model_dicts, download_gdrive_new), or None when it is not installed."""
    import importlib.util

    if importlib.util.find_spec("robustbench") is None:
        return None
    if importlib.util.find_spec("autoattack") is None:  # robustbench.eval: `from autoattack import AutoAttack`
        try:
            import pyautoattack
            import pyautoattack.state
        except ImportError:
            pass
        else:
            sys.modules.setdefault("autoattack", pyautoattack)
            sys.modules.setdefault("autoattack.state", pyautoattack.state)
    try:
        with warnings.catch_warnings():  # its imports warn (pkg_resources, torch.jit), none about what we use
            warnings.simplefilter("ignore")
            from robustbench.model_zoo import model_dicts
            from robustbench.utils import download_gdrive_new
    except ImportError as e:
        fix = ("pip install 'setuptools<81' (robustbench imports pkg_resources, which setuptools 81 removed)"
               if e.name == "pkg_resources" else "pip install 'autolora[robustbench]'")
        raise UserError(f"the robustbench package is installed but cannot be imported ({reason(e)}): {fix}") from None
    zoo = {(d.value, t.value): models for d, by_threat in model_dicts.items() for t, models in by_threat.items()}
    return zoo, download_gdrive_new


def _zoo() -> tuple[dict, object | None]:
    """{(dataset, threat): {name: entry}} and the downloader (None without the package: the BUILTIN entries)."""
    pkg = _package()
    if pkg is not None:
        return pkg
    entries = {n: {"model": lambda lib=lib, arch=arch: _builtin(lib, arch), "gdrive_id": gid}
               for n, (lib, arch, gid) in BUILTIN.items()}
    return {("imagenet", "Linf"): entries}, None


def parse(name: str) -> Ref:
    parts = [p.strip() for p in name.strip().split("/")]
    if len(parts) != 3 or not all(parts):
        raise UserError(f"robustbench:{name} is not robustbench:DATASET/THREAT/NAME (e.g. {EXAMPLE})")
    dataset = parts[0].lower()
    threat = next((t for t in THREATS if t.lower() == parts[1].lower()), parts[1])
    if dataset not in DATASETS:
        raise UserError(f"robustbench:{name}: unknown dataset '{parts[0]}'{suggest(dataset, DATASETS)}: "
                        f"RobustBench's are {', '.join(DATASETS)}")
    zoo, downloader = _zoo()
    models = zoo.get((dataset, threat))
    if models is None and downloader is None:
        raise UserError(f"robustbench:{name}: {dataset} {threat} models need the robustbench package: pip install "
                        f"'autolora[robustbench]' (built in without it: imagenet/Linf/{', '.join(BUILTIN)})")
    if models is None:
        have = sorted(t for d, t in zoo if d == dataset)
        raise UserError(f"robustbench:{name}: RobustBench has no {threat} models for {dataset}: its threat models "
                        f"there are {', '.join(have)}")
    model = parts[2]
    if model not in models:
        more = ("" if downloader is not None else
                "; these are built in, the others need the robustbench package: pip install 'autolora[robustbench]'")
        raise UserError(f"robustbench:{name}: no model '{model}' in RobustBench's {dataset} {threat} zoo"
                        f"{suggest(model, models)} (it has {', '.join(models)}){more}")
    gid = models[model].get("gdrive_id")
    if isinstance(gid, (list, tuple)):
        raise UserError(f"robustbench:{name} is an ensemble of {len(gid)} models, not one backbone: choose another")
    if not gid:
        raise UserError(f"robustbench:{name} has no RobustBench weights file (RobustBench builds it from torchvision's "
                        "or timm's weights): use --weights torchvision:... or timm:... for those")
    key = f"{dataset}/{threat}/{model}"
    return Ref("robustbench", key, f"robustbench:{key}", info={"gdrive_id": gid, "dataset": dataset,
                                                               "threat": threat, "model": model})


def zoo_model(name: str) -> tuple[nn.Module, int]:
    """The zoo's architecture for DATASET/THREAT/NAME (random weights, its head included) and its input size."""
    ref = parse(name)
    zoo, _ = _zoo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = zoo[(ref.info["dataset"], ref.info["threat"])][ref.info["model"]]["model"]()
    return net, DATASETS[ref.info["dataset"]][1]


def model_dir() -> str:
    return os.environ.get("AUTOLORA_ROBUSTBENCH_DIR") or "models"


def fetch(ref: Ref, cache_dir: str | None = None, overlay: dict | None = None) -> str:
    """`<model_dir>/<dataset>/<threat>/<name>.pt`, downloaded there by RobustBench's downloader when missing."""
    info = ref.info
    path = os.path.abspath(os.path.join(model_dir(), info["dataset"], info["threat"], info["model"] + ".pt"))
    if os.path.isfile(path):
        return path
    url = f"https://drive.google.com/uc?id={info['gdrive_id']}"
    manual = (f"fetch {url} and save it as {path} (RobustBench's model_dir layout; $AUTOLORA_ROBUSTBENCH_DIR sets "
              "model_dir)")
    _, download = _zoo()
    if download is None:
        raise UserError(f"RobustBench model {ref} is not at {path}: {manual}, or pip install 'autolora[robustbench]' "
                        "to download it")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        download(info["gdrive_id"], path)
        if not os.path.isfile(path):
            raise FileNotFoundError("the downloader wrote nothing")
    except Exception as e:  # gdown: offline, Drive quota, ...
        if os.path.isfile(path):
            os.remove(path)  # partial, or Drive's HTML page
        raise UserError(f"download of RobustBench model {ref} from Google Drive failed ({reason(e)}): {manual}") from e
    return path


def prepare(ref: Ref, sd: dict, model) -> dict:
    """`robustbench.utils.load_model`'s key cleaning: a leading `module.` and `model.` off each key, an old-layout
    Swin converted by timm's filter, `model.` put back for the ImageNet models it wraps as `normalize`/`model`; the
    normalisation buffers the files do not carry (RobustBench loads those non-strictly) come from the builder."""
    def strip(d, prefix):
        return {k.removeprefix(prefix): v for k, v in d.items()}

    sd = strip(strip(sd, "module."), "model.")
    name = ref.info["model"]
    if ref.info["dataset"] == "imagenet":
        if name in SWIN_OLD_LAYOUT:
            from timm.models.swin_transformer import checkpoint_filter_fn

            sd = checkpoint_filter_fn(sd, model.backbone.model)
        if name not in NOT_WRAPPED:
            sd = {"model." + k: v for k, v in sd.items()}
    own = model.backbone.state_dict()
    params = {n for n, _ in model.backbone.named_parameters()}
    for k, v in own.items():
        if k not in sd and k not in params and k.rsplit(".", 1)[-1] in ("mean", "std", "mu", "sigma"):
            sd[k] = v
    return sd
