"""Adversarial attacks in pixel space (inputs in [0, 1]; eps and step sizes in pixel units).

Names and what they record live in `registry` (imported without torch); the attack classes load on first use."""

__all__ = ["Attack", "AutoAttack", "FGSMRS", "PGD", "eval_mode"]

_WHERE = {"Attack": "base", "eval_mode": "base", "FGSMRS": "fgsm", "PGD": "pgd", "AutoAttack": "autoattack"}


def __getattr__(name):  # lazy: `autolora.attacks.registry` (names only) does not import torch
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)


def __dir__():
    return sorted([*globals(), *_WHERE])
