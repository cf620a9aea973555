"""RoLI (Hua et al., CVPR 2024): adversarial linear probing first, then any method from the probed head;
the bundled `roli` preset; both stages recorded in the run."""
import pytest
import torch

import autolora.engine.loop as trainer_mod
from autolora.methods import resolve_config
from autolora.cli import build_parser, main
from autolora.cli.options import config_from_args
from autolora.config import TrainConfig
from autolora.errors import UserError
from autolora.engine.checkpoints import load_checkpoint
from autolora.engine.loop import plan_stages
from helpers import E2E_ARGS as E2E
from helpers import make_imagefolder, read_json, read_jsonl



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), classes=3, per_class=12, test_per_class=3)


@pytest.fixture
def stage_heads(monkeypatch):
    """Records (stage method, head weights right after the method was built) for every stage."""
    seen = []
    real = trainer_mod.create_method

    def spy(name, model, cfg):
        m = real(name, model, cfg)
        seen.append((name, {k: v.detach().clone() for k, v in m.model.head.state_dict().items()}))
        return m

    monkeypatch.setattr(trainer_mod, "create_method", spy)
    return seen


@pytest.mark.parametrize("args", [
    ["--method", "roli"],  # shorthand: --init roli --method madry_ft
    ["--method", "roli", "--peft", "lora"],
    ["--init", "roli", "--method", "autolora"],  # RoLI ∘ AutoLoRa
    ["--init", "roli", "--method", "twins"],
    ["--init", "roli", "--method", "vanilla_rft"],
])
def test_stage2_starts_from_the_probed_best_head(tmp_path, data, stage_heads, args):
    out = tmp_path / "run"
    assert main(["train", *args, "--data-dir", str(data), *E2E, "--epochs", "1", "--probe-epochs", "2",
                 "--out", str(out)]) == 0
    main_method = {"roli": "madry_ft"}.get(args[args.index("--method") + 1], args[args.index("--method") + 1])
    assert [name for name, _ in stage_heads] == ["linear_probe", main_method]
    best_probe = load_checkpoint(str(out / "checkpoints" / "best_probe.pt"))
    probe_start, main_start = stage_heads[0][1], stage_heads[1][1]
    for k in ("weight", "bias"):
        assert torch.equal(main_start[k], best_probe["net"][f"head.{k}"].to(main_start[k].dtype))
    assert not torch.equal(main_start["weight"], probe_start["weight"]), "stage 1 trained the head"
    # both stages are in the run: metrics tagged by stage, results.json has both stages' validation figures
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["probe", "probe", "main"]
    res = read_json(out / "results.json")
    assert res["init"] == "roli" and res["method"] == main_method
    stages = {s["stage"]: s for s in res["stages"]}
    assert stages["probe"]["method"] == "linear_probe" and stages["main"]["method"] == main_method
    # figures named by what ran: --eval-steps 2 (E2E) validates with PGD-2
    assert "val_pgd10" not in rows[0] and "best_val_pgd10" not in res
    assert stages["probe"]["best_val_pgd2"] == max(r["val_pgd2"] for r in rows if r["stage"] == "probe")
    assert stages["main"]["best_val_pgd2"] == rows[-1]["val_pgd2"] == res["best_val_pgd2"]
    assert best_probe["epoch"] == stages["probe"]["best_epoch"]


def test_plan_stages():
    c = resolve_config(TrainConfig(method="autolora", init="roli", epochs=4))
    assert plan_stages(c) == [("probe", "linear_probe", 2), ("main", "autolora", 4)]
    c = resolve_config(TrainConfig(method="roli", epochs=4, probe_epochs=3))
    assert (c.method, c.init) == ("madry_ft", "roli")
    assert plan_stages(c) == [("probe", "linear_probe", 3), ("main", "madry_ft", 4)]
    assert plan_stages(resolve_config(TrainConfig(method="linear_probe", init="roli"))) == [("main", "linear_probe", 60)]
    assert plan_stages(resolve_config(TrainConfig(method="twins"))) == [("main", "twins", 60)]


def test_roli_preset_by_name():
    args = build_parser().parse_args(["train", "--config", "roli", "--method", "autolora", "--out", "x"])
    cfg, _ = config_from_args(args)
    cfg = resolve_config(cfg)
    assert (cfg.method, cfg.init) == ("autolora", "roli")  # RoLI ∘ AutoLoRa under RoLI's protocol (CIFAR-10's)
    assert (cfg.train_steps, cfg.eval_steps, cfg.epochs, cfg.probe_epochs) == (7, 10, 20, 20)
    assert cfg.probe_lr == pytest.approx(0.05 / 256 * 64)
    cfg, _ = config_from_args(build_parser().parse_args(["train", "--config", "roli", "--out", "x"]))
    assert (resolve_config(cfg).method, resolve_config(cfg).init) == ("madry_ft", "roli")


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(UserError, match="or a preset: roli, twins-authors"):
        config_from_args(build_parser().parse_args(["train", "--config", "rolli", "--out", "x"]))
