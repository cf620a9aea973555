#!/usr/bin/env python
"""What evaluation costs: images/s of PGD-10 and of standard AutoAttack for one process, and the speed-up of
sharding the test set over 2 processes (torchrun, gloo; `autolora eval` under torchrun does this).

    .venv/bin/python bench/eval_cost.py RUN_DIR [--pgd-images 400] [--aa-images 60] [--batch-size 30]

RUN_DIR is a finished `autolora train` run (its model and test split are used). Three settings are timed one
after another, in the same invocation: 1 process × 2 threads, 1 process × 1 thread, 2 processes × 1 thread
(torchrun). Each time is the evaluation itself (`autolora.eval.evaluate_run`, data and model loading included,
the interpreter's start excluded), the slowest rank under torchrun. The figures go to
bench/results/eval_cost_<device>.md and .json; the counts of the sharded run must equal the 1-process ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(args) -> None:
    """One timed evaluation (run by the driver, possibly under torchrun); prints one JSON line on rank 0."""
    import torch

    torch.set_num_threads(args.threads)
    from autolora.workflows.evaluate import evaluate_run

    out = {}
    for attack, limit in (("pgd10", args.pgd_images), ("aa", args.aa_images)):
        t0 = time.perf_counter()
        res = evaluate_run(args.run_dir, attacks=["clean", attack], limit=limit, device="cpu", write=False,
                           progress=False, batch_size=args.batch_size)
        out[attack] = {"seconds": time.perf_counter() - t0, "num": res["num_test"], "acc": res[f"test_{attack}"],
                       "sa": res["test_sa"]}
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(out), flush=True)


def _launch(args, threads: int, nproc: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr",
                "127.0.0.1", "--master_port", str(port)]
    cmd += [os.path.abspath(__file__), args.run_dir, "--worker", "--threads", str(threads), "--pgd-images",
            str(args.pgd_images), "--aa-images", str(args.aa_images), "--batch-size", str(args.batch_size)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"eval_cost: {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--pgd-images", type=int, default=400)
    ap.add_argument("--aa-images", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=30,
                    help="evaluation batch (default 30): the unit of sharding, so each rank gets whole batches")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "eval_cost_cpu"))
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    settings = [("1 process × 2 threads", 2, 1), ("1 process × 1 thread", 1, 1), ("2 processes × 1 thread", 1, 2)]
    rows = {}
    for name, threads, nproc in settings:
        print(f"eval_cost: {name} ...", flush=True)
        rows[name] = _launch(args, threads, nproc)
        print(f"eval_cost: {name}: {json.dumps(rows[name])}", flush=True)
    one, two = rows["1 process × 1 thread"], rows["2 processes × 1 thread"]
    same = all(one[a]["acc"] == two[a]["acc"] and one[a]["sa"] == two[a]["sa"] for a in one)
    cfg = open(os.path.join(args.run_dir, "config.yaml")).read()
    arch = next((line.split(":", 1)[1].strip() for line in cfg.splitlines() if line.startswith("arch:")), "?")
    md = ["# Evaluation cost (CPU)", "",
          f"`{sys.executable.replace(ROOT + '/', '')} bench/eval_cost.py {os.path.relpath(args.run_dir, ROOT)} "
          f"--pgd-images {args.pgd_images} --aa-images {args.aa_images} --batch-size {args.batch_size}`, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {platform.machine()}, {os.cpu_count()} cores, arch `{arch}`, eval batch "
          f"{args.batch_size} (the unit of sharding: ranks take whole batches). Seconds include building "
          "the test split and loading the model (not the interpreter's start); under torchrun the slowest rank.", "",
          "| setting | PGD-10: images | s | images/s | AA (standard): images | s | images/s |",
          "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['pgd10']['num']} | {r['pgd10']['seconds']:.1f} | "
                  f"{r['pgd10']['num'] / r['pgd10']['seconds']:.1f} | {r['aa']['num']} | {r['aa']['seconds']:.1f} | "
                  f"{r['aa']['num'] / r['aa']['seconds']:.2f} |")
    sp = {a: one[a]["seconds"] / two[a]["seconds"] for a in one}
    sp2 = {a: rows["1 process × 2 threads"][a]["seconds"] / two[a]["seconds"] for a in one}
    md += ["", f"Sharded over 2 processes: PGD-10 {sp['pgd10']:.2f}× and AA {sp['aa']:.2f}× the speed of one 1-thread "
           f"process ({sp2['pgd10']:.2f}× and {sp2['aa']:.2f}× one 2-thread process). The sharded counts "
           + ("**equal** the 1-process counts" if same else "**differ** from the 1-process counts (a bug)")
           + f" (SA {one['pgd10']['sa']:.4f}, PGD-10 {one['pgd10']['acc']:.4f}, AA {one['aa']['acc']:.4f})."
           " On this 2-core machine two processes share the cores that one 2-thread process uses, so the sharded "
           "speed-up here is about parallel efficiency; on N GPUs each rank has its own device.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": rows, "speedup_vs_1x1": sp, "speedup_vs_1x2": sp2, "equal": same}, f, indent=1)
    print("\n".join(md))


if __name__ == "__main__":
    main()
