"""`autolora report` on hand-written run directories (no training: fast)."""
import json
import math

import pytest
import yaml

from autolora.cli import main
from helpers import read_json


def run_report(*args):
    return main(["report", *map(str, args)])


def _fake_run(path, method, seed, sa, pgd, aa, epochs=4, gradsim=True, results=True):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"method": method, "dataset": "digits", "arch": "tiny",
                                                      "seed": seed, "init": "random", "eps": 8 / 255}))
    rows = []
    for e in range(epochs):
        r = {"stage": "main", "epoch": e, "lr": 0.01 / (2 ** max(0, e - 2)), "train_loss": 2.0 - 0.3 * e,
             "train_sa": 0.3 + 0.1 * e, "train_ra": 0.1 + 0.05 * e, "val_sa": 0.4 + 0.1 * e,
             "val_pgd10": 0.2 + 0.05 * e + 0.01 * seed, "seconds": 1.0}
        if method == "autolora":
            r.update({"lambda1": 0.7 - 0.1 * e, "lambda2": 1.8 + 0.6 * e, "lora_train_sa": 0.3 + 0.1 * e})
            if e == 3:
                r["lr_event"] = "halved to 0.005 (condition 1); rolled back to epoch 2"
        if gradsim:
            r["grad_sim"] = (0.8 if method == "autolora" else -0.3) + 0.01 * e
        rows.append(r)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if results:
        (path / "results.json").write_text(json.dumps({
            "test_sa": sa, "test_pgd10": pgd, "test_aa": aa, "method": method, "seed": seed, "dataset": "digits",
            "arch": "tiny", "init": "random", "best_epoch": epochs - 1, "epochs_run": epochs, "num_test": 100,
            "trainable_params": 1000}))
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    return [
        _fake_run(root / "vanilla-s0", "vanilla_rft", 0, 0.80, 0.50, 0.45),
        _fake_run(root / "vanilla-s1", "vanilla_rft", 1, 0.82, 0.52, 0.47),
        _fake_run(root / "autolora-s0", "autolora", 0, 0.85, 0.56, 0.50),
        _fake_run(root / "autolora-s1", "autolora", 1, 0.86, 0.57, 0.52),
    ]


def test_report_table_pvalues_and_plots(runs, tmp_path, capsys):
    from scipy.stats import ttest_ind

    out = tmp_path / "rep"
    assert run_report(*runs, "--out", out) == 0
    stdout = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "| digits | tiny | 8/255 | vanilla_rft | 2 | 81.00 ± 1.41 | 51.00 ± 1.41 | 46.00 ± 1.41 |" in md
    assert "| digits | tiny | 8/255 | autolora | 2 | 85.50 ± 0.71 |" in md
    want = ttest_ind([0.80, 0.82], [0.85, 0.86], equal_var=False).pvalue
    assert f"{want:.3g}" in md and "vanilla_rft vs autolora" in md  # Welch p-value of SA
    assert "81.00 ± 1.41" in stdout and "report:" in stdout
    for r in runs:
        png = out / "plots" / f"{r.name}.png"
        assert png.exists() and png.stat().st_size > 5000
        assert f"](plots/{r.name}.png)" in md  # relative links
    assert (out / "plots" / "curves.png").stat().st_size > 5000
    data = read_json(out / "report.json")
    assert data["tests"][0]["test_sa"]["p"] == pytest.approx(want)
    assert data["summary"][0]["n"] == 2


def test_report_single_seed_na_unfinished_run_and_default_out(tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    _fake_run(root / "a", "vanilla_rft", 0, 0.8, 0.5, None, gradsim=False)
    _fake_run(root / "b", "autolora", 0, 0.9, 0.6, None)
    _fake_run(root / "c", "autolora", 1, 0, 0, 0, epochs=2, results=False)  # still running
    (root / "not_a_run").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run_report("runs") == 0  # a folder holding runs
    md = (root / "report" / "report.md").read_text()  # default: <common parent>/report
    assert "| vanilla_rft | 1 | 80.00 | 50.00 | n/a |" in md
    assert "| autolora | 1 | 90.00 | 60.00 | n/a |" in md  # the unfinished run is not in the table
    line = next(x for x in md.splitlines() if "vanilla_rft vs autolora" in x)
    assert line.count("n/a") == 4  # three p-values with one seed each, and the AA difference
    assert "running or unfinished" in md and (root / "report" / "plots" / "c.png").exists()
    assert (root / "report" / "plots" / "a.png").exists()  # no GS panel, still a plot
    assert "report: runs/report/report.md" in capsys.readouterr().out
    assert run_report(tmp_path / "nothing") == 2
    assert run_report(root / "not_a_run") == 2
    assert "no run directories" in capsys.readouterr().err


def test_welch_p_edge_cases():
    from autolora.workflows.runs import welch_p

    assert welch_p([0.5], [0.6, 0.7]) is None
    assert welch_p([0.5, 0.5], [0.5, 0.5]) is None  # zero variance in both: undefined
    p = welch_p([0.1, 0.2, 0.3], [0.5, 0.6, 0.8])
    assert 0 < p < 0.05 and not math.isnan(p)


def test_runs_differing_in_lr_are_separate_rows(tmp_path):
    root = tmp_path / "runs"
    for lr, seed, sa in ((0.01, 0, 0.8), (0.01, 1, 0.82), (0.001, 0, 0.7), (0.001, 1, 0.72)):
        d = _fake_run(root / f"v-s{seed}-lr{lr}", "vanilla_rft", seed, sa, 0.5, None)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "lr": lr}))
    assert run_report(root, "--out", tmp_path / "rep") == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| vanilla_rft (lr=0.01) | 2 | 81.00 ± 1.41 |" in md
    assert "| vanilla_rft (lr=0.001) | 2 | 71.00 ± 1.41 |" in md
    assert "vanilla_rft (lr=0.001) vs vanilla_rft (lr=0.01)" in md  # the pair, with its Welch p-value
    assert "**0.0194**" in md
