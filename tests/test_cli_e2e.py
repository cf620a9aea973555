"""End to end: `autolora train` + `autolora eval` on tiny generated data, and the run-directory contract."""
import json

import pytest
import torch

from helpers import TINY_ARGS, make_imagefolder, read_json, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # end-to-end runs in real processes: `make test`, not `make test-fast`


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), classes=3, per_class=30, test_per_class=8)


@pytest.mark.parametrize("method", ["vanilla_rft", "autolora"])
def test_train_then_eval(tmp_path, data, method):
    out = tmp_path / "run"
    run_cli("train", "--method", method, "--data-dir", data, *TINY_ARGS, "--epochs", "2", "--out", out,
            "--log-gradsim", "--gradsim-samples", "16")
    for f in ("config.yaml", "metrics.jsonl", "results.json", "model.safetensors", "split.json",
              "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / f).exists(), f
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        for k in ("epoch", "lr", "train_loss", "train_sa", "val_sa", "val_pgd10", "seconds", "grad_sim"):
            assert k in r, k
        assert -1 <= r["grad_sim"] <= 1
        if method == "autolora":
            assert r["lambda1"] + r["lambda2"] / 6 == pytest.approx(1)
            assert 0 <= r["lora_train_sa"] <= 1
    res = read_json(out / "results.json")
    for k in ("test_sa", "test_pgd10", "best_epoch", "method", "arch", "dataset", "seed",
              "backbone_params", "lora_params", "trainable_params", "attacks", "num_val", "threads"):
        assert k in res, k
    assert "test_aa" not in res and 0 <= res["test_pgd10"] <= res["test_sa"] <= 1  # only what ran is recorded
    assert res["attacks"]["test"]["pgd10"] == {"attack": "pgd", "norm": "linf", "eps": 8 / 255, "step_size": 2 / 255,
                                               "steps": 10, "restarts": 1, "random_start": True, "loss": "ce"}
    assert res["seconds"] > sum(r["seconds"] for r in rows) and res["eval_seconds"] > 0  # training / final eval
    assert res["best_epoch"] in (0, 1) and res["method"] == method
    assert (res["lora_params"] > 0) == (method == "autolora")
    assert res["best_val_pgd10"] == max(r["val_pgd10"] for r in rows)  # best epoch chosen on validation
    # eval re-evaluates the saved best model on the run's own test split: same figures
    p = run_cli("eval", out, "--attacks", "clean,pgd10")
    ev = json.loads(p.stdout)
    assert ev["test_sa"] == pytest.approx(res["test_sa"]) and ev["test_pgd10"] is not None
    assert read_json(ev["file"]) == ev and f"written to {ev['file']}" in p.stderr


def test_eval_on_another_copy_matches_classes_by_name(tmp_path, data):
    out = tmp_path / "run"
    run_cli("train", "--method", "vanilla_rft", "--data-dir", data, *TINY_ARGS, "--epochs", "1", "--out", out,
            "--train-steps", "1")
    other = make_imagefolder(tmp_path / "copy", classes=4, per_class=4, test_per_class=6, seed=3)
    ev = json.loads(run_cli("eval", out, "--dataset", "imagefolder", "--data-dir", other, "--attacks", "clean").stdout)
    assert ev["num_test"] == 18  # 3 run classes x 6; the extra class is dropped
    assert 0 <= ev["test_sa"] <= 1


def test_exported_model_loads_into_plain_backbone(tmp_path, data):
    from safetensors.torch import load_file

    from autolora.models.tiny import TinyResNet

    out = tmp_path / "run"
    run_cli("train", "--method", "autolora", "--data-dir", data, *TINY_ARGS, "--epochs", "1", "--out", out,
            "--train-steps", "1")
    sd = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in sd)
    net = TinyResNet()
    net.fc = torch.nn.Linear(64, 3)
    net.load_state_dict(sd)  # strict: exactly backbone + head


def test_out_dir_never_silently_overwritten(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    p = run_cli("train", "--data-dir", data, *TINY_ARGS, "--epochs", "1", "--out", out, check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr and (out / "keep.txt").read_text() == "precious"


def test_resolved_config_saved_with_presets(tmp_path, data):
    out = tmp_path / "run"
    run_cli("train", "--data-dir", data, *TINY_ARGS, "--epochs", "0", "--out", out)
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["lr"] == 0.01 and cfg["weight_decay"] == 1e-4 and cfg["lr_schedule"] == "step"
    assert cfg["method"] == "vanilla_rft" and cfg["beta"] == 6.0


def test_resnet18_results_report_lora_ratio(tmp_path, data):
    """Table 4: the rank-8 branch of ResNet-18 is 4.5-5.0 % of the backbone, as results.json reports it."""
    out = tmp_path / "run"
    args = [a if a != "tiny" else "resnet18" for a in TINY_ARGS]
    run_cli("train", "--method", "autolora", "--data-dir", data, *args, "--epochs", "0", "--eval-attacks", "clean",
            "--out", out)
    res = read_json(out / "results.json")
    assert res["arch"] == "resnet18" and res["backbone_params"] == 11176512
    assert 0.045 <= res["lora_params"] / res["backbone_params"] <= 0.050
    assert res["trainable_params"] == res["backbone_params"] + res["lora_params"] + 512 * 3 + 3


def test_log_has_the_weight_loading_messages_and_tensorboard_the_metrics(tmp_path, data):
    """One stdlib logging tree: autolora.models.weights' own message reaches train.log; --tensorboard writes the
    metrics.jsonl scalars as events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import FAST_ARGS

    src = tmp_path / "src"
    run_cli("train", *FAST_ARGS, "--data-dir", data, "--epochs", "0", "--out", src)
    out = tmp_path / "run"
    run_cli("train", *FAST_ARGS, "--data-dir", data, "--epochs", "2", "--weights", src / "model.safetensors",
            "--tensorboard", "--out", out)
    log = (out / "train.log").read_text()
    assert "loaded" in log and "backbone tensors from" in log and "dropped 2 keys" in log  # autolora.models.weights
    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    rows = read_jsonl(out / "metrics.jsonl")
    # FAST_ARGS validate with --eval-steps 1: the figure is named PGD-1, not PGD-10
    assert "val_pgd10" not in rows[0]
    assert [e.value for e in ev.Scalars("main/val_pgd1")] == pytest.approx([r["val_pgd1"] for r in rows])
    assert [e.step for e in ev.Scalars("main/train_loss")] == [1, 2]


def test_tensorboard_missing_is_one_clear_error(tmp_path, data, monkeypatch, capsys):
    import sys

    from autolora.cli import main
    from helpers import FAST_ARGS

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    assert main(["train", *FAST_ARGS, "--data-dir", str(data), "--tensorboard", "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'autolora[tensorboard]'" in capsys.readouterr().err and not (tmp_path / "r").exists()
