"""Tiny generated data and a CLI runner shared by the end-to-end tests."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

COLOURS = [(230, 40, 40), (40, 200, 40), (40, 60, 230), (220, 220, 40), (200, 40, 200)]


def make_imagefolder(root, classes=3, per_class=24, size=16, test_per_class=0, seed=0) -> str:
    """DIR/train/<class>/*.png (and DIR/test/... when test_per_class): a coloured square on noise per class,
    easy enough that a tiny model learns it in a couple of epochs."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                a = rng.random((size, size, 3)) * 110
                lo, hi = size // 4, size - size // 4
                a[lo:hi, lo:hi] = np.array(COLOURS[c % len(COLOURS)]) * 0.85 + a[lo:hi, lo:hi] * 0.15
                Image.fromarray(a.astype(np.uint8)).save(os.path.join(d, f"{i:03d}.png"))
    return str(root)


TINY_ARGS = ["--dataset", "imagefolder", "--arch", "tiny", "--input-size", "none", "--batch-size", "16",
             "--eval-attacks", "clean,pgd10", "--train-steps", "2", "--device", "cpu"]


# the fastest CLI run (clean evaluation only, 1-step attacks): for safety and bad-input tests
FAST_ARGS = ["--dataset", "imagefolder", "--arch", "tiny", "--input-size", "none", "--batch-size", "8",
             "--eval-attacks", "clean", "--train-steps", "1", "--eval-steps", "1", "--device", "cpu", "--quiet"]
# end-to-end method runs with a PGD evaluation
E2E_ARGS = ["--dataset", "imagefolder", "--arch", "tiny", "--input-size", "none", "--batch-size", "16",
            "--eval-attacks", "clean,pgd10", "--train-steps", "1", "--eval-steps", "2", "--device", "cpu", "--quiet"]


# the resume tests: 1-step attacks on 8x8 images, deterministic kernels
RESUME_ARGS = ["--dataset", "imagefolder", "--arch", "tiny", "--input-size", "none", "--batch-size", "8",
               "--eval-attacks", "clean,pgd10", "--train-steps", "1", "--eval-steps", "1", "--device", "cpu",
               "--deterministic", "--quiet"]
# the sweep tests: clean evaluation, 1-step attacks, batch 16
COMPARE_ARGS = ["--dataset", "imagefolder", "--arch", "tiny", "--input-size", "none", "--batch-size", "16",
                "--train-steps", "1", "--eval-steps", "1", "--eval-attacks", "clean", "--device", "cpu",
                "--no-progress"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, check=True, env=None, timeout=600, fault=None, nproc=1, script=None, prelude=None,
            preexec_fn=None):
    """Run `python -m autolora ARGS` in a real process (one intra-op thread); returns CompletedProcess (text).

    `fault`: the test-only AUTOLORA_FAULT points (autolora/engine/faults.py); `nproc` > 1: under torchrun with
    that many gloo processes; `script`: a Python file to run instead of `-m autolora`; `prelude`: Python code run
    before the CLI in the same process; `preexec_fn`: run in the child before it starts (e.g. resource limits)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e.pop("AUTOLORA_FAULT", None)  # only the faults this call names
    e.update(env or {})
    if fault:
        e["AUTOLORA_FAULT"] = fault
    if prelude:
        target = ["-c", prelude + "\nimport sys, autolora.cli as c; sys.exit(c.main(sys.argv[1:]))"]
    else:
        target = [str(script)] if script else ["-m", "autolora"]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                     "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd = [*launcher, *target, *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout, preexec_fn=preexec_fn)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def cli(capsys, *argv):
    """Run the CLI in this process: (exit code, captured output); argparse's usage errors (SystemExit) give their
    code too."""
    from autolora.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr()


CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_fake_cifar(root, per_class=40, size=16):
    """CIFAR-10's layout for the benchmarks (`train/<class>/*.png`): every class a colour square on noise."""
    rng = np.random.default_rng(0)
    for k, c in enumerate(CIFAR):
        d = os.path.join(root, "train", c)
        os.makedirs(d)
        colour = np.array([(37 * k) % 256, (91 * k + 40) % 256, (151 * k + 90) % 256])
        for i in range(per_class):
            a = rng.random((size, size, 3)) * 100
            a[4:12, 4:12] = colour * 0.8 + a[4:12, 4:12] * 0.2
            Image.fromarray(a.astype(np.uint8)).save(os.path.join(d, f"{i:04d}.png"))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    with open(path) as f:
        return json.load(f)

def fit(model, x, y, steps, lr=1e-2):
    """`steps` full-batch Adam steps on cross-entropy; the model comes back in eval mode with no .grad."""
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def squares(n, k=4, size=16, seed=0):
    """k classes of coloured squares on a grey noise background: separable, learnt in a few steps."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])[:k]
    y = torch.arange(n) % k
    x = 0.4 + 0.2 * torch.rand(n, 3, size, size, generator=g)
    s = size // 2
    for i in range(n):
        r, c = torch.randint(0, size - s + 1, (2,), generator=g).tolist()
        x[i, :, r:r + s, c:c + s] = colours[y[i]].view(3, 1, 1)
    return x, y
