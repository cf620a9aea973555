"""The two threat models, their default budgets (pixel units of images in [0, 1]) and AutoAttack's versions. Imports
no torch.

- L∞: eps 8/255 at every resolution (RobustBench's CIFAR L∞ budget; the AutoLoRa paper's).
- L2: eps 0.5 for low-resolution images (at most 64 px a side: RobustBench's CIFAR-10 L2 budget) and 3.0 above
  (Salman et al. 2020's L2 training budget at 224²).
- The step: eps/4 for both, i.e. 2.5·eps/10, Madry et al.'s rule for 10 steps (8/255 -> 2/255; L2 0.5 -> 0.125).
"""
from __future__ import annotations

from ..errors import UserError, suggest
from ..utils.pixels import format_pixels

NORMS = ("linf", "l2")
NORM_LABEL = {"linf": "L∞", "l2": "L2"}
_ALIASES = {"inf": "linf", "l_inf": "linf", "linfty": "linf", "2": "l2", "l_2": "l2"}
DEFAULT_EPS = {("linf", "low"): 8 / 255, ("linf", "high"): 8 / 255, ("l2", "low"): 0.5, ("l2", "high"): 3.0}
NORM_HELP = ("threat model of every attack (training, validation, test, eval): linf or l2 (Madry et al.'s PGD-L2; "
             "AutoAttack with norm='L2')")
EPS_HELP = ("attack budget in pixel units of images in [0, 1] (default: the norm's for the data's resolution: "
            "L∞ 8/255; L2 0.5 for images of at most 64 px a side (RobustBench CIFAR L2), 3.0 above (Salman et al.'s "
            "224² budget))")
STEP_HELP = "PGD step in pixel units, training and evaluation (default: eps/4 = 2.5·eps/10, Madry et al.'s rule)"


def check_norm(norm) -> str:
    """'linf' or 'l2' (also accepted: Linf, L2, inf, 2); one UserError otherwise."""
    n = _ALIASES.get(str(norm).strip().lower(), str(norm).strip().lower())
    if n not in NORMS:
        raise UserError(f"unknown norm '{norm}'{suggest(str(norm).lower(), NORMS)}: use linf or l2")
    return n


def default_eps(norm: str, resolution: str) -> float:
    """The norm's budget for data of a resolution ("low": at most 64 px a side, "high": above)."""
    return DEFAULT_EPS[(check_norm(norm), "low" if resolution == "low" else "high")]


def default_step_size(eps: float) -> float:
    """eps/4 = 2.5·eps/10 (Madry et al.'s step for 10 steps); 8/255 -> 2/255."""
    return eps / 4


def resolve_budget(norm: str, eps, step_size, resolution: str) -> tuple[float, float]:
    """(eps, step): the given ones, else the norm's default eps for data of `resolution` and eps/4. eps 0 (the clean
    images) gets the default budget's step: never taken, but valid. The one place this rule is written."""
    eps = default_eps(norm, resolution) if eps is None else float(eps)
    step = default_step_size(eps or default_eps(norm, resolution)) if step_size is None else float(step_size)
    return eps, step


def eps_text(norm: str, eps) -> str:
    """"8/255" under L∞, "0.5" under L2: a budget's number as a user types it."""
    return format_pixels(eps) if norm == "linf" else f"{float(eps):g}"


def budget_label(norm: str, eps) -> str:
    """"L∞ 8/255", "L2 0.5": a budget as a figure names it."""
    return f"{NORM_LABEL.get(norm, norm)} {eps_text(norm, eps)}"


AA_VERSIONS = ("standard", "plus", "rand")  # pyautoattack's versions (Croce & Hein 2020); rand: randomised defences


def check_version(version: str) -> str:
    """An AutoAttack version: standard, plus or rand; one UserError otherwise."""
    v = str(version).strip().lower()
    if v not in AA_VERSIONS:
        raise UserError(f"unknown AutoAttack version '{version}'{suggest(v, AA_VERSIONS)}: use standard, plus or rand "
                        "(pyautoattack's versions; rand for randomised defences)")
    return v
