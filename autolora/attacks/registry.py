"""Attack names in one place: what `--eval-attacks`, `autolora eval --attacks`, `--train-attack` and the Python
API accept, the figure each name produces, and the factories that build the attacks (`train_attack`,
`eval_attack`). Importing this module does not import torch; the factories import the attack classes.

Evaluation names: `clean`; `pgd` (PGD with the configured number of steps, `--eval-steps` / `--steps`) or `pgdN`
(exactly N steps); `aa` (AutoAttack). A figure is named by what ran: `pgd` with 2 steps is recorded as `pgd2`,
never as `pgd10`. Training attacks: `pgd` (PGD-k, `--train-steps`) and `fgsm_rs` (FGSM with a random start).
"""
from __future__ import annotations

import re

from ..errors import UserError, suggest

EVAL_ATTACKS = ("clean", "pgd", "pgdN", "aa")
EVAL_HELP = "clean, pgd (PGD with the run's --eval-steps), pgdN (N steps), aa (standard AutoAttack)"
TRAIN_HELP = "pgd (PGD-k, --train-steps) or fgsm_rs (FGSM with random start, step 1.25·eps; Wong et al. 2020)"
ALIASES = {"sa": "clean", "natural": "clean", "autoattack": "aa"}
TRAIN_ATTACKS = ("pgd", "fgsm_rs")


def parse_attacks(spec, pgd_steps: int = 10) -> list[str]:
    """"clean,pgd,aa" -> ["clean", "pgd10", "aa"] (`pgd` = PGD with `pgd_steps` steps, `pgdN` = N steps);
    duplicates dropped; an unknown name is one UserError with a suggestion."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name)
        m = re.fullmatch(r"pgd-?(\d*)", name)
        if m:
            steps = int(m.group(1)) if m.group(1) else int(pgd_steps)
            if steps < 1:
                raise UserError(f"attack '{str(item).strip()}' needs at least 1 step: use e.g. pgd10")
            name = pgd_name(steps)
        elif name not in ("clean", "aa"):
            raise UserError(f"unknown attack '{str(item).strip()}'{suggest(name, ('clean', 'pgd', 'pgd10', 'aa'))}: "
                            "use clean, pgd (PGD with --eval-steps steps), pgdN (e.g. pgd20) or aa, comma-separated")
        if name not in names:
            names.append(name)
    if not names:
        raise UserError("no attacks given: use e.g. clean,pgd,aa")
    return names


def pgd_name(steps: int) -> str:
    """The name (and result key) of PGD with `steps` steps: pgd10, pgd2, ..."""
    return f"pgd{int(steps)}"


def pgd_steps(name: str) -> int | None:
    """N of `pgdN`, else None."""
    m = re.fullmatch(r"pgd(\d+)", name)
    return int(m.group(1)) if m else None


def result_key(name: str) -> str:
    """Key of an attack's accuracy in a result: 'sa' (clean), 'pgdN' or 'aa'."""
    return "sa" if name == "clean" else name


def label(key: str) -> str:
    """A figure's column label: SA, PGD-10, PGD-2, AA."""
    key = key.removeprefix("test_").removeprefix("val_")
    if key == "sa":
        return "SA"
    if key == "aa":
        return "AA"
    n = pgd_steps(key)
    return f"PGD-{n}" if n is not None else key


def check_train_attack(name: str) -> None:
    if name not in TRAIN_ATTACKS:
        raise UserError(f"--train-attack must be one of {', '.join(TRAIN_ATTACKS)}, got '{name}'"
                        f"{suggest(name, TRAIN_ATTACKS)}")


def attack_record(name: str, *, eps: float, step_size: float, norm: str = "linf", keep: str = "last") -> dict:
    """What an evaluation attack name ran, for results.json: clean; PGD (norm, eps, step size, steps, restarts,
    random start); AutoAttack (version, norm, eps)."""
    if name == "clean":
        return {"attack": "clean"}
    if name == "aa":
        return {"attack": "autoattack", "version": "standard", "norm": norm, "eps": eps, "implementation": "pyautoattack"}
    rec = {"attack": "pgd", "norm": norm, "eps": eps, "step_size": step_size, "steps": pgd_steps(name), "restarts": 1,
           "random_start": True, "loss": "ce"}
    return rec if keep == "last" else {**rec, "keep": keep}


def train_attack(name: str, model, *, eps: float, step_size: float, steps: int, keep: str = "last"):
    """The training attack: `pgd` (PGD-`steps` of `step_size`, returning the iterate `keep` says) or `fgsm_rs` (FGSM
    with a random start, step 1.25·eps; Wong et al. 2020), in eval mode on `model`."""
    check_train_attack(name)
    if name == "fgsm_rs":
        from .fgsm import FGSMRS

        return FGSMRS(model, eps=eps)
    from .pgd import PGD

    return PGD(model, eps=eps, step_size=step_size, steps=steps, keep=keep)


def eval_attack(name: str, model, *, eps: float, step_size: float, batch_size: int = 256, device="cpu",
                autocast_dtype=None, keep: str = "last"):
    """The attack an evaluation name runs (None for `clean`): PGD-N for `pgdN`, the official AutoAttack for `aa`."""
    if name == "clean":
        return None
    if name == "aa":
        from .autoattack import AutoAttack

        return AutoAttack(model, eps=eps, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
    from .pgd import PGD

    return PGD(model, eps=eps, step_size=step_size, steps=pgd_steps(name), autocast_dtype=autocast_dtype, keep=keep)
