"""Nothing lost (issue 20, items 1-6): `--overwrite` validates everything before it replaces a run, and replaces only
a run directory; a run directory is locked (two real processes); ImageFolder links cannot relabel images; options
fail before the first step and a rejected start leaves nothing behind; `eval` prints before it writes; no flag is
taken for another by prefix."""
import json
import os
import subprocess
import sys
import time

import pytest

from helpers import FAST_ARGS, cli, make_imagefolder, read_json, run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), classes=3, per_class=6, test_per_class=2, size=8)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished run to be protected."""
    from autolora.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *FAST_ARGS, "--data-dir", data, "--epochs", "1", "--out", str(out)]) == 0
    return out


def snapshot(path):
    """Every file under `path` with its bytes (the lock file's note aside)."""
    out = {}
    for dp, _, files in os.walk(path):
        for f in files:
            if f != ".lock":
                p = os.path.join(dp, f)
                out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def copy_run(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run, snapshot(run)


def no_siblings(run):
    """No staging or trash directory of an overwrite left beside the run."""
    return not [e for e in os.listdir(run.parent) if ".autolora-" in e]


# ------------------------------------------------------------------------------------ 1. --overwrite
@pytest.mark.parametrize("where", ["equal", "parent"])
def test_out_that_is_or_holds_the_data_is_refused_before_anything_is_touched(tmp_path, capsys, where):
    root = tmp_path / "data"
    victim = make_imagefolder(root / "victim", classes=3, per_class=4, size=8)
    before = snapshot(root)
    out = victim if where == "equal" else root
    rc, io = cli(capsys, "train", *FAST_ARGS, "--data-dir", victim, "--out", out, "--overwrite")
    assert rc == 2 and "must not hold the run's inputs" in io.err and "--data-dir" in io.err, io.err
    assert snapshot(root) == before


def test_out_that_holds_the_weights_or_the_config_is_refused(tmp_path, capsys, data, finished):
    import shutil

    box = tmp_path / "box"
    box.mkdir()
    shutil.copy(finished / "model.safetensors", box / "w.safetensors")
    (box / "cfg.yaml").write_text("epochs: 1\n")
    before = snapshot(box)
    rc, io = cli(capsys, "train", *FAST_ARGS, "--data-dir", data, "--weights", box / "w.safetensors", "--out", box,
                 "--overwrite")
    assert rc == 2 and "--weights" in io.err and "must not hold" in io.err
    rc, io = cli(capsys, "train", *FAST_ARGS, "--data-dir", data, "--config", box / "cfg.yaml", "--out", box,
                 "--overwrite")
    assert rc == 2 and "--config" in io.err and "must not hold" in io.err
    assert snapshot(box) == before


def test_overwrite_replaces_only_a_run_directory(tmp_path, capsys, data):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    rc, io = cli(capsys, "train", *FAST_ARGS, "--data-dir", data, "--out", d, "--overwrite")
    assert rc == 2 and "files that autolora did not write (thesis.tex)" in io.err
    assert (d / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("flags, expect", [
    (["--eval-steps", "0"], "--eval-steps must be >= 1"),
    (["--lora-filter", "nothing_matches_this", "--method", "autolora"], "matches no Conv2d/Linear layer"),
    (["--eval-attacks", "clean,foo"], "unknown attack 'foo'"),
    (["--method", "twins", "--arch", "test_vit"], "TWINS needs batch normalisation"),
])
def test_overwrite_with_a_typo_keeps_the_finished_run(tmp_path, capsys, data, finished, flags, expect):
    run, before = copy_run(finished, tmp_path)
    rc, io = cli(capsys, "train", *FAST_ARGS, "--data-dir", data, "--epochs", "1", *flags, "--out", run, "--overwrite")
    assert rc == 2 and expect in io.err, io.err
    assert snapshot(run) == before and no_siblings(run)


def test_overwrite_that_fails_in_its_first_epoch_keeps_the_old_run(tmp_path, capsys, data, finished, monkeypatch):
    """The new run is built beside the old one and swapped in only once it has a checkpoint: a failure in the
    first epoch (here a NaN loss) leaves the old run exactly as it was and nothing beside it."""
    run, before = copy_run(finished, tmp_path)
    monkeypatch.setenv("AUTOLORA_FAULT", "nan_loss:main:0:0")
    rc, io = cli(capsys, "train", *FAST_ARGS, "--data-dir", data, "--epochs", "2", "--out", run, "--overwrite")
    assert rc == 2 and "no checkpoint yet" in io.err, io.err
    assert snapshot(run) == before and no_siblings(run)


def test_overwrite_swaps_the_new_run_in(tmp_path, capsys, data, finished):
    run, before = copy_run(finished, tmp_path)
    rc, _ = cli(capsys, "train", *FAST_ARGS, "--data-dir", data, "--epochs", "2", "--out", run, "--overwrite")
    assert rc == 0 and no_siblings(run)
    assert read_json(run / "results.json")["epochs_run"] == 2 and snapshot(run) != before


def test_a_failed_new_run_leaves_no_directory(tmp_path, capsys, data, monkeypatch):
    monkeypatch.setenv("AUTOLORA_FAULT", "nan_loss:main:0:0")
    rc, io = cli(capsys, "train", *FAST_ARGS, "--data-dir", data, "--epochs", "1", "--out", tmp_path / "new")
    assert rc == 2 and not (tmp_path / "new").exists()
    monkeypatch.delenv("AUTOLORA_FAULT")  # the corrected command is not refused as "exists and is not empty"
    assert cli(capsys, "train", *FAST_ARGS, "--data-dir", data, "--epochs", "1", "--out", tmp_path / "new")[0] == 0


# ------------------------------------------------------------------------------------ 2. the lock
def _paused_run(tmp_path, args, out, flag):
    """A real `autolora train` that pauses at step 1 of epoch 0 holding its run directory (test-only fault)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", AUTOLORA_FAULT="wait_at_step:main:0:1", AUTOLORA_FAULT_FLAG=str(flag))
    p = subprocess.Popen([sys.executable, "-m", "autolora", "train", *map(str, args)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(str(flag) + ".waiting"):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    return p


@pytest.mark.slow
def test_a_second_process_on_a_run_directory_is_refused_naming_the_first(tmp_path, data):
    out, flag = tmp_path / "run", tmp_path / "go"
    first = _paused_run(tmp_path, [*FAST_ARGS, "--data-dir", data, "--epochs", "2", "--out", out], out, flag)
    try:
        assert (out / ".lock").exists()
        # resume of the same directory, an --overwrite of it, and an eval writing into it: each refused at once
        for args in (["train", "--resume", out, "--quiet"],
                     ["train", *FAST_ARGS, "--data-dir", data, "--epochs", "1", "--out", out, "--overwrite"]):
            p = run_cli(*args, check=False, timeout=120)
            assert p.returncode == 2 and f"in use by process {first.pid}" in p.stderr, p.stderr
            assert p.stderr.count("autolora: error:") == 1
        assert not (out / "results.json").exists() and no_siblings(out)
    finally:
        flag.write_text("go")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # one run's rows, each once


@pytest.mark.slow
def test_the_lock_dies_with_its_process(tmp_path, data):
    """SIGKILL releases the lock (the kernel drops a dead process's flock): --resume works at once."""
    out, flag = tmp_path / "run", tmp_path / "go"
    first = _paused_run(tmp_path, [*FAST_ARGS, "--data-dir", data, "--epochs", "2", "--out", out], out, flag)
    first.kill()
    first.communicate()
    # killed in epoch 0, before its first checkpoint: the directory stays resumable (config.yaml, no last.pt)
    run_cli("train", "--resume", out, "--quiet")
    assert read_json(out / "results.json")["epochs_run"] == 2


def test_two_overwrites_of_a_new_directory_do_not_both_run(tmp_path):
    """Two `--overwrite` starts that both found the directory missing: the second to open finds the first's run
    there and refuses (Locked), rather than staging beside it and swapping it away when it commits."""
    from autolora.engine.rundir import RunDir
    from autolora.utils.lock import Locked

    path = str(tmp_path / "run")
    first, second = RunDir(path), RunDir(path)
    for r in (first, second):
        r.check(resume=False, overwrite=True)
        r.lock_existing()  # nothing there yet
    first.open(resume=False, overwrite=True)
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(Locked):
        second.open(resume=False, overwrite=True)
    second.close()
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging directory beside it
    first.close()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """A child forked while a run holds its lock (a DataLoader worker) drops its inherited copy: once the parent
    lets go (or is killed), the directory is free although the child still lives."""
    import os
    import signal
    import time

    from autolora.utils.lock import FileLock, Locked

    lock = FileLock(str(tmp_path / ".lock"), "run directory").acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its fork handlers have run) says so, and outlives the parent's hold
        os.write(w, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(r, 1) == b"1"
        with pytest.raises(Locked):
            FileLock(str(tmp_path / ".lock"), "run directory").acquire()  # the parent's lock still holds
        lock.release()
        FileLock(str(tmp_path / ".lock"), "run directory").acquire().release()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r), os.close(w)


@pytest.mark.slow
def test_compare_and_eval_respect_locks(tmp_path, data, finished):
    """A sweep directory and a run directory in use (locked here, by this test process) refuse `compare` and an
    `eval` that would write into them, naming this process."""
    import shutil

    from autolora.utils.lock import lock_dir

    root = tmp_path / "sweep"
    root.mkdir()
    with lock_dir(str(root)):
        p = run_cli("compare", "--methods", "vanilla_rft", "--seeds", "0", "--out-root", root, *FAST_ARGS,
                    "--data-dir", data, "--epochs", "1", check=False)
        assert p.returncode == 2 and f"sweep directory {root} is in use by process {os.getpid()}" in p.stderr
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with lock_dir(str(run)):
        p = run_cli("eval", run, "--attacks", "clean", "--device", "cpu", check=False)
        assert p.returncode == 2 and f"in use by process {os.getpid()}" in p.stderr
        assert not list(run.glob("eval*.json"))


# ------------------------------------------------------------------------------------ 3. links in an ImageFolder
def test_a_folder_link_cannot_relabel_images(tmp_path, capsys):
    from autolora.data import build_data

    d = make_imagefolder(tmp_path / "d", classes=2, per_class=6, test_per_class=2, size=8)
    os.symlink("..", os.path.join(d, "train", "class0", "loopdir"))  # a loop, and the other class's images
    os.symlink(".", os.path.join(d, "train", "class1", "self"))  # a loop inside the class folder
    with pytest.warns(UserWarning, match="skipped 1 folder link.*loopdir -> .. \\(outside the class folder\\)"):
        with pytest.warns(UserWarning, match="skipped 1 folder link.*self -> . \\(a folder listed already"):
            bundle = build_data("imagefolder", d, val_fraction=0.2)
    labels = [bundle.train.targets[i] for i in range(len(bundle.train))] + bundle.val.targets
    assert sorted(labels) == [0] * 6 + [1] * 6  # 12 images, each with its own label (was: 934 with wrong labels)


# ------------------------------------------------------------------------------------ 4. options before the first step
@pytest.mark.parametrize("flags, expect", [
    (["--eval-attacks", "clean,foo"], "unknown attack 'foo'"),
    (["--limit-train", "1"], "--limit-train must be >= 2"),
    (["--milestones", "5", "--epochs", "2"], "epoch 5 is not inside the run"),
])
def test_options_are_checked_before_anything(tmp_path, capsys, data, flags, expect):
    rc, io = cli(capsys, "train", *FAST_ARGS, "--data-dir", data, *flags, "--out", tmp_path / "run")
    assert rc == 2 and expect in io.err, io.err
    assert not (tmp_path / "run").exists()


def test_one_image_per_class_is_one_error_and_no_directory(tmp_path, capsys):
    d = make_imagefolder(tmp_path / "d", classes=2, per_class=1, test_per_class=1, size=8)
    rc, io = cli(capsys, "train", *FAST_ARGS, "--data-dir", d, "--out", tmp_path / "run")
    assert rc == 2 and "the validation split is empty" in io.err and "Traceback" not in io.err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_may_change_the_test_attacks(tmp_path, capsys, data, monkeypatch):
    """A run interrupted before its final evaluation can be finished with other test attacks (they do not change
    training); config.yaml records them."""
    out = tmp_path / "run"
    p = run_cli("train", *FAST_ARGS, "--data-dir", data, "--epochs", "1", "--out", out, check=False,
                fault="kill_in_final_eval")
    assert p.returncode == -9
    rc, io = cli(capsys, "train", "--resume", out, "--eval-attacks", "clean,pgd2", "--quiet")
    assert rc == 0, io.err
    res = read_json(out / "results.json")
    assert set(k for k in res if k.startswith("test_")) == {"test_sa", "test_pgd2"}
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["eval_attacks"] == ["clean", "pgd2"]


def test_demo_on_a_missing_device_leaves_nothing(tmp_path, capsys):
    rc, io = cli(capsys, "demo", "--quick", "--device", "tpu", "--out", tmp_path / "demo")
    assert rc == 2 and "--device 'tpu'" in io.err
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------------ 5. eval prints before it writes
def test_eval_prints_the_figures_when_the_run_directory_cannot_be_written(tmp_path, capsys, finished, monkeypatch):
    import shutil

    import autolora.workflows.evaluate as E
    from autolora.utils.fileio import WriteFailed

    run = tmp_path / "run"
    shutil.copytree(finished, run)

    def refuse(path, obj):
        raise WriteFailed(f"could not write {path}: write failed (Read-only file system)")

    monkeypatch.setattr(E, "atomic_write_json", refuse)
    rc, io = cli(capsys, "eval", run, "--attacks", "clean", "--device", "cpu")
    assert rc == 2 and "--out FILE" in io.err
    assert json.loads(io.out)["test_sa"] is not None  # the figures came first
    monkeypatch.undo()
    rc, io = cli(capsys, "eval", run, "--attacks", "clean", "--device", "cpu", "--out", tmp_path / "mine.json")
    assert rc == 0 and read_json(tmp_path / "mine.json")["test_sa"] == json.loads(io.out)["test_sa"]


# ------------------------------------------------------------------------------------ 6. no prefix matching
def test_out_is_not_taken_for_out_root(tmp_path, capsys, data):
    rc, io = cli(capsys, "compare", "--methods", "vanilla_rft", "--out", tmp_path / "x", *FAST_ARGS,
                 "--data-dir", data)
    assert rc == 2 and "required: --out-root" in io.err and len(io.err.strip().splitlines()) == 1
    rc, io = cli(capsys, "compare", "--methods", "vanilla_rft", "--out-root", tmp_path / "root", "--out",
                 tmp_path / "x", *FAST_ARGS, "--data-dir", data)
    assert rc == 2 and "unrecognized argument --out (did you mean '--out-root'?)" in io.err
    assert not (tmp_path / "x").exists() and not (tmp_path / "root").exists()
