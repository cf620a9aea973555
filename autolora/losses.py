"""Loss pieces shared by the methods."""
import torch.nn.functional as F


def kl_sum_batchmean(adv_logits, nat_logits, detach_nat: bool = False):
    """KL(p_nat ‖ p_adv) summed over classes, averaged over the batch (TRADES direction, Zhang et al. 2019):
    adversarial log-probabilities against natural probabilities. Used by Eq. 1, 2 and 5 of the AutoLoRa paper."""
    p_nat = F.softmax(nat_logits.float(), dim=1)
    if detach_nat:
        p_nat = p_nat.detach()
    return F.kl_div(F.log_softmax(adv_logits.float(), dim=1), p_nat, reduction="batchmean")


def kl_sum(adv_logits, nat_logits):
    """KL(p_nat ‖ p_adv) summed over classes and over the batch (TWINS divides by the whole batch size)."""
    return F.kl_div(F.log_softmax(adv_logits.float(), dim=1), F.softmax(nat_logits.float(), dim=1), reduction="sum")


def ce(logits, y):
    return F.cross_entropy(logits.float(), y)
