"""Safe loading everywhere: a pickle crafted to run code when unpickled (here: create a marker file) is
refused with a clear message by `train --weights`, `eval` and `train --resume`, and the code never runs.
`--trust-pickle` is the only way to unpickle, is off by default, and warns loudly."""
import argparse
import pickle

import pytest
import torch

from autolora.methods import resolve_config
from helpers import FAST_ARGS as ARGS
from helpers import make_imagefolder, run_cli



class Evil:
    """Unpickling calls open(marker, 'w'), i.e. runs code and creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), classes=2, per_class=6, test_per_class=2, size=8)


def _evil_files(tmp_path, marker):
    """The same payload as a torch zip checkpoint, a legacy torch file and a bare pickle."""
    from autolora.models import create_model

    sd = create_model("tiny", 2, "none").backbone.state_dict()
    files = {"zip": tmp_path / "evil.pt", "legacy": tmp_path / "evil_legacy.pth", "pickle": tmp_path / "evil.ckpt"}
    torch.save({"state_dict": sd, "x": Evil(marker)}, files["zip"])
    torch.save({"state_dict": sd, "x": Evil(marker)}, files["legacy"], _use_new_zipfile_serialization=False)
    with open(files["pickle"], "wb") as f:
        pickle.dump({"state_dict": sd, "x": Evil(marker)}, f)
    return files


def test_payload_is_real(tmp_path):
    """Sanity check of the test itself: plain unpickling does run the code."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


@pytest.mark.slow
def test_malicious_weights_refused_in_a_real_process(tmp_path, data):
    marker = tmp_path / "pwned"
    evil = _evil_files(tmp_path, marker)["zip"]
    out = tmp_path / "run"
    p = run_cli("train", "--data-dir", data, *ARGS, "--epochs", "1", "--weights", evil, "--out", out, check=False)
    assert p.returncode == 2, p.stderr
    assert "autolora: error:" in p.stderr and "arbitrary pickled objects" in p.stderr and "--trust-pickle" in p.stderr
    assert "Traceback" not in p.stderr
    assert not marker.exists()
    assert not out.exists()  # refused before the run directory was created


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_malicious_weights_refused(tmp_path, data, capsys, kind):
    from autolora.cli import main

    marker = tmp_path / "pwned"
    evil = _evil_files(tmp_path, marker)[kind]
    assert main(["train", "--data-dir", data, *ARGS, "--epochs", "1", "--weights", str(evil),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    # torch files are refused by the weights_only unpickler; a bare pickle is not a torch file at all
    expected = "cannot read weights file" if kind == "pickle" else "arbitrary pickled objects"
    assert str(evil) in err and expected in err, err
    assert not marker.exists()


def _fake_run(tmp_path, data):
    """A run directory as `train` leaves it (config.yaml) without training."""
    from autolora.config import TrainConfig

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = TrainConfig(dataset="imagefolder", data_dir=data, arch="tiny", input_size="none", epochs=1,
                      device="cpu", eval_attacks=["clean"], train_steps=1, eval_steps=1)
    (run / "config.yaml").write_text(resolve_config(cfg).to_yaml())
    return run


def test_eval_refuses_a_malicious_model_file(tmp_path, data, capsys):
    from autolora.cli import main

    marker = tmp_path / "pwned"
    run = _fake_run(tmp_path, data)
    (run / "model.safetensors").write_bytes(_evil_files(tmp_path, marker)["zip"].read_bytes())
    assert main(["eval", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is not a readable safetensors model file" in err
    assert not marker.exists()


def test_resume_refuses_a_malicious_checkpoint(tmp_path, data, capsys):
    from autolora.cli import main

    marker = tmp_path / "pwned"
    run = _fake_run(tmp_path, data)
    (run / "checkpoints" / "last.pt").write_bytes(_evil_files(tmp_path, marker)["zip"].read_bytes())
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "last.pt" in err and "weights_only=True" in err
    assert not marker.exists()


def test_trust_pickle_is_opt_in_and_loud(tmp_path, data, capsys):
    """A benign legacy checkpoint that pickles an argparse.Namespace (as old training scripts did): refused
    by default, loaded with --trust-pickle and a warning that names the risk."""
    from autolora.cli import main
    from autolora.config import TrainConfig
    from autolora.models import create_model

    assert TrainConfig().trust_pickle is False
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": create_model("tiny", 2, "none").backbone.state_dict(),
                "args": argparse.Namespace(lr=0.1)}, legacy)
    assert main(["train", "--data-dir", data, *ARGS, "--epochs", "0", "--weights", str(legacy),
                 "--out", str(tmp_path / "a")]) == 2
    assert "argparse.Namespace" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="--trust-pickle: unpickling .* may run arbitrary code"):
        assert main(["train", "--data-dir", data, *ARGS, "--epochs", "0", "--weights", str(legacy),
                     "--trust-pickle", "--out", str(tmp_path / "b")]) == 0
    # besides the Python warning, a log record in the run's own train.log
    assert "may run arbitrary code" in (tmp_path / "b" / "train.log").read_text()
    assert (tmp_path / "b" / "results.json").exists()


def test_every_load_is_weights_only(tmp_path, data, monkeypatch):
    """Every torch.load the package makes (weights, checkpoints on resume, best.pt, eval, convert-weights) passes
    weights_only=True; weights_only=False happens only after the explicit --trust-pickle opt-in."""
    from autolora.cli import main
    from autolora.models import create_model

    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    weights = tmp_path / "w.pth"
    torch.save(create_model("tiny", 2, "none").backbone.state_dict(), weights)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", data, *ARGS, "--epochs", "2", "--weights", str(weights), "--out", str(out)]) == 0
    (out / "results.json").unlink()  # resume it: last.pt (and best.pt) are read back
    (out / "model.safetensors").unlink()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert main(["eval", str(out), "--attacks", "clean", "--device", "cpu"]) == 0
    assert main(["convert-weights", str(weights), str(tmp_path / "w.safetensors")]) == 0
    assert len(calls) >= 3 and set(calls) == {True}, calls
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": create_model("tiny", 2, "none").backbone.state_dict(),
                "args": argparse.Namespace(lr=0.1)}, legacy)
    calls.clear()
    with pytest.warns(UserWarning, match="--trust-pickle"):
        assert main(["convert-weights", str(legacy), str(tmp_path / "l.safetensors"), "--trust-pickle"]) == 0
    assert calls == [True, False]  # refused safely first, unpickled only because of the opt-in
