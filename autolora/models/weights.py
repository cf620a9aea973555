"""Pretrained backbone weights: read checkpoints safely, map their keys to our backbone, load strictly.

Sources (`--weights`):

* a `.safetensors` file (plain layout, e.g. our own exported `model.safetensors`);
* a torch file (`.pth` / `.pt` / `.bin` / `.ckpt`): a plain torchvision / timm state dict, optionally
  wrapped as `{'state_dict': ...}` / `{'model': ...}` and/or with a `module.` (DataParallel) prefix;
* a MadryLab `robustness`-library checkpoint, the format of the adversarially robust ImageNet models of
  Salman et al., "Do Adversarially Robust ImageNet Models Transfer Better?" (NeurIPS 2020), which the
  AutoLoRa paper fine-tunes: `{'model': sd, 'optimizer': ..., 'schedule': ..., 'epoch': ...}` whose
  backbone keys live under `module.model.`, with a duplicate under `module.attacker.model.` and the
  input normalisation under `module.normalizer.` / `module.attacker.normalize.`;
* a source `salman:`, `robustbench:`, `timm:`, `torchvision:` (`sources/`), whose file is fetched in the
  source's own layout (downloaded when missing) and whose keys the source maps to its architecture's.

The source's classification head(s) (`spec.head_keys`, e.g. `fc.*`, `head.*` / `head_dist.*`), the attacker copy and the
normaliser are dropped; every remaining key must match the backbone exactly (names and shapes), so a
checkpoint for another architecture is refused instead of being partially loaded.

Torch files are read with `torch.load(..., weights_only=True)`, which never runs code from the file, inside
`torch.serialization.safe_globals(_safe_globals())`: the few pure-data globals that checkpoints written by the
robustness library (`ch.save(..., pickle_module=dill)`) need beyond torch's defaults (see `_safe_globals`).
So a `salman:` download, like any such file, loads without `trust_pickle`; every source's file is read here.
A file that needs any other pickled object is refused, naming the globals, unless the caller opts in with
`trust_pickle` (CLI `--trust-pickle`); `convert_weights` (`autolora convert-weights`) turns a file, once, into a
.safetensors file that anyone can load safely.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping

import torch

from ..errors import UserError, suggest
from ..utils.fileio import atomic_path
from . import sources
from .archs import canonical_arch, split_arch
from .export import canonical_safetensors

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar", ".tar")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_MAX_LISTED = 10


def resolve_source(source: str, cache_dir: str | None = None, overlay: dict | None = None) -> str:
    """A local file for `source`: a source (`salman:`, ...) is fetched in its own layout, downloaded when missing
    (huggingface_hub's `cache_dir`, else $AUTOLORA_CACHE, else its default cache); a path is checked and returned."""
    source = str(source)
    ref = sources.parse(source)
    if ref is not None:
        return sources.fetch(ref, cache_dir, overlay)
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"weights directory '{source}' has no model.safetensors or pytorch_model.bin: pass the weights file itself")
    if not os.path.isfile(path):
        prefix = source.split(":", 1)[0]
        hint = ""
        if re.match(r"^[A-Za-z]{2,}:", source):  # looks like a source, not a path (C:\... has one letter)
            hint = f"; '{prefix}:' is not a source{suggest(prefix, sources.names())}"
        raise UserError(
            f"weights file '{source}' not found: pass an existing .safetensors/.pth/.pt/.bin/.ckpt file, none, or a "
            f"source such as {', '.join(sources.examples())}{hint}"
        )
    return path


# -- reading files -----------------------------------------------------------------------------------
def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    if path.endswith(TORCH_SUFFIXES):
        return False
    with open(path, "rb") as f:  # header: u64 length, then a JSON object
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _safe_globals() -> list:
    """The allowlist: globals that robustness-library checkpoints need beyond torch's weights_only defaults.

    What `robustness.train.train_model` saves (v1.0-1.2.1: model / optimizer / schedule state dicts and
    `epoch`; from v1.2 also `amp` and `{adv,nat}_prec1`, a 0-d tensor) unpickles with torch's defaults, with
    one exception: for `--custom-lr-multiplier` with linear interpolation (or 'cyclic'),
    `make_optimizer_and_schedule` builds a LambdaLR whose factor is `np.interp(...)[0]`, so the optimizer's
    param-group `lr` and the schedule's `_last_lr` are numpy float64 scalars. Pickled, one is
    `scalar(dtype, raw bytes)` with a dtype made by `numpy.dtype('f8', False, True)` and filled by BUILD.
    Each entry only rebuilds data, none runs code:

    * `numpy.core.multiarray.scalar` (NumPy 1 files) / `numpy._core.multiarray.scalar` (NumPy 2): copies the
      raw bytes into a scalar of the given dtype (anything but a long enough bytes or str buffer is an
      error); the object dtype is refused by NumPy 2, and NumPy 1 returns the argument, which this
      restricted unpickler has already built;
    * `numpy.dtype`: parses a type code such as 'f8' (a class would need a further, refused, global);
    * `numpy.dtypes.Float64DType`, the type of `np.dtype('f8')`: lets BUILD run the dtype's C `__setstate__`
      (byte order, flags). Only float64, which is all such files hold: other dtypes stay refused.

    argparse.Namespace and the rest (which the library does not save) stay refused.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import scalar
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, type(np.dtype(np.float64))]


def _global_name(g) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


def _unsafe_globals(path: str, msg: str) -> list[str]:
    """The globals outside torch's defaults and our allowlist that the file needs (all of them for a zip
    checkpoint, else the first one the unpickler met), plus a class the unpickler refused to build."""
    try:  # reads the pickle's opcodes without running them
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy format or not a checkpoint at all)
        names = re.findall(r"GLOBAL ([\w.]+)", msg)
    names += re.findall(r"but got <class '([^']+)'>", msg)  # e.g. numpy.dtypes.Float32DType, numpy.dtype[float32]
    allowed = {_global_name(g) for g in _safe_globals()}
    return sorted(set(names) - allowed)


def _torch_load(path: str, trust_pickle: bool):
    try:  # torch warns about legacy / non-zip files before failing: the error below says it all in one line
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- classified below
        err = e
    msg = str(err)
    needs = _unsafe_globals(path, msg)
    if not needs:
        first = msg.strip().splitlines()[0][:120] if msg.strip() else ""
        detail = type(err).__name__ if not first or first.startswith("Weights only load failed") else f"{type(err).__name__}: {first}"
        raise UserError(
            f"cannot read weights file '{path}' ({detail}): it is not a torch checkpoint; "
            "pass a torch state dict (.pth/.pt/.bin/.ckpt) or a .safetensors file"
        ) from err
    if not trust_pickle:
        raise UserError(
            f"weights file '{path}' needs arbitrary pickled objects {_listed(needs)} beyond tensors and numpy "
            "float64 scalars, which can run code when loaded: on a machine where you trust the file, convert it "
            f"once with `autolora convert-weights {path} OUT.safetensors --trust-pickle` and use OUT.safetensors, "
            "or pass --trust-pickle (only for trusted legacy files)"
        ) from err
    text = (f"--trust-pickle: unpickling '{path}' with weights_only=False; it may run arbitrary code "
            f"(it needs {', '.join(needs[:5])}); only do this for files you trust")
    warnings.warn(text, UserWarning, stacklevel=3)
    log.warning(text)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read weights file '{path}' even with --trust-pickle ({type(e).__name__}: {e}): pass a valid checkpoint") from e


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _find_state_dict(obj, depth: int = 0):
    if isinstance(obj, torch.nn.Module):  # a whole pickled model (only possible with trust_pickle)
        return obj.state_dict()
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping) and depth < 2:
        for key in _WRAPPER_KEYS:
            if key in obj:
                found = _find_state_dict(obj[key], depth + 1)
                if found is not None:
                    return found
    return None


def _read(path: str, trust_pickle: bool) -> tuple[dict, str]:
    """(state dict, container format: 'safetensors' | 'torch')."""
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu")), "safetensors"
        except Exception as e:
            raise UserError(f"cannot read safetensors file '{path}' ({type(e).__name__}: {e}): pass a valid .safetensors file") from e
    obj = _torch_load(path, trust_pickle)
    sd = _find_state_dict(obj)
    if sd is None:
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(
            f"no state dict of tensors found in '{path}' (top level: {keys}): pass a state dict or a dict "
            f"holding one under {' / '.join(repr(k) for k in _WRAPPER_KEYS)}"
        )
    return dict(sd), "torch"


def read_state_dict(path: str, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or torch file (unwrapping `state_dict` / `model` containers).

    Torch files are loaded with `weights_only=True`; one that needs arbitrary pickled objects raises
    UserError unless `trust_pickle` (then it is loaded with a loud warning).
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise UserError(f"weights file '{path}' not found: pass an existing .safetensors/.pth/.pt/.bin/.ckpt file")
    return _read(path, trust_pickle)[0]


# -- key mapping ------------------------------------------------------------------------------------
def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items()}


def _plain_layout(sd: dict) -> tuple[dict, list[str], bool]:
    """The source model under plain torchvision / timm keys, its own head included: (state dict, dropped
    keys, is robustness layout). Strips `module.` / `_orig_mod.`; drops the robustness attacker copy and
    normaliser (a torchvision arch, which the library wraps once more in its DummyModel, loses that `model.` too), and
    the `head.*` of our own Classifier (its plain name depends on the arch)."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    if sd and all(k.startswith("_orig_mod.") for k in sd):  # torch.compile'd model
        sd = _strip(sd, "_orig_mod.")
    dropped: list[str] = []
    robust = any(k.startswith("model.") for k in sd) and any(
        k.startswith(("attacker.", "normalizer.")) for k in sd
    )
    if robust:  # Salman et al. 2020 / robustness library: keep model.*, drop attacker + normalizer copies
        dropped = [k for k in sd if not k.startswith("model.")]
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        if sd and all(k.startswith("model.") for k in sd):  # a torchvision arch in the library's DummyModel
            sd = _strip(sd, "model.")
    elif any(k.startswith("backbone.") for k in sd) and all(k.startswith(("backbone.", "head.")) for k in sd):
        # our own Classifier.state_dict(): backbone.* + head.*
        dropped = [k for k in sd if k.startswith("head.")]
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd, dropped, robust


def _map_keys(sd: dict, expected: set[str], heads: tuple) -> tuple[dict, list[str], bool]:
    """(backbone state dict, dropped keys, is robustness layout): `_plain_layout` minus the source's head(s)
    (`heads`: prefixes such as ("fc",) or a distilled DeiT's ("head", "head_dist"))."""
    sd, dropped, robust = _plain_layout(sd)
    prefixes = tuple(h + "." for h in heads)
    head_keys = [k for k in sd if k.startswith(prefixes) and k not in expected]
    dropped += head_keys
    sd = {k: v for k, v in sd.items() if k not in set(head_keys)}
    return sd, dropped, robust


def _listed(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return "[" + ", ".join(keys[:_MAX_LISTED]) + more + "]"


def _check(sd: dict, target: dict, arch: str, source: str) -> None:
    # checkpoints from before BatchNorm tracked num_batches_tracked simply lack it: not an error
    missing = sorted(k for k in target if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in target)
    shapes = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}"
        for k in sd if k in target and tuple(sd[k].shape) != tuple(target[k].shape)
    )
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {_listed(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (file vs model) {_listed(shapes)}")
    raise UserError(
        f"weights '{source}' do not fit arch '{arch}': {'; '.join(parts)}; "
        "they are for a different architecture: pass the matching --arch (or the right weights file)"
    )


def load_weights(model, source: str, *, trust_pickle: bool = False, cache_dir: str | None = None,
                 pretrained_cfg_overlay: dict | None = None) -> dict:
    """Load pretrained backbone weights from `source` into `model.backbone` (strict, all or nothing).

    `source` is a file path or a source (`salman:resnet50_l2_eps3`, `robustbench:imagenet/Linf/Salman2020Do_R18`,
    `timm:NAME.TAG`, `torchvision:ARCH.WEIGHTS`; `sources/`) for the model's arch. The source's classification
    head, and in robustness-library checkpoints the attacker copy and the normaliser, are dropped; `model.head`
    stays as it is; a ViT's position embeddings are resampled to the model's patch grid (`_resample_pos_embed`).
    Torch files, every source's included, are unpickled with weights_only=True and the allowlist of
    `_safe_globals` only; `trust_pickle` is for trusted files that need more. `pretrained_cfg_overlay` changes a
    `timm:` source's pretrained config (e.g. dict(file=PATH)). Returns {"source", "path", "format",
    "num_tensors", "dropped"} where format is 'robustness', 'torch' or 'safetensors' and dropped lists the keys
    that were left out.
    """
    spec = model.spec
    source = str(source)
    ref = sources.parse(source)
    if ref is not None and spec.arch != ref.arch:  # before any download
        raise UserError(f"weights '{source}' are for arch '{ref.arch}' but the model is '{spec.arch}': pass --arch "
                        f"{ref.arch}, or leave --arch out (the weights imply it)")
    path = resolve_source(source, cache_dir, pretrained_cfg_overlay)
    raw, fmt = _read(path, trust_pickle)
    if ref is not None:
        raw = sources.prepare(ref, raw, model)
    sd, dropped, robust = _fit(raw, model, source)
    fmt = "robustness" if robust else fmt
    check_finite(sd, source)
    result = model.backbone.load_state_dict(sd, strict=False)
    left = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if left or result.unexpected_keys:  # pragma: no cover -- _check already guarantees this
        raise UserError(f"weights '{source}' did not load fully into '{spec.arch}': pass the matching --arch")
    info = {"source": source, "path": path, "format": fmt, "num_tensors": len(sd), "dropped": dropped}
    log.info("loaded %d backbone tensors from %s (%s); dropped %d keys", len(sd), source, fmt, len(dropped))
    return info


def check_finite(sd: dict, source: str) -> None:
    """UserError when floating tensors hold NaN or inf: such weights give NaN logits, whose argmax is class 0."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"weights '{source}' hold NaN or inf values in {len(bad)} tensor(s) ({_listed(bad)}): the file "
                        "is damaged (e.g. saved from a diverged run); use another checkpoint")


def _fit(raw: dict, model, source: str) -> tuple[dict, list[str], bool]:
    """`_map_keys` for `model.backbone`, checked strictly (`_check`), with `_check_normalizer`'s warning."""
    target = model.backbone.state_dict()
    sd, dropped, robust = _map_keys(raw, set(target), model.spec.head_keys)
    sd = _resample_pos_embed(sd, model.backbone, source)
    _check(sd, target, model.spec.arch, source)
    if robust:
        _check_normalizer(raw, model.spec, source)
    return sd, dropped, robust


def _resample_pos_embed(sd: dict, backbone, source: str) -> dict:
    """A ViT's absolute position embeddings (`pos_embed`, timm's layout) for another patch grid than the file's, e.g.
    weights for 224 (14x14 patches + class token: 197 tokens) in a ViT built for 64 (4x4 + 1: 17), resampled with
    timm's `resample_abs_pos_embed` (bicubic, prefix tokens kept), as timm's own checkpoint filter does; logged."""
    for key, v in list(sd.items()):
        if not (key == "pos_embed" or key.endswith(".pos_embed")) or v.dim() != 3:
            continue
        owner = backbone.get_submodule(key[:-len(".pos_embed")]) if "." in key else backbone
        grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
        ours = getattr(owner, "pos_embed", None)
        if grid is None or ours is None or tuple(ours.shape) == tuple(v.shape) or v.shape[-1] != ours.shape[-1]:
            continue
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(owner, "no_embed_class", False) else getattr(owner, "num_prefix_tokens", 1)
        sd[key] = resample_abs_pos_embed(v, new_size=list(grid), num_prefix_tokens=prefix)
        log.info("weights '%s': %s %s resampled to %s for a %dx%d patch grid", source, key, tuple(v.shape),
                 tuple(sd[key].shape), *grid)
    return sd


def _check_normalizer(raw: dict, spec, source: str) -> None:
    """Warn when a robustness checkpoint was trained with another input normalisation than ours."""
    for name, ours in (("new_mean", spec.mean), ("new_std", spec.std)):
        theirs = next((v for k, v in raw.items() if k.endswith("normalizer." + name)), None)
        if theirs is None or theirs.numel() != len(ours):
            continue
        if not torch.allclose(theirs.float().flatten(), torch.tensor(ours, dtype=torch.float32), atol=1e-3):
            log.warning("weights '%s' were trained with normalizer %s %s, the model uses %s",
                        source, name, [round(float(x), 4) for x in theirs.flatten()], list(ours))


# -- conversion -------------------------------------------------------------------------------------
def convert_weights(source: str, out: str, *, arch: str | None = None, trust_pickle: bool = False,
                    overwrite: bool = False, cache_dir: str | None = None) -> dict:
    """`autolora convert-weights`: write `source` once as a .safetensors file that loads without unpickling.

    `source` is anything `load_weights` reads. `out` holds the source model in the plain torchvision / timm
    layout that `--weights` accepts, its classification head included (`fc.*` / `head.*`; `--weights`
    drops it, other tools can use it); the optimizer and schedule state, the robustness attacker copy and
    normaliser, and a Classifier's own `head.*` are left out. With `arch` (implied by a source such as `salman:`)
    the weights are first checked to fit that backbone strictly. `out` is written atomically, with the same
    bytes for the same input, and an existing `out` is only replaced with `overwrite`. Returns {"source",
    "path", "out", "format", "num_tensors", "dropped", "arch"}.
    """
    from safetensors.torch import save

    source, out = str(source), os.path.expanduser(str(out))
    if not out.endswith(".safetensors"):
        raise UserError(f"output '{out}' must end in .safetensors: pass OUT.safetensors")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"output '{out}' already exists: choose another OUT.safetensors or pass --overwrite")
    if os.path.isdir(out):
        raise UserError(f"output '{out}' is a directory: pass a file name OUT.safetensors")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"output '{out}': {parent} is a file, not a directory: choose another OUT.safetensors")
    ref = sources.parse(source)
    if ref is not None:
        if arch and canonical_arch(*split_arch(arch)) != ref.arch:
            raise UserError(f"weights '{source}' are for arch '{ref.arch}', not '{arch}': pass --arch {ref.arch} or drop --arch")
        arch = ref.arch
    model = None
    if arch:  # before any download or read, so that an unknown arch fails at once
        from . import create_model

        model = create_model(arch, 2)
    path = resolve_source(source, cache_dir)
    raw, fmt = _read(path, trust_pickle)
    if ref is not None:
        raw = sources.prepare(ref, raw, model)
    sd, dropped, robust = _plain_layout(raw)
    if model is not None:
        _fit(raw, model, source)
    fmt = "robustness" if robust else fmt
    # safetensors refuses tensors that share memory (e.g. tied weights): give each its own contiguous copy
    tensors = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    meta = {"converted_from": source if ref is not None else os.path.basename(path),
            "source_format": fmt}
    blob = canonical_safetensors(save(tensors, metadata=meta))
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob)
    log.info("converted %s (%s) to %s: %d tensors, dropped %d keys", source, fmt, out, len(tensors), len(dropped))
    return {"source": source, "path": path, "out": out, "format": fmt, "num_tensors": len(tensors),
            "dropped": dropped, "arch": arch}
