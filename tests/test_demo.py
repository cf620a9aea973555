"""`autolora demo --quick`: the whole pipeline (pre-train, two fine-tuning runs, report) in seconds."""

import pytest

from helpers import read_json, read_jsonl

from autolora.cli import main

pytestmark = pytest.mark.slow  # end-to-end runs in real processes: `make test`, not `make test-fast`


def test_quick_demo_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--jobs", "1", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert "| vanilla_rft |" in stdout and "| autolora |" in stdout and "report:" in stdout
    assert "[autolora-s0" in stdout  # the runs' log lines are echoed
    assert (out / "pretrain" / "model.safetensors").exists() and (out / "pretrain" / "results.json").exists()
    for method in ("vanilla_rft", "autolora"):
        res = read_json(out / f"{method}-s0" / "results.json")
        assert res["method"] == method and res["dataset"] == "digits" and res["test_sa"] is not None
        cfg = (out / f"{method}-s0" / "config.yaml").read_text()
        assert "log_gradsim: true" in cfg and "weights:" in cfg
        rows = read_jsonl(out / f"{method}-s0" / "metrics.jsonl")
        assert all("grad_sim" in r for r in rows)
    md = (out / "report" / "report.md").read_text()
    assert "Pre-training" in md and "](plots/vanilla_rft-s0.png)" in md
    assert (out / "report" / "plots" / "autolora-s0.png").stat().st_size > 5000
    # a second run with the same settings keeps everything and only re-renders the report
    mtime = (out / "autolora-s0" / "results.json").stat().st_mtime
    assert main(["demo", "--quick", "--out", str(out), "--jobs", "1", "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "report:" in stdout and "[autolora-s0" not in stdout
    assert (out / "autolora-s0" / "results.json").stat().st_mtime == mtime
    # other settings need --overwrite
    assert main(["demo", "--quick", "--epochs", "1", "--out", str(out), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_quick_demo_under_l2(tmp_path, capsys):
    """`demo --norm l2`: pre-training (PGD, FGSM-RS being L∞ only) and both fine-tuning runs under L2 at the demo's
    L2 budget, and the report says so."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--norm", "l2", "--out", str(out), "--jobs", "1", "--device", "cpu", "--quiet"]) == 0
    for run in ("pretrain", "vanilla_rft-s0", "autolora-s0"):
        rec = read_json(out / run / "results.json")["attacks"]
        for r in (rec["val"], rec["test"]["pgd10"]):
            assert (r["norm"], r["eps"]) == ("l2", 1.0), run
    assert "| L2 1 |" in (out / "report" / "report.md").read_text()
