"""`autolora pretrain`, the FGSM-RS attack and the `digits` dataset."""

import pytest
import torch

from autolora.cli import main
from helpers import read_jsonl


def test_digits_builds_offline_with_class_filter():
    from autolora.data import DATASETS, build_data

    assert "digits" in DATASETS
    d = build_data("digits", classes=["5", "6", "7", "8", "9"])
    assert d.classes == ["5", "6", "7", "8", "9"]
    x, _ = d.train[0]
    assert x.shape == (3, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(d.train.targets) == set(range(5))
    assert len(d.train) + len(d.val) + len(d.test) == 896  # digits 5-9 of the 1,797
    assert len(d.test) == 179  # a stratified 20 % held out
    assert len(build_data("digits", classes=["5", "6"], limit_eval=10).test) == 10
    xt, _ = d.test[0]
    assert torch.equal(xt, d.test[0][0])  # no augmentation at test time
    # same per-class split whatever the filter: the test items of digit 5 do not depend on the other classes
    d5 = build_data("digits", classes=["5", "9"])
    full = build_data("digits")
    five = lambda b: sorted(int(i) for i, t in zip(b.test.indices, b.test.targets) if b.classes[t] == "5")  # noqa: E731
    assert five(d5) == five(full)


def test_digits_unknown_class_is_a_user_error():
    from autolora.data import build_data
    from autolora.errors import UserError

    with pytest.raises(UserError, match="unknown class '12'"):
        build_data("digits", classes=["1", "12"])


def test_fgsm_rs_respects_budget_and_box():
    from autolora.attacks import FGSMRS
    from autolora.models import create_model

    model = create_model("tiny", 3, "none")
    x = torch.rand(16, 3, 8, 8)
    x[:4] = 0.0  # on the box's edges
    x[4:8] = 1.0
    y = torch.randint(0, 3, (16,))
    eps = 8 / 255
    atk = FGSMRS(model, eps=eps)
    assert atk.step_size == pytest.approx(1.25 * eps)
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float((x_adv - x).abs().max()) > 0  # it moved
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(FGSMRS(model, eps=0.0)(x, y), x)


def test_pretrain_writes_weights_that_train_loads(tmp_path):
    from autolora.models import create_model
    from autolora.workflows.pretrain import pretrain
    from autolora.models.weights import load_weights

    out = tmp_path / "pre"
    path = pretrain("tiny", "digits", classes=[0, 1, 2], attack="fgsm_rs", epochs=1, batch_size=32, limit_train=48,
                    limit_eval=12, eps=16 / 255, out=str(out), quiet=True)
    assert path == str(out / "model.safetensors")
    from autolora.workflows.pretrain import pretrain_summary

    rec = pretrain_summary(str(out))  # an ordinary run directory of the one trainer
    assert rec["attack"] == "fgsm_rs" and rec["classes"] == ["0", "1", "2"] and rec["num_train"] == 48
    assert set(rec["test"]) == {"sa", "pgd10"} and rec["schedule"] == "onecycle"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and (out / "checkpoints" / "last.pt").exists()
    # `--weights` accepts it: strict backbone load into a model with another head
    model = create_model("tiny", 5, "native")
    info = load_weights(model, path)
    assert info["format"] == "safetensors" and info["num_tensors"] > 0 and any(k.startswith("fc.") for k in info["dropped"])
    from safetensors.torch import load_file

    sd = load_file(path)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a non-empty output is never silently replaced
    from autolora.errors import UserError

    with pytest.raises(UserError, match="--overwrite"):
        pretrain("tiny", "digits", epochs=1, out=str(out), quiet=True)


def test_pretrain_cli_pgd(tmp_path, capsys):
    out = tmp_path / "pre"
    rc = main(["pretrain", "--dataset", "digits", "--classes", "0,1", "--attack", "pgd", "--steps", "2",
               "--epochs", "1", "--batch-size", "32", "--limit-train", "32", "--limit-eval", "8",
               "--eps", "8/255", "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0 and "weights:" in capsys.readouterr().out and (out / "model.safetensors").stat().st_size > 0
    from autolora.workflows.pretrain import pretrain_summary

    rec = pretrain_summary(str(out))
    assert rec["steps"] == 2 and rec["step_size"] == pytest.approx(2.5 * (8 / 255) / 2)
    assert rec["eps"] == pytest.approx(8 / 255)
    assert main(["pretrain", "--attack", "fgsm", "--out", str(tmp_path / "x")]) == 2  # --attack: --train-attack
    assert "--train-attack must be one of pgd, fgsm_rs, got 'fgsm' (did you mean 'fgsm_rs'?)" in capsys.readouterr().err
    assert main(["pretrain", "--epochs", "0", "--out", str(tmp_path / "y")]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # not a pretrain flag
        main(["pretrain", "--method", "autolora", "--out", str(tmp_path / "z")])
    assert e.value.code == 2


@pytest.mark.slow
def test_pretrain_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    """Pre-training is a run of the one trainer: SIGKILLed inside its second epoch and resumed with
    `autolora pretrain --resume`, it ends with the same bytes as an uninterrupted run, and its per-iteration
    one-cycle LR continues where it stopped."""
    import signal

    from helpers import run_cli

    args = ["pretrain", "--dataset", "digits", "--classes", "0,1,2", "--attack", "fgsm_rs", "--epochs", "3",
            "--batch-size", "16", "--limit-train", "48", "--limit-eval", "12", "--device", "cpu", "--quiet"]
    run_cli(*args, "--out", tmp_path / "ref")
    p = run_cli(*args, "--out", tmp_path / "run", check=False, fault="kill_at_step:main:1:1")
    assert p.returncode == -signal.SIGKILL
    run_cli("pretrain", "--resume", tmp_path / "run", "--quiet")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert lrs == [r["lr"] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")] and lrs[0] < lrs[1]


def test_pretrain_resume_refuses_other_settings(tmp_path, capsys):
    """`pretrain --resume` shares `train --resume`'s one conflict check (and its flags are train's, generated)."""
    from autolora.workflows.pretrain import pretrain_config

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(pretrain_config(epochs=3).to_yaml())
    assert main(["pretrain", "--resume", str(tmp_path / "run"), "--epochs", "30"]) == 2
    assert "--epochs 30 conflicts with --resume" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(tmp_path / "run"), "--schedule", "cosine"]) == 2  # an alias, same check
    assert "--lr-schedule cosine conflicts with --resume" in capsys.readouterr().err


def test_pretrain_disk_full_names_the_pretrain_resume_command(tmp_path, capsys, monkeypatch):
    """A checkpoint write that fails during pre-training tells the user to continue with `autolora pretrain
    --resume`, the command that owns the run, not `autolora train --resume`."""
    out = tmp_path / "pre"
    monkeypatch.setenv("AUTOLORA_FAULT", "disk_full_in_checkpoint_write:main:0")
    rc = main(["pretrain", "--dataset", "digits", "--classes", "0,1", "--epochs", "2", "--batch-size", "16",
               "--limit-train", "32", "--limit-eval", "8", "--device", "cpu", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "the disk is full" in err and f"`autolora pretrain --resume {out}`" in err, err
