"""TWINS-TRADES, adversarial linear probing and Madry fine-tuning (full / LoRA / bias): what each trains,
what it leaves untouched, what it exports; and each end to end through the CLI on tiny generated data."""
import dataclasses

import pytest
import torch
import torch.nn as nn

import torch.nn.functional as F

from autolora.methods import resolve_config
from autolora.config import TrainConfig
from autolora.errors import UserError
from autolora.methods.losses import ce
from autolora.methods import create_method
from autolora.methods.twins import DualBN, split_point
from autolora.models import create_model
from autolora.models.tiny import TinyResNet
from helpers import E2E_ARGS as E2E
from helpers import make_imagefolder, read_json, read_jsonl

NUM_CLASSES = 3


def kl_sum(adv, nat):
    """KL(p_nat ‖ p_adv) summed over classes and examples, written out here as an independent reference."""
    return F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="sum")


def _method(name, wd=0.0, **kw):
    model = create_model("tiny", NUM_CLASSES, input_size="none")
    with torch.no_grad():  # "pretrained" BN statistics that are not the defaults
        for m in model.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    cfg = resolve_config(TrainConfig(method=name, arch="tiny", train_steps=1, weight_decay=wd, **kw))
    return create_method(name, model, cfg)


def _batch(n=8, size=16):
    return torch.rand(n, 3, size, size), torch.randint(0, NUM_CLASSES, (n,))


def _steps(method, n=2, batch=8, lr=0.05):
    from autolora.engine.loop import make_optimizer

    opt = make_optimizer(method, dataclasses.replace(method.cfg, lr=lr))  # the trainer's own SGD (momentum, WD)
    for _ in range(n):
        x, y = _batch(batch)
        method.train_mode()
        loss = method.training_step(x, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module, params_only=None):
    after = module.state_dict()
    names = before if params_only is None else [n for n, _ in module.named_parameters() if n in before]
    return {k for k in names if not torch.equal(before[k], after[k])}


# ---------------------------------------------------------------------------------------------- TWINS
def test_twins_frozen_statistics_bit_identical_adaptive_move():
    m = _method("twins")
    duals = [d for d in m.model.backbone.modules() if isinstance(d, DualBN)]
    assert len(duals) == sum(isinstance(x, nn.BatchNorm2d) for x in TinyResNet().modules())
    frozen = {id(d): {k: v.clone() for k, v in d.frz.named_buffers()} for d in duals}
    ada0 = [d.ada.running_mean.clone() for d in duals]
    frz_w0 = [d.frz.weight.detach().clone() for d in duals]
    # both branches start from the pretrained layer
    assert all(torch.equal(d.frz.running_var, d.ada.running_var) for d in duals)
    _steps(m, n=2)
    for d in duals:
        for k, v in d.frz.named_buffers():
            assert torch.equal(v, frozen[id(d)][k]), f"frozen {k} changed"
    assert all(not torch.equal(d.ada.running_mean, a) for d, a in zip(duals, ada0)), "adaptive stats must move"
    assert all(not torch.equal(d.frz.weight, w) for d, w in zip(duals, frz_w0)), "frozen affine must train"
    # validation / attack / export use the adaptive branch only
    m.net.eval()
    x, _ = _batch(4)
    with torch.no_grad():
        out = m.eval_model()(x)
        exported = m.export_model().eval()(x)
    assert torch.allclose(out, exported, atol=1e-6)


def test_twins_loss_is_the_papers_formula():
    m = _method("twins", gamma=3.0)
    x, y = _batch(7)  # odd: 3 frozen, 4 adaptive
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    m.attack = lambda a, b: x_adv
    k = split_point(7)
    assert k == 3
    m.train_mode()
    state = _snapshot(m.net)
    loss = m.training_step(x, y)["loss"]
    m.net.load_state_dict(state)  # separate forwards: frozen branch on x1 alone, adaptive branch on x2 alone
    frz = lambda t: m.net(t, split=len(t))
    ada = lambda t: m.net(t, split=0)
    nat1, adv1 = frz(x[:k]), frz(x_adv[:k])
    nat2, adv2 = ada(x[k:]), ada(x_adv[k:])
    want = 3.0 * ce(nat1, y[:k]) + ce(nat2, y[k:]) + 6.0 / 7 * (3.0 * kl_sum(adv1, nat1) + kl_sum(adv2, nat2))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("b", [1, 2, 3, 5])
def test_twins_small_and_odd_batches(b):
    m = _method("twins")
    x, y = _batch(b)
    m.train_mode()
    out = m.training_step(x, y)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_twins_export_loads_into_plain_backbone():
    m = _method("twins")
    _steps(m, n=1)
    sd = m.export_model().plain_state_dict()
    assert not any(".frz." in k or ".ada." in k for k in sd)
    net = TinyResNet()
    net.fc = nn.Linear(64, NUM_CLASSES)
    net.load_state_dict(sd)  # strict
    duals = [d for d in m.model.backbone.modules() if isinstance(d, DualBN)]
    assert torch.equal(sd["bn1.running_mean"], duals[0].ada.running_mean)
    assert torch.equal(sd["bn1.weight"], duals[0].ada.weight)


def test_twins_gradsim_eq4_leaves_buffers_alone():
    m = _method("twins")
    before = {k: v.clone() for k, v in m.net.named_buffers()}
    s = m.grad_similarity(*_batch(6))
    assert -1 <= s <= 1
    assert all(torch.equal(v, before[k]) for k, v in m.net.named_buffers())


def test_twins_without_batchnorm_is_a_clear_error():
    model = create_model("tiny", NUM_CLASSES, input_size="none")
    for mod in list(model.backbone.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(mod, cname, nn.Identity())
    cfg = resolve_config(TrainConfig(method="twins", arch="tiny"))
    with pytest.raises(UserError, match="batch normalisation"):
        create_method("twins", model, cfg)


@pytest.mark.parametrize("dataset,lr,gamma", [("cifar10", 1e-2, 1.0), ("dtd", 1e-3, 1.0), ("cub200", 1e-2, 3.0),
                                              ("caltech256", 3e-3, 1.0)])
def test_twins_table5_presets(dataset, lr, gamma):
    c = resolve_config(TrainConfig(method="twins", dataset=dataset))
    assert (c.lr, c.weight_decay, c.gamma, c.beta) == (lr, 1e-4, gamma, 6.0)


# ---------------------------------------------------------------------------------------------- linear probing
def test_linear_probe_changes_only_the_head():
    m = _method("linear_probe", wd=1e-2)
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in m.model.head.parameters()}
    m.train_mode()
    assert not any(x.training for x in m.model.backbone.modules()), "backbone stays in eval mode"
    before = _snapshot(m.model)
    _steps(m, n=2)
    assert _changed(before, m.model) == {"head.weight", "head.bias"}  # every backbone param and buffer identical


# ---------------------------------------------------------------------------------------------- Madry fine-tuning
def test_madry_full_trains_everything():
    m = _method("madry_ft", peft="none")
    before = _snapshot(m.model)
    _steps(m, n=1)
    params = {n for n, _ in m.model.named_parameters()}
    assert _changed(before, m.model, params_only=True) == params


def test_peft_bias_changes_exactly_the_biases_and_head():
    m = _method("madry_ft", peft="bias", wd=1e-2)
    before = _snapshot(m.model)
    _steps(m, n=2)
    want = {n for n, _ in m.model.backbone.named_parameters() if n.endswith(".bias")}
    want = {f"backbone.{n}" for n in want} | {"head.weight", "head.bias"}
    assert len(want) > 2
    assert _changed(before, m.model, params_only=True) == want


def test_peft_lora_both_factors_train_and_nothing_else():
    m = _method("madry_ft", peft="lora")  # weight decay 0: a change is the loss's doing
    lora = m.net.lora
    a0 = {k: v.detach().clone() for k, v in lora.A.items()}
    b0 = {k: v.detach().clone() for k, v in lora.B.items()}
    assert all(v.abs().sum() == 0 for v in b0.values()) and all(v.abs().sum() > 0 for v in a0.values())
    before = _snapshot(m.model)
    trainable = {id(p) for p in m.trainable_parameters()}
    assert trainable == {id(p) for p in lora.parameters()} | {id(p) for p in m.model.head.parameters()}
    _steps(m, n=1)
    assert all(not torch.equal(lora.B[k], b0[k]) for k in b0), "B gets gradient at the first step"
    _steps(m, n=1)
    assert all(not torch.equal(lora.A[k], a0[k]) for k in a0), "A gets gradient once B != 0"
    assert all(lora.A[k].grad is not None and lora.A[k].grad.abs().sum() > 0 for k in a0)
    changed = _changed(before, m.model, params_only=True)
    assert changed == {"head.weight", "head.bias"}, "backbone weights stay frozen"
    # export merges W + BA/r into a plain classifier with the same outputs
    m.net.eval()
    x, _ = _batch(4)
    exported = m.export_model().eval()
    with torch.no_grad():
        assert torch.allclose(m.eval_model()(x), exported(x), atol=1e-5)
    net = TinyResNet()
    net.fc = nn.Linear(64, NUM_CLASSES)
    net.load_state_dict(exported.plain_state_dict())
    assert sum(p.numel() for p in m.lora_parameters()) == lora.num_params() > 0


def test_peft_only_for_madry():
    with pytest.raises(UserError, match="--peft"):
        resolve_config(TrainConfig(method="vanilla_rft", peft="lora"))
    assert resolve_config(TrainConfig(method="roli", peft="bias")).method == "madry_ft"


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), classes=NUM_CLASSES, per_class=12, test_per_class=3)


@pytest.mark.parametrize("method,extra", [
    ("twins", ["--lr-schedule", "auto", "--log-gradsim", "--gradsim-samples", "8"]),
    ("linear_probe", ["--lr-schedule", "auto"]),
    ("madry_ft", ["--peft", "none"]),
    ("madry_ft", ["--peft", "lora", "--lr-schedule", "auto"]),
    ("madry_ft", ["--peft", "bias"]),
])
def test_cli_end_to_end(tmp_path, data, method, extra):
    from safetensors.torch import load_file

    from autolora.cli import main

    out = tmp_path / "run"
    assert main(["train", "--method", method, "--data-dir", data, *E2E, "--epochs", "1", "--out", str(out), *extra]) == 0
    res = read_json(out / "results.json")
    assert res["method"] == method and 0 <= res["test_pgd10"] <= res["test_sa"] <= 1
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["main"]
    if method == "twins":
        assert -1 <= rows[0]["grad_sim"] <= 1
    assert (res["lora_params"] > 0) == ("lora" in extra)
    net = TinyResNet()
    net.fc = nn.Linear(64, NUM_CLASSES)
    net.load_state_dict(load_file(out / "model.safetensors"))  # plain keys, strict


def test_a_registered_method_is_accepted_everywhere(tmp_path, capsys):
    """The registry is the only list of method names: a Method registered by a user is accepted by TrainConfig,
    `compare`'s specs and the trainer, which runs it, and `--method`'s help names it."""
    from autolora.methods import METHOD_REGISTRY, method_names, register
    from autolora.methods.base import AdversarialCE
    from autolora.workflows.compare import parse_spec

    class CleanCE(AdversarialCE):  # a toy method: Madry's objective on clean inputs, automated LR by default
        name = "clean_ce"
        default_lr_schedule = "auto"

        def training_step(self, x, y):
            logits = self.fwd(x)
            return {"loss": ce(logits, y)}

    register(CleanCE)
    try:
        assert "clean_ce" in method_names() and "roli" in method_names()
        from autolora.cli import main

        with pytest.raises(SystemExit):
            main(["train", "--help"])
        assert "clean_ce" in " ".join(capsys.readouterr().out.split())  # --method's help: the registry as it is now
        assert resolve_config(TrainConfig(method="clean_ce")).lr_schedule == "auto"  # its class's default schedule
        assert resolve_config(TrainConfig(method="vanilla_rft")).lr_schedule == "step"
        assert parse_spec("clean_ce:roli") == ("clean_ce", "roli")
        from autolora.engine.loop import train

        data = make_imagefolder(tmp_path / "d", classes=2, per_class=6, test_per_class=2, size=8)
        res = train(TrainConfig(method="clean_ce", dataset="imagefolder", data_dir=str(data), arch="tiny",
                                input_size="none", epochs=1, batch_size=4, eval_attacks=["clean"], device="cpu",
                                progress=False), str(tmp_path / "run"), quiet=True)
        assert res["method"] == "clean_ce" and res["epochs_run"] == 1
    finally:
        METHOD_REGISTRY.pop("clean_ce")
    with pytest.raises(UserError, match="unknown method 'clean_ce'"):
        resolve_config(TrainConfig(method="clean_ce"))
