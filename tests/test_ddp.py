"""torchrun DDP on CPU (gloo): a 2-process run equals a 1-process run with the same global batch, every rank
takes the same decisions, and a killed 2-process run resumes to the same result.

Why the comparison can be exact (up to float summation order):
- A backbone without batch norm: timm's `test_efficientnet_gn` (GroupNorm, 0.1 M parameters). With batch norm
  each rank normalises with its own shard's statistics, so 2 ranks x batch b differ from 1 process x batch 2b by
  construction, and SyncBatchNorm (`--sync-bn`) has no CPU kernel. GroupNorm is per example, so a step is the
  same function of the global batch on both sides.
- eps = 0: PGD's random start draws noise from each rank's own generator (ranks are seeded differently, as they
  should be in real training), so with eps > 0 a 2-rank run's adversarial examples differ from a 1-process
  run's. With eps = 0 the attack returns x, and the rest of the AutoLoRa step runs unchanged: two forwards into
  the DDP wrapper (the LoRa natural path and the plain path, the head used by both) before one backward, the
  λ-weighted loss, SGD with momentum and weight decay.
- Same data order: the trainer deals one permutation per epoch round-robin to the ranks, so step k of 2 ranks x
  batch 8 sees the 16 examples that step k of 1 process x batch 16 sees; 64 training images, so no padding.
  DDP averages the ranks' gradients of per-shard means = the gradient of the global mean.
- The same augmentation: each item's random crop and flip are drawn under an RNG seeded by (seed, stage, epoch,
  index) (`data.samplers.SeededItems`), so the rank that loads an image does not matter.
- Decisions: the automated LR schedule (checked after every epoch: `--auto-lr-rules apgd`, since the authors'
  rules never check after the final epoch of a 2-epoch run; with halving and roll-back) and λ1/λ2 (from the
  branch's SA over the training split) are taken from counts summed over the ranks. A worker script records the
  per-epoch row of *every* rank (only rank 0 writes files), and the rows of rank 0, rank 1 and the 1-process
  run must agree.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_imagefolder, read_json, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # end-to-end runs in real processes: `make test`, not `make test-fast`

WORKER = r'''
import json, os, sys
import autolora.engine.loop as T

_rows = os.environ["ROWS_OUT"] + ".rank" + os.environ.get("RANK", "0") + ".jsonl"
_orig = T._row_line


def _record(row):  # called on every rank with the epoch's row (the log itself is rank 0 only)
    with open(_rows, "a") as f:
        f.write(json.dumps(row) + "\n")
    return _orig(row)


T._row_line = _record
from autolora.cli import main


sys.exit(main(sys.argv[1:]))
'''

DECISION_KEYS = ("stage", "epoch", "lr", "lr_event", "lambda1", "lambda2", "lora_train_sa", "val_sa", "val_pgd1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_imagefolder(root / "data", classes=4, per_class=17, size=16, test_per_class=2)
    worker = root / "worker.py"
    worker.write_text(WORKER)
    common = ["train", "--method", "autolora", "--dataset", "imagefolder", "--data-dir", data,
              "--arch", "test_efficientnet_gn", "--input-size", "none", "--epochs", "2", "--lr", "0.05",
              "--lr-schedule", "auto", "--auto-lr-interval", "1", "--auto-lr-rules", "apgd", "--eps", "0",
              "--train-steps", "1",
              "--eval-steps", "1", "--eval-attacks", "clean,pgd10", "--device", "cpu", "--seed", "3"]
    return root, worker, [str(a) for a in common]


def _run(worker, args, rows_out, nproc, fault=None, check=True):
    """The worker script (every rank records its rows) as one process or under torchrun."""
    return run_cli(*args, script=worker, nproc=nproc, env={"ROWS_OUT": str(rows_out)}, fault=fault, check=check,
                   timeout=300)


def _decisions(rows):
    return [{k: r.get(k) for k in DECISION_KEYS} for r in rows]


def _assert_same_weights(a, b, atol=1e-4):
    """Every tensor within `atol` (weights are O(0.01..1); 8 SGD steps amplify the float summation-order
    differences of per-shard means vs one global mean, ~1e-7 in the loss, to ~1e-5 in the weights)."""
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k].double() - wb[k].double()).abs().max().item() if wa[k].numel() else 0.0
        assert diff <= atol, f"{k}: max diff {diff:.3g}"


@pytest.fixture(scope="module")
def runs(setup):
    root, worker, common = setup
    one = root / "one"
    two = root / "two"
    _run(worker, [*common, "--batch-size", "16", "--out", str(one)], root / "rows_one", 1)
    p2 = _run(worker, [*common, "--batch-size", "8", "--out", str(two)], root / "rows_two", 2)
    return root, one, two, p2


def test_two_ranks_equal_one_process_and_decide_alike(runs):
    root, one, two, p2 = runs
    # the same weights as one process with the global batch
    _assert_same_weights(one / "model.safetensors", two / "model.safetensors")
    # both ranks took the same decisions, and the same as one process
    r0 = read_jsonl(f"{root / 'rows_two'}.rank0.jsonl")
    r1 = read_jsonl(f"{root / 'rows_two'}.rank1.jsonl")
    ref = read_jsonl(f"{root / 'rows_one'}.rank0.jsonl")
    assert len(r0) == len(r1) == len(ref) == 2
    assert any("rolled back" in r.get("lr_event", "") for r in ref)  # a halving with roll-back is compared
    assert _decisions(r0) == _decisions(r1)
    for a, b in zip(_decisions(r0), _decisions(ref)):
        for k in DECISION_KEYS:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
            else:
                assert a[k] == b[k], k
    # one set of files: rank 0 alone logged, checkpointed and wrote results
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert read_jsonl(two / "metrics.jsonl") == r0
    log = (two / "train.log").read_text().splitlines()
    assert sum(" epoch " in line and "| lr " in line for line in log) == 2
    assert sum(line.count("DDP over 2 processes") for line in log) == 1
    assert p2.stdout.count("test: test_sa") == 1  # rank 1 printed nothing
    res_one, res_two = read_json(one / "results.json"), read_json(two / "results.json")
    for k in ("test_sa", "test_pgd10", "best_epoch", "best_val_sa", "best_val_pgd1", "epochs_run"):
        assert res_two[k] == res_one[k], k
    cfg = (two / "config.yaml").read_text()
    assert "amp: false" in cfg and "channels_last: true" in cfg  # resolved for CPU, not left None


def test_killed_ddp_run_resumes_to_the_same_result(setup, runs):
    root, worker, common = setup
    _, _, two, _ = runs
    out = root / "killed"
    args = [*common, "--batch-size", "8", "--out", str(out)]
    p = _run(worker, args, root / "rows_killed", 2, fault="kill_after_checkpoint:main:0", check=False)
    assert p.returncode != 0 and not (out / "results.json").exists()
    assert os.path.exists(out / "checkpoints" / "last.pt")
    _run(worker, ["train", "--resume", str(out)], root / "rows_resumed", 2)
    assert len(read_jsonl(out / "metrics.jsonl")) == len(read_jsonl(two / "metrics.jsonl"))
    assert read_jsonl(out / "metrics.jsonl") == [
        {**r, "seconds": r2["seconds"]} for r, r2 in zip(read_jsonl(two / "metrics.jsonl"),
                                                          read_jsonl(out / "metrics.jsonl"))]
    _assert_same_weights(two / "model.safetensors", out / "model.safetensors", atol=0)  # bit-exact
    r0 = read_jsonl(f"{root / 'rows_resumed'}.rank0.jsonl")
    r1 = read_jsonl(f"{root / 'rows_resumed'}.rank1.jsonl")
    assert _decisions(r0) == _decisions(r1) and [r["epoch"] for r in r0] == [1]


def test_samplers_deal_one_permutation_and_whole_batches():
    """Training: rank r's k-th batch of b holds perm[r::2] within block k, so the union over ranks of step k is
    block k of the 1-process order; items come as (epoch, index) keys. Evaluation: every batch of a 1-process
    evaluation goes to exactly one rank, unchanged and unpadded."""
    from torch.utils.data import DataLoader

    from autolora.data.samplers import EpochSampler, SeededItems, ShardBatches

    n, b = 20, 4
    one = EpochSampler(n, seed=5, rank_=0, world=1)
    one.set_epoch(3)
    ref = [[i for _, i in batch] for batch in DataLoader(list(one), batch_size=2 * b, collate_fn=list)]
    assert sorted(i for blk in ref for i in blk) == list(range(n)) and {e for e, _ in one} == {3}
    shards = []
    for r in range(2):
        s = EpochSampler(n, seed=5, rank_=r, world=2)
        s.set_epoch(3)
        shards.append([[i for _, i in batch] for batch in DataLoader(list(s), batch_size=b, collate_fn=list)])
    for k, block in enumerate(ref):
        assert sorted(block) == sorted(shards[0][k] + shards[1][k])
    odd = EpochSampler(7, seed=0, rank_=1, world=2)
    assert len(odd) == 4 and len(list(odd)) == 4  # padded: every rank makes the same number of steps
    batches = {r: list(ShardBatches(10, 3, r, 2)) for r in range(2)}
    assert batches[0] == [[0, 1, 2], [6, 7, 8]] and batches[1] == [[3, 4, 5], [9]]
    # an item's augmentation depends on (seed, epoch, index) only, and the caller's RNG is left alone
    class Draw(list):  # item i: a draw from torch's RNG, as a random crop is
        def __getitem__(self, i):
            return torch.rand(2)

    items = SeededItems(Draw(range(3)), seed=1)
    state = torch.get_rng_state()
    a, b2 = items[(0, 2)], items[(0, 2)]
    assert torch.equal(a, b2) and not torch.equal(a, items[(1, 2)]) and torch.equal(state, torch.get_rng_state())


def test_sharded_evaluation_equals_one_process(setup, tmp_path):
    """`autolora eval` under torchrun: 2 gloo processes split the test batches (clean, PGD-10 and AutoAttack),
    sum the counts, and get exactly the figures of one process; rank 0 alone writes the eval file and prints."""
    root, _, _ = setup
    run = tmp_path / "run"
    run_cli("train", "--method", "vanilla_rft", "--dataset", "imagefolder", "--data-dir", root / "data", "--arch",
            "tiny", "--input-size", "none", "--epochs", "2", "--lr", "0.05", "--eps", "16/255", "--step-size", "4/255",
            "--train-steps", "1", "--eval-steps", "2", "--eval-attacks", "clean", "--device", "cpu", "--quiet",
            "--out", run)
    args = ["eval", run, "--attacks", "clean,pgd10,aa", "--batch-size", "3", "--device", "cpu"]
    res_one = json.loads(run_cli(*args).stdout)
    assert read_json(res_one["file"]) == res_one
    os.unlink(res_one["file"])
    two = run_cli(*args, nproc=2)
    assert read_json(res_one["file"]) == res_one and two.stdout.count('"run_dir"') == 1
    # twice in one torchrun process (e.g. a script evaluating several runs): the process group is reused
    script = tmp_path / "twice.py"
    # each rank writes its own file (two ranks printing to one pipe interleave): every rank holds the gathered figures
    script.write_text("import os, sys, pathlib\nfrom autolora.workflows.evaluate import evaluate_run\n"
                      "a = evaluate_run(sys.argv[1], attacks=['clean'], device='cpu', write=False)\n"
                      "b = evaluate_run(sys.argv[1], attacks=['clean', 'pgd10'], batch_size=3, device='cpu', write=False)\n"
                      "pathlib.Path(sys.argv[1], 'twice-rank' + os.environ['RANK']).write_text("
                      "f\"{a['test_sa']} {b['test_pgd10']}\")\n")
    run_cli(run, script=script, nproc=2, timeout=120)
    for rank in (0, 1):
        assert (run / f"twice-rank{rank}").read_text() == f"{res_one['test_sa']} {res_one['test_pgd10']}"
    assert res_one["num_test"] == 8 and res_one["test_aa"] <= res_one["test_pgd10"] < res_one["test_sa"]


def test_sync_bn_needs_cuda(tmp_path):
    from autolora.config import TrainConfig
    from autolora.errors import UserError
    from autolora.engine.loop import train

    data = make_imagefolder(tmp_path / "d", classes=2, per_class=4, size=8)
    cfg = TrainConfig(method="vanilla_rft", dataset="imagefolder", data_dir=data, arch="tiny", input_size="none",
                      epochs=1, device="cpu", sync_bn=True)
    with pytest.raises(UserError, match="sync-bn needs CUDA"):
        train(cfg, str(tmp_path / "run"))


def test_training_loader_keeps_its_workers_and_draws_each_epochs_order():
    """The training loader is built once per stage: with --workers 1 the same worker process serves every epoch
    (persistent workers, not respawned per epoch), and epoch e's order is the DistributedSampler permutation of
    seed + e, whatever the worker."""
    from torch.utils.data import Dataset

    from autolora.config import TrainConfig
    from autolora.engine.loop import train_loader

    class Pid(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.tensor([i, os.getpid()])

    cfg = TrainConfig(workers=1, batch_size=3, seed=2)
    loader = train_loader(Pid(), cfg, torch.device("cpu"), 0)
    seen = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batch = torch.cat(list(loader))
        seen.append((batch[:, 0].tolist(), set(batch[:, 1].tolist())))
    assert seen[0][1] == seen[1][1] and seen[0][1] != {os.getpid()}  # one worker, kept, not this process
    base = 2 * 1_000_003
    for epoch, (order, _) in enumerate(seen):
        g = torch.Generator().manual_seed(base + epoch)
        assert order == torch.randperm(6, generator=g).tolist()
    assert seen[0][0] != seen[1][0]
