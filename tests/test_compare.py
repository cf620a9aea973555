"""`autolora compare`: methods × seeds in one call; finished runs skipped, interrupted ones resumed, report."""
import os

import pytest

from autolora.workflows.compare import compare, parse_spec, run_name
from autolora.config import TrainConfig
from autolora.errors import UserError

from helpers import COMPARE_ARGS as ARGS
from helpers import make_imagefolder, read_json, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # end-to-end runs in real processes: `make test`, not `make test-fast`


def _cfg(data, **kw):
    return TrainConfig(dataset="imagefolder", data_dir=data, arch="tiny", input_size="none", batch_size=16,
                       train_steps=1, eval_steps=1, eval_attacks=["clean"], device="cpu", epochs=1,
                       progress=False, **kw)


def test_names_and_specs():
    assert parse_spec("autolora") == ("autolora", "random")
    assert parse_spec("autolora:roli") == ("autolora", "roli")
    assert parse_spec("roli∘autolora") == ("autolora", "roli")
    assert run_name("autolora", "roli", 2) == "autolora-roli-s2"
    assert run_name("vanilla_rft", "random", 0, 0.001) == "vanilla_rft-s0-lr0.001"
    with pytest.raises(UserError, match="unknown method 'autolra'"):
        parse_spec("autolra")


def test_compare_skips_resumes_and_reports(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=12, size=8, test_per_class=4)
    root = str(tmp_path / "cmp")
    cfg = _cfg(data)
    runs = compare(cfg, ["vanilla_rft", "autolora"], [0, 1], root, quiet=True)
    assert [os.path.basename(r) for r in runs] == ["vanilla_rft-s0", "autolora-s0", "vanilla_rft-s1", "autolora-s1"]
    for r in runs:
        res = read_json(os.path.join(r, "results.json"))
        assert res["seed"] == int(r[-1]) and res["test_sa"] is not None
    summary = read_json(os.path.join(root, "compare.json"))
    assert [row["status"] for row in summary["runs"]] == ["done"] * 4
    report = open(os.path.join(root, "report", "report.md")).read()
    assert "vanilla_rft" in report and "autolora" in report
    stamps = {r: os.path.getmtime(os.path.join(r, "results.json")) for r in runs}

    # a second call trains nothing
    msgs = []
    compare(cfg, ["vanilla_rft", "autolora"], [0, 1], root, quiet=True, log=msgs.append)
    assert "4 finished, 0 to resume, 0 new" in msgs[0]
    assert stamps == {r: os.path.getmtime(os.path.join(r, "results.json")) for r in runs}

    # an unfinished run (config.yaml, no results.json) is resumed; a new seed is added
    os.unlink(os.path.join(runs[1], "results.json"))
    msgs = []
    compare(cfg, ["vanilla_rft", "autolora"], [0, 1, 2], root, quiet=True, log=msgs.append)
    assert "4 runs" not in msgs[0] and "3 finished, 1 to resume, 2 new" in msgs[0]
    assert any("resuming autolora-s0" in m for m in msgs)
    assert os.path.exists(os.path.join(runs[1], "results.json"))
    assert os.path.exists(os.path.join(root, "autolora-s2", "results.json"))

    # a run dir made with another config is an error naming it
    with pytest.raises(UserError, match="vanilla_rft-s0 was made with a different config .*epochs"):
        compare(TrainConfig(**{**cfg.to_dict(), "epochs": 2}),
                ["vanilla_rft"], [0], root, quiet=True)


def test_cli_interrupted_sweep_resumes(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=12, size=8, test_per_class=4)
    root = tmp_path / "cmp"
    common = ["compare", "--methods", "vanilla_rft,autolora", "--seeds", "0", "--lrs", "0.01,0.001",
              "--out-root", root, "--data-dir", data, "--epochs", "2", "--quiet", *ARGS]
    # killed (SIGKILL) in the first run's second epoch
    p = run_cli(*common, check=False, fault="kill_at_step:main:1:0")
    assert p.returncode != 0
    first = root / "vanilla_rft-s0-lr0.01"
    assert (first / "config.yaml").exists() and not (first / "results.json").exists()
    p = run_cli(*common)
    assert "0 finished, 1 to resume, 3 new" in p.stdout
    for name in ("vanilla_rft-s0-lr0.01", "vanilla_rft-s0-lr0.001", "autolora-s0-lr0.01", "autolora-s0-lr0.001"):
        res = read_json(root / name / "results.json")
        assert res["epochs_run"] == 2
    rows = read_jsonl(first / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert read_json(root / "compare.json")["runs"][0]["lr"] == 0.01
    assert "Initial-LR sensitivity" in (root / "report" / "report.md").read_text()
    # bad input: one line, status 2
    p = run_cli("compare", "--methods", "vanilla_rft", "--seeds", "0", "--out-root", root, "--lr", "0.1",
                "--lrs", "0.01", "--data-dir", data, *ARGS, check=False)
    assert p.returncode == 2 and "--lr conflicts with --lrs" in p.stderr
