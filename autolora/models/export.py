"""The exported model format: `model.safetensors`, the classifier's plain state dict (backbone + head under the
plain torchvision / timm / tiny keys) with JSON metadata: arch, family, num_classes, classes, input_size, resize,
input_range, mean, std, head_keys (see `Classifier.meta`) plus the writer's extras (e.g. method). Everything a plain
model needs to reproduce the classifier: inputs in [0, 1], resized (nearest) to input_size, then normalised.
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


def load_model(path: str):
    """Rebuild the classifier saved by `save_model`; returns (model, metadata), the model in eval mode (as
    RobustBench's `load_model` returns it: ready to evaluate or attack)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from . import create_model

    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        sd = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a readable safetensors model file ({e})") from None
    if "arch" not in meta:
        raise UserError(f"{path} has no autolora metadata (arch, num_classes); it was not written by autolora")
    _check_model_meta(path, meta)
    size = meta.get("input_size")
    model = create_model(meta["arch"], meta["num_classes"], "none" if size is None else size)
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
    classes = meta.get("classes")
    need(classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
                             and len(classes) == n), f"has classes {str(classes)[:80]!r}, not a list of {n} names")
