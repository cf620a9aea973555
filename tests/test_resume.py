"""Crash safety: a real `autolora train` killed with SIGKILL at exact points, then resumed with
`--resume`, ends bitwise identical to the same run uninterrupted (model.safetensors, metrics.jsonl rows,
results.json); plus `--deterministic` reproducibility and `--resume` conflict checks.

The kill points come from the test-only hook AUTOLORA_FAULT (autolora/engine/faults.py): the process sends itself
SIGKILL there, so no cleanup code runs, as with `kill -9` or an OOM kill. Rows and results are compared
without their wall-clock fields (`seconds`), the only values that legitimately differ between two runs.
Subprocesses run with one intra-op thread (identical float reductions, less load on a shared machine).
"""
import os
import signal

import pytest

from autolora.methods import resolve_config
from helpers import RESUME_ARGS, make_imagefolder, read_json, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # end-to-end runs in real processes: `make test`, not `make test-fast`

TIMING_FIELDS = ("seconds", "eval_seconds")
ARGS = RESUME_ARGS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 21 train images -> 3 steps of 8/8/5 per epoch; 3 val, 6 test images of 8x8 pixels
    return make_imagefolder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, test_per_class=2, size=8)


def _killed(p, fault):
    assert p.returncode == -signal.SIGKILL, f"{fault}: expected SIGKILL, got exit {p.returncode}\n{p.stdout}\n{p.stderr}"


def _strip(obj):
    return {k: v for k, v in obj.items() if k not in TIMING_FIELDS}


def assert_same_run(ref, run):
    """Bitwise-identical model, identical metrics rows and results (timing fields removed); best.pt of the
    run's best epoch in place."""
    assert (run / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert [_strip(r) for r in read_jsonl(run / "metrics.jsonl")] == [_strip(r) for r in read_jsonl(ref / "metrics.jsonl")]
    res = read_json(run / "results.json")
    assert _strip(res) == _strip(read_json(ref / "results.json"))
    from autolora.engine.checkpoints import load_checkpoint

    assert load_checkpoint(str(run / "checkpoints" / "best.pt"))["epoch"] == res["best_epoch"]


def kill_and_resume(out, train_args, faults):
    """Start the run with faults[0], resume once per further fault (each must kill it), then resume to the end."""
    for i, fault in enumerate(faults):
        args = ["train", *train_args, "--out", out] if i == 0 else ["train", "--resume", out, "--quiet"]
        _killed(run_cli(*args, check=False, fault=fault), fault)
        assert not (out / "results.json").exists()
    run_cli("train", "--resume", out, "--quiet")
    assert not [f for d in (out, out / "checkpoints") for f in os.listdir(d) if f.endswith(".tmp")]


def _last_epoch(out):
    from autolora.engine.checkpoints import load_checkpoint

    ck = load_checkpoint(str(out / "checkpoints" / "last.pt"))
    return ck["stage"], ck["epoch"]


# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vanilla_ref(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vanilla") / "ref"
    args = ["--method", "vanilla_rft", "--data-dir", data, *ARGS, "--epochs", "2", "--workers", "1"]
    run_cli("train", *args, "--out", out)
    return out, args


def test_deterministic_runs_are_bitwise_identical(vanilla_ref, tmp_path):
    """--deterministic (torch flags, seeded DataLoader workers: --workers 1 here) twice: the same bytes."""
    ref, args = vanilla_ref
    run_cli("train", *args, "--out", tmp_path / "again")
    assert_same_run(ref, tmp_path / "again")


def test_vanilla_killed_mid_epoch_and_in_checkpoint_write(vanilla_ref, tmp_path):
    ref, args = vanilla_ref
    out = tmp_path / "run"
    _killed(run_cli("train", *args, "--out", out, check=False, fault="kill_at_step:main:1:1"), "mid-epoch")
    assert _last_epoch(out) == ("main", 0)
    # dies with last.pt's temp file half written: the previous last.pt stays intact and loadable
    _killed(run_cli("train", "--resume", out, "--quiet", check=False, fault="kill_in_checkpoint_write:main:1"), "ckpt write")
    assert [f for f in os.listdir(out / "checkpoints") if f.endswith(".tmp")]  # the half-written temp file
    assert _last_epoch(out) == ("main", 0)
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0]
    run_cli("train", "--resume", out, "--quiet")
    assert not [f for f in os.listdir(out / "checkpoints") if f.endswith(".tmp")]  # cleaned on resume
    assert_same_run(ref, out)
    p = run_cli("train", "--resume", out, "--quiet", check=False)
    assert p.returncode == 2 and "already finished" in p.stderr


def test_autolora_auto_lr_rollback_killed_and_resumed(data, tmp_path):
    """Automated LR checked every epoch: a halving with roll-back happens inside the run (lr_event), and
    kills before best.pt is written, mid-epoch after the roll-back and in the final evaluation each resume
    to the uninterrupted result. --min-lr stops the run at the second halving (here before the last epoch,
    so the resumed run must see that its stage had stopped)."""
    args = ["--method", "autolora", "--data-dir", data, *ARGS, "--epochs", "6", "--lr-schedule", "auto",
            "--auto-lr-interval", "1", "--min-lr", "0.003"]
    ref = tmp_path / "ref"
    run_cli("train", *args, "--out", ref)
    rows = read_jsonl(ref / "metrics.jsonl")
    back = [r["epoch"] for r in rows if "rolled back" in r.get("lr_event", "")]
    assert back, f"no LR halving with roll-back in the reference run: {rows}"
    if back[0] + 1 >= len(rows):
        pytest.fail(f"the first roll-back (epoch {back[0]}) ended the run; the test needs an epoch after it: {rows}")
    faults = ["kill_after_checkpoint:main:0",  # last.pt of the best epoch written, best.pt not yet
              f"kill_at_step:main:{back[0] + 1}:1",  # mid-epoch, after the roll-back
              "kill_in_final_eval"]  # model.safetensors written, results.json not yet
    kill_and_resume(tmp_path / "run", args, faults)
    assert_same_run(ref, tmp_path / "run")


def test_roli_two_stage_killed_between_and_within_stages(data, tmp_path):
    args = ["--method", "roli", "--data-dir", data, *ARGS, "--epochs", "2", "--probe-epochs", "1"]
    ref = tmp_path / "ref"
    run_cli("train", *args, "--out", ref)
    assert [r["stage"] for r in read_jsonl(ref / "metrics.jsonl")] == ["probe", "main", "main"]
    out = tmp_path / "run"
    kill_and_resume(out, args, ["kill_before_stage:main", "kill_at_step:main:1:1"])
    assert_same_run(ref, out)
    assert (out / "checkpoints" / "best_probe.pt").exists()


# --------------------------------------------------------------------------------- --resume checks
@pytest.mark.parametrize("extra, message", [
    (["--epochs", "9"], "--epochs 9 conflicts"),
    (["--config", "x.yaml"], "--config x.yaml conflicts"),
    (["--overwrite"], "--overwrite conflicts"),
    (["--out", "elsewhere"], "--out elsewhere conflicts"),
])
def test_resume_conflicting_flag_is_named(tmp_path, capsys, extra, message):
    from autolora.cli import main
    from autolora.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(resolve_config(TrainConfig(epochs=3)).to_yaml())
    assert main(["train", "--resume", str(run), *extra]) == 2
    assert message in capsys.readouterr().err


def test_resume_without_a_run_is_an_error(tmp_path, capsys):
    from autolora.cli import main

    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
