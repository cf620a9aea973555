"""The exported model format: `model.safetensors`, the classifier's plain state dict (backbone + head under the
plain torchvision / timm / tiny / RobustBench-zoo / your own module's keys) with JSON metadata: arch, family,
num_classes, classes, input_size, resize, input_range, mean, std, head_keys, img_size, peft (see `Classifier.meta`)
plus the writer's extras (e.g. method). Everything a plain model needs to reproduce the classifier: inputs in [0, 1],
resized (`resize`: nearest or bilinear) to input_size, then normalised; a fixed-size timm model built with img_size;
adapters or prompts re-added from `peft` (`load_model` does this). A model of your own is recorded as family
"module", arch its class's qualified name: loading it needs that class (`load_model(path, model=...)`).
"""
from __future__ import annotations

import json
import os

from ..utils.fileio import atomic_path
from ..errors import UserError


def save_model(model, path: str, extra_meta: dict | None = None) -> None:
    """Write the classifier's plain state dict (backbone + head, the torchvision/timm key layout) as safetensors."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.plain_state_dict().items()}
    meta = {k: json.dumps(v) for k, v in {**model.meta(), **(extra_meta or {})}.items()}
    blob = canonical_safetensors(save(sd, metadata=meta))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob)


def canonical_safetensors(blob: bytes) -> bytes:
    """safetensors writes its metadata map in hash (random) order: sort it, so that the same model always
    gives the same bytes (a resumed or repeated run's model.safetensors is compared bitwise)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    h += b" " * (-len(h) % 8)  # the format pads the header with spaces to 8 bytes
    return len(h).to_bytes(8, "little") + h + blob[8 + n:]


def load_model(path: str, model=None):
    """Rebuild the classifier saved by `save_model`; returns (model, metadata), the model in eval mode (as
    RobustBench's `load_model` returns it: ready to evaluate or attack). A model of your own (family "module") needs
    `model`, a fresh instance of its class (its head and weights are replaced from the file)."""
    from . import create_model

    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    sd, meta = read_model_file(path)
    if "arch" not in meta:
        raise UserError(f"{path} has no autolora metadata (arch, num_classes); it was not written by autolora")
    _check_model_meta(path, meta)
    size = meta.get("input_size")
    size = "none" if size is None else size
    family = meta.get("family")
    resize = meta.get("resize", "nearest")
    if family == "module":
        if model is None:
            raise UserError(f"{path} holds a model of your own ({meta['arch']}): load it with "
                            "autolora.load_model(path, model=<a fresh instance of that class>)")
        model = create_model(model, meta["num_classes"], size, head=meta["head_keys"][0], mean=meta["mean"],
                             std=meta["std"], resize=resize)
    else:
        arch = meta["arch"] if family in (None, "tiny") else f"{family}:{meta['arch']}"
        model = create_model(arch, meta["num_classes"], size, resize=resize)
        if "mean" in meta and "std" in meta:  # e.g. a timm tag's, not the arch's default tag's
            model.set_normalisation(meta["mean"], meta["std"])
    if meta.get("peft"):  # adapters or prompts (RoLI's PEFT family): re-added before the weights load
        from .peft import restore

        restore(model.backbone, meta["peft"])
    head = model.spec.head_key + ".weight"
    if head in sd and tuple(sd[head].shape) != tuple(model.head.weight.shape):
        raise UserError(f"{path}: the head has {sd[head].shape[0]} outputs but the file's metadata says "
                        f"{meta['num_classes']} classes ({len(meta.get('classes') or [])} class names): the file is "
                        "inconsistent; re-export it with autolora (or retrain)")
    try:
        model.load_plain_state_dict(sd)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{path} does not fit arch '{meta['arch']}' with {meta['num_classes']} classes: "
                        f"{str(e).strip().splitlines()[-1].strip()}") from None
    return model.eval(), meta


def read_model_file(path: str, what: str = "") -> tuple[dict, dict]:
    """(state dict, decoded metadata) of a safetensors file; one UserError (prefixed `what`) if it is not one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return load_file(path), meta
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what}{path} is not a readable safetensors model file ({e})") from None


def load_probe_head(model, path: str, classes: list[str]) -> None:
    """RoLI's stage 2 start (`src/engine/trainer.py`, MODEL.WEIGHT_PATH): the head of a finished linear-probing run
    (`path`: its directory or model.safetensors) copied into `model`. Its backbone must be `model`'s, tensor for
    tensor (probing froze it: other weights mean another source), and its classes the data's; else one UserError."""
    import torch

    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"--probe-from {path}: no model.safetensors there; name a finished linear-probing run "
                        "(its directory or its model.safetensors)")
    sd, meta = read_model_file(file, "--probe-from ")
    if meta.get("arch") != model.spec.name or meta.get("num_classes") != model.num_classes:
        raise UserError(f"--probe-from {file} is a {meta.get('arch')} with {meta.get('num_classes')} classes, this run "
                        f"a {model.spec.name} with {model.num_classes}: name a probing run of this arch and data")
    if meta.get("classes") not in (None, classes):
        raise UserError(f"--probe-from {file} was trained on classes {meta['classes']}, this run's are {classes}: "
                        "name a probing run on the same data")
    own = model.plain_state_dict()
    heads = {k for k in own if k.startswith(tuple(h + "." for h in model.spec.head_keys))}
    if set(sd) != set(own):
        raise UserError(f"--probe-from {file} holds other tensors than this run's model "
                        f"({len(set(sd) ^ set(own))} differ, e.g. {sorted(set(sd) ^ set(own))[0]}): name a probing "
                        "run of this arch")
    differ = [k for k in own if k not in heads and not torch.equal(own[k].cpu(), sd[k].to(own[k].dtype))]
    if differ:
        raise UserError(f"--probe-from {file}: its backbone is not this run's --weights ({len(differ)} tensors differ, "
                        f"e.g. {differ[0]}): linear probing leaves the backbone as loaded, so it probed other weights; "
                        "name the probing run made from these --weights")
    model.load_plain_state_dict({**own, **{k: sd[k] for k in heads}})


def _check_model_meta(path: str, meta: dict) -> None:
    """The metadata fields `load_model` relies on have the types `save_model` writes; else one UserError."""
    def need(ok, what):
        if not ok:
            raise UserError(f"{path} is not an autolora model file: its metadata {what}; re-export the model with "
                            "autolora (or retrain)")

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    need(isinstance(meta["arch"], str) and meta["arch"], f"names no architecture (arch {meta['arch']!r})")
    n = meta.get("num_classes")
    need(is_int(n) and n >= 2, f"has num_classes {n!r}, not an integer >= 2")
    size = meta.get("input_size")
    need(size is None or (is_int(size) and size >= 8), f"has input_size {size!r}, not null or an integer >= 8")
    need(meta.get("resize", "nearest") in ("nearest", "bilinear"), f"has resize {meta.get('resize')!r}, not nearest "
                                                                     "or bilinear")
    classes = meta.get("classes")
    need(classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
                             and len(classes) == n), f"has classes {str(classes)[:80]!r}, not a list of {n} names")
