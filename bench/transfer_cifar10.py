#!/usr/bin/env python
"""Transfer benchmark on CIFAR-10 split in two (issue 6, item 5): does AutoLoRa beat vanilla RFT and TWINS?

    cd /work/main && OMP_NUM_THREADS=2 .venv/bin/python bench/transfer_cifar10.py     # `make bench-transfer`
    .venv/bin/python bench/transfer_cifar10.py --quick                                 # smoke version, minutes

Rerunning the same command continues: every stage skips what is on disk (finished runs are skipped,
interrupted ones resumed from their last epoch checkpoint).

Stages
  0. data     bench/runs/<name>/data/target/{train,test}/<class>/ (symlinks into --data-dir): for each target
              class (dog, frog, horse, ship, truck) a fixed held-out test subset (--test-per-class, seeded once)
              and the remaining images as the train pool; every run draws its seeded train subset
              (--per-class) and validation subset from the pool, so all methods and seeds are tested on the
              same images and train and test are disjoint.
  A. pretrain robust pretraining of `small` (CIFAR ResNet, 0.31 M parameters) from scratch with FGSM-RS AT
              (Wong et al. 2020) on the 5 source classes (airplane, automobile, bird, cat, deer) ->
              bench/weights/small_fgsmrs_c10src.safetensors (skipped when the file exists; remake it with
              `--remake-weights`, see `remake_command` in its .json).
  B. main     `autolora compare`: vanilla_rft, twins, autolora, autolora:roli × seeds, gradient similarity
              logged every epoch; test SA and PGD-10 on the whole held-out test set.
  C. aa       AutoAttack (standard) on a fixed, stratified --aa-limit-image subset of the test set per main run
              (AA is slow on CPU), written to RUN/aa_subset.json (with clean and PGD-10 on the same subset).
  D. lr       initial-LR sensitivity (the paper's Table 6): vanilla_rft and AutoLoRa *without* the automated LR
              (`--lr-schedule step`) at --lrs, --lr-seeds seeds. vanilla_rft at LR 0.01 is the main run (linked).
  E. report   bench/results/transfer_cifar10.md (--out-md): tables, paired and Welch t-tests, GS, LR table,
              automatic verdicts on the paper's claims, then the hand-written <out-md>_discussion.md if present.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from autolora.report import fmt_p, mean_std, read_json, read_rows, welch_p  # noqa: E402  (no torch import)

SOURCE = ["airplane", "automobile", "bird", "cat", "deer"]
TARGET = ["dog", "frog", "horse", "ship", "truck"]
METHODS = ["vanilla_rft", "twins", "autolora", "autolora:roli"]
LABEL = {"vanilla_rft": "vanilla RFT", "twins": "TWINS", "autolora": "AutoLoRa", "autolora:roli": "RoLI∘AutoLoRa"}
WEIGHTS = os.path.join(ROOT, "bench", "weights", "small_fgsmrs_c10src.safetensors")

FULL = dict(name="transfer_full", pretrain_epochs=4, pretrain_per_class=1000, pretrain_lr=0.1, per_class=200,
            test_per_class=400, val_per_class=20, epochs=8, train_steps=3, batch_size=32, probe_epochs=1,
            seeds="0,1,2", lr_seeds="0", lrs="0.001,0.01,0.03", aa_limit=60, gradsim_samples=16,
            budget_minutes=86.0)
QUICK = dict(name="transfer_quick", pretrain_epochs=1, pretrain_per_class=60, pretrain_lr=0.1, per_class=12,
             test_per_class=12, val_per_class=4, epochs=2, train_steps=1, batch_size=16, probe_epochs=1,
             seeds="0,1", lr_seeds="0", lrs="0.001,0.03", aa_limit=10, gradsim_samples=16, budget_minutes=30.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] bench: {msg}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke version (tiny sizes, own run dir and weights)")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10"),
                    help="CIFAR-10 as an image folder: DIR/train/<class>/*.jpg (default ../shared/data/cifar10)")
    ap.add_argument("--runs", default=None, help="where the run directories go (default bench/runs/<name>)")
    ap.add_argument("--out-md", default=None, help="results file (default bench/results/transfer_cifar10.md; "
                                                   "--quick: inside the runs dir)")
    ap.add_argument("--weights", default=None, help=f"pretrained weights (default {os.path.relpath(WEIGHTS, ROOT)})")
    ap.add_argument("--remake-weights", action="store_true", help="pretrain again even if the weights exist")
    for k, v in FULL.items():
        if k == "name":
            continue
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v} (quick {QUICK[k]})")
    # (--budget-minutes: AA, the last stage, evaluates runs only while the total time is below it)
    ap.add_argument("--skip", default="", help="comma list of stages to skip: aa, lr")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the results file from what is on disk")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 2)")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.runs = args.runs or os.path.join(ROOT, "bench", "runs", args.name)
    args.out_md = args.out_md or (os.path.join(args.runs, "transfer_cifar10.md") if args.quick
                                  else os.path.join(ROOT, "bench", "results", "transfer_cifar10.md"))
    args.weights = args.weights or (os.path.join(args.runs, "pretrain_weights.safetensors") if args.quick else WEIGHTS)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.lr_seed_list = [int(s) for s in args.lr_seeds.split(",") if s.strip()]
    args.lr_list = [float(s) for s in args.lrs.split(",") if s.strip()]
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


# ------------------------------------------------------------------------------------------------ timings
class Timings:
    """Seconds per stage, accumulated over invocations (RUNS/timings.json), so a resumed benchmark reports
    the total time it took."""

    def __init__(self, path, record=True):
        self.path = path
        self.data = json.load(open(path)) if os.path.exists(path) else {"stages": {}, "invocations": []}
        if record:
            self.data["invocations"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]})
            self.save()

    t_stage = 0.0

    def add(self, stage, seconds):
        self.data["stages"][stage] = round(self.data["stages"].get(stage, 0.0) + seconds, 1)
        self.save()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def stage(timings, name):
    class _S:
        def __enter__(self):
            self.t0 = timings.t_stage = time.perf_counter()
            log(f"== stage {name} ==")

        def __exit__(self, *exc):
            dt = time.perf_counter() - self.t0
            timings.add(name, dt)
            log(f"== stage {name}: {dt:.0f}s{' (interrupted)' if exc[0] else ''} ==")
    return _S()


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
    with open(manifest, "w") as f:
        json.dump({**want, "counts": counts}, f, indent=1)
    return root


# ------------------------------------------------------------------------------------------------ stage A
def remake_command(args) -> str:
    return ("OMP_NUM_THREADS=2 .venv/bin/autolora pretrain --arch small --dataset imagefolder "
            f"--data-dir ../shared/data/cifar10 --classes {','.join(SOURCE)} --attack fgsm_rs "
            f"--epochs {args.pretrain_epochs} --lr {args.pretrain_lr} --batch-size 128 --input-size none "
            f"--limit-train {args.pretrain_per_class * len(SOURCE)} --test-fraction 0.1 --limit-eval 500 "
            "--eval-attacks clean,pgd10 --seed 0 --device cpu --out bench/runs/pretrain_small && "
            "cp bench/runs/pretrain_small/model.safetensors bench/weights/small_fgsmrs_c10src.safetensors")


def pretrain_weights(args) -> dict:
    from autolora.pretrain import pretrain

    meta_path = os.path.splitext(args.weights)[0] + ".json"
    if os.path.exists(args.weights) and not args.remake_weights:
        log(f"pretrained weights exist: {os.path.relpath(args.weights, ROOT)} (skipping pretraining)")
        return json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    out = os.path.join(args.runs, "pretrain")
    log(f"pretraining small on {', '.join(SOURCE)}: FGSM-RS, {args.pretrain_epochs} epochs, "
        f"{args.pretrain_per_class} images per class")
    w = pretrain("small", "imagefolder", args.data_dir, out=out, classes=SOURCE, attack="fgsm_rs",
                 epochs=args.pretrain_epochs, lr=args.pretrain_lr, batch_size=128, input_size="none",
                 limit_train=args.pretrain_per_class * len(SOURCE), test_fraction=0.1,
                 limit_eval=500 if not args.quick else 50, eval_attacks=("clean", "pgd10"), seed=0,
                 device="cpu", overwrite=True, quiet=False, progress=False)
    rec = json.load(open(os.path.join(out, "pretrain.json")))
    os.makedirs(os.path.dirname(args.weights), exist_ok=True)
    shutil.copyfile(w, args.weights)
    meta = {k: rec.get(k) for k in ("arch", "classes", "attack", "eps", "step_size", "epochs", "lr", "schedule",
                                     "batch_size", "weight_decay", "num_train", "num_test", "seed", "seconds")}
    meta.update({"test": rec.get("test"), "source_data": "CIFAR-10 train/ (5 source classes), as an image folder",
                 "remake_command": remake_command(args)})
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return meta


# ------------------------------------------------------------------------------------------------ stage B/D
def base_config(args, target_dir):
    from autolora.config import TrainConfig

    pool = json.load(open(os.path.join(target_dir, "manifest.json")))["counts"][TARGET[0]]["train_pool"]
    return TrainConfig(
        dataset="imagefolder", data_dir=os.path.abspath(target_dir), arch="small", input_size="none",
        weights=os.path.abspath(args.weights), epochs=args.epochs, batch_size=args.batch_size,
        train_steps=args.train_steps, eval_attacks=["clean", "pgd10"], limit_train=args.per_class * len(TARGET),
        val_fraction=(args.val_per_class + 0.25) / pool, probe_epochs=args.probe_epochs, log_gradsim=True,
        gradsim_samples=args.gradsim_samples, device="cpu", progress=False, amp=False, channels_last=False)


def run_aa(args, run_dirs, timings, on_done=None):
    """AA on the subset, run by run (seed-major), while the benchmark's total time is within --budget-minutes
    (AA is the most expendable stage: it goes last, and what is not evaluated is reported as such)."""
    from autolora.trainer import evaluate_run

    for d in run_dirs:
        out = os.path.join(d, "aa_subset.json")
        if os.path.exists(out) or not os.path.exists(os.path.join(d, "results.json")):
            continue
        spent = sum(timings.data["stages"].values()) + (time.perf_counter() - timings.t_stage) / 1
        if spent > 60 * args.budget_minutes:
            log(f"AA: time budget of {args.budget_minutes:g} min spent ({spent / 60:.1f} min); the remaining "
                "runs are not AA-evaluated (rerun with a larger --budget-minutes to add them)")
            break
        t0 = time.perf_counter()
        res = evaluate_run(d, attacks=["clean", "pgd10", "aa"], limit=args.aa_limit, device="cpu", write=False,
                           progress=False)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, out)
        if on_done:
            on_done(d)
        log(f"AA subset {os.path.basename(d)}: SA {res['test_sa']:.4f} PGD-10 {res['test_pgd10']:.4f} "
            f"AA {res['test_aa']:.4f} on {res['num_test']} images ({res['seconds']:.0f}s)")


def link_shared_lr_runs(args, main_root, lr_root):
    """vanilla_rft at LR 0.01 with the step schedule is exactly the main run: link it instead of retraining."""
    from autolora.compare import run_name

    os.makedirs(lr_root, exist_ok=True)
    for s in args.lr_seed_list:
        if s not in args.seed_list or 0.01 not in args.lr_list:
            continue
        main = os.path.join(main_root, run_name("vanilla_rft", "random", s))
        link = os.path.join(lr_root, run_name("vanilla_rft", "random", s, 0.01))
        if os.path.exists(os.path.join(main, "results.json")) and not os.path.lexists(link):
            os.symlink(os.path.relpath(main, lr_root), link)


# ------------------------------------------------------------------------------------------------ stage E
def _ms(vals, scale=100.0, nd=2):
    """mean ± sample std of the non-missing values, times `scale`, `nd` decimals."""
    m, s = mean_std([v for v in vals if v is not None])
    if m is None:
        return "n/a"
    return f"{scale * m:.{nd}f}" + ("" if s is None else f" ± {scale * s:.{nd}f}")


def _tests(a, b):
    """(mean paired diff, paired t p, Welch p) for per-seed lists a, b (same seed order)."""
    import warnings

    from scipy import stats

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return None, None, None
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    md = sum(x - y for x, y in pairs) / len(pairs)
    pp = None
    if len(pairs) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pp = float(stats.ttest_rel(xs, ys).pvalue)
        pp = None if math.isnan(pp) else pp
    return md, pp, welch_p(xs, ys)


def collect(args, main_root):
    from autolora.compare import parse_spec, run_name

    data = {}
    for spec in METHODS:
        m, init = parse_spec(spec)
        for s in args.seed_list:
            d = os.path.join(main_root, run_name(m, init, s))
            res = read_json(os.path.join(d, "results.json"))
            aa = read_json(os.path.join(d, "aa_subset.json"))
            rows = [r for r in read_rows(os.path.join(d, "metrics.jsonl")) if r.get("stage") == "main"]
            gs = [r.get("grad_sim") for r in rows if r.get("grad_sim") is not None]
            data[(spec, s)] = {"dir": d, "res": res, "aa": aa, "gs": gs,
                               "gs_mean": sum(gs) / len(gs) if gs else None}
    return data


def sizing_lines(args, D, meta):
    """Why the benchmark has the size it has: per-epoch and AA costs measured on the runs themselves."""
    import statistics

    ep = {}
    for (spec, _), v in D.items():
        ep.setdefault(spec, []).extend(r["seconds"] for r in read_rows(os.path.join(v["dir"], "metrics.jsonl"))
                                       if r.get("stage") == "main" and r.get("seconds"))
    aa = [v["aa"]["seconds"] for v in D.values() if v["aa"] and v["aa"].get("seconds")]
    n_train = args.per_class * len(TARGET)
    cost = ", ".join(f"{LABEL[s]} {statistics.median(x):.0f} s" for s, x in ep.items() if x)
    return ["## Sizing", "",
            "The issue's pilot suggested 300 training images per class × 12 epochs, assuming bf16 autocast made "
            "training about 4× faster than fp32. On this CPU bf16 is 10–23× *slower* (bench/results/throughput_formats_*_cpu.md), so the sizes above were "
            "chosen from costs measured here to keep the whole benchmark within 90 minutes:",
            f"- one fine-tuning epoch on {n_train} images with PGD-{args.train_steps} (median over the runs "
            f"above, including validation and the GS probe): {cost or 'n/a'};",
            "- PGD-10 on 2000 test images: about 70 s per run (measured in a 1-epoch pilot);",
            "- standard AutoAttack costs about 7 s per test image that survives APGD-CE (Square's 5000 queries "
            "and FAB-T dominate): a 200-image subset of one model took 491 s; "
            + (f"here, {args.aa_limit} images took {statistics.mean(aa):.0f} s per run on average;" if aa else "")
            + " so AA runs on a subset and the full test set gets PGD-10;",
            "- two 1-thread processes side by side gave only 1.07× the throughput of one 2-thread process, so runs "
            "go one after another;",
            "- the source weights are committed, so the total above leaves out pretraining"
            + (f" ({meta['seconds'] / 60:.1f} min when they were made)" if meta.get("seconds") else "") + ".", ""]


def write_results(args, main_root, lr_root, meta, timings, command):
    D = collect(args, main_root)
    seeds = args.seed_list
    get = lambda spec, key: [(D[(spec, s)]["res"] or {}).get(key) for s in seeds]  # noqa: E731
    get_aa = lambda spec, key: [(D[(spec, s)]["aa"] or {}).get(key) for s in seeds]  # noqa: E731
    man = json.load(open(os.path.join(args.runs, "data", "target", "manifest.json")))
    n_done = sum(1 for v in D.values() if v["res"])
    n_aa = sum(1 for v in D.values() if v["aa"])

    md = ["# Transfer benchmark: CIFAR-10 source → target classes" + (" (QUICK smoke run)" if args.quick else ""), ""]
    md += ["Command (from the repository root; rerunning it continues where it stopped):", "", "```",
           command, "```", ""]
    st = timings.data["stages"]
    md += [f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}; "
           f"written {time.strftime('%Y-%m-%d %H:%M')}. Wall time per stage (summed over invocations): "
           + ", ".join(f"{k} {v / 60:.1f} min" for k, v in st.items())
           + f"; total {sum(st.values()) / 60:.1f} min.", ""]
    md += [f"Status: {n_done}/{len(D)} main runs finished, AA subset evaluated for {n_aa}/{len(D)}.", ""]

    md += ["## Setup", "",
           f"- **Source** (robust pretraining): CIFAR-10 train images of {', '.join(SOURCE)}. `small` CIFAR ResNet "
           f"(one basic block per stage, widths 32/64/128, 0.31 M parameters) trained from scratch with FGSM-RS AT "
           f"(ε = 8/255, step 10/255), {meta.get('epochs')} epochs on {meta.get('num_train')} images, one-cycle LR "
           f"peak {meta.get('lr')}; source test (held-out {meta.get('num_test')} images): "
           + (", ".join(f"{k} {100 * v:.1f}%" for k, v in (meta.get("test") or {}).items() if v is not None) or "n/a")
           + f". Weights: `{os.path.relpath(args.weights, ROOT)}` (remake: `{meta.get('remake_command', remake_command(args))}`).",
           f"- **Target**: {', '.join(TARGET)}. A fixed held-out test set of {args.test_per_class} images per class "
           f"({args.test_per_class * len(TARGET)} in all, seeded once, the same for every method and seed); "
           f"from the remaining {man['counts'][TARGET[0]]['train_pool']} images per class each run draws (seeded by "
           f"its seed) {args.per_class} training images per class and {args.val_per_class} validation images per "
           f"class (best-epoch selection, AutoLoRa's automated LR). Runs with the same seed share train, val and "
           f"test images, so comparisons are paired by seed.",
           f"- **Fine-tuning**: {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, training attack "
           f"PGD-{args.train_steps} (ε 8/255, step 2/255), fp32 on CPU (bf16 autocast measured 10–23× *slower* than fp32 "
           f"on this CPU, AMD EPYC with AVX2 only, where bf16 convolutions are emulated; channels_last off, "
           f"as in every run's config.yaml); vanilla RFT and TWINS: Table 5 "
           f"defaults (LR 0.01, WD 1e-4, step ÷10 at epochs {args.epochs // 2} and {5 * args.epochs // 6}; TWINS "
           f"γ 1); AutoLoRa: η0 0.01 with the automated LR (Algorithm 1), r 8, α 1, λ2_max 6; RoLI∘AutoLoRa: "
           f"{args.probe_epochs} epoch{'' if args.probe_epochs == 1 else 's'} of adversarial linear probing first. Best epoch by validation PGD-10.",
           f"- **Evaluation**: SA and PGD-10 (ε 8/255, step 2/255) on all {args.test_per_class * len(TARGET)} test "
           f"images; **AA (standard AutoAttack) on a {args.aa_limit}-image stratified subset** of the test set "
           f"(the same subset for every method within a seed; CPU-bound), reported next to PGD-10 on that subset.",
           f"- Gradient similarity (GS, the paper's Eq. 3 vs Eq. 8): cosine similarity between the gradients of "
           f"the natural and the adversarial objective w.r.t. the feature extractor, logged after every epoch on "
           f"{args.gradsim_samples} fixed training images.", ""]
    md += sizing_lines(args, D, meta)

    # main table
    md += ["## Results (test accuracy %, mean ± std over seeds " + ",".join(map(str, seeds)) + ")", "",
           f"| method | n | SA | PGD-10 ({args.test_per_class * len(TARGET)}) | SA (AA subset) | PGD-10 (AA subset) | "
           f"AA ({args.aa_limit}-image subset) | GS (mean over epochs) |", "|---|---|---|---|---|---|---|---|"]
    for spec in METHODS:
        n = sum(1 for s in seeds if D[(spec, s)]["res"])
        md.append(f"| {LABEL[spec]} | {n} | {_ms(get(spec, 'test_sa'))} | {_ms(get(spec, 'test_pgd10'))} | "
                  f"{_ms(get_aa(spec, 'test_sa'))} | {_ms(get_aa(spec, 'test_pgd10'))} | {_ms(get_aa(spec, 'test_aa'))} | "
                  f"{_ms([D[(spec, s)]['gs_mean'] for s in seeds], 1, 3)} |")
    md.append("")
    md += ["Per run (SA / PGD-10 on the full test set; AA on the subset; best epoch):", ""]
    md += ["| run | SA | PGD-10 | AA (subset) | best epoch | seconds |", "|---|---|---|---|---|---|"]
    for spec in METHODS:
        for s in seeds:
            v = D[(spec, s)]
            r, a = v["res"] or {}, v["aa"] or {}
            f = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
            md.append(f"| {os.path.basename(v['dir'])} | {f(r.get('test_sa'))} | {f(r.get('test_pgd10'))} | "
                      f"{f(a.get('test_aa'))} | {r.get('best_epoch', 'n/a')} | {r.get('seconds', 'n/a')} |")
    md.append("")

    # tests
    md += ["## AutoLoRa vs the baselines: paired differences and t-tests", "",
           "Δ = A − B in percentage points, mean over seeds of the per-seed difference (same train/val/test "
           "images within a seed). p-values: paired t-test over seeds and two-sided Welch t-test (unequal "
           "variances, as in the paper's Table 7); bold when < 0.05. With 3 seeds these tests have little power: "
           "a p above 0.05 means 'not shown', not 'no difference'.", "",
           "| A vs B | metric | per-seed Δ | mean Δ | paired p | Welch p |", "|---|---|---|---|---|---|"]
    claims = {}
    for a, b in (("autolora", "vanilla_rft"), ("autolora", "twins"), ("autolora:roli", "vanilla_rft"),
                 ("autolora:roli", "autolora"), ("twins", "vanilla_rft")):
        for key, name, src in (("test_sa", "SA", "res"), ("test_pgd10", "PGD-10", "res"), ("test_aa", "AA (subset)", "aa"),
                               ("test_pgd10", "PGD-10 (AA subset)", "aa")):
            g = get if src == "res" else get_aa
            xa, xb = g(a, key), g(b, key)
            md_, pp, pw = _tests(xa, xb)
            per = ", ".join("n/a" if x is None or y is None else f"{100 * (x - y):+.2f}" for x, y in zip(xa, xb))
            md.append(f"| {LABEL[a]} vs {LABEL[b]} | {name} | {per} | "
                      f"{'n/a' if md_ is None else f'{100 * md_:+.2f}'} | {fmt_p(pp)} | {fmt_p(pw)} |")
            claims[(a, b, name)] = (md_, pp, pw)
    md.append("")

    # GS
    gs_v = [D[("vanilla_rft", s)]["gs_mean"] for s in seeds]
    gs_a = [D[("autolora", s)]["gs_mean"] for s in seeds]
    gd, gpp, gpw = _tests(gs_a, gs_v)
    md += ["## Gradient similarity: vanilla RFT vs AutoLoRa", "",
           "GS per epoch (mean over seeds) of the natural vs adversarial objective's gradient w.r.t. the feature "
           "extractor θ1 (vanilla RFT: CE(h(x)) vs KL(h(x)‖h(x̃)), Eq. 3; AutoLoRa: KL(h_{θ̄1+BA}(x)‖h(x̃)) vs "
           "CE(h(x̃)), Eq. 8). The paper's claim: GS(AutoLoRa) > GS(vanilla RFT).", ""]
    n_ep = max((len(D[(spec, s)]["gs"]) for spec in METHODS for s in seeds), default=0)
    if n_ep:
        md += ["| epoch | " + " | ".join(LABEL[s] for s in METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
        for e in range(n_ep):
            cells = []
            for spec in METHODS:
                vals = [D[(spec, s)]["gs"][e] for s in seeds if len(D[(spec, s)]["gs"]) > e]
                cells.append(_ms(vals, 1, 3))
            md.append(f"| {e} | " + " | ".join(cells) + " |")
        md.append("")
    md += [f"Mean GS over epochs: vanilla RFT {_ms(gs_v, 1, 3)}, AutoLoRa {_ms(gs_a, 1, 3)}; "
           f"AutoLoRa − vanilla = {'n/a' if gd is None else f'{gd:+.3f}'} (paired p {fmt_p(gpp)}, Welch p {fmt_p(gpw)}).", ""]
    png = plot_gs(args, D, seeds)
    if png:
        md += [f"![gradient similarity]({os.path.relpath(png, os.path.dirname(args.out_md))})", ""]

    # LR sensitivity
    lr_lines, ranges = lr_section(args, lr_root)
    md += lr_lines

    # verdicts
    def verdict(key):
        m, pp, pw = claims.get(key, (None, None, None))
        if m is None:
            return "not measured yet"
        sig = pp is not None and pp < 0.05 or pw is not None and pw < 0.05
        return (f"{'holds' if m > 0 and sig else 'same direction, not significant' if m > 0 else 'does NOT hold'} "
                f"(Δ {100 * m:+.2f} points, paired p {fmt_p(pp)}, Welch p {fmt_p(pw)})")

    md += ["## The paper's claims on this benchmark (computed automatically)", "",
           f"1. AutoLoRa's PGD-10 beats vanilla RFT: {verdict(('autolora', 'vanilla_rft', 'PGD-10'))}.",
           f"2. AutoLoRa's PGD-10 beats TWINS: {verdict(('autolora', 'twins', 'PGD-10'))}.",
           f"3. AutoLoRa's AA (subset) beats vanilla RFT: {verdict(('autolora', 'vanilla_rft', 'AA (subset)'))}.",
           f"4. AutoLoRa's AA (subset) beats TWINS: {verdict(('autolora', 'twins', 'AA (subset)'))}.",
           "5. GS(AutoLoRa) > GS(vanilla RFT): "
           + ("not measured yet" if gd is None else
              f"{'holds' if gd > 0 else 'does NOT hold'} (Δ {gd:+.3f}, paired p {fmt_p(gpp)})") + ".",
           "6. AutoLoRa (no automated LR) is less sensitive to the initial LR than vanilla RFT: "
           + (("holds" if ranges["autolora"] < ranges["vanilla_rft"] else "does NOT hold")
              + f" (PGD-10 range across LRs {100 * ranges['autolora']:.2f} vs {100 * ranges['vanilla_rft']:.2f} points"
              + (f"; without the lowest LR {100 * ranges['autolora:upper']:.2f} vs "
                 f"{100 * ranges['vanilla_rft:upper']:.2f}" if "autolora:upper" in ranges and "vanilla_rft:upper" in ranges else "")
              + ")"
              if "autolora" in ranges and "vanilla_rft" in ranges else "not measured yet") + ".", ""]
    discussion = os.path.splitext(args.out_md)[0] + "_discussion.md"  # hand-written reading of the figures
    if os.path.exists(discussion):
        md += [open(discussion).read().strip(), ""]
    md += ["Run directories: `" + os.path.relpath(main_root, ROOT) + "/<run>` and `" + os.path.relpath(lr_root, ROOT)
           + "/<run>` (git-ignored); each is an `autolora` run directory (`autolora eval RUN_DIR` re-evaluates it; "
           "`aa_subset.json` holds the subset evaluation). The per-run curves and autolora's own grouped report: `"
           + os.path.relpath(os.path.join(main_root, "report", "report.md"), ROOT) + "`.", ""]
    os.makedirs(os.path.dirname(args.out_md), exist_ok=True)
    tmp = args.out_md + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(md).rstrip() + "\n")
    os.replace(tmp, args.out_md)
    log(f"wrote {os.path.relpath(args.out_md, ROOT)}")


def lr_section(args, lr_root):
    from autolora.compare import fmt_lr, run_name

    lines = ["## Initial-LR sensitivity (Table 6 style)", "",
             f"vanilla RFT and AutoLoRa *without* the automated LR (`--lr-schedule step`, the same step schedule "
             f"as vanilla RFT) at initial LRs {', '.join(fmt_lr(x) for x in args.lr_list)}; seeds "
             f"{','.join(map(str, args.lr_seed_list))}. Test accuracy % (full test set)"
             + ("; only one seed, for time: single-run figures carry seed noise of about ±1–2 points" if len(args.lr_seed_list) == 1 else "")
             + ". Range = max − min of PGD-10 across LRs (smaller = less sensitive). Each run takes "
             f"{args.epochs * math.ceil(args.per_class * len(TARGET) / args.batch_size)} SGD steps; the last column "
             "leaves out the lowest LR, where so few steps may leave both methods under-trained, which is a "
             "different failure from the instability the paper's Table 6 is about (a secondary view, "
             "chosen after the benchmark was designed).", "",
             "| method | " + " | ".join(f"LR {fmt_lr(x)} SA / PGD-10" for x in args.lr_list)
             + " | PGD-10 range | PGD-10 range without the lowest LR |",
             "|---" * (len(args.lr_list) + 3) + "|"]
    ranges = {}
    for m in ("vanilla_rft", "autolora"):
        cells, means = [], []
        for lr in args.lr_list:
            rs = [read_json(os.path.join(lr_root, run_name(m, "random", s, lr), "results.json")) for s in args.lr_seed_list]
            rs = [r for r in rs if r]
            failed = [s for s in args.lr_seed_list
                      if os.path.exists(os.path.join(lr_root, run_name(m, "random", s, lr), "FAILED.json"))]
            if rs:
                pg = [r["test_pgd10"] for r in rs]
                means.append(sum(pg) / len(pg))
                cells.append(f"{_ms([r['test_sa'] for r in rs])} / {_ms(pg)}")
            else:
                cells.append("failed (diverged)" if failed else "n/a")
        full = len(means) == len(args.lr_list) and len(means) > 1
        rng = (max(means) - min(means)) if full else None
        upper = [x for lr, x in zip(args.lr_list, means) if lr != min(args.lr_list)] if full else []
        rng_up = (max(upper) - min(upper)) if len(upper) > 1 else None
        if rng is not None:
            ranges[m] = rng
        if rng_up is not None:
            ranges[m + ":upper"] = rng_up
        fmt = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
        lines.append(f"| {LABEL[m]} (step LR) | " + " | ".join(cells) + f" | {fmt(rng)} | {fmt(rng_up)} |")
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
    for spec in METHODS:
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
    ax.set_ylabel("gradient similarity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.splitext(args.out_md)[0] + "_gs.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    import torch

    torch.set_num_threads(args.threads)
    from autolora.compare import compare

    os.makedirs(args.runs, exist_ok=True)
    command = "cd " + ROOT + " && OMP_NUM_THREADS=" + str(args.threads) + " .venv/bin/python bench/transfer_cifar10.py" \
        + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]) if a != "--report-only")
    main_root, lr_root = os.path.join(args.runs, "main"), os.path.join(args.runs, "lr")
    if args.report_only:
        timings = Timings(os.path.join(args.runs, "timings.json"), record=False)
        meta_path = os.path.splitext(args.weights)[0] + ".json"
        write_results(args, main_root, lr_root, read_json(meta_path) or {}, timings, command)
        return
    timings = Timings(os.path.join(args.runs, "timings.json"))
    t_all = time.perf_counter()
    log(f"runs in {args.runs}; results -> {args.out_md}")
    with stage(timings, "data"):
        target = make_target_data(args)
    with stage(timings, "pretrain"):
        meta = pretrain_weights(args)
    cfg = base_config(args, target)
    progress = lambda run_dir: write_results(args, main_root, lr_root, meta, timings, command)  # noqa: E731
    with stage(timings, "main"):
        runs = compare(cfg, METHODS, args.seed_list, main_root, report=True, quiet=False, on_run_done=progress)
    write_results(args, main_root, lr_root, meta, timings, command)
    if "lr" not in args.skip_set:
        with stage(timings, "lr"):
            link_shared_lr_runs(args, main_root, lr_root)
            compare(dataclasses.replace(cfg, lr_schedule="step"), ["vanilla_rft", "autolora"], args.lr_seed_list,
                    lr_root, lrs=args.lr_list, report=True, quiet=False, on_run_done=progress)
        write_results(args, main_root, lr_root, meta, timings, command)
    if "aa" not in args.skip_set:
        with stage(timings, "aa"):
            run_aa(args, runs, timings, progress)
    write_results(args, main_root, lr_root, meta, timings, command)
    log(f"done in {time.perf_counter() - t_all:.0f}s (this invocation)")


if __name__ == "__main__":
    main()
