"""Attack names in one place: what `--eval-attacks`, `autolora eval --attacks`, `--train-attack` and the Python
API accept, the figure each name produces, and the factories that build the attacks (`train_attack`,
`eval_attack`). Importing this module does not import torch; the factories import the attack classes.

Evaluation names: `clean`; `pgd` (PGD with the configured number of steps, `--eval-steps` / `--steps`) or `pgdN`
(exactly N steps); `aa` (AutoAttack, standard version). A figure is named by what ran: `pgd` with 2 steps is
recorded as `pgd2`, never as `pgd10`; PGD-10 with 5 restarts as `pgd10_r5`; AutoAttack's plus and rand versions as
`aa_plus`, `aa_rand`. The norm and eps of each figure are in its `attack_record`. Training attacks: `pgd` (PGD-k,
`--train-steps`) and `fgsm_rs` (FGSM with a random start, L∞ only).
"""
from __future__ import annotations

import re

from ..errors import UserError, suggest
from .norms import AA_VERSIONS, check_norm, check_version  # noqa: F401  (AA_VERSIONS: re-exported for the CLI)

EVAL_ATTACKS = ("clean", "pgd", "pgdN", "aa")
EVAL_HELP = "clean, pgd (PGD with the run's --eval-steps), pgdN (N steps), aa (standard AutoAttack)"
TRAIN_HELP = ("pgd (PGD-k, --train-steps) or fgsm_rs (FGSM with random start, step 1.25·eps; Wong et al. 2020; L∞ "
              "only)")
ALIASES = {"sa": "clean", "natural": "clean", "autoattack": "aa", "aa+": "aa_plus", "aa_standard": "aa"}
TRAIN_ATTACKS = ("pgd", "fgsm_rs")
_PGD_RE = re.compile(r"pgd-?(\d*)(?:_r(\d+))?")
def aa_name(version: str = "standard") -> str:
    """The name (and result key) of AutoAttack in a version: aa, aa_plus, aa_rand."""
    v = check_version(version)
    return "aa" if v == "standard" else f"aa_{v}"


def aa_version(name: str) -> str | None:
    """The version of an AutoAttack name (aa -> standard), else None."""
    if name == "aa":
        return "standard"
    return name[3:] if name.startswith("aa_") and name[3:] in AA_VERSIONS else None


def parse_attacks(spec, pgd_steps: int = 10, *, restarts: int = 1, version: str = "standard") -> list[str]:
    """"clean,pgd,aa" -> ["clean", "pgd10", "aa"] (`pgd` = PGD with `pgd_steps` steps, `pgdN` = N steps; with
    `restarts` R > 1 `pgd10_rR`; `aa` in `version` plus/rand: `aa_plus`/`aa_rand`); duplicates dropped; an unknown
    name is one UserError with a suggestion."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name)
        m = _PGD_RE.fullmatch(name)
        if m:
            steps = int(m.group(1)) if m.group(1) else int(pgd_steps)
            if steps < 1:
                raise UserError(f"attack '{str(item).strip()}' needs at least 1 step: use e.g. pgd10")
            name = pgd_name(steps, int(m.group(2)) if m.group(2) else restarts)
        elif name == "aa":
            name = aa_name(version)
        elif aa_version(name) is None and name != "clean":
            raise UserError(f"unknown attack '{str(item).strip()}'{suggest(name, ('clean', 'pgd', 'pgd10', 'aa'))}: "
                            "use clean, pgd (PGD with --eval-steps steps), pgdN (e.g. pgd20) or aa, comma-separated")
        if name not in names:
            names.append(name)
    if not names:
        raise UserError("no attacks given: use e.g. clean,pgd,aa")
    return names


def pgd_name(steps: int, restarts: int = 1) -> str:
    """The name (and result key) of PGD with `steps` steps: pgd10, pgd2, ...; pgd10_r5 with 5 restarts."""
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise UserError(f"--restarts must be an integer >= 1, got {restarts}")
    return f"pgd{int(steps)}" + (f"_r{restarts}" if restarts > 1 else "")


_PGD_NAME = re.compile(r"pgd(\d+)(?:_r(\d+))?")  # the names `parse_attacks` gives: pgdN, pgdN_rR


def pgd_steps(name: str) -> int | None:
    """N of `pgdN` (or `pgdN_rR`), else None."""
    m = _PGD_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def pgd_restarts(name: str) -> int:
    """R of `pgdN_rR`; 1 for `pgdN` (and any other name)."""
    m = _PGD_NAME.fullmatch(name)
    return int(m.group(2)) if m and m.group(2) else 1


def result_key(name: str) -> str:
    """Key of an attack's accuracy in a result: 'sa' (clean), 'pgdN' or 'aa'."""
    return "sa" if name == "clean" else name


def label(key: str) -> str:
    """A figure's column label: SA, PGD-10, PGD-2, AA."""
    key = key.removeprefix("test_").removeprefix("val_")
    if key == "sa":
        return "SA"
    if aa_version(key) is not None:
        return {"standard": "AA", "plus": "AA+", "rand": "AA-rand"}[aa_version(key)]
    n = pgd_steps(key)
    if n is None:
        return key
    r = pgd_restarts(key)
    return f"PGD-{n}" + (f" ×{r}" if r > 1 else "")


def check_train_attack(name: str, norm: str = "linf") -> None:
    norm = check_norm(norm)
    if name not in TRAIN_ATTACKS:
        raise UserError(f"--train-attack must be one of {', '.join(TRAIN_ATTACKS)}, got '{name}'"
                        f"{suggest(name, TRAIN_ATTACKS)}")
    if name == "fgsm_rs" and norm != "linf":
        raise UserError(f"--train-attack fgsm_rs is L∞ only (Wong et al. 2020 take one signed-gradient step): under "
                        f"--norm {norm} use --train-attack pgd (e.g. --train-steps 2 for a fast one)")


def attack_record(name: str, *, eps: float, step_size: float, norm: str = "linf", keep: str = "last") -> dict:
    """What an evaluation attack name ran, for results.json: clean; PGD (norm, eps, step size, steps, restarts,
    random start); AutoAttack (version, norm, eps)."""
    if name == "clean":
        return {"attack": "clean"}
    if aa_version(name) is not None:
        return {"attack": "autoattack", "version": aa_version(name), "norm": norm, "eps": eps,
                "implementation": "pyautoattack"}
    rec = {"attack": "pgd", "norm": norm, "eps": eps, "step_size": step_size, "steps": pgd_steps(name),
           "restarts": pgd_restarts(name), "random_start": True, "loss": "ce"}
    return rec if keep == "last" else {**rec, "keep": keep}


def train_attack(name: str, model, *, eps: float, step_size: float, steps: int, norm: str = "linf",
                 keep: str = "last"):
    """The training attack: `pgd` (PGD-`steps` of `step_size` under `norm`, returning the iterate `keep` says) or
    `fgsm_rs` (FGSM with a random start, step 1.25·eps; Wong et al. 2020; L∞ only), in eval mode on `model`."""
    check_train_attack(name, norm)
    if name == "fgsm_rs":
        from .fgsm import FGSMRS

        return FGSMRS(model, eps=eps)
    from .pgd import PGD

    return PGD(model, eps=eps, step_size=step_size, steps=steps, norm=norm, keep=keep)


def eval_attack(name: str, model, *, eps: float, step_size: float, norm: str = "linf", batch_size: int = 256,
                device="cpu", autocast_dtype=None, progress=None, keep: str = "last"):
    """The attack an evaluation name runs (None for `clean`): PGD-N (with R restarts) for `pgdN` (`pgdN_rR`), the
    official AutoAttack for `aa` (`aa_plus`, `aa_rand`). `progress(message)` receives AutoAttack's progress."""
    if name == "clean":
        return None
    if aa_version(name) is not None:
        from .autoattack import AutoAttack

        return AutoAttack(model, eps=eps, norm=norm, version=aa_version(name), batch_size=batch_size, device=device,
                          autocast_dtype=autocast_dtype, progress=progress)
    from .pgd import PGD

    return PGD(model, eps=eps, step_size=step_size, steps=pgd_steps(name), norm=norm, restarts=pgd_restarts(name),
               autocast_dtype=autocast_dtype, keep=keep)
