"""The options `train`, `compare` and `pretrain` share: one flag per TrainConfig field (help, group and default
from the field's metadata), the pixel-unit number parser, and defaults < --config < flags."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re

from ..config import GROUPS, TrainConfig, load_yaml
from ..utils.pixels import format_pixels, pixels


def _shown(value, pixels: bool = False) -> str:
    """A default as a user would type it: 8/255 for a pixel budget, a comma list for lists."""
    if isinstance(value, float):
        return format_pixels(value) if pixels else f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def add_train_options(p: argparse.ArgumentParser, *, exclude=(), defaults: dict | None = None,
                      aliases: dict | None = None) -> None:
    """One flag per TrainConfig field, in the field's group, with its help and default from the field's metadata
    (`defaults` overrides the shown default, e.g. pretrain's; `exclude` leaves fields out; `aliases` adds option
    strings). Numbers accept fractions (`--eps 8/255`); bool fields are switches (tri-state ones --x/--no-x); lists
    are comma-separated. Every default is None here, so `given_flags` can tell given flags from defaults."""
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    defaults, aliases = defaults or {}, aliases or {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        kinds = {k.strip() for k in str(f.type).split("|")}
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = defaults.get(f.name, default)
        h = f.metadata["help"]
        if f.name == "method":  # the registry as it is when the parser is built, methods registered by plugins too
            from ..methods import method_names

            h = h.format(names=", ".join(method_names()))
        if f.name in defaults:  # this command's own default replaces train's (and what train's preset means)
            h = re.split(r" \(default|; default", h)[0]
        if default is not None and default is not False and "default" not in h:
            h += f" (default: {_shown(default, f.metadata['group'] == 'attack')})"
        g = groups[f.metadata["group"]]
        names = [flag, *aliases.get(f.name, ())]
        if "bool" in kinds:
            action = argparse.BooleanOptionalAction if "None" in kinds else "store_true"
            g.add_argument(*names, dest=f.name, action=action, default=None, help=h)
        elif "list" in kinds:
            item = f.metadata.get("item") or str
            g.add_argument(*names, dest=f.name, default=None, metavar="A,B,...", help=h,
                           type=lambda text, t=item: [t(v) for v in text.split(",") if v])
        else:
            typ = int if "int" in kinds else pixel_arg if "float" in kinds else str
            g.add_argument(*names, dest=f.name, type=typ, default=None, help=h)


def pixel_list(text: str) -> list[float]:
    """Comma-separated numbers, each as `pixel_arg` takes it (0.01, 8/255)."""
    return [pixel_arg(v) for v in text.split(",") if v.strip()]


def pixel_arg(text: str) -> float:
    """argparse type of every number flag: `0.0314` or a fraction such as `8/255` (pixel units)."""
    try:
        return pixels(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (e.g. 0.0314 or 8/255)") from None


def given_flags(args) -> dict:
    """The TrainConfig fields given explicitly on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None}


def config_values(args) -> dict:
    """Defaults < --config < explicit flags, as a mapping of the fields that were given (file, preset or flags).
    `--config` is a YAML file, or a preset (`autolora.methods.presets`: roli, twins-authors), whose values depend on
    the dataset (and --peft, --init) the flags or defaults give."""
    from ..methods.presets import PRESETS, preset_values

    name = getattr(args, "config", None)
    given = given_flags(args)
    if name in PRESETS and not os.path.exists(name):
        return preset_values(name, given)
    base = load_yaml(name, presets=sorted(PRESETS)) if name else {}
    TrainConfig.from_dict(base, source=name or "config")  # unknown keys or wrong types -> error naming the file
    return {**base, **given}


def config_from_args(args) -> tuple[TrainConfig, dict]:
    """Defaults < --config < explicit flags. Returns the config and the explicitly given flags."""
    return TrainConfig.from_dict(config_values(args)), given_flags(args)
