"""Loss pieces shared by the methods."""
import torch.nn.functional as F


def kl_rows(adv_logits, nat_logits, detach_nat: bool = False):
    """KL(p_nat ‖ p_adv) per example, summed over classes (TRADES direction, Zhang et al. 2019): adversarial
    log-probabilities against natural probabilities. Shape [B]."""
    p_nat = F.softmax(nat_logits.float(), dim=1)
    if detach_nat:
        p_nat = p_nat.detach()
    return F.kl_div(F.log_softmax(adv_logits.float(), dim=1), p_nat, reduction="none").sum(1)


def kl_sum_batchmean(adv_logits, nat_logits, detach_nat: bool = False):
    """`kl_rows` averaged over the batch: the KL term of Eq. 1, 2 and 5 of the AutoLoRa paper."""
    return kl_rows(adv_logits, nat_logits, detach_nat).mean()


def ce(logits, y):
    return F.cross_entropy(logits.float(), y)


def ce_rows(logits, y):
    """Cross-entropy per example, shape [B]."""
    return F.cross_entropy(logits.float(), y, reduction="none")
