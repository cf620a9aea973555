"""Learning-rate schedules.

`StepLR`: the baselines' protocol (Liu et al. 2023; AutoLoRa Sec. 5): η0, ÷10 at each milestone (30 and 50 of 60).
`WarmupCosine`: RoLI's per-epoch linear warm-up from 0, then cosine.
`iteration_lr`: per-iteration "onecycle" / "cosine" schedules of adversarial pre-training (Wong et al. 2020).

`AutoLR`: AutoLoRa's automated LR (Sec. 4.2, Algorithm 1), AutoAttack's step-size rule applied to the LR.
Let RA[e] be the validation PGD-10 accuracy after training epoch e (0-based). With `rules="authors"` (the
default) it does what the authors' script does (RobustSSL_Benchmark, `AutoLoRa_high_resolution.py`, where the
paper is silent or ambiguous):
- checkpoint epochs c_j = j·interval for j = 1, 2, ... (the authors hard-code W = [0, 4, 8, ..., 56] and test
  `epoch - 1 == W[w_index]` from w_index = 1); c_0 = 0; never the final epoch (nothing follows it; the authors
  also decide there when it is in W) and on beyond 56 (their W ends there): both in the README's deviations;
- the accuracy before training is not part of any window (the authors' `loss_list[0]` is RA after epoch 0);
- Condition 1: #{e ∈ [c_{j-1}, c_j): RA[e+1] > RA[e]} < 0.75·(c_j − c_{j-1}) (the accuracy rose in fewer than
  75 % of the window's epochs; the paper's formula counts falls with ≤, against its own text and the authors' code);
- Condition 2: the best RA did not improve since c_{j-1} (at c_1 never: the authors' `eta_list[1]` starts at 0,
  so their η-equality test fails there and holds at every later check, as `eta_list` is copied forward);
- on a halving the trainer rolls the weights back to the best epoch; the history keeps the abandoned epoch's RA,
  and (`reset_momentum=False`) SGD's momentum is kept, since the authors reload the model only.
`rules="apgd"` is AutoAttack's APGD rule as printed, a named option: checkpoints after every `interval`
epochs counted from the accuracy before training RA_0 (which opens the first window), the final epoch included;
Condition 2 also needs "η not halved at the previous check" (AutoAttack's APGD, Croce & Hein 2020); after a
halving the history holds the best RA at c_j (the weights rolled back to). Training stops once η < min_lr.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..config import AUTO_LR_RULES  # noqa: E402  (the names live next to the config)


def iteration_lr(schedule: str, peak: float, it: int, total: int) -> float:
    """LR of iteration `it` (0-based) of `total` for the per-iteration schedules of adversarial (pre)training:
    "onecycle" (linear 0 → peak over the first 40 %, then linear → 0; Wong et al. 2020) or "cosine" (peak → 0)."""
    t = (it + 0.5) / max(total, 1)
    if schedule == "onecycle":
        return peak * (t / 0.4 if t < 0.4 else max(0.0, (1 - t) / 0.6))
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown per-iteration schedule {schedule!r}")


class StepLR:
    def __init__(self, lr0: float, milestones, factor: float = 0.1):
        self.lr0, self.milestones, self.factor = lr0, sorted(milestones), factor

    def lr_at(self, epoch: int) -> float:
        return self.lr0 * self.factor ** sum(epoch >= m for m in self.milestones)


@dataclass
class AutoLRDecision:
    halve: bool = False
    reason: str | None = None  # "condition 1" / "condition 2" / "condition 1+2"
    stop: bool = False


@dataclass
class AutoLR:
    lr: float = 0.01
    interval: int = 4
    min_lr: float = 1e-5
    rho: float = 0.75
    epochs: int | None = None  # E: "authors" rules never check at the final epoch E - 1
    rules: str = "authors"
    ra0: float | None = None  # validation RA before training (logged; opens the first window under "apgd")
    history: list = field(default_factory=list)  # "authors": RA[0], RA[1], ...; "apgd": RA_0, RA[0], RA[1], ...
    best: float = float("-inf")
    best_at_last_check: float = float("-inf")
    last_check: int = 0  # c_{j-1}, as an index into `history`
    reduced_last_check: bool = False
    started: bool = False

    def __post_init__(self):
        if self.rules not in AUTO_LR_RULES:
            raise ValueError(f"AutoLR rules must be one of {AUTO_LR_RULES}, got {self.rules!r}")

    def start(self, ra0: float) -> None:
        """Record RA before training."""
        self.ra0, self.started = float(ra0), True
        self.history = [float(ra0)] if self.rules == "apgd" else []

    def is_check(self, epoch: int) -> bool:
        """Whether the LR is decided after training epoch `epoch` (0-based)."""
        if self.rules == "apgd":
            return (epoch + 1) % self.interval == 0
        last = self.epochs - 1 if self.epochs is not None else None
        return epoch > 0 and epoch % self.interval == 0 and (last is None or epoch < last)

    def observe(self, epoch: int, ra: float) -> AutoLRDecision:
        """Record RA after training epoch `epoch` (0-based) and decide at checkpoint epochs."""
        if not self.started:
            raise RuntimeError("AutoLR.start(ra0) must be called before training")
        self.history.append(float(ra))
        self.best = max(self.best, float(ra))
        if not self.is_check(epoch):
            return AutoLRDecision(stop=self.lr < self.min_lr)
        c = len(self.history) - 1  # index of this epoch's RA: epoch ("authors") or epoch + 1 ("apgd")
        prev = self.last_check
        window = self.history[prev: c + 1]
        rises = sum(b > a for a, b in zip(window, window[1:]))
        cond1 = rises < self.rho * (c - prev)
        not_improved = self.best <= self.best_at_last_check  # -inf before the first check: False there
        cond2 = not_improved and (self.rules == "authors" or not self.reduced_last_check)
        halve = cond1 or cond2
        reason = None
        if halve:
            reason = "condition 1+2" if cond1 and cond2 else ("condition 1" if cond1 else "condition 2")
            self.lr /= 2
            if self.rules == "apgd":
                self.history[c] = self.best  # the rolled-back weights are the best ones
        self.reduced_last_check = halve
        self.best_at_last_check = self.best
        self.last_check = c
        return AutoLRDecision(halve=halve, reason=reason, stop=self.lr < self.min_lr)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)



class WarmupCosine:
    """RoLI's schedule (Hua et al. 2024; `src/solver/lr_scheduler.py`, a LambdaLR stepped once per epoch): LR(e) =
    lr0 · e / W for the W warm-up epochs (epoch 0 trains at LR 0), then lr0 · ½(1 + cos(π (e − W) / (E − W))); the
    last epoch's LR is small, not zero."""

    def __init__(self, lr0: float, warmup: int, epochs: int):
        self.lr0, self.warmup, self.epochs = lr0, warmup, epochs

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup:
            return self.lr0 * epoch / max(1, self.warmup)
        progress = (epoch - self.warmup) / max(1, self.epochs - self.warmup)
        return self.lr0 * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
