"""bench/transfer_cifar10.py end to end on a generated stand-in for CIFAR-10 (10 class folders of tiny PNGs):
every stage runs, the results file has each section and claim, every run directory is a valid autolora run, and a
second invocation trains nothing (resumability)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import make_fake_cifar, read_json, run_cli

pytestmark = pytest.mark.slow  # end-to-end runs in real processes: `make test`, not `make test-fast`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(root) -> dict:
    """{path: (size, mtime_ns)} of every file of the run directories (what a rerun that trains or evaluates would
    change; the sweep reports, compare.json and the stage timings are rewritten by every invocation)."""
    out = {}
    for dp, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "report"]
        for f in files:
            if f in ("compare.json", "timings.json", ".lock", "restore.lock"):  # .lock: the note of the sweep's last holder
                continue
            p = os.path.join(dp, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _bench(tmp, *extra):
    args = [*extra, "--quick", "--data-dir", os.path.join(tmp, "cifar"), "--runs", os.path.join(tmp, "runs"),
            "--out-md", os.path.join(tmp, "results.md"), "--weights", os.path.join(tmp, "w", "src.safetensors"),
            "--pretrain-per-class", "20", "--per-class", "8", "--test-per-class", "10", "--val-per-class", "4",
            "--epochs", "1", "--seeds", "0", "--lrs", "0.001,0.01", "--aa-limit", "5", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "transfer_cifar10.py"), *args],
                       capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def test_transfer_benchmark_quick_end_to_end(tmp_path):
    tmp = str(tmp_path)
    make_fake_cifar(os.path.join(tmp, "cifar"))
    _bench(tmp)

    md = open(os.path.join(tmp, "results.md")).read()
    for section in ("## Setup", "## Measured cost", "## Results", "## AutoLoRa vs the baselines",
                    "## Gradient similarity", "## Initial-LR sensitivity", "## The paper's claims"):
        assert section in md, section
    assert "Status: 4/4 main runs finished, AA subset evaluated for 4/4; LR sweep 4/4 runs." in md
    for n in range(1, 8):  # all seven claims have a verdict computed from the runs
        assert re.search(rf"\n{n}\. [^\n]*: (holds|not shown|fails) \(", md), n
    assert "not measured yet" not in md and "per-example form" in md
    summary = read_json(os.path.join(tmp, "results.json"))  # the JSON twin of the results file
    assert summary["runs"]["autolora|0"]["res"]["test_pgd10"] == read_json(
        os.path.join(tmp, "runs", "main", "autolora-s0", "results.json"))["test_pgd10"]

    main = os.path.join(tmp, "runs", "main")
    names = ["vanilla_rft-s0", "twins-s0", "autolora-s0", "autolora-roli-s0"]
    test_files = set()
    for name in names:
        d = os.path.join(main, name)
        res = read_json(os.path.join(d, "results.json"))
        aa = read_json(os.path.join(d, "aa_subset.json"))
        assert res["num_test"] == 50 and aa["num_test"] == 5
        assert aa["test_aa"] <= aa["test_pgd10"] + 1e-9 <= aa["test_sa"] + 2e-9
        split = read_json(os.path.join(d, "split.json"))
        test_files.add((split["data_dir"], split["test_split"], split["sizes"]["test"]))
        assert split["split_seed"] == 0  # validation split and AA subset fixed across seeds
        out = run_cli("eval", d, "--attacks", "clean", "--device", "cpu").stdout
        assert "test_sa" in out
    assert len(test_files) == 1  # every method is tested on the same fixed test folder
    lr = os.path.join(tmp, "runs", "lr")
    assert os.path.islink(os.path.join(lr, "vanilla_rft-s0-lr0.01"))  # the main run, not retrained
    for name in ("vanilla_rft-s0-lr0.001", "autolora-s0-lr0.001", "autolora-s0-lr0.01"):
        assert os.path.exists(os.path.join(lr, name, "results.json")), name  # trained and evaluated

    before_files = _state(os.path.join(tmp, "runs"))
    _bench(tmp)
    assert _state(os.path.join(tmp, "runs")) == before_files  # a second invocation trains and evaluates nothing

    # a fresh clone: the git-ignored run directories are gone, the committed archive of run records is there
    archive = os.path.join(tmp, "results_runs")
    for name in names:
        assert sorted(os.listdir(os.path.join(archive, "main", name))) == sorted(
            ["config.yaml", "split.json", "metrics.jsonl", "train.log", "results.json", "aa_subset.json"])
    assert not os.path.exists(os.path.join(archive, "lr", "vanilla_rft-s0-lr0.01"))  # a link to a main run
    before = read_json(os.path.join(tmp, "results.json"))
    shutil.rmtree(os.path.join(tmp, "runs"))
    _bench(tmp)
    restored = _state(os.path.join(tmp, "runs"))
    runs_with_results = {os.path.dirname(p) for p in restored if p.endswith("results.json") and "report" not in p}
    assert len(runs_with_results) == 7  # the 7 trained runs (the linked LR run aside), restored from their records
    assert not [p for p in restored if p.endswith(("model.safetensors", "last.pt"))]  # nothing was trained again
    for name in names:  # AA results came with the records, not from a new evaluation
        assert read_json(os.path.join(tmp, "runs", "main", name, "aa_subset.json")) == read_json(
            os.path.join(archive, "main", name, "aa_subset.json"))
    after = read_json(os.path.join(tmp, "results.json"))
    assert after["runs"] == before["runs"] and after["lr"] == before["lr"]
    assert after["stages_seconds"]["main"] >= before["stages_seconds"]["main"]  # timings carried over

    # --report-only in a fresh clone rewrites the results from the archive alone, training nothing
    shutil.rmtree(os.path.join(tmp, "runs"))
    os.remove(os.path.join(tmp, "results.json"))
    _bench(tmp, "--report-only")
    state = _state(os.path.join(tmp, "runs"))
    assert len({os.path.dirname(p) for p in state if p.endswith("results.json") and "report" not in p}) == 7
    assert not [p for p in state if p.endswith(("model.safetensors", "last.pt"))]
    assert read_json(os.path.join(tmp, "results.json"))["runs"] == before["runs"]


def load_benchlib():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchlib", os.path.join(ROOT, "bench", "benchlib.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_recorded_commit_says_when_the_code_differs_from_it(tmp_path, monkeypatch):
    """The invocation record names the commit whose code made the figures and adds "+local changes" when the
    library or a bench script differs from it (not for other files, e.g. the README)."""
    bench = load_benchlib()
    repo = tmp_path / "repo"
    for rel in ("autolora/a.py", "bench/b.py", "README.md"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert bench.git_commit(str(repo)) == head
    (repo / "README.md").write_text("y\n")
    assert bench.git_commit(str(repo)) == head
    for rel in ("bench/b.py", "autolora/a.py"):
        (repo / rel).write_text("x = 2\n")
        assert bench.git_commit(str(repo)) == head + " +local changes", rel
        subprocess.run([*git, "checkout", "-q", "--", rel], check=True)
    assert bench.git_commit(str(repo)) == head
    assert bench.git_commit(str(tmp_path / "not_a_repo")) is None


def test_paired_statistics_on_equal_differences():
    """Equal per-seed differences (up to float rounding, e.g. 0.26 − 0.24 and 0.25 − 0.23) have no paired t-test:
    p is None, not a rounding-noise 1e-16 shown as significant; no difference at all needs no seed count."""
    bench = load_benchlib()
    tie = bench.paired([0.26, 0.25], [0.24, 0.23])
    assert tie["p"] is None and tie["sd"] == 0 and tie["seeds_for_power"] is None and tie["wins"] == 2
    assert bench.verdict(tie).startswith("not shown")
    zero = bench.paired([0.24, 0.25], [0.25, 0.24])
    assert zero["p"] == pytest.approx(1.0) and zero["seeds_for_power"] is None
    real = bench.paired([0.30, 0.35, 0.33], [0.29, 0.30, 0.31])
    assert 0.1 < real["p"] < 0.2 and real["seeds_for_power"] == 7


def test_two_parts_archiving_one_run_at_once(tmp_path, monkeypatch):
    """`make bench-roli` runs two parts side by side, and both archive the shared probing runs: a copy in flight must
    not lose its temporary file to the other part's (a shared `config.yaml.tmp` did: FileNotFoundError)."""
    bench = load_benchlib()
    run = tmp_path / "runs" / "probe" / "linear_probe-s0"
    run.mkdir(parents=True)
    for f in ("config.yaml", "results.json", "train.log"):
        (run / f).write_text(f"{f}\n")
    archive = tmp_path / "archive"
    copy, nested = bench.copy_record, []

    def copy_while_the_other_part_archives(src, dst, *args):
        out = copy(src, dst, *args)
        if not nested:  # the other part archives the same run between our copy and our rename
            nested.append(dst)
            bench.archive_run(str(archive), str(run), runs_root=str(tmp_path / "runs"))
        return out

    monkeypatch.setattr(bench, "copy_record", copy_while_the_other_part_archives)
    bench.archive_run(str(archive), str(run), runs_root=str(tmp_path / "runs"))
    got = archive / "probe" / "linear_probe-s0"
    assert nested and sorted(os.listdir(got)) == ["config.yaml", "results.json", "train.log"]  # no temporary left
    assert all((got / f).read_text() == f"{f}\n" for f in os.listdir(got))


def test_two_parts_restoring_a_fresh_clone_at_once(tmp_path, monkeypatch):
    """`make bench-roli` on a fresh clone: both parts restore the archived runs at once. The second waits for the
    first and finds the runs there (a shared `RUN.restoring` directory was renamed away under the first part)."""
    import threading

    bench = load_benchlib()
    archive, runs = tmp_path / "archive", tmp_path / "runs"
    for name in ("a-s0", "a-s1"):
        (archive / "g" / name).mkdir(parents=True)
        for f in ("config.yaml", "results.json"):
            (archive / "g" / name / f).write_text(f"{name} {f}\n")
    copy, other, other_done, restored = bench.copy_record, [], threading.Event(), {}

    def other_part():
        restored["second"] = bench.restore_runs(str(archive), str(runs), log=lambda m: None)
        other_done.set()

    def copy_while_the_other_part_starts(src, dst, *args):
        out = copy(src, dst, *args)
        if not other:  # the other part starts restoring in the middle of our first run's copy
            other.append(threading.Thread(target=other_part))
            other[0].start()
            other_done.wait(timeout=1.0)  # without the lock it finishes here, under our feet
        return out

    monkeypatch.setattr(bench, "copy_record", copy_while_the_other_part_starts)
    restored["first"] = bench.restore_runs(str(archive), str(runs), log=lambda m: None)
    other[0].join(timeout=10)
    assert restored == {"first": 2, "second": 0}
    assert sorted(os.listdir(runs / "g")) == ["a-s0", "a-s1"]  # and no `.restoring` left
    assert (runs / "g" / "a-s1" / "results.json").read_text() == "a-s1 results.json\n"


def test_archived_runs_resume_in_a_clone_elsewhere(tmp_path, monkeypatch):
    """A run's config names its data and weights by absolute path, and a resumed sweep compares them: the archive
    says ${ROOT} for the checkout, and a clone at another path restores configs naming its own files."""
    bench = load_benchlib()
    made_at, clone = tmp_path / "made_at", tmp_path / "clone"
    run = made_at / "bench" / "runs" / "g" / "r-s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"data_dir: {made_at}/bench/runs/data\nweights: {made_at}/bench/w.safetensors\n"
                                     f"other: {made_at}2/kept\n")
    (run / "results.json").write_text('{"test_sa": 0.5}\n')
    (run / "probe_head.safetensors").write_bytes(b"\x00" + str(made_at).encode())
    monkeypatch.setattr(bench, "ROOT", str(made_at))
    bench.archive_run(str(clone / "archive"), str(run), runs_root=str(made_at / "bench" / "runs"))
    archived = (clone / "archive" / "g" / "r-s0" / "config.yaml").read_text()
    assert str(made_at) + "/" not in archived and archived.startswith("data_dir: ${ROOT}/bench/runs/data")
    monkeypatch.setattr(bench, "ROOT", str(clone))
    assert bench.restore_runs(str(clone / "archive"), str(clone / "bench" / "runs"), log=lambda m: None) == 1
    restored = clone / "bench" / "runs" / "g" / "r-s0"
    assert (restored / "config.yaml").read_text() == (f"data_dir: {clone}/bench/runs/data\n"
                                                      f"weights: {clone}/bench/w.safetensors\nother: {made_at}2/kept\n")
    assert (restored / "probe_head.safetensors").read_bytes() == b"\x00" + str(made_at).encode()  # binary as it was


def test_only_invocations_that_made_something_name_their_commit(tmp_path, monkeypatch):
    """"The runs were made by commit(s) ...": an invocation that found everything done (a resume, a fresh clone's
    report) made nothing, and its commit is not named; records from before the count existed still are."""
    bench = load_benchlib()
    path = tmp_path / "timings.json"
    path.write_text('{"stages": {}, "invocations": [{"commit": "old", "t0": 1.0, "t1": 2.0}]}')
    for pid, (commit, made) in enumerate((("aaa", 2), ("bbb", 0), ("ccc", 1))):
        monkeypatch.setattr(bench, "git_commit", lambda c=commit: c)
        monkeypatch.setattr(bench.os, "getpid", lambda p=pid: 100 + p)  # one process per invocation
        t = bench.Timings(str(path), log=lambda m: None)
        for _ in range(made):
            t.made()
    assert bench.Timings(str(path), record=False).commits() == ["old", "aaa", "ccc"]
    assert [i.get("made") for i in read_json(str(path))["invocations"]] == [None, 2, 0, 1]
