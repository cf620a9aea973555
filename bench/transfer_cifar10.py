#!/usr/bin/env python
"""Transfer benchmark on CIFAR-10 split in two: does AutoLoRa beat vanilla RFT and TWINS (issues 6 and 11)?

    OMP_NUM_THREADS=2 .venv/bin/python bench/transfer_cifar10.py                  # `make bench-transfer` (protocol v2)
    OMP_NUM_THREADS=2 .venv/bin/python bench/transfer_cifar10.py --protocol v1    # the earlier, smaller protocol
    .venv/bin/python bench/transfer_cifar10.py --quick                             # smoke version, minutes

Rerunning the same command continues: every stage skips what is on disk (finished runs are skipped,
interrupted ones resumed from their last epoch checkpoint, AA results kept per run), so the benchmark can
be spread over several sessions. Run directories are git-ignored, so each finished run's record (config.yaml,
results.json, metrics.jsonl, train.log, split.json, aa_subset.json; not its weights) is also copied into
<out-md>_runs/ (committed, e.g. bench/results/transfer_cifar10_runs/), together with the stage timings; a fresh
clone restores those records first and trains only what is missing. In the main stage each run's AA subset
evaluation follows the run at once, so an archived run never needs its weights again.

Protocols (`PROTOCOLS` below; every size can be overridden by its flag):
  v2  the default, sized to decide the paper's claims: a robust source backbone pretrained on 24,000
      source images; per target class 200 training images (drawn per seed), a validation split of 50 (fixed
      across seeds: --split-seed 0) and a test set of 400 (fixed); 16 fine-tuning epochs (AutoLoRa's LR
      checked after epochs 4, 8, 12); 5 seeds paired by seed; AA on one fixed 100-image subset shared by every
      method and seed; the initial-LR sweep on 2 seeds; per-example gradient similarity.
  v1  the earlier, smaller protocol (weights pretrained on 5,000 images, 20 validation images per class drawn per
      seed, 8 epochs, 3 seeds, AA on 60 images per seed).

Stages
  0. data     RUNS/data/target/{train,test}/<class>/ (symlinks into --data-dir): for each target class (dog,
              frog, horse, ship, truck) a fixed held-out test subset (--test-per-class, seeded once) and the
              remaining images as the train pool, from which every run draws its seeded train subset
              (--per-class) and its validation split (--val-per-class; fixed across seeds under v2).
  A. pretrain robust pretraining of `small` (CIFAR ResNet, 0.31 M parameters) from scratch with FGSM-RS AT
              (Wong et al. 2020) on the 5 source classes (airplane, automobile, bird, cat, deer), skipped when
              the protocol's weights file exists (committed under bench/weights/; `--remake-weights` redoes it).
  B. main     `autolora compare`: vanilla_rft, twins, autolora, autolora:roli × seeds, gradient similarity logged
              every epoch; test SA and PGD-10 on the whole held-out test set.
  C. aa       AutoAttack (standard, pyautoattack) on a stratified --aa-limit-image subset of the test set per
              main run, written to RUN/aa_subset.json (with clean and PGD-10 on the same subset): right after
              each main run finishes, and after stage B for any finished run still without it.
  D. lr       initial-LR sensitivity (the paper's Table 6): vanilla_rft and AutoLoRa *without* the automated LR
              (`--lr-schedule step`) at --lrs, --lr-seeds seeds. vanilla_rft at LR 0.01 is the main run (linked).
  E. report   the protocol's results file (--out-md) and its JSON twin: tables, paired and Welch t-tests, the
              seeds a paired test would need, GS, LR table, verdicts on the paper's claims (holds / not shown /
              fails), then the hand-written <out-md>_discussion.md (the reading of the figures) if present.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (ROOT, Timings, archive_run, archive_timings, atomic_write_json, discussion, fmt_p, logger, ms,  # noqa: E402
                      num, paired, read_json, read_rows, restore_runs, verdict, write_text)

SOURCE = ["airplane", "automobile", "bird", "cat", "deer"]
TARGET = ["dog", "frog", "horse", "ship", "truck"]
SPECS = ["vanilla_rft", "twins", "autolora", "autolora:roli"]
LABEL = {"vanilla_rft": "vanilla RFT", "twins": "TWINS", "autolora": "AutoLoRa", "autolora:roli": "RoLI∘AutoLoRa"}
RESULTS = os.path.join(ROOT, "bench", "results")

PROTOCOLS = {
    "v2": dict(name="transfer_v2", weights="bench/weights/small_fgsmrs_c10src_v2.safetensors",
               pretrain_epochs=5, pretrain_per_class=4700, source_val_per_class=100, source_test_per_class=200,
               pretrain_lr=0.1, channels_last=True,
               per_class=200, test_per_class=400, val_per_class=50, fixed_splits=True, epochs=16, train_steps=3,
               batch_size=32, probe_epochs=1, seeds="0,1,2,3,4", lr_seeds="0,1", lrs="0.001,0.01,0.03",
               aa_limit=100, gradsim_samples=16, gradsim_mode="per_example",
               out_md="bench/results/transfer_cifar10.md"),
    "v1": dict(name="transfer_v1_fixed", weights="bench/weights/small_fgsmrs_c10src.safetensors",
               pretrain_epochs=4, pretrain_per_class=1000, source_val_per_class=0, source_test_per_class=100,
               pretrain_lr=0.1, channels_last=False,
               per_class=200, test_per_class=400, val_per_class=20, fixed_splits=False, epochs=8, train_steps=3,
               batch_size=32, probe_epochs=1, seeds="0,1,2", lr_seeds="0", lrs="0.001,0.01,0.03", aa_limit=60,
               gradsim_samples=16, gradsim_mode="batch", out_md="bench/results/transfer_cifar10_v1.md"),
}
QUICK = dict(pretrain_epochs=1, pretrain_per_class=60, source_val_per_class=4, source_test_per_class=10, per_class=12,
             test_per_class=12,
             val_per_class=4, epochs=2, train_steps=1, batch_size=16, seeds="0,1", lr_seeds="0", lrs="0.001,0.03",
             aa_limit=10)
SIZES = [k for k in PROTOCOLS["v2"] if k not in ("name", "weights", "out_md", "fixed_splits", "gradsim_mode",
                                                  "channels_last")]


log = logger("bench")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="v2", help="sizes and splits (default v2)")
    ap.add_argument("--quick", action="store_true", help="smoke version (tiny sizes, own run dir and weights)")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10"),
                    help="CIFAR-10 as an image folder: DIR/train/<class>/*.jpg (default ../shared/data/cifar10)")
    ap.add_argument("--runs", default=None, help="where the run directories go (default bench/runs/<name>)")
    ap.add_argument("--out-md", default=None, help="results file (default: the protocol's; --quick: in the runs dir)")
    ap.add_argument("--weights", default=None, help="pretrained source weights (default: the protocol's)")
    ap.add_argument("--archive", default=None, help="where finished runs' records are kept for a fresh clone to "
                                                    "restore (default: <out-md without .md>_runs)")
    ap.add_argument("--remake-weights", action="store_true", help="pretrain again even if the weights exist")
    for k in SIZES:
        v = PROTOCOLS["v2"][k]
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None,
                        help=f"v2 {v}, v1 {PROTOCOLS['v1'][k]}, quick {QUICK.get(k, 'as v2')}")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="AA (the last stage) evaluates runs only while the benchmark's total time is below this "
                         "(default: no limit; what is not evaluated is reported as such)")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: aa, lr")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the results file from what is on disk")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 2)")
    ap.add_argument("--device", default="cpu", help="where every stage runs (default cpu, where the committed figures "
                                                    "were measured; e.g. cuda on a lent GPU, fp32 there too)")
    args = ap.parse_args(argv)
    preset = dict(PROTOCOLS[args.protocol])
    if args.quick:
        preset.update(QUICK, name=f"transfer_quick_{args.protocol}")
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.runs = args.runs or os.path.join(ROOT, "bench", "runs", args.name)
    args.out_md = args.out_md or (os.path.join(args.runs, "transfer_cifar10.md") if args.quick
                                  else os.path.join(ROOT, preset["out_md"]))
    args.archive = args.archive or os.path.splitext(args.out_md)[0] + "_runs"
    args.weights = args.weights or (os.path.join(args.runs, "pretrain_weights.safetensors") if args.quick
                                    else os.path.join(ROOT, preset["weights"]))
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.lr_seed_list = [int(s) for s in args.lr_seeds.split(",") if s.strip()]
    args.lr_list = [float(s) for s in args.lrs.split(",") if s.strip()]
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


# ------------------------------------------------------------------------------------------------ stage 0
def make_target_data(args) -> str:
    """RUNS/data/target/{train,test}/<class>/ as symlinks; a fixed seeded test subset per class."""
    import numpy as np

    root = os.path.join(args.runs, "data", "target")
    manifest = os.path.join(root, "manifest.json")
    want = {"source": os.path.abspath(args.data_dir), "classes": TARGET, "test_per_class": args.test_per_class,
            "seed": 0}
    if os.path.exists(manifest):
        have = json.load(open(manifest))
        if {k: have.get(k) for k in want} == want:
            return root
        raise SystemExit(f"bench: {root} was made with other settings ({have}); remove it or use another --runs")
    if os.path.exists(root):
        shutil.rmtree(root)
    counts = {}
    for c in TARGET:
        src = os.path.join(args.data_dir, "train", c)
        if not os.path.isdir(src):
            raise SystemExit(f"bench: no {src}: --data-dir must hold CIFAR-10 as train/<class>/*.jpg")
        files = sorted(f for f in os.listdir(src) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        perm = np.random.default_rng([0, TARGET.index(c)]).permutation(len(files))
        test = set(perm[: args.test_per_class].tolist())
        for split in ("train", "test"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
        for i, f in enumerate(files):
            os.symlink(os.path.abspath(os.path.join(src, f)),
                       os.path.join(root, "test" if i in test else "train", c, f))
        counts[c] = {"train_pool": len(files) - len(test), "test": len(test)}
    atomic_write_json(manifest, {**want, "counts": counts})
    return root


# ------------------------------------------------------------------------------------------------ stage A
def pretrain_settings(args) -> dict:
    """`autolora.workflows.pretrain.pretrain_config` arguments: per source class --pretrain-per-class training images, a
    --source-val-per-class validation split (logged) and a --source-test-per-class held-out test split."""
    n = len(SOURCE)
    pool = args.pretrain_per_class + args.source_val_per_class + args.source_test_per_class
    rest = pool - args.source_test_per_class
    return dict(classes=SOURCE, attack="fgsm_rs", epochs=args.pretrain_epochs, lr=args.pretrain_lr, batch_size=128,
                input_size="none", limit_train=args.pretrain_per_class * n,
                val_fraction=max(args.source_val_per_class, 1) / rest, test_fraction=args.source_test_per_class / pool,
                limit_eval=args.source_test_per_class * n, eval_attacks=("clean", "pgd10"), seed=0, device=args.device)


def remake_command(args) -> str:
    s = pretrain_settings(args)
    return ("OMP_NUM_THREADS=2 .venv/bin/autolora pretrain --arch small --dataset imagefolder "
            f"--data-dir ../shared/data/cifar10 --classes {','.join(SOURCE)} --attack fgsm_rs "
            f"--epochs {s['epochs']} --lr {s['lr']} --batch-size 128 --input-size none "
            f"--limit-train {s['limit_train']} --val-fraction {s['val_fraction']:.6g} "
            f"--test-fraction {s['test_fraction']:.6g} --limit-eval {s['limit_eval']} "
            f"--eval-attacks clean,pgd10 --seed 0 --device {s['device']} --out bench/runs/pretrain_{args.name} && "
            f"cp bench/runs/pretrain_{args.name}/model.safetensors {os.path.relpath(args.weights, ROOT)}")


def pretrain_weights(args) -> dict:
    """The source weights: skipped when the file exists; else a pre-training run in RUNS/pretrain (resumed when
    an earlier invocation was interrupted), its model copied to the weights path with a JSON of what it is."""
    from autolora.workflows.pretrain import pretrain, pretrain_summary

    meta_path = os.path.splitext(args.weights)[0] + ".json"
    if os.path.exists(args.weights) and not args.remake_weights:
        log(f"pretrained weights exist: {os.path.relpath(args.weights, ROOT)} (skipping pretraining)")
        return read_json(meta_path) or {}
    out = os.path.join(args.runs, "pretrain")
    resume = os.path.exists(os.path.join(out, "config.yaml")) and not os.path.exists(os.path.join(out, "results.json"))
    if not os.path.exists(os.path.join(out, "results.json")) or args.remake_weights:
        log(f"{'resuming' if resume else 'starting'} the pretraining of small on {', '.join(SOURCE)}: FGSM-RS, "
            f"{args.pretrain_epochs} epochs, {args.pretrain_per_class} images per class")
        pretrain("small", "imagefolder", args.data_dir, out=out, overwrite=not resume, resume=resume, quiet=False,
                 progress=False, **pretrain_settings(args))
    meta = pretrain_summary(out)
    os.makedirs(os.path.dirname(args.weights), exist_ok=True)
    shutil.copyfile(meta["weights"], args.weights)
    meta.update({"weights": os.path.relpath(args.weights, ROOT),
                 "source_data": "CIFAR-10 train/ (5 source classes), as an image folder",
                 "remake_command": remake_command(args)})
    atomic_write_json(meta_path, meta)
    return meta


# ------------------------------------------------------------------------------------------------ stage B/D
def base_config(args, target_dir):
    from autolora.config import TrainConfig

    pool = json.load(open(os.path.join(target_dir, "manifest.json")))["counts"][TARGET[0]]["train_pool"]
    return TrainConfig(
        dataset="imagefolder", data_dir=os.path.abspath(target_dir), arch="small", input_size="none",
        weights=os.path.abspath(args.weights), epochs=args.epochs, batch_size=args.batch_size,
        train_steps=args.train_steps, eval_attacks=["clean", "pgd"], limit_train=args.per_class * len(TARGET),
        val_fraction=(args.val_per_class + 0.25) / pool, split_seed=0 if args.fixed_splits else None,
        log_gradsim=True, gradsim_samples=args.gradsim_samples,
        gradsim_mode=args.gradsim_mode, device=args.device, progress=False, amp=False, channels_last=args.channels_last)


def run_aa(args, run_dirs, timings, on_done=None, nested: bool = False) -> None:
    """AA on the subset, run by run (seed-major), while the benchmark's total time is within --budget-minutes;
    its time goes to stage 'aa' (`nested`: called from inside another stage, which is not charged for it)."""
    from autolora.workflows.evaluate import evaluate_run

    for d in run_dirs:
        out = os.path.join(d, "aa_subset.json")
        if os.path.exists(out) or not os.path.exists(os.path.join(d, "results.json")):
            continue
        if not os.path.exists(os.path.join(d, "model.safetensors")):
            log(f"AA: {os.path.basename(d)} was restored from {os.path.relpath(args.archive, ROOT)} without its "
                "weights and has no AA result: remove its directory there and here to retrain it")
            continue
        if args.budget_minutes is not None and timings.spent() > 60 * args.budget_minutes:
            log(f"AA: time budget of {args.budget_minutes:g} min spent ({timings.spent() / 60:.1f} min); the "
                "remaining runs are not AA-evaluated (rerun without --budget-minutes to add them)")
            break
        t0 = time.perf_counter()
        res = evaluate_run(d, attacks=["clean", "pgd10", "aa"], limit=args.aa_limit, device=args.device, write=False,
                           progress=False)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out, res)
        timings.add("aa", time.perf_counter() - t0, nested=nested)
        timings.made()
        log(f"AA subset {os.path.basename(d)}: SA {res['test_sa']:.4f} PGD-10 {res['test_pgd10']:.4f} "
            f"AA {res['test_aa']:.4f} on {res['num_test']} images ({res['seconds']:.0f}s)")
        if on_done:
            on_done(d)


def link_shared_lr_runs(args, main_root, lr_root):
    """vanilla_rft at LR 0.01 with the step schedule is the main run but for logging GS: link it instead of
    retraining (GS is logged under a forked RNG, so it does not change the run)."""
    from autolora.workflows.compare import run_name

    os.makedirs(lr_root, exist_ok=True)
    for s in args.lr_seed_list:
        if s not in args.seed_list or 0.01 not in args.lr_list:
            continue
        main = os.path.join(main_root, run_name("vanilla_rft", "random", s))
        link = os.path.join(lr_root, run_name("vanilla_rft", "random", s, 0.01))
        if os.path.exists(os.path.join(main, "results.json")) and not os.path.lexists(link):
            os.symlink(os.path.relpath(main, lr_root), link)


# ------------------------------------------------------------------------------------------------ stage E
def collect(args, main_root):
    from autolora.workflows.compare import parse_spec, run_name

    data = {}
    for spec in SPECS:
        m, init = parse_spec(spec)
        for s in args.seed_list:
            d = os.path.join(main_root, run_name(m, init, s))
            res = read_json(os.path.join(d, "results.json"))
            aa = read_json(os.path.join(d, "aa_subset.json"))
            rows = [r for r in read_rows(os.path.join(d, "metrics.jsonl")) if r.get("stage") == "main"]
            gs = [r.get("grad_sim") for r in rows if r.get("grad_sim") is not None]
            events = [f"{r['epoch']}: {r['lr_event']}" for r in rows if r.get("lr_event")]
            data[(spec, s)] = {"dir": d, "res": res, "aa": aa, "gs": gs, "rows": rows, "events": events,
                               "gs_mean": sum(gs) / len(gs) if gs else None}
    return data


def lr_runs(args, lr_root):
    from autolora.workflows.compare import run_name

    out = {}
    for m in ("vanilla_rft", "autolora"):
        for lr in args.lr_list:
            for s in args.lr_seed_list:
                d = os.path.join(lr_root, run_name(m, "random", s, lr))
                out[(m, lr, s)] = {"res": read_json(os.path.join(d, "results.json")),
                                   "failed": os.path.exists(os.path.join(d, "FAILED.json"))}
    return out


def final_eval_seconds(train_log: str) -> float | None:
    """Seconds from the trainer's "evaluating the best model" line to its "test:" line in a run's train.log."""
    if not os.path.exists(train_log):
        return None
    stamps = {}
    with open(train_log) as f:
        for line in f:
            m = re.match(r"\[(\d\d):(\d\d):(\d\d)\] (evaluating the best model|test:)", line)
            if m:
                stamps[m.group(4)] = 3600 * int(m.group(1)) + 60 * int(m.group(2)) + int(m.group(3))
    if len(stamps) < 2:
        return None
    return (stamps["test:"] - stamps["evaluating the best model"]) % 86400  # across midnight too


def sizing_lines(args, D, meta, timings):
    """What each stage costs, measured on the runs themselves."""
    ep, final, aa = {}, [], []
    for (spec, _), v in D.items():
        secs = [r["seconds"] for r in v["rows"] if r.get("seconds")]
        ep.setdefault(spec, []).extend(secs)
        t = (v["res"] or {}).get("eval_seconds")  # written by the trainer since it was added; older runs: the log
        t = t if t is not None else final_eval_seconds(os.path.join(v["dir"], "train.log"))
        if t is not None:
            final.append(t)
        if v["aa"] and v["aa"].get("seconds"):
            aa.append(v["aa"]["seconds"])
    st = timings.data["stages"]
    n_train = args.per_class * len(TARGET)
    lines = ["## Measured cost", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}"
             + (f", device {args.device}" if args.device != "cpu" else "") + ", one run at a time. "
             "Wall time per stage, summed over invocations: "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in st.items()) + f"; total {sum(st.values()) / 60:.1f} min.",
             "",
             "- pretraining the source backbone: "
             + (f"{meta['seconds'] / 60:.1f} min ({meta.get('epochs')} epochs on {meta.get('num_train')} images, "
                "when the committed weights were made)" if meta.get("seconds") else "n/a") + ";",
             f"- one fine-tuning epoch on {n_train} images with PGD-{args.train_steps}, including validation "
             f"PGD-10 on {args.val_per_class * len(TARGET)} images and the GS probe (median): "
             + (", ".join(f"{LABEL[s]} {statistics.median(x):.1f} s" for s, x in ep.items() if x) or "n/a") + ";",
             f"- the final test evaluation (SA and PGD-10 on {args.test_per_class * len(TARGET)} images) per run "
             "(median; results.json's `eval_seconds`, or the run's train.log for runs older than that field): "
             + (f"{statistics.median(final):.0f} s" if final else "n/a")
             + " (not part of results.json's `seconds`, which stops before it);",
             f"- standard AutoAttack on the {args.aa_limit}-image subset: "
             + (f"{statistics.mean(aa):.0f} s per run on average ({min(aa):.0f}–{max(aa):.0f} s)" if aa else "n/a")
             + ".", ""]
    return lines


def write_results(args, main_root, lr_root, meta, timings, command):
    D = collect(args, main_root)
    L = lr_runs(args, lr_root)
    seeds = args.seed_list
    get = lambda spec, key: [(D[(spec, s)]["res"] or {}).get(key) for s in seeds]  # noqa: E731
    get_aa = lambda spec, key: [(D[(spec, s)]["aa"] or {}).get(key) for s in seeds]  # noqa: E731
    man = json.load(open(os.path.join(args.runs, "data", "target", "manifest.json")))
    n_done = sum(1 for v in D.values() if v["res"])
    n_aa = sum(1 for v in D.values() if v["aa"])
    n_test = args.test_per_class * len(TARGET)
    commits = timings.commits()

    md = [f"# Transfer benchmark: CIFAR-10 source → target classes, protocol {args.protocol}"
          + (" (QUICK smoke run)" if args.quick else ""), ""]
    md += ["Command (from the repository root; rerunning it continues where it stopped):", "", "```",
           command, "```", "", f"Written {time.strftime('%Y-%m-%d %H:%M')}; the runs were made by commit"
           f"{'s' if len(commits) > 1 else ''} {', '.join(commits) or 'n/a'}. Status: {n_done}/{len(D)} main runs "
           f"finished, AA subset evaluated for {n_aa}/{len(D)}; LR sweep "
           f"{sum(1 for v in L.values() if v['res'])}/{len(L)} runs.", ""]
    src_test = ", ".join(f"{k} {100 * v:.1f}%" for k, v in (meta.get("test") or {}).items() if v is not None) or "n/a"
    pool = man["counts"][TARGET[0]]["train_pool"]
    checks = ", ".join(str(e) for e in range(4, args.epochs - 1, 4)) or "none"
    setup = [
        ("source data", f"CIFAR-10 train images of {', '.join(SOURCE)}"),
        ("source backbone", f"`small` (0.31 M parameters), FGSM-RS AT ε 8/255 (step 10/255), {meta.get('epochs')} "
                            f"epochs on {meta.get('num_train')} images, one-cycle LR peak {meta.get('lr')}, batch "
                            f"{meta.get('batch_size')}; source test ({meta.get('num_test')} images): {src_test}"),
        ("weights", f"`{os.path.relpath(args.weights, ROOT)}`; remake: "
                    f"`{meta.get('remake_command', remake_command(args))}`"),
        ("target classes", ", ".join(TARGET)),
        ("per target class", f"train {args.per_class} (drawn per seed from {pool}), validation {args.val_per_class} "
                             f"({'fixed across seeds, --split-seed 0' if args.fixed_splits else 'drawn per seed'}), "
                             f"test {args.test_per_class} (fixed)"),
        ("fine-tuning", f"{args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, training PGD-"
                        f"{args.train_steps} (ε 8/255, step 2/255), fp32, channels_last "
                        f"{'on' if args.channels_last else 'off'}"),
        ("vanilla RFT, TWINS", f"Table 5: LR 0.01, WD 1e-4, ÷10 at epochs {args.epochs // 2} and "
                               f"{5 * args.epochs // 6}; TWINS γ 1"),
        ("AutoLoRa", f"η0 0.01, automated LR (authors' rules; checks after epochs {checks}), r 8, α 1, λ2max 6, "
                     "A ~ N(0, 1)"),
        ("RoLI∘AutoLoRa", f"{args.probe_epochs} epoch(s) of adversarial linear probing, then AutoLoRa"),
        ("selection", "best epoch by validation PGD-10"),
        ("evaluation", f"SA and PGD-10 (ε 8/255, step 2/255, random start) on {n_test} test images; standard "
                       f"AutoAttack (pyautoattack) on a {args.aa_limit}-image stratified subset "
                       + ("fixed for every method and seed" if args.fixed_splits else "per seed")),
        ("gradient similarity", f"{args.gradsim_mode.replace('_', '-')} form, after every epoch, on "
                                f"{args.gradsim_samples} fixed training images"),
    ]
    md += ["## Setup", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in setup], ""]
    md += sizing_lines(args, D, meta, timings)

    # main table
    md += ["## Results (test accuracy %, mean ± std over seeds " + ",".join(map(str, seeds)) + ")", "",
           f"| method | n | SA | PGD-10 ({n_test}) | SA (AA subset) | PGD-10 (AA subset) | AA ({args.aa_limit}-image "
           "subset) | GS (mean over epochs) |", "|---|---|---|---|---|---|---|---|"]
    for spec in SPECS:
        n = sum(1 for s in seeds if D[(spec, s)]["res"])
        md.append(f"| {LABEL[spec]} | {n} | {ms(get(spec, 'test_sa'))} | {ms(get(spec, 'test_pgd10'))} | "
                  f"{ms(get_aa(spec, 'test_sa'))} | {ms(get_aa(spec, 'test_pgd10'))} | {ms(get_aa(spec, 'test_aa'))} | "
                  f"{ms([D[(spec, s)]['gs_mean'] for s in seeds], 1, 3)} |")
    md += ["", "Per run (SA / PGD-10 on the full test set; AA on the subset; best epoch; the automated LR's "
           "decisions):", "", "| run | SA | PGD-10 | AA (subset) | best epoch | epochs run | LR events | training s |",
           "|---|---|---|---|---|---|---|---|"]
    f = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
    for spec in SPECS:
        for s in seeds:
            v = D[(spec, s)]
            r, a = v["res"] or {}, v["aa"] or {}
            ev = "; ".join(e.split(";")[0].replace(" (condition", " (cond.") for e in v["events"]) or "–"
            md.append(f"| {os.path.basename(v['dir'])} | {f(r.get('test_sa'))} | {f(r.get('test_pgd10'))} | "
                      f"{f(a.get('test_aa'))} | {r.get('best_epoch', 'n/a')} | {r.get('epochs_run', 'n/a')} | "
                      f"{ev if 'autolora' in spec else ''} | {r.get('seconds', 'n/a')} |")
    md.append("")

    # tests
    md += ["## AutoLoRa vs the baselines: paired differences and t-tests", "",
           "Δ = A − B in percentage points, per seed and the mean over seeds (same train/val/test images within a "
           "seed). p-values: paired t-test over seeds, and the two-sided Welch t-test of the paper's Table 7; bold "
           "when < 0.05. 'seeds needed': how many seeds a paired t-test would need for 80 % power at the observed "
           "mean and spread of the differences.", "",
           "| A vs B | metric | per-seed Δ | mean Δ | sd of Δ | paired p | Welch p | seeds needed |",
           "|---|---|---|---|---|---|---|---|"]
    claims = {}
    pairs = (("autolora", "vanilla_rft"), ("autolora", "twins"), ("autolora:roli", "vanilla_rft"),
             ("autolora:roli", "autolora"), ("twins", "vanilla_rft"))
    for a, b in pairs:
        for key, name, g in (("test_sa", "SA", get), ("test_pgd10", "PGD-10", get), ("test_aa", "AA (subset)", get_aa),
                             ("test_pgd10", "PGD-10 (AA subset)", get_aa)):
            t = paired(g(a, key), g(b, key))
            md.append(f"| {LABEL[a]} vs {LABEL[b]} | {name} | {', '.join(num(x, '+.2f') for x in t['diffs']) or 'n/a'}"
                      f" | {num(t['mean'], '+.2f')} | {num(t['sd'], '.2f')} | {fmt_p(t['p'])} | "
                      f"{fmt_p(t['welch'])} | {t['seeds_for_power'] or 'n/a'} |")
            claims[(a, b, name)] = t
    md.append("")

    # GS
    gs_v = [D[("vanilla_rft", s)]["gs_mean"] for s in seeds]
    gs_t = [D[("twins", s)]["gs_mean"] for s in seeds]
    gs_a = [D[("autolora", s)]["gs_mean"] for s in seeds]
    claims["gs_vanilla"], claims["gs_twins"] = paired(gs_a, gs_v), paired(gs_a, gs_t)
    md += ["## Gradient similarity", "",
           f"GS per epoch (mean ± std over seeds; {args.gradsim_mode.replace('_', '-')} form) of the natural vs the "
           "adversarial objective's gradient w.r.t. the feature extractor θ1 (vanilla RFT: CE(h(x)) vs "
           "KL(h(x)‖h(x̃)), Eq. 3; TWINS: Eq. 4; AutoLoRa: KL(h_{θ̄1+BA}(x)‖h(x̃)) vs CE(h(x̃)), Eq. 8). The paper's "
           "claim: GS(AutoLoRa) > GS(vanilla RFT), GS(TWINS).", ""]
    n_ep = max((len(D[(spec, s)]["gs"]) for spec in SPECS for s in seeds), default=0)
    if n_ep:
        md += ["| epoch | " + " | ".join(LABEL[s] for s in SPECS) + " |", "|---" * (len(SPECS) + 1) + "|"]
        for e in range(n_ep):
            cells = [ms([D[(spec, s)]["gs"][e] for s in seeds if len(D[(spec, s)]["gs"]) > e], 1, 3) for spec in SPECS]
            md.append(f"| {e} | " + " | ".join(cells) + " |")
        md.append("")
    gd = claims["gs_vanilla"]
    md += [f"Mean GS over epochs: vanilla RFT {ms(gs_v, 1, 3)}, TWINS {ms(gs_t, 1, 3)}, AutoLoRa {ms(gs_a, 1, 3)}; "
           f"AutoLoRa − vanilla = {num(gd['mean'], '+.3f', 1)} "
           f"(paired p {fmt_p(gd['p'])}).", ""]
    png = plot_gs(args, D, seeds)
    if png:
        md += [f"![gradient similarity]({os.path.relpath(png, os.path.dirname(args.out_md))})", ""]

    lr_lines, ranges = lr_section(args, L)
    md += lr_lines
    claims["lr_range"] = paired(ranges.get("vanilla_rft", []), ranges.get("autolora", []))

    md += ["## The paper's claims on this benchmark (computed automatically)", "",
           "Verdicts: **holds** = the difference has the paper's sign and paired p < 0.05; **fails** = the opposite "
           "sign with paired p < 0.05; **not shown** = otherwise. Δ in points (GS: in cosine units).", "",
           f"1. AutoLoRa's PGD-10 beats vanilla RFT: {verdict(claims[('autolora', 'vanilla_rft', 'PGD-10')])}.",
           f"2. AutoLoRa's PGD-10 beats TWINS: {verdict(claims[('autolora', 'twins', 'PGD-10')])}.",
           f"3. AutoLoRa's AA beats vanilla RFT (subset): {verdict(claims[('autolora', 'vanilla_rft', 'AA (subset)')])}.",
           f"4. AutoLoRa's AA beats TWINS (subset): {verdict(claims[('autolora', 'twins', 'AA (subset)')])}.",
           f"5. GS(AutoLoRa) > GS(vanilla RFT): {verdict(claims['gs_vanilla'], 1.0, '.3f')}; > GS(TWINS): "
           f"{verdict(claims['gs_twins'], 1.0, '.3f')}.",
           "6. AutoLoRa (no automated LR) is less sensitive to the initial LR than vanilla RFT (per-seed PGD-10 range "
           f"across LRs, vanilla − AutoLoRa): {verdict(claims['lr_range'])}.",
           f"7. (RoLI) RoLI∘AutoLoRa's PGD-10 beats AutoLoRa: {verdict(claims[('autolora:roli', 'autolora', 'PGD-10')])}.",
           ""]
    md += discussion(args.out_md)  # the hand-written reading of the figures
    md += ["Run directories: `" + os.path.relpath(main_root, ROOT) + "/<run>` and `" + os.path.relpath(lr_root, ROOT)
           + "/<run>` (git-ignored); each is an `autolora` run directory (`autolora eval RUN_DIR` re-evaluates it; "
           "`aa_subset.json` holds the subset evaluation). The per-run curves and autolora's own grouped report: `"
           + os.path.relpath(os.path.join(main_root, "report", "report.md"), ROOT) + "`. Each finished run's record "
           "(config.yaml, split.json, metrics.jsonl, train.log, results.json, aa_subset.json; not its weights) is "
           "kept in `" + os.path.relpath(args.archive, ROOT) + "/`, from which the command restores the run "
           "directories in a fresh clone, so every figure above can be checked against its run.", ""]
    write_text(args.out_md, "\n".join(md).rstrip() + "\n")
    summary = {"protocol": args.protocol, "seeds": seeds, "stages_seconds": timings.data["stages"],
               "runs": {f"{spec}|{s}": {"res": D[(spec, s)]["res"], "aa": D[(spec, s)]["aa"],
                                        "gs_mean": D[(spec, s)]["gs_mean"], "events": D[(spec, s)]["events"]}
                        for spec in SPECS for s in seeds},
               "lr": {f"{m}|{lr:g}|{s}": v["res"] for (m, lr, s), v in L.items()}}
    atomic_write_json(os.path.splitext(args.out_md)[0] + ".json", summary)
    log(f"wrote {os.path.relpath(args.out_md, ROOT)}")


def lr_section(args, L):
    """The Table 6 view: per method and LR the mean over seeds; per seed the PGD-10 range across LRs."""
    from autolora.workflows.compare import fmt_lr

    lines = ["## Initial-LR sensitivity (Table 6 style)", "",
             f"vanilla RFT and AutoLoRa *without* the automated LR (`--lr-schedule step`, the same step schedule as "
             f"vanilla RFT) at initial LRs {', '.join(fmt_lr(x) for x in args.lr_list)}; seeds "
             f"{','.join(map(str, args.lr_seed_list))}; test accuracy % on the full test set. Range = max − min of "
             "PGD-10 across LRs, per seed (smaller = less sensitive). Each run takes "
             f"{args.epochs * math.ceil(args.per_class * len(TARGET) / args.batch_size)} SGD steps.", "",
             "| method | " + " | ".join(f"LR {fmt_lr(x)} SA / PGD-10" for x in args.lr_list)
             + " | PGD-10 range per seed | mean range |", "|---" * (len(args.lr_list) + 3) + "|"]
    ranges = {}
    for m in ("vanilla_rft", "autolora"):
        cells = []
        for lr in args.lr_list:
            rs = [L[(m, lr, s)]["res"] for s in args.lr_seed_list if L[(m, lr, s)]["res"]]
            failed = any(L[(m, lr, s)]["failed"] for s in args.lr_seed_list)
            cells.append(f"{ms([r['test_sa'] for r in rs])} / {ms([r['test_pgd10'] for r in rs])}" if rs
                         else ("failed (diverged)" if failed else "n/a"))
        per_seed = []
        for s in args.lr_seed_list:
            pg = [(L[(m, lr, s)]["res"] or {}).get("test_pgd10") for lr in args.lr_list]
            per_seed.append(max(pg) - min(pg) if all(p is not None for p in pg) and len(pg) > 1 else None)
        ranges[m] = per_seed
        lines.append(f"| {LABEL[m]} (step LR) | " + " | ".join(cells) + " | "
                     + ", ".join("n/a" if r is None else f"{100 * r:.2f}" for r in per_seed)
                     + f" | {ms(per_seed)} |")
    lines.append("")
    return lines, ranges


def plot_gs(args, D, seeds):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    colours = {"vanilla_rft": "tab:blue", "twins": "tab:green", "autolora": "tab:red", "autolora:roli": "tab:orange"}
    drawn = False
    for spec in SPECS:
        for i, s in enumerate(seeds):
            gs = D[(spec, s)]["gs"]
            if gs:
                ax.plot(range(len(gs)), gs, color=colours[spec], alpha=0.8, label=LABEL[spec] if i == 0 else None)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"gradient similarity ({args.gradsim_mode.replace('_', '-')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.splitext(args.out_md)[0] + "_gs.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


# ------------------------------------------------------------------------------------------------ main
def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(argv)
    args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    import torch

    torch.set_num_threads(args.threads)
    from autolora.workflows.compare import compare

    os.makedirs(args.runs, exist_ok=True)
    command = "OMP_NUM_THREADS=" + str(args.threads) + " .venv/bin/python bench/transfer_cifar10.py" \
        + "".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only")
    main_root, lr_root = os.path.join(args.runs, "main"), os.path.join(args.runs, "lr")
    meta_path = os.path.splitext(args.weights)[0] + ".json"
    if args.report_only:  # from the run directories, or in a fresh clone from the archive (no training)
        restore_runs(args.archive, args.runs, log)
        link_shared_lr_runs(args, main_root, lr_root)
        make_target_data(args)  # symlinks only; the results file names the per-class pool sizes
        write_results(args, main_root, lr_root, read_json(meta_path) or {},
                      Timings(os.path.join(args.runs, "timings.json"), record=False, log=log), command)
        return
    restore_runs(args.archive, args.runs, log)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops like Ctrl-C: the stage times so far are recorded
    timings = Timings(os.path.join(args.runs, "timings.json"), log=log)
    t_all = time.perf_counter()
    log(f"protocol {args.protocol}: runs in {args.runs}; results -> {args.out_md}")
    try:
        with timings.stage("data"):
            target = make_target_data(args)
        with timings.stage("pretrain"):
            meta = pretrain_weights(args)
        cfg = base_config(args, target)

        def progress(run_dir):  # after each run made: its record to the archive, the results file refreshed
            timings.made()
            archive_run(args.archive, run_dir, timings)
            write_results(args, main_root, lr_root, meta, timings, command)

        def main_run_done(run_dir):  # the AA subset evaluation at once, so the archived record is complete
            if "aa" not in args.skip_set:
                run_aa(args, [run_dir], timings, nested=True)
            progress(run_dir)

        with timings.stage("main"):
            runs = compare(cfg, SPECS, args.seed_list, main_root, report=True, quiet=False,
                           on_run_done=main_run_done, overrides={"autolora:roli": {"probe_epochs": args.probe_epochs}})
        write_results(args, main_root, lr_root, meta, timings, command)
        if "aa" not in args.skip_set:  # finished runs still without AA (e.g. made with --skip aa)
            with timings.stage("aa"):
                run_aa(args, runs, timings, progress, nested=True)
        if "lr" not in args.skip_set:
            with timings.stage("lr"):
                link_shared_lr_runs(args, main_root, lr_root)
                compare(dataclasses.replace(cfg, lr_schedule="step"), ["vanilla_rft", "autolora"],
                        args.lr_seed_list, lr_root, lrs=args.lr_list, report=True, quiet=False,
                        on_run_done=progress)
        write_results(args, main_root, lr_root, meta, timings, command)
        log(f"done in {time.perf_counter() - t_all:.0f}s (this invocation)")
    finally:  # interrupted or not, the archive's timings include this invocation's
        archive_timings(args.archive, timings)


if __name__ == "__main__":
    main()
