"""PGD properties on tiny models and a handful of 16x16 images (CPU, a few seconds)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autolora.attacks import PGD, Attack
from autolora.errors import UserError
from autolora.models import create_model
from helpers import fit, squares

EPS = 8 / 255


def tiny(k=4, seed=0):
    torch.manual_seed(seed)
    return create_model("tiny", k, input_size="none")


@pytest.fixture(scope="module")
def data():
    return squares(16)


@pytest.fixture(scope="module")
def trained():
    """A tiny ResNet trained briefly (eval mode on return); clean accuracy is high."""
    return fit(tiny(), *squares(32, seed=1), steps=15)


def ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_pgd_in_ball_and_range(data):
    x, y = data
    model = tiny().eval()
    for eps in (EPS, 0.3):
        torch.manual_seed(1)
        x_adv = PGD(model, eps=eps, step_size=eps / 4, steps=5)(x, y)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv != x).any()


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_pgd_increases_loss(which, data, trained):
    x, y = data
    model = tiny().eval() if which == "untrained" else trained
    torch.manual_seed(0)
    x_adv = PGD(model, eps=EPS, steps=10)(x, y)
    clean, adv = ce(model, x, y), ce(model, x_adv, y)
    assert adv.mean() > clean.mean()
    assert (adv >= clean - 1e-4).float().mean() >= 0.9
    # and much more than a random point of the same budget
    noise = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    assert adv.mean() > ce(model, noise, y).mean()


def test_more_steps_not_weaker(data, trained):
    x, y = data
    losses = {}
    for steps in (1, 10):
        torch.manual_seed(0)
        losses[steps] = ce(trained, PGD(trained, eps=EPS, step_size=EPS / 4, steps=steps)(x, y), y).mean()
    assert losses[10] >= losses[1]


def test_one_step_without_random_start_is_fgsm(data):
    """steps=1, no random start, step_size=eps: exactly x + eps * sign(grad CE), clipped to [0, 1]."""
    x, y = data
    model = tiny().eval()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), [xg])
    expected = (x + EPS * g.sign()).clamp(0, 1)
    got = PGD(model, eps=EPS, step_size=EPS, steps=1, random_start=False)(x, y)
    assert torch.allclose(got, expected, atol=1e-6)


def test_seeded_random_start_is_reproducible(data):
    x, y = data
    model = tiny().eval()
    attack = PGD(model, eps=EPS, steps=2)
    torch.manual_seed(3)
    a = attack(x, y)
    torch.manual_seed(3)
    b = attack(x, y)
    c = attack(x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_buffers_and_grads_untouched_in_train_mode(data):
    x, y = data
    model = tiny().train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    head_grad = torch.full_like(model.head.weight, 0.5)
    model.head.weight.grad = head_grad.clone()
    PGD(model, eps=EPS, steps=3)(x, y)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for name, p in model.named_parameters():
        if name == "head.weight":
            assert torch.equal(p.grad, head_grad)
        else:
            assert p.grad is None, name
    assert all(m.training for m in model.modules())


def test_eval_during_attack_and_mixed_modes_restored(data):
    x, y = data
    model = tiny().train()
    model.backbone.layer2.eval()
    model.preprocess.eval()
    before = [m.training for m in model.modules()]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen.append(m.training)) for m in model.modules()]
    PGD(model, eps=EPS, steps=2)(x, y)
    for h in hooks:
        h.remove()
    assert seen and not any(seen)  # every module ran in eval mode
    assert [m.training for m in model.modules()] == before
    model.eval()
    PGD(model, eps=EPS, steps=1)(x, y)
    assert not any(m.training for m in model.modules())


def test_modes_restored_on_exception(data):
    x, y = data

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.fc = nn.Linear(3 * 16 * 16, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return self.fc(self.bn(x).flatten(1))

    model = Boom().train()
    model.fc.eval()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(model, eps=EPS, steps=3)(x, y)
    assert model.training and model.bn.training and not model.fc.training


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen", "autocast"])
def test_works_in_caller_contexts(context, data):
    """Same result under no_grad / inference_mode / frozen params / the caller's autocast."""
    x, y = data
    model = tiny().eval()
    torch.manual_seed(0)
    reference = PGD(model, eps=EPS, steps=2)(x, y)
    torch.manual_seed(0)
    if context == "no_grad":
        with torch.no_grad():
            got = PGD(model, eps=EPS, steps=2)(x, y)
    elif context == "inference_mode":
        with torch.inference_mode():
            xi, yi = x.clone(), y.clone()  # inference tensors
            got = PGD(model, eps=EPS, steps=2)(xi, yi)
        got = got.clone()
    elif context == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        got = PGD(model, eps=EPS, steps=2)(x, y)
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    else:
        dtypes = []
        hook = model.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = PGD(model, eps=EPS, steps=2)(x, y)
        hook.remove()
        assert set(dtypes) == {torch.float32}  # the caller's autocast does not leak in
    assert torch.equal(got, reference)


def test_autocast_dtype_opt_in(data):
    x, y = data
    model = tiny().eval()
    dtypes = []
    hook = model.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    x_adv = PGD(model, eps=EPS, steps=2, autocast_dtype=torch.bfloat16)(x, y)
    hook.remove()
    assert set(dtypes) == {torch.bfloat16}
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_eps_zero_returns_input_and_input_untouched(data):
    x, y = data
    x0 = x.clone()
    model = tiny().eval()
    assert torch.equal(PGD(model, eps=0, steps=5)(x, y), x)
    PGD(model, eps=EPS, steps=2)(x, y)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("kwargs", [
    {"eps": -0.1}, {"eps": 8}, {"eps": float("nan")}, {"step_size": 0}, {"step_size": -1e-3},
    {"steps": -1}, {"steps": 1.5}, {"steps": True},
])
def test_bad_arguments(kwargs):
    with pytest.raises(UserError):
        PGD(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize("kwargs", [{"step_size": -0.1}, {"step_size": 0.0}, {"eps": -0.1}, {"eps": 8}, {"step_size": 2.0}])
def test_fgsm_rs_bad_arguments_like_pgd(kwargs):
    """FGSM-RS validates its step like PGD (a negative step used to pass silently)."""
    from autolora.attacks import FGSMRS

    with pytest.raises(UserError):
        FGSMRS(nn.Linear(2, 2), **{"eps": 8 / 255, **kwargs})
    FGSMRS(nn.Linear(2, 2), eps=0.0)  # eps 0: the default step 1.25·eps = 0 is never taken


def test_base_class_contract():
    """A custom attack gets eval mode and grad mode from the base class."""
    seen = {}

    class Probe(Attack):
        def perturb(self, x, y):
            seen["training"] = self.model.training
            seen["grad"] = torch.is_grad_enabled()
            return x + 0

    model = nn.Linear(3, 2).train()
    with torch.no_grad():
        out = Probe(model)(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    assert seen == {"training": False, "grad": True}
    assert model.training and not out.requires_grad


# ------------------------------------------------------------------------------------------------ L2 (issue 23)
L2 = 0.5


def l2_norms(x_adv, x):
    return (x_adv.double() - x.double()).flatten(1).norm(dim=1)


def test_pgd_l2_in_ball_and_range(data):
    x, y = data
    model = tiny().eval()
    for eps in (L2, 2.0):
        torch.manual_seed(1)
        x_adv = PGD(model, eps=eps, step_size=eps / 4, steps=5, norm="l2")(x, y)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
        assert (l2_norms(x_adv, x) <= eps + 1e-6).all()  # per example
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (l2_norms(x_adv, x) > eps / 2).any()  # it moves: the ball is not left unused
        assert (x_adv - x).abs().max() > 8 / 255  # L2, not a small L∞ box: single pixels move far


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_pgd_l2_increases_loss(which, data, trained):
    x, y = data
    model = tiny().eval() if which == "untrained" else trained
    torch.manual_seed(0)
    x_adv = PGD(model, eps=L2, steps=10, norm="l2")(x, y)
    clean, adv = ce(model, x, y), ce(model, x_adv, y)
    assert adv.mean() > clean.mean() and (adv >= clean - 1e-4).float().mean() >= 0.9
    g = torch.randn_like(x)  # a random direction of the same L2 length
    noise = (x + g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * L2).clamp(0, 1)
    assert adv.mean() > ce(model, noise, y).mean()


def test_pgd_l2_buffers_grads_and_modes_untouched(data):
    x, y = data
    model = tiny().train()
    model.backbone.layer2.eval()
    before = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    PGD(model, eps=L2, steps=3, norm="l2")(x, y)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == before


def test_pgd_l2_one_step_is_a_normalised_gradient_step(data):
    """steps=1, no random start: x + step·g/‖g‖₂ per example, projected onto the ball and [0, 1]."""
    x, y = data
    model = tiny().eval()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), [xg])
    step = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
    expected = (x + 0.3 * step).clamp(0, 1)
    got = PGD(model, eps=L2, step_size=0.3, steps=1, norm="l2", random_start=False)(x, y)
    assert torch.allclose(got, expected, atol=1e-6)


def test_pgd_agrees_with_torchattacks():
    """The same model (BatchNorm and Dropout left in train mode), images and seed as torchattacks 3.5.1's PGD and
    PGDL2 give the same adversarial images, bit for bit (tests/fixtures/torchattacks_pgd.py recorded them; our L2
    random start is torchattacks' draw)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
    from torchattacks_pgd import CASES, FIXTURE, make_model

    rec = torch.load(FIXTURE, weights_only=True)
    model = make_model()
    model.load_state_dict({k[len("model."):]: v for k, v in rec.items() if k.startswith("model.")})
    model.train()
    for norm, _, kw, seed in CASES:
        torch.manual_seed(seed)
        got = PGD(model, eps=kw["eps"], step_size=kw["alpha"], steps=kw["steps"], norm=norm)(rec["x"], rec["y"])
        assert torch.equal(got, rec[f"adv_{norm}"]), norm
        assert model.training


def test_default_budget_follows_norm_and_resolution():
    model = nn.Linear(1, 1)
    small, large = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 224, 224)
    assert PGD(model).budget(small) == (8 / 255, 2 / 255) == PGD(model).budget(large)
    assert PGD(model, norm="l2").budget(small) == (0.5, 0.125)
    assert PGD(model, norm="L2").budget(large) == (3.0, 0.75)
    assert PGD(model, eps=1.0, norm="l2").budget(small) == (1.0, 0.25)
    PGD(model, eps=3.0, step_size=1.5, norm="l2")  # an L2 radius may exceed 1
    with pytest.raises(UserError, match="above 1"):
        PGD(model, eps=3.0)
    with pytest.raises(UserError, match="unknown norm 'l1'"):
        PGD(model, norm="l1")


def test_restarts_count_an_example_robust_only_if_every_restart_fails(data, trained):
    """Restart 1 is the single-start attack (same RNG); each later restart attacks the examples still correct, so
    accuracy can only fall with restarts, and here it does."""
    x, y = data
    acc = {}
    for r in (1, 8):
        torch.manual_seed(0)
        x_adv = PGD(trained, eps=0.06, step_size=0.06, steps=1, restarts=r)(x, y)
        with torch.no_grad():
            acc[r] = trained(x_adv).argmax(1) == y
    assert not (acc[8] & ~acc[1]).any() and acc[8].sum() < acc[1].sum()
    with pytest.raises(UserError, match="restarts"):
        PGD(trained, restarts=0)
    with pytest.raises(UserError, match="random start"):
        PGD(trained, restarts=2, random_start=False)


def test_fgsm_rs_is_refused_under_l2():
    from autolora.attacks.registry import train_attack
    from autolora.config import TrainConfig

    with pytest.raises(UserError, match="fgsm_rs is L∞ only.*--train-attack pgd"):
        train_attack("fgsm_rs", nn.Linear(2, 2), eps=0.5, step_size=0.1, steps=1, norm="l2")
    with pytest.raises(UserError, match="fgsm_rs is L∞ only"):
        TrainConfig(train_attack="fgsm_rs", norm="l2")
    assert train_attack("pgd", nn.Linear(2, 2), eps=0.5, step_size=0.1, steps=3, norm="l2").norm == "l2"
