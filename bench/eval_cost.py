#!/usr/bin/env python
"""What evaluation costs: images/s of PGD-10 and of standard AutoAttack under each threat model (L∞ and L2, on the
same run and the same images), and the speed-up of sharding the test set over 2 processes (torchrun, gloo;
`autolora eval` under torchrun does this).

    .venv/bin/python bench/eval_cost.py RUN_DIR [--pgd-images 400] [--aa-images 60] [--batch-size 30] \
        [--norms linf,l2] [--settings 1x2,1x1,2x1]

RUN_DIR is a finished `autolora train` run (its model and test split are used; each norm at the run's budget for
its own norm, the other norm's default for the run's resolution otherwise: L∞ 8/255, L2 0.5 at 32×32). The
settings (processes × threads: 1x2, 1x1, 2x1 = torchrun) are timed one after another, in the same invocation.
Each time is the evaluation itself (`autolora.eval.evaluate_run`, data and model loading included, the
interpreter's start excluded), the slowest rank under torchrun. The figures go to
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

from benchlib import ROOT, discussion, run_config  # noqa: E402  (bench/ is the script's directory)


def worker(args) -> None:
    """One timed evaluation (run by the driver, possibly under torchrun); prints one JSON line on rank 0."""
    import torch

    torch.set_num_threads(args.threads)
    from autolora.workflows.evaluate import evaluate_run

    out = {}
    for norm in args.norms.split(","):
        for attack, limit in (("pgd10", args.pgd_images), ("aa", args.aa_images)):
            t0 = time.perf_counter()
            res = evaluate_run(args.run_dir, attacks=["clean", attack], norm=norm, limit=limit, device="cpu",
                               write=False, progress=False, batch_size=args.batch_size)
            out.setdefault(norm, {})[attack] = {"seconds": time.perf_counter() - t0, "num": res["num_test"],
                                                "acc": res[f"test_{attack}"], "sa": res["test_sa"], "eps": res["eps"],
                                                "step_size": res["step_size"]}
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
            str(args.pgd_images), "--aa-images", str(args.aa_images), "--batch-size", str(args.batch_size),
            "--norms", args.norms]
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
    ap.add_argument("--norms", default="linf,l2", help="threat models, comma list (default linf,l2)")
    ap.add_argument("--settings", default="1x2,1x1,2x1",
                    help="processes x threads, comma list (default 1x2,1x1,2x1; 2x1 runs under torchrun)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "eval_cost_cpu"))
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    rows = {}
    for setting in args.settings.split(","):
        nproc, threads = (int(v) for v in setting.split("x"))
        name = f"{nproc} process{'es' if nproc > 1 else ''} × {threads} thread{'s' if threads > 1 else ''}"
        print(f"eval_cost: {name} ...", flush=True)
        rows[name] = _launch(args, threads, nproc)
        print(f"eval_cost: {name}: {json.dumps(rows[name])}", flush=True)
    write_results(args, rows)


def write_results(args, rows: dict) -> None:
    """bench/results/eval_cost_<device>.md and .json: a row per setting and norm; the sharding speed-up and whether
    the sharded counts equal the 1-process ones, when both settings ran."""
    from autolora.attacks.norms import budget_label

    arch = run_config(args.run_dir).get("arch", "?")
    md = ["# Evaluation cost (CPU)", "", *discussion(args.out + ".md"),
          f"`{sys.executable.replace(ROOT + '/', '')} bench/eval_cost.py {os.path.relpath(args.run_dir, ROOT)} "
          f"--pgd-images {args.pgd_images} --aa-images {args.aa_images} --batch-size {args.batch_size} --norms "
          f"{args.norms} --settings {args.settings}`, {time.strftime('%Y-%m-%d %H:%M')}; {platform.machine()}, "
          f"{os.cpu_count()} cores, arch `{arch}`, eval batch {args.batch_size} (the unit of sharding: ranks take "
          "whole batches). PGD-10 and AA each on a seeded stratified subset of the run's test split, the same images for both norms. "
          "Seconds include building the test split and loading the model (not the interpreter's start); under "
          "torchrun the slowest rank. Accuracies in %: SA clean, then under the attack.", "",
          "| setting | threat (PGD step) | PGD-10: images | s | images/s | SA | PGD-10 | AA (standard): images | s | "
          "images/s | AA |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, per_norm in rows.items():
        for norm, r in per_norm.items():
            p, a = r["pgd10"], r["aa"]
            md.append(f"| {name} | {budget_label(norm, p['eps'])} ({p['step_size']:.4g}) | {p['num']} | "
                      f"{p['seconds']:.1f} | {p['num'] / p['seconds']:.1f} | {100 * p['sa']:.1f} | {100 * p['acc']:.1f} | "
                      f"{a['num']} | {a['seconds']:.1f} | {a['num'] / a['seconds']:.2f} | {100 * a['acc']:.1f} |")
    out = {"settings": rows}
    one, two = rows.get("1 process × 1 thread"), rows.get("2 processes × 1 thread")
    if one and two:
        same = all(one[n][a]["acc"] == two[n][a]["acc"] and one[n][a]["sa"] == two[n][a]["sa"]
                   for n in one for a in one[n])
        sp = {n: {a: one[n][a]["seconds"] / two[n][a]["seconds"] for a in one[n]} for n in one}
        out.update({"speedup_vs_1x1": sp, "equal": same})
        md += ["", "Sharded over 2 processes: " + "; ".join(
            f"{budget_label(n, one[n]['pgd10']['eps'])}: PGD-10 {sp[n]['pgd10']:.2f}×, AA {sp[n]['aa']:.2f}×"
            for n in sp) + " the speed of one 1-thread process. The sharded counts "
            + ("**equal** the 1-process counts." if same else "**differ** from the 1-process counts (a bug).")]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    print("\n".join(md))


if __name__ == "__main__":
    main()
