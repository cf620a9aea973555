"""Bad input: one clear `autolora: error: ...` line, exit status 2, and nothing lost (no half-made run
directory, an existing run kept). The CLI runs in-process (`autolora.cli.main`, whose return value is the
exit status) to keep the tests fast; test_safety and test_cli_e2e check the status of real processes."""
import os
import re
import shutil

import pytest
import torch

from helpers import FAST_ARGS as ARGS
from helpers import make_imagefolder, read_json, run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), classes=3, per_class=6, test_per_class=2, size=8)


def _copy(data, tmp_path, name="data"):
    dst = tmp_path / name
    shutil.copytree(data, dst)
    return dst


def fails(capsys, *argv, out=None, expect=()):
    """Run the CLI; assert exit 2, one error line containing each of `expect`; return the message."""
    from autolora.cli import main

    argv = [str(a) for a in argv] + (["--out", str(out)] if out is not None else [])
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("autolora: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for e in expect:
        assert str(e) in lines[0], lines[0]
    return lines[0]


def train_fails(capsys, tmp_path, *argv, expect=()):
    """`train ... --out NEW`: the error, and no run directory left behind."""
    out = tmp_path / "run"
    msg = fails(capsys, "train", *argv, out=out, expect=expect)
    assert not out.exists(), "a failed start left a run directory behind"
    return msg


# ------------------------------------------------------------------------------------------ data
def test_missing_data_dir(tmp_path, capsys):
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", tmp_path / "nope", expect=["does not exist", "nope"])
    train_fails(capsys, tmp_path, *ARGS, expect=["needs a data directory", "--data-dir"])


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", tmp_path / "empty", expect=["has no train/ folder"])
    (tmp_path / "empty" / "train").mkdir()
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", tmp_path / "empty", expect=["no class folders"])


def test_class_folder_without_images(tmp_path, capsys, data):
    d = _copy(data, tmp_path)
    (d / "train" / "class3").mkdir()
    (d / "test" / "class3").mkdir()
    (d / "train" / "class3" / "notes.txt").write_text("not an image")
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", d, expect=[f"class folder {d / 'train' / 'class3'} has no images"])


def test_corrupt_image_named_and_skippable(tmp_path, capsys, data):
    d = _copy(data, tmp_path)
    bad = d / "train" / "class1" / "zz_bad.png"
    bad.write_bytes(b"this is not a png")
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", d, expect=[str(bad), "--skip-bad-images"])
    from autolora.cli import main

    with pytest.warns(UserWarning, match="skipped 1 unreadable image.*zz_bad.png"):
        assert main(["train", *ARGS, "--data-dir", str(d), "--epochs", "0", "--skip-bad-images",
                     "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "results.json").exists()


def test_truncated_image_named(tmp_path, capsys, data):
    """A valid PNG header with a cut-off body (no end marker, so it is decoded in full when listed): the error names
    the file before anything is trained or written, and --skip-bad-images skips it, counted."""
    d = _copy(data, tmp_path)
    src = d / "test" / "class0" / "000.png"
    bad = d / "test" / "class0" / "001.png"
    bad.write_bytes(src.read_bytes()[:60])
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", d, "--epochs", "1", expect=[f"unreadable image {bad}", "truncated"])
    from autolora.cli import main

    with pytest.warns(UserWarning, match="skipped 1 unreadable image.*001.png"):
        assert main(["train", *ARGS, "--data-dir", str(d), "--epochs", "1", "--skip-bad-images",
                     "--out", str(tmp_path / "ok")]) == 0


def test_train_test_class_mismatch(tmp_path, capsys, data):
    d = _copy(data, tmp_path)
    shutil.rmtree(d / "test" / "class2")
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", d, expect=["class folders of", "differ", "only in train/: class2"])


# ---------------------------------------------------------------------------------------- weights
def test_weights_for_another_architecture(tmp_path, capsys, data):
    from autolora.models import create_model

    sd = create_model("tiny", 3, "none").backbone.state_dict()
    other = {k: v for k, v in sd.items() if not k.startswith("layer3.")}
    other["layer4.0.conv1.weight"] = torch.zeros(8, 8, 3, 3)
    torch.save(other, tmp_path / "other.pth")
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, "--weights", tmp_path / "other.pth",
                expect=["do not fit arch 'tiny'", "missing keys [layer3.0.bn1.bias", "1 unexpected keys [layer4.0.conv1.weight]",
                        "different architecture"])
    torch.save(create_model("small", 3, "none").backbone.state_dict(), tmp_path / "small.pth")
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, "--weights", tmp_path / "small.pth",
                expect=["shape mismatches", "conv1.weight (32, 3, 3, 3) vs (16, 3, 3, 3)"])


# ------------------------------------------------------------------------------ head vs dataset
@pytest.fixture(scope="module")
def trained_run(data, tmp_path_factory):
    from autolora.cli import main

    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", *ARGS, "--data-dir", data, "--epochs", "0", "--out", str(out)]) == 0
    return out


def test_eval_on_data_without_the_runs_classes(tmp_path, capsys, trained_run):
    other = make_imagefolder(tmp_path / "other", classes=2, per_class=2, test_per_class=2, size=8)
    fails(capsys, "eval", trained_run, "--dataset", "imagefolder", "--data-dir", other,
          expect=["1 class(es) of the run are not in", "class2"])


def test_eval_when_the_data_gained_a_class(tmp_path, capsys, data, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    d = _copy(data, tmp_path)
    for split in ("train", "test"):
        shutil.copytree(d / split / "class0", d / split / "class9")
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data_dir"] = str(d)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    fails(capsys, "eval", run, expect=["classes differ from the run's", "class9"])


def test_model_head_does_not_match_its_metadata(tmp_path, capsys, trained_run):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = str(run / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(5, sd["fc.weight"].shape[1]), torch.zeros(5)
    save_file(sd, path, metadata=meta)
    fails(capsys, "eval", run, expect=["the head has 5 outputs", "says 3 classes"])


# ------------------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize("flags, expect", [
    (["--eps", "-0.1"], "--eps must be in [0, 1]"),
    (["--eps", "8"], "--eps must be in [0, 1] (pixel units"),
    (["--step-size", "0"], "--step-size must be > 0"),
    (["--step-size", "-1"], "--step-size must be > 0"),
    (["--rank", "0"], "--rank must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 2"),
    (["--batch-size", "1"], "--batch-size must be >= 2 (a batch of one breaks batch norm"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--train-steps", "-1"], "--train-steps must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--method", "vanila_rft"], "unknown method 'vanila_rft' (did you mean 'vanilla_rft'?)"),
    (["--arch", "tinny"], "unknown arch 'tinny' (did you mean"),
])
def test_nonsensical_hyperparameters(tmp_path, capsys, data, flags, expect):
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, *flags, expect=[expect])


def test_yaml_config_with_unknown_key(tmp_path, capsys, data):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 1\nlrr: 0.1\n")
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, "--config", cfg,
                expect=[f"{cfg}: unknown key 'lrr' (did you mean 'lr'?)"])


# ---------------------------------------------------------------------------------- runtime
def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(tmp_path, capsys, data, monkeypatch):
    """The loss of epoch 1, step 0 is made NaN (test-only AUTOLORA_FAULT hook): the run stops naming the
    epoch and the step, exits non-zero, and epoch 0's checkpoint and metrics stay intact."""
    from autolora.engine.checkpoints import load_checkpoint

    monkeypatch.setenv("AUTOLORA_FAULT", "nan_loss:main:1:0")
    out = tmp_path / "run"
    fails(capsys, "train", *ARGS, "--data-dir", data, "--epochs", "2", out=out,
          expect=["non-finite training loss (nan) in main epoch 1, step 0", "last good checkpoint is kept"])
    ck = load_checkpoint(str(out / "checkpoints" / "last.pt"))
    assert ck["epoch"] == 0 and all(torch.isfinite(v).all() for v in ck["net"].values() if v.is_floating_point())
    assert load_checkpoint(str(out / "checkpoints" / "best.pt"))["epoch"] == 0
    assert [line.count('"epoch": 0') for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "results.json").exists()


def test_cuda_requested_but_absent(tmp_path, capsys, data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [a if a != "cpu" else "cuda" for a in ARGS]
    train_fails(capsys, tmp_path, *args, "--data-dir", data, expect=["--device cuda", "CUDA is not available"])


# -------------------------------------------------------------------------------- run directories
def test_overwrite_with_bad_input_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    fails(capsys, "train", *ARGS, "--data-dir", tmp_path / "nope", "--overwrite", out=out, expect=["does not exist"])
    assert (out / "results.json").read_text() == "{}"


def test_out_is_a_file(tmp_path, capsys, data):
    (tmp_path / "f").write_text("x")
    fails(capsys, "train", *ARGS, "--data-dir", data, out=tmp_path / "f", expect=["is a file, not a directory"])


# ------------------------------------------------------------------- issue 14: types, locations, files
@pytest.mark.parametrize("yaml_text, expect", [
    ('epochs: "abc"\n', "epochs must be an integer, got 'abc'"),
    ("epochs: 2.5\n", "epochs must be an integer, got 2.5"),
    ('eps: "8/x"\n', "eps must be a number"),
    ("download: maybe\n", "download must be true or false"),
])
def test_yaml_config_with_a_wrong_type(tmp_path, capsys, data, yaml_text, expect):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, "--config", cfg, expect=[f"{cfg}: {expect}"])


def test_yaml_and_cli_accept_pixel_fractions(tmp_path, data):
    from autolora.cli import main
    from autolora.config import load_yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text('eps: "8/255"\nstep_size: 2/255\n')
    assert main(["train", *ARGS, "--data-dir", str(data), "--epochs", "0", "--config", str(cfg),
                 "--out", str(tmp_path / "a")]) == 0
    saved = load_yaml(str(tmp_path / "a" / "config.yaml"))
    assert saved["eps"] == pytest.approx(8 / 255) and saved["step_size"] == pytest.approx(2 / 255)
    assert main(["train", *ARGS, "--data-dir", str(data), "--epochs", "0", "--eps", "4/255",
                 "--out", str(tmp_path / "b")]) == 0
    assert load_yaml(str(tmp_path / "b" / "config.yaml"))["eps"] == pytest.approx(4 / 255)


def test_resume_with_an_edited_config_of_the_wrong_type(tmp_path, capsys, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "results.json").unlink()
    text = (run / "config.yaml").read_text().replace("epochs: 0", "epochs: many")
    (run / "config.yaml").write_text(text)
    fails(capsys, "train", "--resume", run, expect=[f"{run / 'config.yaml'}: epochs must be an integer, got 'many'"])


@pytest.mark.parametrize("where, expect", [
    ("file_parent", "is a file, not a directory"),
    ("/sys/autolora-unwritable/run", "cannot write in /sys"),  # PermissionError, even for root
    ("/proc/autolora-unwritable/run", "cannot write in /proc"),  # FileNotFoundError
])
def test_out_that_cannot_be_written_fails_before_training(tmp_path, capsys, data, where, expect):
    if where == "file_parent":
        (tmp_path / "f").write_text("x")
        where = tmp_path / "f" / "run"
    fails(capsys, "train", *ARGS, "--data-dir", data, out=where, expect=["--out", expect])


def test_eval_batch_size_and_device_are_validated(capsys, trained_run):
    fails(capsys, "eval", trained_run, "--batch-size", "0", expect=["--batch-size must be >= 1, got 0"])
    fails(capsys, "eval", trained_run, "--device", "bogus", expect=["--device 'bogus' is not a device",
                                                                     "auto, cpu, cuda or cuda:N"])


def test_report_on_a_config_with_a_python_tag(tmp_path, capsys, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "config.yaml").write_text("method: !!python/object/apply:os.system ['touch pwned']\n")
    fails(capsys, "report", run, "--out", tmp_path / "rep",
          expect=[f"config file {run / 'config.yaml'} is not a plain config"])
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("field, value", [("num_classes", '"3"'), ("classes", '"abc"'), ("input_size", '"big"')])
def test_crafted_model_metadata_is_not_an_autolora_model(tmp_path, capsys, trained_run, field, value):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = str(run / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(path), path, metadata={**meta, field: value})
    fails(capsys, "eval", run, expect=[f"{path} is not an autolora model file", field])


def test_disk_full_during_a_checkpoint_write_says_so_and_resume_continues(tmp_path, capsys, data, monkeypatch):
    """last.pt of epoch 1 cannot be written (ENOSPC, test-only fault): one line says the disk is full and how to
    continue; epoch 0's checkpoint stays intact, no temp file is left, and --resume finishes the run."""
    from autolora.cli import main
    from autolora.engine.checkpoints import load_checkpoint

    out = tmp_path / "run"
    monkeypatch.setenv("AUTOLORA_FAULT", "disk_full_in_checkpoint_write:main:1")
    fails(capsys, "train", *ARGS, "--data-dir", data, "--epochs", "3", out=out,
          expect=["the disk is full", "last.pt", f"autolora train --resume {out}"])
    assert load_checkpoint(str(out / "checkpoints" / "last.pt"))["epoch"] == 0
    assert not [f for f in os.listdir(out / "checkpoints") if f.endswith(".tmp")]
    monkeypatch.delenv("AUTOLORA_FAULT")
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert read_json(out / "results.json")["epochs_run"] == 3


@pytest.mark.slow
def test_a_real_write_failure_is_one_line(tmp_path, data):
    """The OS refuses the checkpoint's bytes (RLIMIT_FSIZE below its size, SIGXFSZ ignored: EFBIG, as a quota
    or a full disk would): exit 2, one error line, no traceback."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # config/log fit, last.pt (~0.2 MB) does not

    p = run_cli("train", *ARGS, "--data-dir", data, "--epochs", "1", "--out", tmp_path / "run", check=False,
                preexec_fn=limit)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("autolora: error: ") == 1
    assert "could not write" in p.stderr and "File too large" in p.stderr and "--resume" in p.stderr


def test_zero_epochs_is_an_evaluation_only_run_and_says_so(trained_run):
    res = read_json(trained_run / "results.json")
    assert res["evaluation_only"] is True and res["epochs_run"] == 0 and res["test_sa"] is not None
    assert "nothing is trained" in (trained_run / "train.log").read_text()


def test_resume_of_a_checkpoint_from_an_older_version_is_refused(tmp_path, capsys, data):
    """A last.pt of checkpoint version 1 (before the authors' AutoLR bookkeeping) is not resumed into the new
    schedules: one line says so."""
    from autolora.cli import main
    from autolora.engine.checkpoints import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    assert main(["train", *ARGS, "--data-dir", str(data), "--epochs", "2", "--out", str(out)]) == 0
    ck = load_checkpoint(str(out / "checkpoints" / "last.pt"))
    ck["version"], ck["epoch"] = 1, 0
    save_checkpoint(ck, str(out / "checkpoints" / "last.pt"))
    (out / "results.json").unlink()
    fails(capsys, "train", "--resume", out, expect=["written by an older autolora", "start a new run"])


# ===================================================================================== issue 20, items 7-14
def test_figures_are_named_by_the_pgd_that_ran(tmp_path, data):
    """--eval-steps 2: validation, test, results and the report say PGD-2, never PGD-10."""
    from autolora.cli import main

    out = tmp_path / "run"
    assert main(["train", *ARGS, "--data-dir", str(data), "--epochs", "1", "--eval-steps", "2",
                 "--eval-attacks", "clean,pgd", "--out", str(out)]) == 0
    row = read_json(out / "results.json")
    assert "test_pgd2" in row and "test_pgd10" not in row and "best_val_pgd2" in row
    assert row["attacks"]["val"]["steps"] == 2 and row["attacks"]["test"]["pgd2"]["steps"] == 2
    assert "val_pgd2" in (out / "metrics.jsonl").read_text() and "pgd10" not in (out / "metrics.jsonl").read_text()
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "PGD-2 (%)" in md and "PGD-10" not in md and "2 steps of" in md


def _fake(root, name, cfg, results=None, failed=None):
    import json

    import yaml

    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.jsonl").write_text(json.dumps({"stage": "main", "epoch": 0, "lr": 0.01, "train_loss": 1.0,
                                                 "val_sa": 0.5, "val_pgd10": 0.3, "seconds": 1}) + "\n")
    if results is not None:
        (d / "results.json").write_text(json.dumps({"method": cfg["method"], "seed": cfg["seed"], "dataset": "digits",
                                                    "arch": "tiny", **results}))
    if failed is not None:
        (d / "FAILED.json").write_text(json.dumps(failed))
    return d


def test_report_pools_only_seeds_of_one_experiment(tmp_path):
    """Runs that differ in more than the seed are separate rows; the same seed twice is two rows; a mean over fewer
    runs than its row says its n; a diverged run is named as such."""
    from autolora.workflows.report import write_report

    base = {"method": "vanilla_rft", "dataset": "digits", "arch": "tiny", "eps": 8 / 255, "step_size": 2 / 255,
            "amp": False, "seed": 0}
    root = tmp_path / "runs"
    _fake(root, "a", base, {"test_sa": 0.6, "test_pgd10": 0.3, "test_aa": 0.2})
    _fake(root, "b", {**base, "step_size": 16 / 255}, {"test_sa": 0.7, "test_pgd10": 0.3})
    _fake(root, "c", {**base, "amp": True}, {"test_sa": 0.8, "test_pgd10": 0.3})
    _fake(root, "d", base, {"test_sa": 0.9, "test_pgd10": 0.3})  # same config, same seed as a
    _fake(root, "e", {**base, "seed": 1}, {"test_sa": 0.5, "test_pgd10": 0.3})
    _fake(root, "f", {**base, "seed": 2}, {"test_sa": 0.4, "test_pgd10": 0.3, "test_aa": 0.1})
    _fake(root, "g", {**base, "seed": 3}, failed={"error": "non-finite training loss (nan)", "diverged": True})
    res = write_report([root], str(tmp_path / "rep"))
    rows = {r["method"]: r for r in res["summary"]}
    assert len(rows) == 5, list(rows)  # b, c alone; a and d apart (both seed 0); e, f pooled with neither
    assert {r["n"] for r in rows.values()} == {1, 2}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "step_size=0.0627" in md and "amp=True" in md and "[a]" in md and "[d]" in md
    pooled = next(r for r in rows.values() if r["n"] == 2)
    assert pooled["seeds"] == [1, 2] and pooled["test_aa"]["n"] == 1
    assert "10.00 (n=1)" in md  # AA of the pooled row: 1 of its 2 runs
    assert "### Diverged runs" in md and re.search(r"- g \(vanilla_rft[^\n]*, seed 3\): non-finite training loss", md)


def test_report_refuses_a_damaged_results_file(tmp_path, capsys):
    root = tmp_path / "runs"
    _fake(root, "a", {"method": "autolora", "seed": 0, "eps": 8 / 255}, {"test_sa": "high"})
    from autolora.cli import main

    assert main(["report", str(root / "a"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "test_sa is 'high', not an accuracy" in err and "Traceback" not in err


def test_alpha_means_nothing_and_method_flags_must_be_read(tmp_path, capsys, data):
    from autolora.cli import main
    from autolora.eval import evaluate
    from autolora.errors import UserError

    with pytest.raises(SystemExit) as e:
        main(["train", *ARGS, "--data-dir", str(data), "--alpha", "2/255", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--step-size" in err and "--sharpen-alpha" in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("alpha: 0.0078\n")
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, "--config", cfg, expect=["step_size", "sharpen_alpha"])
    for flags, expect in ((["--method", "vanilla_rft", "--sharpen-alpha", "2"], "--sharpen-alpha 2.0 is not read by "
                                                                                 "method 'vanilla_rft'"),
                          (["--method", "autolora", "--gamma", "2"], "it applies to twins"),
                          (["--method", "vanilla_rft", "--rank", "4"], "autolora, madry_ft --peft lora"),
                          (["--method", "twins", "--probe-epochs", "3"], "--init roli")):
        train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, *flags, expect=[expect])
    with pytest.raises(UserError, match="step_size="):
        evaluate(torch.nn.Linear(2, 2), [], alpha=2 / 255)


def test_compare_gives_a_method_flag_to_the_methods_that_read_it(tmp_path):
    from autolora.config import TrainConfig
    from autolora.errors import UserError
    from autolora.workflows.compare import plan

    runs = plan(TrainConfig(rank=4, gamma=2.0), ["vanilla_rft", "autolora", "twins"], [0])
    by = {r.method: r.cfg for r in runs}
    assert (by["vanilla_rft"].rank, by["autolora"].rank, by["twins"].rank) == (8, 4, 8)
    assert (by["autolora"].gamma, by["twins"].gamma) == (None, 2.0)
    with pytest.raises(UserError, match="--gamma is read by no method of the sweep"):
        plan(TrainConfig(gamma=2.0), ["vanilla_rft", "autolora"], [0])


@pytest.mark.parametrize("epochs, want", [(1, []), (2, [1]), (3, [1, 2]), (6, [3, 5]), (60, [30, 50])])
def test_default_milestones_are_distinct_epochs_inside_the_run(epochs, want):
    from autolora.config import TrainConfig
    from autolora.methods import resolve_config

    assert resolve_config(TrainConfig(epochs=epochs)).milestones == want


@pytest.mark.parametrize("flags, expect", [
    (["--milestones", "100", "--epochs", "1"], "a 1-epoch run has no milestone"),
    (["--milestones", "2,2", "--epochs", "4"], "repeats an epoch"),
    (["--milestones", "0", "--epochs", "4"], "epoch 0 is not inside the run"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--train-steps", "0"], "PGD-0 is only the random start"),
    (["--limit-train", "1"], "--limit-train must be >= 2"),
    (["--lr", "1e308"], "float32"),
    (["--lora-filter", "(", "--method", "autolora"], "is not a valid regular expression"),
])
def test_meaningless_settings_are_refused(tmp_path, capsys, data, flags, expect):
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, *flags, expect=[expect])


def test_almost_surely_mistaken_settings_warn_once(tmp_path, capsys, data, monkeypatch):
    import autolora.engine.loop as T
    from autolora.cli import main

    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: False)  # --amp warns only where bf16 is emulated
    assert main(["train", *ARGS, "--data-dir", str(data), "--epochs", "0", "--step-size", "16/255", "--amp",
                 "--out", str(tmp_path / "r")]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("autolora: warning:")]
    assert len(warnings) == 3 and "larger than --eps" in warnings[0] and "--amp on a CPU without native bf16" in warnings[2]
    assert "no --weights: the tiny backbone starts from random weights" in warnings[1]
    # --weights none: training from random weights is meant, no warning
    assert main(["train", *ARGS, "--data-dir", str(data), "--epochs", "0", "--weights", "none",
                 "--out", str(tmp_path / "r2")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "larger than --eps" in (tmp_path / "r" / "train.log").read_text()


def test_nan_weights_are_refused_not_scored(tmp_path, capsys, trained_run):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = str(run / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    sd = {k: v.float() * float("nan") if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(sd, path, metadata=meta)
    fails(capsys, "eval", run, "--device", "cpu", expect=["outputs are not finite", "weights are damaged"])
    from autolora.errors import UserError
    from autolora.models import create_model
    from autolora.models.weights import load_weights

    with pytest.raises(UserError, match="hold NaN or inf values"):
        load_weights(create_model("tiny", 3, "none"), path)


def test_a_first_epoch_divergence_says_there_is_no_checkpoint(tmp_path, capsys, data):
    msg = train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, "--epochs", "1", "--lr", "1e30")
    assert "no checkpoint yet, so nothing of it was kept" in msg and "last good checkpoint is kept" not in msg


@pytest.mark.slow
def test_threads_are_recorded_and_a_resume_with_others_warns(tmp_path, data):
    out = tmp_path / "run"
    p = run_cli("train", *ARGS, "--data-dir", data, "--epochs", "2", "--out", out, check=False,
                fault="kill_at_step:main:1:0")
    assert p.returncode == -9
    p = run_cli("train", "--resume", out, "--quiet", env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    assert "trained with 1 CPU thread(s), this process has 2" in p.stderr and "not bitwise" in p.stderr
    assert read_json(out / "results.json")["threads"] == 2


@pytest.mark.parametrize("field, value, expect", [("arch", "small", "arch: checkpoint 'tiny', config.yaml 'small'"),
                                                  ("method", "twins", "method: checkpoint 'vanilla_rft'")])
@pytest.mark.slow
def test_resume_after_editing_config_names_the_setting(tmp_path, capsys, data, field, value, expect):
    import yaml

    out = tmp_path / "run"
    p = run_cli("train", *ARGS, "--data-dir", data, "--epochs", "2", "--out", out, check=False,
                fault="kill_at_step:main:1:0")
    assert p.returncode == -9
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg[field] = value
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    fails(capsys, "train", "--resume", out, expect=[expect, "was edited"])


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"", b"\x00" * 100, None])
def test_a_damaged_checkpoint_is_called_damaged(tmp_path, capsys, data, content):
    out = tmp_path / "run"
    p = run_cli("train", *ARGS, "--data-dir", data, "--epochs", "2", "--out", out, check=False,
                fault="kill_at_step:main:1:0")
    assert p.returncode == -9
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(content if content is not None else last.read_bytes()[:500])
    msg = fails(capsys, "train", "--resume", out, expect=["is damaged", "best.pt"])
    assert "refusing" not in msg


def test_config_that_is_a_directory_or_not_utf8(tmp_path, capsys, data):
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, "--config", tmp_path, expect=["is a directory"])
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("epochs: 1 # d\xe9j\xe0\n".encode("latin-1"))
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", data, "--config", bad, expect=["is not UTF-8 text"])


def test_out_that_is_a_symlink(tmp_path, capsys, data, trained_run):
    link = tmp_path / "link"
    os.symlink(trained_run, link)
    fails(capsys, "train", *ARGS, "--data-dir", data, "--overwrite", out=link, expect=["is a symbolic link"])
    assert (trained_run / "results.json").exists()
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", dangling)
    fails(capsys, "train", *ARGS, "--data-dir", data, out=dangling, expect=["which does not exist"])


@pytest.mark.slow
def test_no_usable_temp_dir_is_one_line(tmp_path, data):
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    p = run_cli("train", *ARGS, "--data-dir", data, "--out", tmp_path / "r", check=False, preexec_fn=limit)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "ulimit -f" in p.stderr


def test_unreadable_class_folder_says_permission_denied(tmp_path, capsys, data, monkeypatch):
    """As root the permission bits do not stop reading, so the OS's refusal is simulated."""
    d = _copy(data, tmp_path)
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("class1"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", d, expect=["permission denied", "class1"])


def test_data_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    train_fails(capsys, tmp_path, *ARGS, "--data-dir", tmp_path / "f", expect=["is a file, not a directory"])


def test_convert_weights_into_a_file_path(tmp_path, capsys, trained_run):
    (tmp_path / "afile").write_text("x")
    fails(capsys, "convert-weights", trained_run / "model.safetensors", tmp_path / "afile" / "x.safetensors",
          expect=["is a file, not a directory"])


@pytest.mark.slow
def test_a_plain_pickle_as_weights_is_one_line(tmp_path, data):
    import pickle

    with open(tmp_path / "w.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    p = run_cli("train", *ARGS, "--data-dir", data, "--weights", tmp_path / "w.pkl", "--out", tmp_path / "r",
                check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_eval_limit_has_one_bound(capsys, trained_run, limit):
    fails(capsys, "eval", trained_run, "--limit", limit, expect=["--limit must be >= 1 (images to evaluate)"])


@pytest.mark.slow
def test_usage_errors_are_one_line():
    p = run_cli("train", "--epochs", "many", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "autolora train --help" in p.stderr
    p = run_cli("train", "--epoch", "3", check=False)  # no prefix matching, a suggestion instead
    assert p.returncode == 2 and "(did you mean '--epochs'?)" in p.stderr
