"""Learning-rate and loss-scalar schedules.

`StepLR`: the baselines' protocol (Liu et al. 2023; AutoLoRa Sec. 5): η0, ÷10 at each milestone (30 and 50 of 60).

`AutoLR`: AutoLoRa's automated LR (Sec. 4.2, Algorithm 1), AutoAttack's step-size rule applied to the LR.
Let RA_e be the validation PGD-10 accuracy of the weights after e training epochs (RA_0: before training).
Checkpoints c_j are every `interval` epochs (E/M; 4 for E = 60, M = 15). At c_j the LR is halved if
  Condition 1: #{e ∈ [c_{j-1}, c_j): RA_{e+1} > RA_e} < 0.75·(c_j − c_{j-1})  (accuracy rose in fewer than 75 %
               of the epochs; the paper prints the inequality the wrong way round, AutoAttack has it this way), or
  Condition 2: η was not halved at c_{j-1} and the best RA so far did not improve since c_{j-1}.
On a halving the trainer rolls the weights (θ, A, B, BN statistics) back to the best epoch so far and clears the
optimiser's momentum (it belongs to the abandoned trajectory); RA_{c_j} then becomes the best RA. Training stops
once η < min_lr or at epoch E.

`lambdas`: AutoLoRa's λ1 = 1 − SA^α, λ2 = λ2max·SA^α (Eq. 6, 7), SA the natural (LoRa) path's training accuracy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


class StepLR:
    def __init__(self, lr0: float, milestones, factor: float = 0.1):
        self.lr0, self.milestones, self.factor = lr0, sorted(milestones), factor

    def lr_at(self, epoch: int) -> float:
        return self.lr0 * self.factor ** sum(epoch >= m for m in self.milestones)


@dataclass
class AutoLRDecision:
    halve: bool = False
    reason: str | None = None  # "condition 1" / "condition 2" / "condition 1+2"
    rollback: bool = False
    stop: bool = False


@dataclass
class AutoLR:
    lr: float = 0.01
    interval: int = 4
    min_lr: float = 1e-5
    rho: float = 0.75
    history: list = field(default_factory=list)  # RA_0, RA_1, ...
    best: float = float("-inf")
    best_at_last_check: float = float("-inf")
    last_check: int = 0
    reduced_last_check: bool = False

    def start(self, ra0: float) -> None:
        """Record RA_0, the validation robust accuracy before training."""
        self.history = [float(ra0)]

    def observe(self, epoch: int, ra: float) -> AutoLRDecision:
        """Record RA after training epoch `epoch` (0-based) and decide at checkpoint epochs."""
        if not self.history:
            raise RuntimeError("AutoLR.start(ra0) must be called before training")
        self.history.append(float(ra))
        self.best = max(self.best, float(ra))
        c = epoch + 1  # epochs trained so far
        if c % self.interval:
            return AutoLRDecision()
        prev = self.last_check
        window = self.history[prev: c + 1]
        rises = sum(b > a for a, b in zip(window, window[1:]))
        cond1 = rises < self.rho * (c - prev)
        cond2 = (not self.reduced_last_check) and self.best <= self.best_at_last_check
        halve = cond1 or cond2
        reason = None
        if halve:
            reason = "condition 1+2" if cond1 and cond2 else ("condition 1" if cond1 else "condition 2")
            self.lr /= 2
            self.history[c] = self.best  # the rolled-back weights are the best ones
        self.reduced_last_check = halve
        self.best_at_last_check = self.best
        self.last_check = c
        return AutoLRDecision(halve=halve, reason=reason, rollback=halve, stop=self.lr < self.min_lr)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def lambdas(sa: float, alpha: float = 1.0, lambda2_max: float = 6.0) -> tuple[float, float]:
    """Eq. 6 and 7: λ1 = 1 − SA^α, λ2 = λ2max · SA^α."""
    s = float(sa) ** alpha
    return 1.0 - s, lambda2_max * s
