"""Vanilla robust fine-tuning, TRADES-style (Zhang et al. 2019; AutoLoRa paper Eq. 1):
    CE(h(x), y) + β·KL(p(x) ‖ p(x̃)),  x̃ = PGD-k on CE (eval mode), β = 6 by default."""
from .losses import ce, ce_rows, kl_rows, kl_sum_batchmean
from .base import Method, correct


class VanillaRFT(Method):
    name = "vanilla_rft"

    def training_step(self, x, y):
        x_adv = self.attack(x, y)
        nat = self.fwd(x)
        adv = self.fwd(x_adv)
        loss_nat = ce(nat, y)
        loss_kl = kl_sum_batchmean(adv, nat)
        return {"loss": loss_nat + self.cfg.beta * loss_kl, "ce_nat": loss_nat.detach(), "kl": loss_kl.detach(),
                "correct_nat": correct(nat, y), "correct_adv": correct(adv, y)}

    def gradsim_objectives(self, x, y):
        """Eq. 3: CE(h(x), y) vs KL(p(x) ‖ p(x̃))."""
        x_adv = self.attack(x, y)
        self.train_mode()
        nat = self.net(x)
        return ce_rows(nat, y), kl_rows(self.net(x_adv), nat)
