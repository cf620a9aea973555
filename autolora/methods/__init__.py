"""Registry of robust fine-tuning methods (one file each), all run by `autolora.engine.loop`, and `resolve_config`,
which asks the run's method for its presets and the flags it reads."""
from __future__ import annotations

import dataclasses
import os

from ..config import PEFT_MODES, TrainConfig, check_milestones, default_milestones
from ..errors import UserError, suggest
from .autolora import AutoLoRa
from .base import Method
from .linear_probe import LinearProbe
from .madry_ft import MadryFT
from .twins import Twins
from .twins_at import TwinsAT
from .vanilla_rft import VanillaRFT

METHOD_REGISTRY: dict[str, type[Method]] = {
    VanillaRFT.name: VanillaRFT,
    AutoLoRa.name: AutoLoRa,
    Twins.name: Twins,
    TwinsAT.name: TwinsAT,
    LinearProbe.name: LinearProbe,
    MadryFT.name: MadryFT,
}


# spelled-out combinations: `--method roli` = RoLI's adversarial linear probing, then Madry fine-tuning
SHORTHANDS: dict[str, dict] = {"roli": {"method": "madry_ft", "init": "roli"}}

# flags of an initialisation rather than a method: `--init roli` (RoLI's stage 1) reads these
INIT_OPTIONS: dict[str, tuple[str, ...]] = {"roli": ("probe_epochs", "probe_lr", "probe_weight_decay",
                                                      "probe_lr_schedule", "probe_from")}


def register(cls: type[Method]) -> type[Method]:
    """Add a Method subclass to the registry: `--method <cls.name>` (config, CLI, compare) accepts it."""
    METHOD_REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every name `--method` accepts: the registry's, then the shorthands."""
    return [*METHOD_REGISTRY, *SHORTHANDS]


def method_class(name: str) -> type[Method]:
    if name not in METHOD_REGISTRY:
        names = method_names()
        raise UserError(f"unknown method '{name}'{suggest(name, names)}: choose one of {', '.join(names)}")
    return METHOD_REGISTRY[name]


def create_method(name: str, model, cfg) -> Method:
    return method_class(name)(model, cfg)


def method_specific_options() -> set[str]:
    """Every flag that some method or initialisation reads and others do not."""
    probe = TrainConfig()
    out = set()
    for cls in METHOD_REGISTRY.values():
        for peft in PEFT_MODES:
            out |= set(cls.options(dataclasses.replace(probe, peft=peft)))
    for opts in INIT_OPTIONS.values():
        out |= set(opts)
    return out


def used_options(cfg: TrainConfig) -> set[str]:
    """The method-specific flags that the run of `cfg` (its method and init; shorthands expanded) reads."""
    cfg = expand_shorthand(cfg)
    used = set(method_class(cfg.method).options(cfg))
    if cfg.init in INIT_OPTIONS and cfg.method != "linear_probe":
        used |= set(INIT_OPTIONS[cfg.init])
    return used


def expand_shorthand(cfg: TrainConfig) -> TrainConfig:
    fields = SHORTHANDS.get(cfg.method)
    return dataclasses.replace(cfg, **fields) if fields else cfg


def unused_options(cfg: TrainConfig) -> list[str]:
    """Method-specific flags set to a non-default value that the run's method does not read."""
    used = used_options(cfg)
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(TrainConfig)}
    return sorted(k for k in method_specific_options() - used if getattr(cfg, k) != defaults[k])


def readers(option: str) -> list[str]:
    """Which methods (or inits) read a method-specific flag, for error messages."""
    probe = TrainConfig()
    who = []
    for name, cls in METHOD_REGISTRY.items():
        modes = [p for p in PEFT_MODES if option in cls.options(dataclasses.replace(probe, peft=p))]
        if modes:
            who.append(name if "none" in modes or len(modes) == len(PEFT_MODES) - 1 or name != "madry_ft"
                       else f"{name} --peft {'/'.join(modes)}")
    return who + [f"--init {i}" for i, opts in INIT_OPTIONS.items() if option in opts]


def check_options(cfg: TrainConfig) -> None:
    """UserError for a method-specific flag the run's method would silently ignore."""
    unused = unused_options(cfg)
    if unused:
        k = unused[0]
        what = f"method '{cfg.method}'" + (f" (init {cfg.init})" if cfg.init != "random" else "")
        raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)} is not read by {what}; it applies to "
                        f"{', '.join(readers(k))}: drop it, or choose one of those")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """A copy with every preset filled in (what is saved as RUN_DIR/config.yaml): the shorthand expanded, the
    method's per-dataset defaults (`Method.defaults`) where the config leaves None, the step schedule's milestones,
    RoLI's probing epochs; a method-specific flag that the method does not read is refused (`check_options`)."""
    c = expand_shorthand(cfg)
    cls = method_class(c.method)
    if c.peft != "none" and "peft" not in cls.options(c):
        raise UserError(f"--peft {c.peft} applies to madry_ft (and roli): method '{c.method}' has its own trainable set")
    check_options(c)
    for k, v in cls.defaults(c.dataset).items():
        if getattr(c, k) is None:
            setattr(c, k, v)
    if c.lr_schedule is None:
        c.lr_schedule = cls.default_lr_schedule
    if c.milestones is None:
        c.milestones = default_milestones(c.epochs)
    check_milestones(c.milestones, c.epochs)
    if c.init == "roli" and c.probe_from is not None and c.probe_epochs is not None:
        raise UserError(f"--probe-epochs {c.probe_epochs} with --probe-from: stage 1 is the run --probe-from names, "
                        "nothing is probed here; drop one of them")
    if c.probe_from is not None:
        c.probe_from = os.path.abspath(c.probe_from)  # config.yaml names it wherever the run is resumed from
    if c.init == "roli" and c.method != "linear_probe" and c.probe_epochs is None and c.probe_from is None:
        c.probe_epochs = max(1, c.epochs // 2)
    return TrainConfig.from_dict(c.to_dict(), "resolved config")


def preset_config(name: str, **options) -> TrainConfig:
    """A config from preset `name` (`methods.presets`: roli, twins-authors) for the options given (its dataset, PEFT
    mode and init choose the preset's values; the options override them)."""
    from .presets import PRESETS, preset_values

    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'{suggest(name, PRESETS)}: choose one of {', '.join(PRESETS)}")
    return TrainConfig.from_dict(preset_values(name, options), f"preset {name}")


__all__ = ["METHOD_REGISTRY", "preset_config", "SHORTHANDS", "Method", "register", "method_names", "create_method", "resolve_config",
           "check_options", "used_options"]
