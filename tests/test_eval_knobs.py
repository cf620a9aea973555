"""The evaluation surface (issue 23): `autolora eval`'s knobs (--norm, --eps lists, --steps, --step-size, --restarts,
--aa-version, --limit, --corruptions), one output file per evaluation, progress, AutoAttack under L2 against
pyautoattack itself, and the Python API (`evaluate(model, x, y)`, `load_model`, `dir(autolora)`)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from autolora.cli import main
from autolora.errors import UserError
from autolora.eval import evaluate
from helpers import FAST_ARGS, cli, fit, make_imagefolder, read_json, squares


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished L∞ run whose own test figures used 6 of its 12 test images (--limit-eval 6)."""
    root = tmp_path_factory.mktemp("evalknobs")
    data = make_imagefolder(root / "data", classes=3, per_class=10, test_per_class=4)
    out = root / "run"
    args = [a if a != "clean" else "clean,pgd" for a in FAST_ARGS]
    assert main(["train", "--data-dir", data, *args, "--epochs", "1", "--limit-eval", "6", "--eval-steps", "3",
                 "--out", str(out)]) == 0
    return out


def evals(run):
    return sorted(p.name for p in run.glob("eval_*"))


def test_limit_defaults_to_the_whole_test_split_and_each_figure_says_its_images(run, capsys):
    rc, io = cli(capsys, "eval", run, "--attacks", "clean,pgd", "--device", "cpu")
    res = json.loads(io.out)
    assert rc == 0 and res["num_test"] == 12 and res["images"] == {"test_sa": 12, "test_pgd3": 12}
    assert res["limit"] is None and os.path.basename(res["file"]).startswith("eval_own_linf-8-255_clean-pgd3_all_")
    assert f"written to {res['file']}" in io.err and read_json(res["file"]) == res
    assert "PGD-3: " in io.err and "12 images" in io.err  # the readable table names what ran and on how many
    own = read_json(run / "results.json")  # --limit 6 gives the run's own final evaluation again
    rc, io = cli(capsys, "eval", run, "--limit", "6", "--device", "cpu", "--no-progress")
    res = json.loads(io.out)
    assert (res["test_sa"], res["test_pgd3"], res["num_test"]) == (own["test_sa"], own["test_pgd3"], 6)
    assert "batch" not in io.err


def test_each_evaluation_has_its_own_file(run, capsys):
    before = set(evals(run))
    files = set()
    for args in (["--attacks", "clean"], ["--attacks", "clean", "--limit", "3"], ["--attacks", "clean"],
                 ["--attacks", "clean", "--batch-size", "5"]):
        rc, io = cli(capsys, "eval", run, *args, "--device", "cpu")
        assert rc == 0
        files.add(json.loads(io.out)["file"])
    assert len(files) == 3  # the same evaluation twice: the same file; another batch seeds PGD otherwise: another
    assert set(evals(run)) - before == {os.path.basename(f) for f in files}


def test_norm_eps_steps_step_size_restarts(run, capsys):
    rc, io = cli(capsys, "eval", run, "--attacks", "pgd", "--norm", "l2", "--device", "cpu")
    res = json.loads(io.out)
    assert rc == 0 and (res["norm"], res["eps"], res["step_size"]) == ("l2", 0.5, 0.125)  # L2's default at 16 px
    assert res["attacks"]["pgd3"] == {"attack": "pgd", "norm": "l2", "eps": 0.5, "step_size": 0.125, "steps": 3,
                                      "restarts": 1, "random_start": True, "loss": "ce"}
    assert "_l2-0.5_pgd3_" in res["file"]
    rc, io = cli(capsys, "eval", run, "--attacks", "pgd", "--eps", "16/255", "--steps", "2", "--step-size", "3/255",
                 "--restarts", "4", "--device", "cpu")
    res = json.loads(io.out)
    rec = res["attacks"]["pgd2_r4"]
    assert (rec["eps"], rec["step_size"], rec["steps"], rec["restarts"]) == (16 / 255, 3 / 255, 2, 4)
    rc, io = cli(capsys, "eval", run, "--attacks", "pgd", "--eps", "16/255", "--steps", "2", "--step-size", "3/255",
                 "--device", "cpu")
    assert res["test_pgd2_r4"] <= json.loads(io.out)["test_pgd2"]  # robust only if it survives every restart
    rc, io = cli(capsys, "eval", run, "--attacks", "clean,aa", "--eps", "0", "--aa-version", "plus", "--device", "cpu")
    res = json.loads(io.out)  # eps 0: AutoAttack has nothing to change
    assert res["test_aa_plus"] == res["test_sa"] and res["attacks"]["aa_plus"]["version"] == "plus"


def test_a_list_of_budgets_gives_a_table_and_a_plot(run, capsys):
    rc, io = cli(capsys, "eval", run, "--attacks", "clean,pgd", "--eps", "2/255,8/255,32/255", "--device", "cpu")
    res = json.loads(io.out)
    assert rc == 0 and [r["eps"] for r in res["sweep"]] == [2 / 255, 8 / 255, 32 / 255]
    assert [r["step_size"] for r in res["sweep"]] == [0.5 / 255, 2 / 255, 8 / 255]  # eps/4 each
    assert res["test_sa"] is not None and all("test_pgd3" in r and "test_sa" not in r for r in res["sweep"])
    assert res["sweep"][-1]["test_pgd3"] <= res["sweep"][0]["test_pgd3"] <= res["test_sa"]
    assert "| 2/255 |" in io.err and "| 32/255 |" in io.err
    png = res["file"][:-len(".json")] + ".png"
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and "_linf-2-255+8-255+32-255_" in res["file"]
    assert "eval L∞ 2/255: batch 1/1" in io.err and "eval L∞ 32/255: batch 1/1" in io.err  # progress lines
    assert res["attacks"]["pgd3"]["step_size"] == "per sweep row" and res["attacks"]["pgd3"]["eps"] == "per sweep row"


@pytest.mark.parametrize("args,message", [
    (["--eps=-1/255"], "eps must be a number >= 0"),
    (["--eps", "2/255,2/255"], "repeats a budget"),
    (["--restarts", "0"], "--restarts must be an integer >= 1"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--eps", "2"], "above 1"),
    (["--corruptions", "/nonexistent/CIFAR-10-C"], "zenodo.org/records/2535967"),
    (["--corruptions-limit", "0", "--corruptions", "/nonexistent"], "--corruptions-limit must be >= 1"),
    (["--attacks", "clean", "--eps", "2/255,8/255"], "no attack uses one"),
])
def test_bad_eval_settings_are_one_error_before_anything_is_written(run, capsys, args, message):
    before = evals(run)
    rc, io = cli(capsys, "eval", run, "--device", "cpu", *args)
    lines = io.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("autolora: error: ") and message in lines[0], io.err
    assert evals(run) == before and io.out == ""


# ------------------------------------------------------------------------------------------------ corruptions
CLASSES = ["cat", "ship", "truck"]  # CIFAR-10 names: indices 3, 8, 9


def write_corruptions(root, names, n=20, seed=0):
    """The official layout in miniature: <name>.npy uint8 (5n, 32, 32, 3), labels.npy (5n,) = 5 copies."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.tile(rng.integers(0, 10, n), 5).astype(np.uint8)
    np.save(root / "labels.npy", labels)
    for name in names:
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5 * n, 32, 32, 3)).astype(np.uint8))
    return labels


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """A run directory of a 3-class CIFAR-10 model (config and model only: corruptions need nothing else)."""
    from autolora.config import TrainConfig
    from autolora.models import create_model
    from autolora.models.export import save_model

    out = tmp_path_factory.mktemp("crun") / "run"
    out.mkdir()
    cfg = TrainConfig(dataset="cifar10", classes=CLASSES, arch="tiny", input_size="none").resolve_budget("low")
    (out / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(0)
    save_model(create_model("tiny", 3, "none"), str(out / "model.safetensors"), {"classes": CLASSES})
    return out


def test_corruptions_per_severity_and_the_mean(tmp_path, cifar_run, capsys):
    from autolora.data.corruptions import CORRUPTIONS
    from autolora.models.export import load_model

    root = tmp_path / "CIFAR-10-C"
    labels = write_corruptions(root, [*CORRUPTIONS, "spatter"])
    rc, io = cli(capsys, "eval", cifar_run, "--corruptions", root, "--corruptions-limit", "4", "--device", "cpu")
    assert rc == 0
    c = json.loads(io.out)["corruptions"]
    assert list(c["accuracy"]) == [*CORRUPTIONS, "spatter"] and c["complete"] and c["set"] == "CIFAR-10-C"
    model, _ = load_model(str(cifar_run / "model.safetensors"))
    index = {3: 0, 8: 1, 9: 2}
    for name in ("gaussian_noise", "spatter"):
        images = np.load(root / f"{name}.npy")
        for s in range(1, 6):
            rows = [i for i in range((s - 1) * 20, s * 20) if labels[i] in index][:4]  # the run's classes, first 4
            x = torch.from_numpy(images[rows]).permute(0, 3, 1, 2).float() / 255
            y = torch.tensor([index[int(labels[i])] for i in rows])
            with torch.no_grad():
                assert c["accuracy"][name][s - 1] == (model(x).argmax(1) == y).float().mean().item()
    assert c["images_per_severity"] == 4
    assert c["mean"] == pytest.approx(np.mean([a for n in CORRUPTIONS for a in c["accuracy"][n]]))
    assert c["extra_mean"] == pytest.approx(np.mean(c["accuracy"]["spatter"]))
    assert "| gaussian_noise |" in io.err and "mean accuracy over 15 of the 15 standard corruptions" in io.err
    assert "_c-CIFAR-10-C_" in json.loads(io.out)["file"] and "test_sa" not in json.loads(io.out)


def test_corruption_layout_errors(tmp_path, cifar_run, capsys):
    root = tmp_path / "C"
    write_corruptions(root, ["fog"])
    (root / "labels.npy").unlink()
    rc, io = cli(capsys, "eval", cifar_run, "--corruptions", root, "--device", "cpu")
    assert rc == 2 and "has no labels.npy" in io.err
    write_corruptions(tmp_path / "empty", [])
    rc, io = cli(capsys, "eval", cifar_run, "--corruptions", tmp_path / "empty", "--device", "cpu")
    assert rc == 2 and "none of the corruption files" in io.err
    write_corruptions(root, ["fog"])
    rc, io = cli(capsys, "eval", cifar_run, "--corruptions", root, "--device", "cpu")
    c = json.loads(io.out)["corruptions"]
    assert rc == 0 and not c["complete"] and "fog" not in c["missing"] and len(c["missing"]) == 14
    assert "(missing: gaussian_noise" in io.err



def test_corruptions_of_other_classes_stop_before_any_attack_runs(tmp_path, cifar_run, capsys, monkeypatch):
    """A CIFAR-100-C directory for a CIFAR-10 run: one error before the attacks (AutoAttack can take hours), and the
    sweep's records: AutoAttack takes no step."""
    from autolora.workflows import evaluate as E

    root = tmp_path / "CIFAR-100-C"
    root.mkdir()
    np.save(root / "labels.npy", np.tile(np.arange(0, 100, 7), 5).astype(np.uint8))  # labels up to 98: CIFAR-100
    np.save(root / "fog.npy", np.zeros((75, 32, 32, 3), np.uint8))
    monkeypatch.setattr(E, "_attack_figures", lambda *a: pytest.fail("the attacks ran before the class check"))
    rc, io = cli(capsys, "eval", cifar_run, "--attacks", "pgd", "--corruptions", root, "--device", "cpu")
    assert rc == 2 and "is a CIFAR-100 class" in io.err


def test_cifar100_c_labels_map_by_fine_label_name(tmp_path):
    """CIFAR-100-C's labels index CIFAR-100's fine labels (alphabetical): a run of apple, bed, worm reads labels 0, 5,
    99 of a severity's block, in the run's order; a run with no CIFAR-100 class is one error naming the set."""
    from autolora.data.corruptions import CorruptedImages, check_classes

    root = tmp_path / "CIFAR-100-C"
    root.mkdir()
    block = np.array([99, 3, 0, 5, 42, 0, 99, 5], dtype=np.uint8)  # worm, bear, apple, bed, lion, apple, worm, bed
    labels = np.tile(block, 5)
    np.save(root / "labels.npy", labels)
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None].repeat(32, 1).repeat(32, 2).repeat(3, 3)
    np.save(root / "fog.npy", images)
    ds = CorruptedImages(str(root), "fog", 2, labels, ["bed", "apple", "worm"], limit=4)
    assert ds.y.tolist() == [2, 1, 0, 1]  # worm, apple, bed, apple: rows 8, 10, 11, 13 of severity 2's block
    assert [round(float(ds[i][0][0, 0, 0]) * 255) for i in range(4)] == [8, 10, 11, 13]
    check_classes(labels, ["bed", "apple", "worm"], str(root))
    with pytest.raises(UserError, match="is a CIFAR-100 class"):
        check_classes(labels, ["airplane", "truck"], str(root))

# ------------------------------------------------------------------------------------------------ the Python API
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fit(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)), *squares(32, seed=1), steps=30)


def test_evaluate_takes_tensors_a_pair_a_dataset_or_a_loader(model):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = squares(12, seed=2)
    kw = dict(attacks="clean,pgd3", norm="l2", eps=2.0, batch_size=4)
    ref = evaluate(model, TensorDataset(x, y), **kw)
    assert evaluate(model, x, y, **kw) == ref == evaluate(model, (x, y), **kw)
    assert evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), **kw) == ref
    assert ref["pgd3"] < ref["sa"]
    default = evaluate(model, x, y, attacks="pgd3", norm="l2", batch_size=4)  # 16 px: L2's default 0.5, step 0.125
    assert default == evaluate(model, x, y, attacks="pgd3", norm="l2", eps=0.5, step_size=0.125, batch_size=4)
    assert default != evaluate(model, x, y, attacks="pgd3", norm="l2", eps=3.0, batch_size=4)
    with pytest.raises(UserError, match="without their labels"):
        evaluate(model, x)
    with pytest.raises(UserError, match="12 images but 5 labels"):
        evaluate(model, x, y[:5])


def test_load_model_is_in_eval_mode_and_dir_lists_the_api(tmp_path):
    import autolora
    from autolora.models import create_model
    from autolora.models.export import save_model

    save_model(create_model("tiny", 2, "none").train(), str(tmp_path / "m.safetensors"), {"classes": ["a", "b"]})
    m, meta = autolora.load_model(str(tmp_path / "m.safetensors"))
    assert not any(mod.training for mod in m.modules()) and meta["classes"] == ["a", "b"]
    names = dir(autolora)
    for name in ("evaluate", "evaluate_run", "load_model", "train", "TrainConfig", "attacks", "PGD", "AutoAttack"):
        assert name in names and getattr(autolora, name) is not None
    assert autolora.attacks.PGD is autolora.PGD


def test_autoattack_cost_is_estimated_before_it_starts(model, capfd):
    x, y = squares(4, seed=2)
    res = evaluate(model, x, y, attacks="aa", norm="l2", eps=8.0, batch_size=4, progress=True)  # broken at once
    err = capfd.readouterr().err.splitlines()
    assert res["aa"] == 0.0 and err[0].startswith("eval: AutoAttack (standard) on 4 images: at most about ")
    assert any("robust accuracy after APGD-CE" in line for line in err) and err[-1].startswith("eval: batch 1/1")


def test_autoattack_forecast_counts_this_processes_images():
    """A rank of a sharded evaluation forecasts AA on its own share (its batches), not on the whole data."""
    from autolora.eval import _total

    assert _total(range(10), None, 4, 3) == 10  # 1 process: 4 batches of 3 cover the 10 images
    assert _total(range(10), None, 2, 3) == 6  # a rank of 2: batches 0 and 2
    assert _total(range(10), 4, 2, 3) == 4 and _total(iter(range(10)), None, 2, 3) == 6
    assert _total(iter(range(10)), None, None, 3) == 3  # nothing known: the first batch


@pytest.mark.slow
def test_autoattack_l2_counts_equal_pyautoattacks():
    """Our AutoAttack under L2 counts what pyautoattack itself counts on the same model and images (a 10-class model,
    so no target is adapted), standard and rand. Square's 5,000 queries are cut to 300 in both (about 9 ms of
    per-query overhead on this CPU: minutes otherwise); everything else is pyautoattack's own."""
    import pyautoattack.autoattack as PA

    torch.manual_seed(0)
    k, n = 10, 10
    protos = torch.rand(k, 3, 8, 8)

    def make(m, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(m) % k
        w = torch.linspace(0.3, 0.95, m).view(-1, 1, 1, 1)  # some images near a boundary, some far from it
        return (protos[y] * w + (1 - w) * torch.rand(m, 3, 8, 8, generator=g)).clamp(0, 1), y

    net = fit(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, k)), *make(200, 1), steps=100)
    x, y = make(n, 2)
    version_set = PA.AutoAttack._set_version

    def shorter_square(self, version):
        version_set(self, version)
        self.square.n_queries = 300

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PA.AutoAttack, "_set_version", shorter_square)
        for version, key in (("standard", "aa"), ("rand", "aa_rand")):
            ours = evaluate(net, x, y, attacks=["clean", "aa"], aa_version=version, norm="l2", eps=1.0, batch_size=n)
            x_adv, y_adv = PA.AutoAttack(net, norm="L2", eps=1.0, version=version, seed=0).run_standard_evaluation(
                x, y, batch_size=n)
            assert ours[key] * n == int((y_adv == y).sum()), version
            assert 0 < ours[key] < ours["sa"] == 1.0  # some images broken, some not
            assert ((x_adv - x).flatten(1).norm(dim=1) <= 1.0 + 1e-5).all()


class _RecordingAA:
    """Stands in for pyautoattack.AutoAttack: records what it is built with, returns the clean images."""
    made: list = []

    def __init__(self, model, norm, eps, version, seed, device):
        type(self).made.append({"norm": norm, "eps": eps, "version": version})
        self.attacks_to_run = []
        self.apgd_targeted = self.fab = type("Sub", (), {"n_target_classes": 9})()

    def run_standard_evaluation(self, x, y, batch_size):
        return x, y


def test_autoattack_gets_the_version_and_the_norms_default_eps(monkeypatch):
    """--aa-version reaches pyautoattack (not only its name in the record), and `AutoAttack` without eps attacks at
    the norm's default for the images' resolution (L2 0.5 at 16 px, 3.0 at 224), as `PGD` does."""
    import pyautoattack

    from autolora.attacks import AutoAttack

    monkeypatch.setattr(pyautoattack, "AutoAttack", _RecordingAA)
    _RecordingAA.made = []
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    evaluate(net, x, y, attacks=["aa"], aa_version="plus", norm="l2", eps=1.0, device="cpu")
    AutoAttack(net, norm="l2")(x, y)
    AutoAttack(net)(x, y)
    AutoAttack(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)), norm="l2")(
        torch.rand(1, 3, 224, 224), y[:1])
    assert _RecordingAA.made == [{"norm": "L2", "eps": 1.0, "version": "plus"},
                                 {"norm": "L2", "eps": 0.5, "version": "standard"},
                                 {"norm": "Linf", "eps": 8 / 255, "version": "standard"},
                                 {"norm": "L2", "eps": 3.0, "version": "standard"}]
