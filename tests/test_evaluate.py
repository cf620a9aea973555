"""evaluate(): clean / PGD-k / AutoAttack accuracies on tiny models and a few 16x16 images (CPU)."""
import time

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from autolora.errors import UserError
from autolora.attacks.autoattack import autoattack
from autolora.attacks.registry import parse_attacks
from autolora.eval import count_correct, evaluate
from autolora.models import create_model
from helpers import fit, squares


@pytest.fixture(scope="module")
def test_set():
    return TensorDataset(*squares(16, seed=2))


@pytest.fixture(scope="module")
def resnet():
    """A tiny ResNet trained briefly on coloured squares: clean accuracy ~1."""
    torch.manual_seed(0)
    return fit(create_model("tiny", 4, input_size="none"), *squares(32, seed=1), steps=15)


def linear(k, seed=0):
    """Flatten + Linear trained on coloured squares: AutoAttack on it takes a few seconds on a CPU."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, k))
    return fit(model, *squares(32, k=k, seed=1), steps=40)


class Recording(Dataset):
    def __init__(self, base):
        self.base, self.seen = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen.append(i)
        return self.base[i]


def test_parse_attacks():
    assert parse_attacks("clean,pgd10,aa") == ["clean", "pgd10", "aa"]
    assert parse_attacks("clean,pgd", pgd_steps=3) == ["clean", "pgd3"]  # `pgd`: PGD with the configured steps
    assert parse_attacks(" Clean, PGD20 ,aa,pgd20") == ["clean", "pgd20", "aa"]
    assert parse_attacks(["pgd7", "sa", "autoattack"]) == ["pgd7", "clean", "aa"]
    with pytest.raises(UserError, match="did you mean 'pgd10'"):
        parse_attacks("clean,pgb10")
    for bad in ("", " , ", "fgsm", "pgd0", "pgdx", "cw"):
        with pytest.raises(UserError):
            parse_attacks(bad)


def test_fractions_and_pgd_below_clean(resnet, test_set):
    res = evaluate(resnet, test_set, attacks="clean,pgd10", batch_size=8)
    assert list(res) == ["sa", "pgd10"]
    assert all(0 <= v <= 1 for v in res.values())
    assert res["sa"] >= 0.9
    assert res["pgd10"] <= res["sa"]
    strong = evaluate(resnet, test_set, attacks=["clean", "pgd5"], eps=0.25, step_size=0.05)
    assert strong["sa"] == res["sa"] and strong["pgd5"] < strong["sa"] - 0.2


def test_eps_zero_pgd_equals_clean(resnet, test_set):
    res = evaluate(resnet, test_set, attacks="clean,pgd3,aa", eps=0)
    assert res["pgd3"] == res["sa"] == res["aa"]


def test_limit_and_dataloader(resnet, test_set):
    rec = Recording(test_set)
    counts = count_correct(resnet, rec, attacks="clean,pgd2", limit=5, batch_size=2)
    assert counts["sa"][1] == counts["pgd2"][1] == 5
    assert max(rec.seen) == 4
    counts = count_correct(resnet, DataLoader(test_set, batch_size=4), attacks="clean", limit=6)
    assert counts["sa"][1] == 6
    full = count_correct(resnet, DataLoader(test_set, batch_size=3), attacks="clean")
    assert full["sa"] == count_correct(resnet, test_set, attacks="clean", batch_size=5)["sa"]
    assert full["sa"][1] == 16 and isinstance(full["sa"][0], int)
    for bad in (0, -5):  # one bound, one message (`autolora eval --limit` says the same)
        with pytest.raises(UserError, match="--limit must be >= 1"):
            evaluate(resnet, test_set, attacks="clean", limit=bad)


def test_mode_grads_and_rng_preserved(test_set):
    torch.manual_seed(0)
    model = create_model("tiny", 4, input_size="none").train()
    model.backbone.layer1.eval()
    flags = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    evaluate(model, test_set, attacks="clean,pgd2", limit=4)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_silent_without_progress_and_lines_with_it(resnet, test_set, capfd):
    evaluate(resnet, test_set, attacks="clean,pgd1", limit=4)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    evaluate(resnet, test_set, attacks="clean,pgd1", limit=6, batch_size=3, progress=True)  # stderr is not a TTY
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 2 and lines[0].startswith("eval: batch 1/2 (50 %)") and "ETA" in lines[0]
    assert lines[1].startswith("eval: batch 2/2 (100 %)") and "SA " in lines[1] and "PGD-1 " in lines[1]


def test_rejects_unnormalised_or_integer_images(resnet):
    x, y = squares(4)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        evaluate(resnet, TensorDataset((x - 0.5) / 0.25, y), attacks="clean")
    with pytest.raises(UserError, match="float"):
        evaluate(resnet, TensorDataset((x * 255).to(torch.uint8), y), attacks="clean")
    with pytest.raises(UserError):
        evaluate(resnet, TensorDataset(x, y), attacks="clean", eps=-1)


@pytest.mark.slow
def test_autoattack_standard(capfd):
    """Official standard AutoAttack: below PGD-10, silent, side-effect free, a few seconds for 16 images.

    eps = 0.1 is beyond what PGD-10 with steps of 2/255 can reach, so AutoAttack must find more."""
    model = linear(4)
    data = TensorDataset(*squares(16, seed=2))
    model.train()
    torch.manual_seed(5)
    t = time.time()
    res = evaluate(model, data, attacks="clean,pgd10,aa", eps=0.1, step_size=2 / 255, batch_size=8)
    elapsed = time.time() - t
    after_aa = torch.rand(3)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    torch.manual_seed(5)
    assert evaluate(model, data, attacks="clean,pgd10", eps=0.1, step_size=2 / 255, batch_size=8) == {k: res[k] for k in ("sa", "pgd10")}
    assert torch.equal(torch.rand(3), after_aa)  # AutoAttack reseeds internally: the caller's RNG is restored
    assert model.training and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert res["sa"] >= 0.9
    assert res["aa"] <= res["pgd10"] - 0.1
    assert elapsed < 60, f"AutoAttack on 16 images took {elapsed:.0f}s"


def test_autoattack_deterministic_and_in_ball():
    model = linear(4)
    x, y = squares(8, seed=2)
    a = autoattack(model, x, y, eps=0.3, batch_size=4)
    b = autoattack(model, x, y, eps=0.3, batch_size=4)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert (a - x).abs().max() <= 0.3 + 1e-6 and a.min() >= 0 and a.max() <= 1


def test_autoattack_two_classes():
    """With < 4 classes APGD-T (targeted DLR) is left out and FAB-T uses 1 target."""
    model = linear(2)
    data = TensorDataset(*squares(8, k=2, seed=2))
    res = evaluate(model, data, attacks="clean,aa", eps=0.1)
    assert res["aa"] <= res["sa"]


@pytest.mark.slow
def test_sharded_counts_sum_to_the_one_process_counts(test_set, monkeypatch):
    """Rank r of N evaluates batches r, r + N, ... only, and because batch k's attacks are seeded by (seed, k),
    the per-rank counts (clean, PGD, AutoAttack) add up to exactly the 1-process counts."""
    import autolora.utils.dist as D

    model = linear(4)
    kw = dict(attacks="clean,pgd3,aa", eps=0.1, step_size=0.05, batch_size=5, seed=4)  # 16 images: batches 5, 5, 5, 1
    one = count_correct(model, test_set, **kw)
    seen, parts = {}, []
    monkeypatch.setattr(D, "all_reduce_sum", lambda *v, device=None: [float(x) for x in v])  # this rank's counts
    for r in range(2):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        monkeypatch.setattr(D, "world_size", lambda: 2)
        data = Recording(test_set)
        parts.append(count_correct(model, data, all_reduce=True, **kw))
        seen[r] = sorted(set(data.seen))
    assert seen == {0: [0, 1, 2, 3, 4, 10, 11, 12, 13, 14], 1: [5, 6, 7, 8, 9, 15]}
    assert {k: tuple(a + b for a, b in zip(parts[0][k], parts[1][k])) for k in one} == one
    assert one["sa"][1] == 16 and one["pgd3"][0] < one["sa"][0]  # the attack does something


def test_limit_applies_to_an_eval_loader(resnet, test_set):
    from autolora.eval import eval_loader

    counts = count_correct(resnet, eval_loader(test_set, 4), attacks="clean", limit=6)
    assert counts["sa"][1] == 6


def test_a_terminal_gets_a_bar_and_auto_means_the_models_device(monkeypatch):
    """On a TTY, a tqdm bar (i/n) instead of lines; device "auto" is the device of the model's parameters, and for a
    model without any the CLI's rule."""
    import inspect
    import io

    from autolora.eval import resolve_device
    from autolora.utils import dist
    from autolora.utils.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    with Progress(True, 2, "eval", stream=s) as p:
        p.update("SA 50.0")
        assert p.bar is not None and "1/2" in s.getvalue() and "batch 1/2 (50 %)" not in s.getvalue()
    assert resolve_device(nn.Linear(2, 2).to("meta"), "auto") == torch.device("meta")
    monkeypatch.setattr(dist, "resolve_device", lambda d: torch.device("meta") if d == "auto" else torch.device(d))
    assert resolve_device(nn.ReLU(), "auto") == torch.device("meta")  # no parameters: the CLI's rule
    assert inspect.signature(evaluate).parameters["device"].default == "auto"
