"""Vanilla robust fine-tuning, TRADES-style (Zhang et al. 2019; AutoLoRa paper Eq. 1):
    CE(h(x), y) + β·KL(p(x) ‖ p(x̃)),  x̃ = PGD-k on CE (eval mode), β = 6 by default."""
from .losses import ce, ce_rows, kl_rows, kl_sum_batchmean
from .base import Method, correct


# Appendix A, Table 5 of the AutoLoRa paper: (η0, weight decay) of vanilla RFT per dataset.
TABLE5_VANILLA = {
    "cifar10": (1e-2, 1e-4), "cifar100": (1e-3, 1e-4), "dtd": (1e-2, 1e-4),
    "dogs120": (1e-3, 1e-4), "cub200": (1e-2, 1e-4), "caltech256": (1e-2, 1e-4),
}


def table5_vanilla(dataset: str, schedule: str = "step") -> dict:
    lr, wd = TABLE5_VANILLA.get(dataset, (1e-2, 1e-4))
    return {"lr": lr, "weight_decay": wd, "lr_schedule": schedule}


class VanillaRFT(Method):
    name = "vanilla_rft"

    @classmethod
    def defaults(cls, dataset):
        return table5_vanilla(dataset)

    @classmethod
    def options(cls, cfg):
        return ("beta",)

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
