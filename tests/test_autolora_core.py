"""AutoLoRa's mechanics: gradient isolation of the two paths, full branch coverage, Table 4 ratios, Eq. 6-7."""
import re

import pytest
import torch
import torch.nn.functional as F

from autolora.methods import resolve_config
from autolora.config import TrainConfig
from autolora.methods.lora import LoRaBranch, lora_targets
from autolora.methods import create_method
from autolora.models import create_model
from autolora.methods.autolora import lambdas


def _autolora(arch="tiny", **kw):
    model = create_model(arch, 5, input_size="none")
    cfg = resolve_config(TrainConfig(method="autolora", arch=arch, train_steps=2, **kw))
    return create_method("autolora", model, cfg)


def _batch(n=8, size=16):
    return torch.rand(n, 3, size, size), torch.randint(0, 5, (n,))


def _grads(method, loss):
    method.net.zero_grad(set_to_none=True)
    loss.backward()
    lora = [p.grad for p in method.net.lora.parameters()]
    body = [p.grad for p in method.model.backbone.parameters()]
    head = [p.grad for p in method.model.head.parameters()]
    return lora, body, head


def _nonzero(g):
    return g is not None and g.abs().sum() > 0


def test_natural_ce_moves_only_lora_and_head():
    m = _autolora()
    with torch.no_grad():  # B = 0 gives A a zero gradient; make both factors live
        for b in m.net.lora.B.values():
            b.normal_(0, 0.01)
    x, y = _batch()
    m.net.train()
    lora, body, head = _grads(m, F.cross_entropy(m.net(x, natural=True), y))
    assert all(_nonzero(g) for g in lora), "every A and B must receive gradient from the natural CE"
    assert all(g is None for g in body), "θ1 (incl. BN affine) is under stop-gradient on the natural path"
    assert all(_nonzero(g) for g in head)


def test_adversarial_ce_moves_backbone_and_head_never_lora():
    m = _autolora()
    x, y = _batch()
    x_adv = m.attack(x, y)
    m.net.train()
    lora, body, head = _grads(m, F.cross_entropy(m.net(x_adv), y))
    assert all(g is None for g in lora)
    assert sum(_nonzero(g) for g in body) == len(body)
    assert all(_nonzero(g) for g in head)


@pytest.mark.parametrize("train_mode", [False, True])
def test_paths_identical_at_b_zero(train_mode):
    m = _autolora()
    x, _ = _batch()
    m.net.train(train_mode)
    with torch.no_grad():
        a, b = m.net(x), m.net(x, natural=True)
    assert torch.equal(a, b)


def test_every_layer_covered_after_one_step():
    """The reference code wires the branch into the last block of each stage only; ours reaches every layer."""
    m = _autolora()
    targets = m.net.lora.targets
    all_layers = [n for n, mod in m.model.backbone.named_modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    assert targets == all_layers and len(targets) >= 8  # stem, every block's convs, downsample convs
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
    x, y = _batch()
    m.lambda1, m.lambda2 = 0.5, 3.0
    m.net.train()
    out = m.training_step(x, y)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    nat = m.net.lora.natural_params(m.model.backbone)
    body = dict(m.model.backbone.named_parameters())
    for t in targets:
        assert not torch.equal(nat[t + ".weight"], body[t + ".weight"]), f"layer {t} not reached by the branch"


def test_training_step_isolation():
    """One full Eq. 5 step: A, B change; θ1 changes; the KL reaches A, B unless soft labels are detached."""
    for detach in (False, True):
        m = _autolora(detach_soft_labels=detach)
        with torch.no_grad():
            for b in m.net.lora.B.values():
                b.normal_(0, 0.01)
        m.lambda1, m.lambda2 = 0.0, 6.0  # only the adversarial CE and the KL
        x, y = _batch()
        m.net.train()
        lora, body, head = _grads(m, m.training_step(x, y)["loss"])
        assert all(_nonzero(g) for g in body)
        assert all(_nonzero(g) for g in lora) != detach


def test_filter_narrows_branch():
    model = create_model("tiny", 5, input_size="none")
    b = LoRaBranch(model.backbone, rank=2, name_filter=r"^layer3")
    assert b.targets and all(re.match(r"^layer3", t) for t in b.targets)
    with pytest.raises(ValueError):
        LoRaBranch(model.backbone, rank=2, name_filter="nothing-matches")


@pytest.mark.parametrize("rank,paper", [(2, 0.0130), (4, 0.0249), (8, 0.0487), (16, 0.0962)])
def test_table4_param_ratio_resnet18(rank, paper):
    model = create_model("resnet18", 10)
    branch = LoRaBranch(model.backbone, rank=rank)
    ratio = branch.num_params() / sum(p.numel() for p in model.backbone.parameters())
    assert abs(ratio - paper) < 0.1 * paper, (rank, ratio)  # ours is exactly linear in r; the paper rounds
    if rank == 8:
        assert 0.045 <= ratio <= 0.050


def test_vit_branch_covers_attention_and_mlp():
    model = create_model("vit_tiny_patch16_224", 5, input_size=32)
    t = lora_targets(model.backbone)
    for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert any(n.endswith(part) for n in t), part
    m = create_method("autolora", model, resolve_config(TrainConfig(method="autolora", arch="vit_tiny_patch16_224", train_steps=1)))
    x, _ = _batch(2, 32)
    m.net.eval()
    with torch.no_grad():
        assert torch.allclose(m.net(x), m.net(x, natural=True))


def test_lambdas_eq6_eq7():
    for sa in (0.0, 0.1, 0.5, 0.93, 1.0):
        l1, l2 = lambdas(sa, alpha=1.0, lambda2_max=6.0)
        assert l1 == pytest.approx(1 - sa) and l1 + l2 / 6.0 == pytest.approx(1.0)
    l1, l2 = lambdas(0.25, alpha=2.0, lambda2_max=6.0)
    assert l1 == pytest.approx(1 - 0.0625) and l2 == pytest.approx(6 * 0.0625)


def test_lora_init_is_the_authors_unit_normal():
    """A ~ N(0, 1), B = 0 by default (the authors' nn.init.normal_), not a small σ that leaves ΔW ≈ 0."""
    assert TrainConfig().lora_std == 1.0
    m = _autolora()
    a = torch.cat([p.flatten() for p in m.net.lora.A.values()])
    assert abs(a.std().item() - 1.0) < 0.05 and abs(a.mean().item()) < 0.05
    assert all(torch.count_nonzero(b) == 0 for b in m.net.lora.B.values())
    assert _autolora(lora_std=0.02).net.lora.A[m.net.lora.key(m.net.lora.targets[0])].std() < 0.05  # --lora-std


@pytest.mark.parametrize("rank", [2, 8])
def test_lora_delta_is_ba_over_r(rank):
    """ΔW = (1/r)·B·A in the kernel's shape (the authors' scaling lora_alpha / r with lora_alpha = 1)."""
    torch.manual_seed(0)
    backbone = create_model("tiny", 5, input_size="none").backbone
    branch = LoRaBranch(backbone, rank=rank)
    for name in branch.targets:
        k = branch.key(name)
        with torch.no_grad():
            branch.B[k].normal_()
        want = (branch.B[k] @ branch.A[k]).reshape(dict(backbone.named_modules())[name].weight.shape) / rank
        assert torch.allclose(branch.delta(name), want, atol=1e-6), name


@pytest.mark.parametrize("method", ["vanilla_rft", "autolora", "twins"])
def test_per_example_grad_similarity_is_each_examples_own_cosine(method):
    """`per_example=True` gives, for every example, the cosine of its own two θ1-gradients: checked against one
    backward pass per example on the same graph."""
    from autolora.methods.base import per_example_cosines, preserved_buffers

    torch.manual_seed(0)
    m = create_method(method, create_model("tiny", 5, input_size="none"),
                      resolve_config(TrainConfig(method=method, arch="tiny", train_steps=1)))
    x, y = _batch(6)
    params = [p for p in m.model.backbone.parameters() if p.requires_grad]
    with preserved_buffers(m.net):
        m.train_mode()
        nat, adv = m.gradsim_objectives(x, y)
        got = per_example_cosines(nat, adv, params, chunk=4)  # two chunks
        want = []
        for i in range(len(y)):
            g1 = torch.autograd.grad(nat[i], params, retain_graph=True, allow_unused=True)
            g2 = torch.autograd.grad(adv[i], params, retain_graph=True, allow_unused=True)
            flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()  # noqa: E731
                                         for g, p in zip(gs, params)])
            want.append(F.cosine_similarity(flat(g1), flat(g2), dim=0))
    assert torch.allclose(got, torch.stack(want), atol=1e-5)
    assert got.std() > 1e-3  # examples differ: this is not one batch cosine repeated
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    sims = m.grad_similarity(x, y, per_example=True)
    assert len(sims) == len(y) and all(-1 <= s <= 1 for s in sims)
    assert all(torch.equal(before[k], v) for k, v in m.net.state_dict().items())  # BN buffers restored


def _rollback_run(tmp_path, monkeypatch, extra=(), script=(0.5, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1)):
    """A 6-epoch AutoLoRa run whose validation RA is scripted (RA0, then after epochs 0, 1, ...) to fall after
    epoch 0, so the first check (after epoch 4) halves the LR by Condition 1 and rolls back to epoch 0; returns
    the run dir and, per epoch, the weights and SGD state as they are checkpointed (after that epoch's LR
    decision)."""
    import autolora.engine.loop as T
    from helpers import make_imagefolder

    data = make_imagefolder(tmp_path / "data", classes=3, per_class=8, test_per_class=2, size=8)
    script = iter(script)
    monkeypatch.setattr(T, "_val_metrics", lambda method, ctx, loader: {"val_sa": 0.5, T.val_key(ctx.cfg): next(script)})
    seen = {}
    real = T._checkpoint

    def spy(ctx, run, st, epoch, *a):  # the stage's weights and SGD state as they are checkpointed
        seen[epoch] = ({k: v.clone() for k, v in st.method.net.state_dict().items()},
                       {k: dict(v) for k, v in st.opt.state.items()})
        return real(ctx, run, st, epoch, *a)

    monkeypatch.setattr(T, "_checkpoint", spy)
    cfg = TrainConfig(method="autolora", dataset="imagefolder", data_dir=data, arch="tiny", input_size="none",
                      epochs=6, batch_size=8, train_steps=1, eval_steps=1, eval_attacks=["clean"], device="cpu",
                      progress=False, **dict(extra))
    T.train(cfg, str(tmp_path / "run"), quiet=True)
    return tmp_path / "run", seen


@pytest.mark.parametrize("reset", [False, True])
def test_rollback_restores_the_best_weights_and_keeps_momentum_by_default(tmp_path, monkeypatch, reset):
    from helpers import read_jsonl

    assert TrainConfig().reset_momentum_on_rollback is False
    run, seen = _rollback_run(tmp_path, monkeypatch, {"reset_momentum_on_rollback": True} if reset else {})
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows if "lr_event" in r] == [4]
    assert "condition 1" in rows[4]["lr_event"] and "rolled back to epoch 0" in rows[4]["lr_event"]
    assert rows[5]["lr"] == pytest.approx(0.005)
    weights, momentum = seen[4]
    assert all(torch.equal(weights[k], seen[0][0][k]) for k in weights)  # epoch 0's weights, after epoch 4
    if reset:
        assert momentum == {}
    else:  # the authors reload the model only: SGD keeps its momentum buffers
        assert momentum and all(torch.count_nonzero(s["momentum_buffer"]) > 0 for s in momentum.values())


def test_rollback_on_a_tie_goes_to_the_first_best_epoch(tmp_path, monkeypatch):
    """Validation accuracy ties often on a few hundred images: like the authors' strict `>` (from max_acc = -1),
    the best epoch is the first to reach the maximum, and the roll-back returns there."""
    from helpers import read_jsonl

    run, seen = _rollback_run(tmp_path, monkeypatch, script=(0.5, 0.6, 0.5, 0.6, 0.3, 0.2, 0.1, 0.1))
    rows = read_jsonl(run / "metrics.jsonl")
    assert "rolled back to epoch 0" in rows[4]["lr_event"]
    assert all(torch.equal(v, seen[0][0][k]) for k, v in seen[4][0].items())
    assert not all(torch.equal(v, seen[2][0][k]) for k, v in seen[4][0].items())  # not the tying epoch 2
