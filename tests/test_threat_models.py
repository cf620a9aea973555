"""Both threat models end to end (issue 23): `--norm linf|l2` in the config (CLI, YAML, API), budgets that default per
norm and resolution and are saved resolved, every method training under L2, and pretrain, compare and the demo
taking the norm."""
import dataclasses

import pytest
import yaml

from autolora.cli import main
from autolora.config import TrainConfig, migrate_saved
from autolora.errors import UserError
from helpers import E2E_ARGS, make_imagefolder, read_json

L2_ARGS = [a for a in E2E_ARGS if a != "--quiet"] + ["--norm", "l2", "--quiet"]


# ------------------------------------------------------------------------------------------------ the config
def test_norm_in_config_yaml_and_flags(tmp_path):
    from autolora.cli import build_parser
    from autolora.cli.options import config_from_args

    assert TrainConfig().norm == "linf" and TrainConfig().eps is None and TrainConfig().step_size is None
    assert TrainConfig(norm="L2").norm == "l2"
    (tmp_path / "c.yaml").write_text("norm: l2\neps: 1.5\n")
    cfg, _ = config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")]))
    assert (cfg.norm, cfg.eps, cfg.step_size) == ("l2", 1.5, None)
    cfg, _ = config_from_args(build_parser().parse_args(["train", "--norm", "l2", "--step-size", "0.2"]))
    assert (cfg.norm, cfg.step_size) == ("l2", 0.2)
    with pytest.raises(UserError, match="unknown norm 'l1'"):
        TrainConfig(norm="l1")
    with pytest.raises(UserError, match=r"--eps must be in \[0, 1\]"):
        TrainConfig(eps=1.5)  # L∞: pixel units of images in [0, 1]
    assert TrainConfig(norm="l2", eps=3.0, step_size=1.5).eps == 3.0  # an L2 radius may exceed 1


def test_budget_defaults_per_norm_and_resolution():
    got = {(n, r): (c.eps, c.step_size) for n in ("linf", "l2") for r in ("low", "high")
           for c in [TrainConfig(norm=n).resolve_budget(r)]}
    assert got == {("linf", "low"): (8 / 255, 2 / 255), ("linf", "high"): (8 / 255, 2 / 255),
                   ("l2", "low"): (0.5, 0.125), ("l2", "high"): (3.0, 0.75)}
    assert TrainConfig(norm="l2", eps=1.0).resolve_budget("low").step_size == 0.25  # eps/4 of the given eps
    assert TrainConfig(eps=0.0).resolve_budget("low").step_size == 2 / 255  # never taken, but valid
    assert TrainConfig(norm="l2", eps=1.0, step_size=0.1).resolve_budget("high").step_size == 0.1
    warnings = TrainConfig(norm="l2", eps=8 / 255).warnings()
    assert any("tiny" in w and "L∞ budget" in w for w in warnings)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("side", [32, 96])
@pytest.mark.parametrize("eps,step", [(None, None), (0.25, None), (0.25, 0.1), (0.0, None)])
def test_every_user_of_the_budget_rule_agrees(norm, side, eps, step):
    """Training, `PGD`, `AutoAttack` and `evaluate` take their defaults from one rule (`attacks.norms.resolve_budget`)."""
    import torch

    from autolora.attacks import PGD, AutoAttack
    from autolora.attacks.norms import resolve_budget
    from autolora.utils.pixels import resolution_of

    want = resolve_budget(norm, eps, step, resolution_of(side, side))
    default = {"linf": 8 / 255, "l2": 0.5 if side <= 64 else 3.0}[norm]  # the rule, written out independently
    e = default if eps is None else eps
    assert want == pytest.approx((e, step if step is not None else (e or default) / 4))
    cfg = TrainConfig(norm=norm, eps=eps, step_size=step).resolve_budget(resolution_of(side, side))
    x, model = torch.zeros(1, 3, side, side), torch.nn.Identity()
    assert (cfg.eps, cfg.step_size) == want
    assert PGD(model, eps=eps, step_size=step, norm=norm).budget(x) == want
    assert AutoAttack(model, eps=eps, norm=norm).budget(x) == want[0]
    assert want[1] > 0  # eps 0 too: the step is never taken, but valid


def test_presets_take_the_norms_budget():
    """`--config roli` / `twins-authors` set the authors' schedule, not a budget: under --norm l2 a CIFAR run gets
    L2's 0.5 (not an L2 radius of 8/255), under L∞ their 8/255 and 2/255 as before."""
    from autolora.cli import build_parser
    from autolora.cli.options import config_from_args

    for preset in ("roli", "twins-authors"):
        for norm, want in (("linf", (8 / 255, 2 / 255)), ("l2", (0.5, 0.125))):
            args = ["train", "--config", preset, "--dataset", "cifar10", "--norm", norm]
            cfg, _ = config_from_args(build_parser().parse_args(args))
            resolved = cfg.resolve_budget("low")
            assert (resolved.eps, resolved.step_size) == pytest.approx(want), (preset, norm)


def test_budget_and_norm_checks():
    from autolora.attacks.registry import check_train_attack

    check_train_attack("fgsm_rs", "Linf")  # the norm as the config takes it
    with pytest.raises(UserError, match="fgsm_rs is L∞ only"):
        check_train_attack("fgsm_rs", "L2")
    for bad in ({"eps": float("inf")}, {"step_size": float("inf")}):
        with pytest.raises(UserError, match="--(eps|step-size) must be"):
            TrainConfig(norm="l2", **bad)  # an L2 radius may exceed 1, but not be infinite


def test_saved_configs_of_older_runs_are_linf():
    old = {"method": "vanilla_rft", "eps": 8 / 255, "step_size": 2 / 255}  # written before --norm existed
    assert migrate_saved(old)["norm"] == "linf" and "norm" not in old
    cfg = TrainConfig.from_saved(old, "config.yaml")
    assert (cfg.norm, cfg.eps, cfg.step_size) == ("linf", 8 / 255, 2 / 255)
    assert migrate_saved({"norm": "l2"})["norm"] == "l2"


# ------------------------------------------------------------------------------------------------ training under L2
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), classes=3, per_class=12, test_per_class=3)


@pytest.fixture
def training_attacks(monkeypatch):
    """Every training attack the methods build: (class, norm, eps, step)."""
    import autolora.methods.base as B

    seen, build = [], B.train_attack

    def spy(*a, **kw):
        atk = build(*a, **kw)
        seen.append((type(atk).__name__, atk.norm, atk.eps, atk.step_size))
        return atk

    monkeypatch.setattr(B, "train_attack", spy)
    return seen


@pytest.mark.parametrize("method,extra", [
    ("autolora", []), ("vanilla_rft", []), ("twins", []), ("roli", ["--probe-epochs", "1"]), ("madry_ft", []),
])
def test_every_method_trains_under_l2(tmp_path, data, training_attacks, method, extra):
    out = tmp_path / "run"
    assert main(["train", "--method", method, "--data-dir", data, *L2_ARGS, "--epochs", "1", "--out", str(out),
                 *extra]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["norm"], cfg["eps"], cfg["step_size"]) == ("l2", 0.5, 0.125)  # 16 px images: low resolution
    assert training_attacks and set(training_attacks) == {("PGD", "l2", 0.5, 0.125)}  # both RoLI stages too
    assert len(training_attacks) == (2 if method == "roli" else 1)
    res = read_json(out / "results.json")
    val, test = res["attacks"]["val"], res["attacks"]["test"]["pgd10"]
    assert val["norm"] == test["norm"] == "l2" and test["eps"] == 0.5 and test["step_size"] == 0.125
    assert 0 <= res["test_pgd10"] <= res["test_sa"] <= 1


def test_fgsm_rs_under_l2_is_one_clear_error(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", data, *L2_ARGS, "--train-attack", "fgsm_rs", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fgsm_rs is L∞ only" in err[0] and not out.exists()


# ------------------------------------------------------------------------------------------------ pretrain, compare, demo
def test_pretrain_under_l2(tmp_path, capsys):
    from autolora.workflows.pretrain import config_from_values, pretrain_summary

    assert config_from_values({}).eps == 8 / 255  # L∞ is the same at every resolution: fixed at once
    c = config_from_values({"norm": "l2"})
    assert (c.eps, c.step_size) == (None, None)  # from the data's resolution, in the trainer
    assert config_from_values({"norm": "l2", "eps": 1.0, "train_steps": 5}).step_size == 2.5 * 1.0 / 5
    out = tmp_path / "pre"
    assert main(["pretrain", "--dataset", "digits", "--classes", "0,1", "--norm", "l2", "--steps", "2",
                 "--epochs", "1", "--batch-size", "32", "--limit-train", "32", "--limit-eval", "8", "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0
    rec = pretrain_summary(str(out))
    assert (rec["norm"], rec["eps"], rec["step_size"]) == ("l2", 0.5, 0.125)
    assert main(["pretrain", "--norm", "l2", "--attack", "fgsm_rs", "--out", str(tmp_path / "x")]) == 2
    assert "fgsm_rs is L∞ only" in capsys.readouterr().err


def test_compare_under_l2_skips_its_finished_runs(tmp_path, data, capsys):
    from autolora.workflows.compare import config_mismatch

    args = ["compare", "--methods", "vanilla_rft", "--seeds", "0", "--out-root", str(tmp_path / "cmp"),
            "--data-dir", data, *L2_ARGS, "--epochs", "1", "--no-report"]
    assert main(args) == 0
    run = tmp_path / "cmp" / "vanilla_rft-s0"
    assert yaml.safe_load((run / "config.yaml").read_text())["eps"] == 0.5
    mtime = (run / "results.json").stat().st_mtime
    assert main(args) == 0  # eps left to its default is the run's resolved 0.5: the run is the sweep's, skipped
    assert (run / "results.json").stat().st_mtime == mtime
    saved = yaml.safe_load((run / "config.yaml").read_text())
    wanted = TrainConfig(method="vanilla_rft", dataset="imagefolder", data_dir=data, norm="l2", arch="tiny")
    assert not [d for d in config_mismatch(wanted, saved, "low") if d.startswith(("eps", "step_size", "norm"))]
    assert [d for d in config_mismatch(wanted, saved, "high") if d.startswith("eps")]  # 3.0 at high resolution
    assert [d for d in config_mismatch(dataclasses.replace(wanted, norm="linf"), saved, "low") if d.startswith("norm")]


def test_demo_settings_per_norm():
    from autolora.workflows.demo import DemoSettings

    linf, l2 = DemoSettings(), DemoSettings(norm="l2")
    assert (linf.eps, linf.step_size, linf.pretrain_attack) == (32 / 255, 8 / 255, "fgsm_rs")
    assert (l2.eps, l2.step_size, l2.pretrain_attack) == (1.0, 0.25, "pgd")
    cfg = l2.finetune_config("autolora", 0, "w.safetensors")
    assert (cfg.norm, cfg.eps, cfg.step_size) == ("l2", 1.0, 0.25)
    assert DemoSettings(**dataclasses.asdict(l2)) == l2  # what demo.json stores rebuilds the same settings


def test_reports_label_l2_budgets():
    from autolora.workflows.runs import budget_text, threat_text

    assert budget_text({"eps": 8 / 255}) == "8/255" and threat_text("8/255") == "L∞ 8/255"  # older runs: L∞
    assert budget_text({"norm": "l2", "eps": 0.5}) == "L2 0.5" == threat_text("L2 0.5")
