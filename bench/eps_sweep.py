#!/usr/bin/env python
"""Robustness against the budget, under both threat models, of one finished run: PGD-10 (and optionally standard
AutoAttack on fewer images) at several eps, L∞ and L2, on the same test images (`autolora eval --eps E1,E2,...`).

    OMP_NUM_THREADS=2 .venv/bin/python bench/eps_sweep.py RUN_DIR [--images 400] [--aa-images 0] \\
        [--linf 1/255,2/255,4/255,8/255,16/255] [--l2 0.125,0.25,0.5,1,2]

The step of each budget is eps/4 (2.5·eps/10, Madry et al.'s rule for 10 steps). Writes bench/results/eps_sweep.md,
.json and .png (one panel per norm).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from benchlib import ROOT, discussion, run_config  # noqa: E402  (bench/ is the script's directory)


def sweep(run_dir: str, norm: str, eps: list, attack: str, images: int, batch_size: int) -> dict:
    from autolora.workflows.evaluate import evaluate_run

    t0 = time.perf_counter()
    res = evaluate_run(run_dir, attacks=["clean", attack], norm=norm, eps=eps, limit=images, device="cpu",
                       write=False, progress=True, batch_size=batch_size)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autolora.attacks.norms import NORM_LABEL
    from autolora.attacks.registry import label

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.9), squeeze=False)
    for ax, (norm, runs) in zip(axes[0], results.items()):
        sa = runs[0]
        for i, res in enumerate(runs):
            keys = [k for k in res["sweep"][0] if k.startswith("test_")]
            xs = [r["eps"] * (255 if norm == "linf" else 1) for r in res["sweep"]]
            for k in keys:
                ax.plot(xs, [100 * r[k] for r in res["sweep"]], "o-", color=f"C{i}",
                        label=f"{label(k)} ({res['images'][k]} images)")
        ax.axhline(100 * sa["test_sa"], color="k", ls="--", lw=1, label=f"clean ({sa['images']['test_sa']} images)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(f"{NORM_LABEL[norm]} eps" + (" (×1/255)" if norm == "linf" else "") + ", step eps/4")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{NORM_LABEL[norm]} threat model", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from autolora.cli.options import pixel_arg

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--images", type=int, default=400, help="test images of PGD-10 (a seeded stratified subset)")
    ap.add_argument("--aa-images", type=int, default=0, help="test images of AutoAttack (0: none)")
    ap.add_argument("--linf", default="1/255,2/255,4/255,8/255,16/255")
    ap.add_argument("--l2", default="0.125,0.25,0.5,1,2")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "eps_sweep"))
    args = ap.parse_args(argv)
    budgets = {"linf": [pixel_arg(v) for v in args.linf.split(",")], "l2": [pixel_arg(v) for v in args.l2.split(",")]}
    results = {}
    for norm, eps in budgets.items():
        results[norm] = [sweep(args.run_dir, norm, eps, "pgd10", args.images, args.batch_size)]
        if args.aa_images:
            results[norm].append(sweep(args.run_dir, norm, eps, "aa", args.aa_images, args.batch_size))
    write(args, results)


def write(args, results: dict) -> None:
    from autolora.attacks.norms import NORM_LABEL, budget_label, eps_text
    from autolora.attacks.registry import label

    cfg = run_config(args.run_dir)
    get = lambda key: cfg.get(key, "?")  # noqa: E731
    run = os.path.relpath(args.run_dir, ROOT)
    md = ["# Robustness against the budget, L∞ and L2 (CPU)", "", *discussion(args.out + ".md"),
          f"`{sys.executable.replace(ROOT + '/', '')} bench/eps_sweep.py {run} --images {args.images} --aa-images "
          f"{args.aa_images} --linf {args.linf} --l2 {args.l2}`, {time.strftime('%Y-%m-%d %H:%M')}; "
          f"{platform.machine()}, {os.cpu_count()} cores. The run: `{get('method')}`, arch `{get('arch')}`, trained "
          f"under {budget_label(get('norm'), float(get('eps')))} (step {float(get('step_size')):.4g}). Every attack "
          "uses the step eps/4 and a random start; each figure says its images. Plot: `eps_sweep.png`.", ""]
    for norm, runs in results.items():
        keys = [(res, k) for res in runs for k in res["sweep"][0] if k.startswith("test_")]
        md += [f"| {NORM_LABEL[norm]} eps | " + " | ".join(
                   f"{label(k)} (%, {res['images'][k]} images)" for res, k in keys) + " |",
               "|---|" + "---|" * len(keys)]
        for i, row in enumerate(runs[0]["sweep"]):
            md.append(f"| {eps_text(norm, row['eps'])} | "
                      + " | ".join(f"{100 * res['sweep'][i][k]:.2f}" for res, k in keys) + " |")
        md += ["", f"Clean accuracy {100 * runs[0]['test_sa']:.2f} % on {runs[0]['images']['test_sa']} images; "
               + ", ".join(f"{label(k)} took {res['seconds']:.0f} s" for res, k in keys) + ".", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out + ".png", f"{run}: accuracy against the budget")
    print("\n".join(md))


if __name__ == "__main__":
    main()
