"""Registry of robust fine-tuning methods (one file each), all run by `autolora.engine.loop`."""
from .autolora import AutoLoRa
from .base import Method
from .linear_probe import LinearProbe
from .madry_ft import MadryFT
from .twins import Twins
from .vanilla_rft import VanillaRFT

METHOD_REGISTRY: dict[str, type[Method]] = {
    VanillaRFT.name: VanillaRFT,
    AutoLoRa.name: AutoLoRa,
    Twins.name: Twins,
    LinearProbe.name: LinearProbe,
    MadryFT.name: MadryFT,
}


# spelled-out combinations: `--method roli` = RoLI's adversarial linear probing, then Madry fine-tuning
SHORTHANDS: dict[str, dict] = {"roli": {"method": "madry_ft", "init": "roli"}}


def register(cls: type[Method]) -> type[Method]:
    """Add a Method subclass to the registry: `--method <cls.name>` (config, CLI, compare) accepts it."""
    METHOD_REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every name `--method` accepts: the registry's, then the shorthands."""
    return [*METHOD_REGISTRY, *SHORTHANDS]


def create_method(name: str, model, cfg) -> Method:
    from ..errors import UserError, suggest

    if name not in METHOD_REGISTRY:
        raise UserError(f"unknown method '{name}'{suggest(name, METHOD_REGISTRY)}: choose one of {', '.join(METHOD_REGISTRY)}")
    return METHOD_REGISTRY[name](model, cfg)
