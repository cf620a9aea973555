"""Registry of robust fine-tuning methods (one file each), all run by `autolora.trainer`."""
from .autolora import AutoLoRa
from .base import Method
from .vanilla_rft import VanillaRFT

METHOD_REGISTRY: dict[str, type[Method]] = {
    VanillaRFT.name: VanillaRFT,
    AutoLoRa.name: AutoLoRa,
}


def register(cls: type[Method]) -> type[Method]:
    METHOD_REGISTRY[cls.name] = cls
    return cls


def create_method(name: str, model, cfg) -> Method:
    from ..errors import UserError, suggest

    if name not in METHOD_REGISTRY:
        raise UserError(f"unknown method '{name}'{suggest(name, METHOD_REGISTRY)}: choose one of {', '.join(METHOD_REGISTRY)}")
    return METHOD_REGISTRY[name](model, cfg)
