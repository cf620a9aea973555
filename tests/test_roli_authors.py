"""RoLI and TWINS as their authors ran them (issue 22): each default of the `roli` and `twins-authors` presets and of
RoLI's machinery (warm-up cosine, AdamW without decay on biases, the highest-loss PGD iterate, the RanLI head, the
CIFAR tail split and transforms, the frozen encoder in eval mode) has a test that fails without it; each PEFT mode
trains only its own parameters and exports loadably; TWINS-AT's loss is the paper's formula; TWINS-TRADES forwards
the adversarial half first."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autolora.config import TrainConfig
from autolora.errors import UserError
from autolora.methods import create_method, preset_config, resolve_config
from autolora.models import BackboneSpec, Classifier, create_model
from helpers import E2E_ARGS as E2E
from helpers import make_imagefolder, read_json

NUM = 3


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("dataset, probe, stage2, epochs", [
    ("cifar10", (0.05 / 4, 0.01), (1e-4 / 4, 0.01), 20),
    ("cifar100", (0.1 / 4, 0.001), (1e-4 / 4, 0.01), 20),
    ("caltech256", (0.5 / 4, 0.01), (1e-4 / 4, 0.01), 40),
    ("cub200", (1.0 / 4, 0.001), (1e-4 / 4, 0.01), 60),
    ("dogs120", (1.0 / 4, 0.01), (5e-5 / 4, 0.01), 40),
])
def test_roli_preset_per_dataset(dataset, probe, stage2, epochs):
    """configs/linear/<ds>_ranli.yaml and configs/finetune/<ds>_roli.yaml, every LR × batch 64 / 256, AdamW's decay
    0.01 whatever positive value the YAML has."""
    c = resolve_config(preset_config("roli", dataset=dataset))
    assert (c.method, c.init, c.batch_size, c.epochs, c.probe_epochs) == ("madry_ft", "roli", 64, epochs, epochs)
    assert (c.probe_lr, c.probe_weight_decay, c.probe_lr_schedule) == (pytest.approx(probe[0]), probe[1],
                                                                       "warmup_cosine")
    assert (c.lr, c.weight_decay, c.optimizer, c.lr_schedule, c.warmup_epochs) == (
        pytest.approx(stage2[0]), stage2[1], "adamw", "warmup_cosine", 10)
    assert (c.train_steps, c.eval_steps, c.pgd_keep, c.head_init) == (7, 10, "best_batch", "roli")
    low = dataset.startswith("cifar")
    assert (c.augmentation, c.resize, c.val_split) == ("roli", "bilinear", "tail" if low else "stratified")


def test_roli_preset_peft_modes_and_the_sgd_switch():
    lora = resolve_config(preset_config("roli", dataset="cifar10", peft="lora"))
    assert (lora.rank, lora.lora_alpha, lora.lora_qkv, lora.peft_encoder) == (16, 16.0, "qv", "eval")
    assert lora.lr == pytest.approx(0.001 / 4)
    # lora/cifar100_ranli.yaml has WEIGHT_DECAY 0.0: their optimizer then is SGD without decay
    ranli = resolve_config(preset_config("roli", dataset="cifar100", peft="lora", init="random"))
    assert (ranli.weight_decay, ranli.init, ranli.probe_epochs) == (0.0, "random", None)
    assert preset_config("roli", dataset="cub200", peft="prompt", init="random").prompt_tokens == 20
    with pytest.raises(UserError, match="no RoLI run with --peft prompt"):
        preset_config("roli", dataset="cifar10", peft="prompt")
    with pytest.raises(UserError, match="not 'dtd'"):
        preset_config("roli", dataset="dtd")
    assert preset_config("roli", dataset="cifar10", epochs=3).epochs == 3  # a flag wins over the preset


def test_twins_authors_preset():
    c = resolve_config(preset_config("twins-authors", dataset="caltech256"))
    assert (c.method, c.lr, c.weight_decay, c.gamma, c.milestones, c.batch_size) == (
        "twins", 0.003, 1e-3, 0.4, [30, 50], 128)
    assert resolve_config(preset_config("twins-authors", dataset="cifar10")).weight_decay == 1e-5
    assert resolve_config(preset_config("twins-authors", dataset="cifar10", method="twins_at")).method == "twins_at"
    with pytest.raises(UserError, match="cifar10, caltech256"):
        preset_config("twins-authors", dataset="cub200")
    assert resolve_config(TrainConfig(method="twins", dataset="caltech256")).lr == 3e-3  # Table 5 stays the default


def test_presets_from_the_cli(capsys):
    from autolora.cli import build_parser
    from autolora.cli.options import config_from_args

    args = build_parser().parse_args(["train", "--config", "roli", "--dataset", "cub200", "--method", "autolora",
                                      "--out", "x"])
    cfg = resolve_config(config_from_args(args)[0])
    assert (cfg.method, cfg.init, cfg.epochs, cfg.probe_lr) == ("autolora", "roli", 60, 0.25)  # CUB's, not CIFAR's


# ------------------------------------------------------------------------------------------------ machinery
def test_warmup_cosine_is_rolis_per_epoch_lambda():
    from autolora.engine.schedules import WarmupCosine

    want = [0, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1.0, .9755, .9045, .7939, .6545, .5, .3455, .2061, .0955, .0245]
    s = WarmupCosine(2.0, 10, 20)
    assert [round(s.lr_at(e) / 2.0, 4) for e in range(20)] == want  # epoch 0 trains at LR 0


def test_adamw_leaves_biases_undecayed_and_switches_to_sgd_at_zero_decay():
    from autolora.engine.loop import make_optimizer

    m = _vit_method(peft="none", optimizer="adamw", weight_decay=0.01)
    opt = make_optimizer(m, m.cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["eps"] == 1e-6
    names = {id(p): n for n, p in m.net.named_parameters()}
    decayed, plain = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all("bias" in n for n in plain) and not any("bias" in n for n in decayed)
    assert any(n.endswith("norm1.weight") for n in decayed)  # LayerNorm weights are decayed, as in their code
    sgd = make_optimizer(m, dataclasses.replace(m.cfg, weight_decay=0.0))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["weight_decay"] == 0.0


def test_pgd_keeps_the_highest_loss_iterate():
    from autolora.attacks import PGD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 4, (16,))

    def rows(xa):
        with torch.no_grad():
            return F.cross_entropy(model(xa), y, reduction="none")

    seen = []
    real = F.cross_entropy

    def spy(logits, target, reduction="mean", **kw):
        out = real(logits, target, reduction=reduction, **kw)
        if reduction == "none":
            seen.append(out.detach().clone())
        return out

    F_ce = F.cross_entropy
    try:
        F.cross_entropy = spy
        for keep in ("best_batch", "best_example"):
            seen.clear()
            torch.manual_seed(1)
            xb = PGD(model, eps=0.3, step_size=0.2, steps=4, keep=keep)(x, y)
            cands = torch.stack(seen)  # losses of x_0 ... x_K
            assert len(cands) == 5
            if keep == "best_batch":  # the whole batch of the highest mean loss, the first on a tie
                assert rows(xb).mean() == pytest.approx(cands.mean(1).max().item(), abs=1e-5)
            else:
                assert torch.allclose(rows(xb), cands.max(0).values, atol=1e-5)
    finally:
        F.cross_entropy = F_ce
    torch.manual_seed(1)
    last = PGD(model, eps=0.3, step_size=0.2, steps=4)(x, y)
    assert rows(xb).sum() >= rows(last).sum() - 1e-5
    assert (xb - x).abs().max() <= 0.3 + 1e-6 and 0 <= xb.min() and xb.max() <= 1


def test_rolis_ranli_head():
    from autolora.models import run_model

    torch.manual_seed(0)
    m = run_model(TrainConfig(arch="tiny", input_size="none", head_init="roli"), 10)
    assert torch.allclose(m.head.bias, torch.full((10,), -math.log(99)))
    assert m.head.weight.std().item() == pytest.approx(math.sqrt(2 / 10), rel=0.2)  # kaiming fan_out over C = 10


def test_bilinear_resize_inside_the_model():
    m = create_model("resnet18", NUM, input_size=64, resize="bilinear").eval()
    x = torch.rand(2, 3, 32, 32)
    want = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(m.preprocess(x) * m.preprocess.std + m.preprocess.mean, want, atol=1e-6)
    assert m.meta()["resize"] == "bilinear"


def test_tail_split_and_roli_transforms(tmp_path):
    from autolora.data import build_data

    d = make_imagefolder(tmp_path / "d", classes=2, per_class=10, test_per_class=2, size=8)
    b = build_data("imagefolder", d, val_fraction=0.1, val_split="tail", augmentation="roli")
    files = sorted(b.train.files() + b.val.files())
    assert b.val.files() == files[-2:]  # the last 10 % of the train split, whatever the class
    x1, x2 = b.train[0][0], b.train[0][0]
    assert torch.equal(x1, x2)  # no augmentation at low resolution (RoLI's CIFAR)
    from autolora.data.core import make_transforms

    names = [type(t).__name__ for t in make_transforms("high", augmentation="roli").train.transforms]
    assert names == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor"]


# ------------------------------------------------------------------------------------------------ PEFT family
def _vit_model():
    torch.manual_seed(0)
    return create_model("test_vit", NUM, input_size=32)  # timm's test ViT built at 32 px: 2 x 2 patches


def _swin_model():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    net = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                          num_classes=0)
    spec = BackboneSpec("swin_test", "timm", net.num_features, native_size=32, head_keys=("head",))
    return Classifier(net, spec, NUM, None)


def _vit_method(model=None, **kw):
    cfg = resolve_config(TrainConfig(method="madry_ft", arch="tiny", train_steps=1, eps=2 / 255, **kw))
    return create_method("madry_ft", model or _vit_model(), cfg)


def _train(method, steps=2):
    from autolora.engine.loop import make_optimizer

    opt = make_optimizer(method, dataclasses.replace(method.cfg, lr=0.05))
    for _ in range(steps):
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, NUM, (8,))
        method.train_mode()
        loss = method.training_step(x, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if k in before and not torch.equal(before[k], v)}


@pytest.mark.parametrize("peft, model, own", [
    ("bias", _vit_model, lambda k: "bias" in k),
    ("bias", _swin_model, lambda k: "bias" in k),  # relative_position_bias_table too, as 'bias' in k
    ("adapter", _vit_model, lambda k: ".adapter." in k),
    ("adapter", _swin_model, lambda k: ".adapter." in k),
    ("prompt", _vit_model, lambda k: "vpt_prompts" in k),
    ("lora", _vit_model, lambda k: k.startswith("lora.")),
])
def test_each_peft_mode_trains_only_its_own_parameters(peft, model, own):
    m = _vit_method(model(), peft=peft)
    trainable = {n for n, p in m.net.named_parameters() if p.requires_grad}
    assert trainable and all(own(n.removeprefix("model.backbone.")) or "head." in n for n in trainable), trainable
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    _train(m)
    changed = _changed(before, m.net)
    assert changed and all(own(k.removeprefix("model.backbone.").removeprefix("backbone.")) or "head." in k
                           for k in changed), changed
    if peft == "bias":
        assert any("relative_position_bias_table" in k for k in trainable) == isinstance(m.model.backbone,
                                                                                          __import__("timm").models.swin_transformer.SwinTransformer)
    if peft == "adapter":  # the learning init: up starts at zero (identity), and from step 2 the down projection learns
        assert any(k.endswith("adapter.down.weight") for k in changed)


def test_authors_adapter_init_learns_only_the_up_bias():
    m = _vit_method(peft="adapter", adapter_init="authors")
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    _train(m, 3)
    moved = {k for k in _changed(before, m.net) if ".adapter." in k}
    assert moved and all(k.endswith("adapter.up.bias") for k in moved)


def test_lora_on_query_and_value_rows_only():
    m = _vit_method(peft="lora", rank=2, lora_alpha=2.0, lora_qkv="qv", lora_init="kaiming")
    _train(m, 2)
    branch = m.net.lora
    name = next(n for n in branch.targets if n.endswith("qkv"))
    d = branch.shapes[name][0] // 3
    delta = branch.delta(name)
    assert delta[d:2 * d].abs().max() == 0 and delta[:d].abs().max() > 0 and delta[2 * d:].abs().max() > 0
    assert branch.scaling == 1.0  # α / r = 2 / 2, RoLI's 16 / 16


@pytest.mark.parametrize("peft", ["adapter", "prompt", "lora"])
def test_peft_exports_load_with_the_same_outputs(tmp_path, peft):
    from autolora.models.export import load_model, save_model

    m = _vit_method(peft=peft)
    _train(m)
    export = m.export_model().eval()
    save_model(export, str(tmp_path / "m.safetensors"))
    back, meta = load_model(str(tmp_path / "m.safetensors"))
    assert ("peft" in meta) == (peft != "lora")  # LoRA folds into the weights; adapters and prompts stay modules
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back.eval()(x), export(x), atol=1e-5)


def test_frozen_encoder_runs_in_eval_mode():
    from autolora.models import create_model

    for mode, stays in (("eval", True), ("train", False)):
        torch.manual_seed(0)
        model = create_model("tiny", NUM, input_size="none")
        cfg = resolve_config(TrainConfig(method="madry_ft", arch="tiny", train_steps=1, peft="bias", peft_encoder=mode))
        m = create_method("madry_ft", model, cfg)
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        x, y = torch.rand(8, 3, 16, 16), torch.randint(0, NUM, (8,))
        m.train_mode()
        m.training_step(x, y)["loss"].backward()
        same = all(torch.equal(stats[k], v) for k, v in model.state_dict().items() if "running" in k)
        assert same == stays, mode


def test_peft_refused_where_there_is_no_place(tmp_path, capsys):
    from autolora.cli import main

    d = make_imagefolder(tmp_path / "d", classes=NUM, per_class=6, test_per_class=2, size=8)
    for peft, msg in (("adapter", "no transformer blocks"), ("prompt", "VisionTransformer")):
        assert main(["train", *E2E, "--data-dir", str(d), "--method", "madry_ft", "--peft", peft,
                     "--out", str(tmp_path / "r")]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ TWINS
def _dual(method="twins_at", **kw):
    torch.manual_seed(0)
    model = create_model("tiny", NUM, input_size="none")
    cfg = resolve_config(TrainConfig(method=method, arch="tiny", train_steps=1, gamma=0.4, **kw))
    return create_method(method, model, cfg)


def test_twins_at_loss_is_the_papers():
    """γ·CE(frozen-BN, x̃ first half) + CE(adaptive-BN, x̃ second half), the attack on the whole batch."""
    import copy

    m = _dual()
    m.train_mode()
    ref = copy.deepcopy(m)  # before the step updates the adaptive BN's running statistics (which the attack uses)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, NUM, (8,))
    torch.manual_seed(5)
    out = m.training_step(x, y)
    torch.manual_seed(5)
    x_adv = ref.attack(x, y)
    with torch.no_grad():
        logits = ref.net(x_adv, split=4)
    want = 0.4 * F.cross_entropy(logits[:4], y[:4]) + F.cross_entropy(logits[4:], y[4:])
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)


def test_twins_trades_forwards_the_adversarial_half_first(monkeypatch):
    m = _dual("twins")
    order = []
    real = m.fwd

    def spy(x, split=None):
        order.append("adv" if spy.adv is not None and torch.equal(x, spy.adv) else "nat")
        return real(x, split=split)

    spy.adv = None
    real_attack = m.attack

    class Rec:
        def __call__(self, x, y):
            spy.adv = real_attack(x, y)
            return spy.adv

    m.attack, m.fwd = Rec(), spy
    m.train_mode()
    m.training_step(torch.rand(8, 3, 16, 16), torch.randint(0, NUM, (8,)))
    assert order == ["adv", "nat"]


@pytest.mark.slow
def test_twins_at_end_to_end(tmp_path):
    from autolora.cli import main

    d = make_imagefolder(tmp_path / "d", classes=NUM, per_class=8, test_per_class=2, size=16)
    assert main(["train", *E2E, "--data-dir", str(d), "--method", "twins_at", "--epochs", "1",
                 "--out", str(tmp_path / "r")]) == 0
    res = read_json(tmp_path / "r" / "results.json")
    assert res["method"] == "twins_at" and res["test_sa"] is not None


@pytest.mark.slow
def test_roli_preset_end_to_end_with_lora(tmp_path):
    """`--config roli` on a CIFAR-like image folder: both stages with RoLI's schedule and optimisers, the trainable
    count in results.json."""
    from autolora.cli import main

    d = make_imagefolder(tmp_path / "d", classes=NUM, per_class=10, test_per_class=2, size=16)
    assert main(["train", "--config", "roli", "--dataset", "imagefolder", "--data-dir", str(d), "--arch", "tiny",
                 "--input-size", "none", "--peft", "lora", "--rank", "2", "--lora-alpha", "2", "--epochs", "2",
                 "--probe-epochs", "2", "--warmup-epochs", "1", "--train-steps", "1", "--eval-steps", "1",
                 "--batch-size", "8", "--eval-attacks", "clean", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "r")]) == 2  # the roli preset has no 'imagefolder' settings
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(d), "--arch", "tiny", "--input-size", "none",
                 "--method", "madry_ft", "--init", "roli", "--peft", "lora", "--rank", "2", "--epochs", "2",
                 "--probe-epochs", "2", "--optimizer", "adamw", "--lr-schedule", "warmup_cosine", "--warmup-epochs",
                 "1", "--probe-lr-schedule", "warmup_cosine", "--pgd-keep", "best_batch", "--train-steps", "1",
                 "--eval-steps", "1", "--batch-size", "8", "--eval-attacks", "clean", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "r")]) == 0
    res = read_json(tmp_path / "r" / "results.json")
    assert res["trainable_params"] == res["lora_params"] + NUM * 65  # LoRA factors and the 64-feature head
    rows = [r for r in map(__import__("json").loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())]
    assert [r["lr"] for r in rows if r["stage"] == "probe"][0] == 0.0  # warm-up starts at LR 0
    assert np.isfinite(res["test_sa"])


def test_roli_stage_two_from_a_finished_probing_run(tmp_path, capsys):
    """`--probe-from RUN`: RoLI's stage 2 starts from that linear-probing run's head (their MODEL.WEIGHT_PATH), with
    no probing stage of its own; a probe of other weights, or with --probe-epochs too, is refused."""
    from safetensors.torch import load_file

    from autolora.cli import main
    from autolora.models.export import save_model

    d = make_imagefolder(tmp_path / "d", classes=NUM, per_class=8, test_per_class=2, size=16)
    for name, seed in (("w", 1), ("other", 2)):
        torch.manual_seed(seed)
        save_model(create_model("tiny", 5, input_size="none"), str(tmp_path / f"{name}.safetensors"))
    common = [*E2E, "--data-dir", str(d), "--weights", str(tmp_path / "w.safetensors")]
    assert main(["train", *common, "--method", "linear_probe", "--epochs", "2", "--lr", "0.1",
                 "--out", str(tmp_path / "lp")]) == 0
    assert main(["train", *common, "--method", "roli", "--probe-from", str(tmp_path / "lp"), "--epochs", "0",
                 "--out", str(tmp_path / "r")]) == 0
    lp, r = load_file(tmp_path / "lp" / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert set(lp) == set(r) and all(torch.equal(lp[k], r[k]) for k in lp)  # the probe's head, the same backbone
    res, lp_res = read_json(tmp_path / "r" / "results.json"), read_json(tmp_path / "lp" / "results.json")
    assert [s["stage"] for s in res["stages"]] == ["main"] and res["test_sa"] == lp_res["test_sa"]
    assert main(["train", *E2E, "--data-dir", str(d), "--weights", str(tmp_path / "other.safetensors"),
                 "--method", "roli", "--probe-from", str(tmp_path / "lp"), "--epochs", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "backbone is not this run's --weights" in capsys.readouterr().err
    assert main(["train", *common, "--method", "roli", "--probe-from", str(tmp_path / "lp"), "--probe-epochs", "1",
                 "--out", str(tmp_path / "y")]) == 2
    assert "drop one of them" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
