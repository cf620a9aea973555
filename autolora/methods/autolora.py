"""AutoLoRa (Xu, Zhang, Kankanhalli, ICLR 2024): RFT disentangled via a low-rank branch, Eq. 5–7.

Loss (Eq. 5):  λ1·CE(h_{θ̄1+BA,θ2}(x), y) + (1 − λ1)·CE(h_θ(x̃), y) + λ2·KL(p_{θ̄1+BA}(x) ‖ p_θ(x̃)),
with the natural path through θ̄1 + BA (θ1 under stop-gradient: only A, B and the head θ2 learn from it)
and the adversarial path through plain θ (never A, B). Both forwards run in train mode (batch statistics).
As in the authors' code the natural soft labels are not detached (`detach_soft_labels` offers the other reading).
x̃ = PGD-k on CE of the adversarial path, eval mode. λ1, λ2 follow the branch's training SA (Eq. 6, 7).
"""
from .base import Method, correct
from .lora import LORA_OPTIONS, BranchNet, LoRaBranch, check_lora_targets
from .losses import ce, ce_rows, kl_rows, kl_sum_batchmean


def lambdas(sa: float, alpha: float = 1.0, lambda2_max: float = 6.0) -> tuple[float, float]:
    """Eq. 6 and 7: λ1 = 1 − SA^α, λ2 = λ2max · SA^α (α: the sharpening exponent, `--sharpen-alpha`)."""
    s = float(sa) ** alpha
    return 1.0 - s, lambda2_max * s


class AutoLoRaNet(BranchNet):
    """The classifier plus its LoRa branch: `forward(x)` is the adversarial path h_θ, `forward(x, natural=True)`
    the natural one h_{θ̄1+BA, θ2}."""

    def forward(self, x, natural: bool = False):
        return super().forward(x) if natural else self.model(x)


class AutoLoRa(Method):
    name = "autolora"
    default_lr_schedule = "auto"

    @classmethod
    def defaults(cls, dataset):
        return {"lr": 1e-2, "weight_decay": 1e-4, "lr_schedule": "auto"}  # Algorithm 1: η0 = 0.01

    @classmethod
    def options(cls, cfg):
        return (*LORA_OPTIONS, "sharpen_alpha", "lambda2_max", "detach_soft_labels")

    @classmethod
    def check_model(cls, model, cfg):
        check_lora_targets(model.backbone, cfg.lora_filter, "--lora-filter")

    def build_net(self):
        cfg = self.cfg
        branch = LoRaBranch(self.model.backbone, rank=cfg.rank, std=cfg.lora_std, name_filter=cfg.lora_filter)
        self.lambda1, self.lambda2 = 1.0, 0.0  # SA = 0 before the first measurement
        return AutoLoRaNet(self.model, branch)

    def on_epoch_start(self, ctx):
        """Eq. 6, 7: SA of the natural (LoRa) path on the training data, eval mode, before each epoch."""
        sa = ctx.accuracy(lambda x: self.net(x, natural=True), ctx.train_eval_loader)
        self.lambda1, self.lambda2 = lambdas(sa, self.cfg.sharpen_alpha, self.cfg.lambda2_max)
        return {"lora_train_sa": sa, "lambda1": self.lambda1, "lambda2": self.lambda2}

    def training_step(self, x, y):
        x_adv = self.attack(x, y)
        nat = self.fwd(x, natural=True)
        adv = self.fwd(x_adv)
        loss_nat = ce(nat, y)
        loss_adv = ce(adv, y)
        loss_kl = kl_sum_batchmean(adv, nat, detach_nat=self.cfg.detach_soft_labels)
        loss = self.lambda1 * loss_nat + (1 - self.lambda1) * loss_adv + self.lambda2 * loss_kl
        return {"loss": loss, "ce_nat": loss_nat.detach(), "ce_adv": loss_adv.detach(), "kl": loss_kl.detach(),
                "correct_nat": correct(nat, y), "correct_adv": correct(adv, y)}

    def gradsim_objectives(self, x, y):
        """Eq. 8: KL(p_{θ̄1+BA}(x) ‖ p_θ(x̃)) (natural: the branch's soft labels) vs CE(h_θ(x̃), y), w.r.t. θ1."""
        x_adv = self.attack(x, y)
        self.train_mode()
        adv = self.net(x_adv)
        return kl_rows(adv, self.net(x, natural=True)), ce_rows(adv, y)

    def extra_state(self):
        return {"lambda1": self.lambda1, "lambda2": self.lambda2}

    def load_extra_state(self, state):
        self.lambda1, self.lambda2 = state.get("lambda1", 1.0), state.get("lambda2", 0.0)

    def lora_parameters(self):
        return list(self.net.lora.parameters())
