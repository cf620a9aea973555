"""Adversarial attacks in pixel space (inputs in [0, 1]; eps and step sizes in pixel units)."""
from .base import Attack, eval_mode
from .fgsm import FGSMRS
from .pgd import PGD

__all__ = ["Attack", "FGSMRS", "PGD", "eval_mode"]
