#!/usr/bin/env python
"""A CPU benchmark of the RoLI paper's claims (Hua et al., CVPR 2024), on the transfer benchmark's protocol v2.

    make bench-roli      # two parts side by side (--only PART_A, --only PART_B), 1 thread each; rerunning continues
    .venv/bin/python bench/roli_cifar10.py --quick                        # a smoke version, minutes
    .venv/bin/python bench/roli_cifar10.py --report-only                  # rewrite the results from the runs / archive

The claims: (1) with a robust backbone, RoLI (the head from adversarial linear probing) beats a random head (RanLI)
for full fine-tuning, and more so for PEFT; (2) PEFT from a *standard* (non-robust) backbone fails or falls far behind
PEFT from a robust one; (3) adversarial linear probing alone keeps much of the source robustness.

Protocol (CPU proxy): the transfer benchmark's v2 splits (CIFAR-10: source airplane, automobile, bird, cat, deer;
target dog, frog, horse, ship, truck; per target class a fixed validation split of 50 and test set of 400, the
training images drawn per seed) and its committed robust source backbone (`small`, FGSM-RS, 8/255); a *standard*
source backbone trained the same way without the attack (eps 0; weights committed with their remake command).
Per source backbone and seed: linear probing alone; RanLI and RoLI × {full fine-tuning, LoRA, bias}. Adapters and
prompts need transformer blocks (RoLI's code has no convolutional adapter), so the CIFAR ResNet has no place for
them. Madry's objective with PGD-3 (8/255, step 2/255) in training, validation by PGD-10, SGD with RoLI's cosine
schedule (per epoch; no warm-up: their 10 warm-up epochs start at LR 0, which a 5-epoch run cannot spare) at
--lr-probe / --lr-full / --lr-lora / --lr-bias, the PEFT encoder in eval mode (RoLI's), test PGD-10
on all 2,000 test images and standard AutoAttack on one fixed 100-image subset.

Stages (each skips what is on disk; finished runs are archived under <results>_runs/ for a fresh clone): data,
standard source backbone, main runs (AA right after each), report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (ROOT, Timings, archive_run, archive_timings, atomic_write_json, discussion, exclusive, fmt_p,  # noqa: E402
                      logger, ms, num, paired, read_json, read_rows, restore_runs, verdict, write_text)

log = logger("roli-bench")
SOURCES = ("robust", "standard")
MODES = ("full", "lora", "bias")
PEFT = {"full": "none", "lora": "lora", "bias": "bias"}
LABEL = {"probe": "linear probing alone", "full": "full FT", "lora": "LoRA", "bias": "bias"}
ROBUST_WEIGHTS = "bench/weights/small_fgsmrs_c10src_v2.safetensors"
STANDARD_WEIGHTS = "bench/weights/small_standard_c10src_v2.safetensors"
DEFAULTS = dict(per_class=100, val_per_class=50, test_per_class=400, probe_epochs=5, epochs=5, train_steps=3,
                batch_size=32, seeds="0,1,2,3,4", aa_limit=100, lr_probe=0.05, lr_full=0.01, lr_lora=0.01, lr_bias=0.05,
                rank=8, pretrain_epochs=5, pretrain_per_class=4700, source_val_per_class=100, source_test_per_class=200,
                pretrain_lr=0.1)
QUICK = dict(per_class=12, val_per_class=4, test_per_class=12, probe_epochs=1, epochs=2, train_steps=1, batch_size=16,
             seeds="0,1", aa_limit=6, pretrain_epochs=1, pretrain_per_class=40, source_val_per_class=4,
             source_test_per_class=10)


# the two parts `make bench-roli` runs side by side, of about equal cost (AA is slow on the robust source's models)
PART_A = "robust/probe,robust/full,robust/lora,standard/bias"
PART_B = "standard/probe,standard/full,standard/lora,robust/bias"


def parse_only(text: str) -> set[str]:
    names = {f"{s}/{m}" for s in SOURCES for m in ("probe", *MODES)}
    out = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        got = {n for n in names if n == part or n.startswith(part + "/")}
        if not got:
            raise argparse.ArgumentTypeError(f"'{part}' is no sweep: use SOURCE or SOURCE/MODE, e.g. robust/lora")
        out |= got
    return out


def selected(args, src: str, mode: str | None = None) -> bool:
    """Whether this process runs sweep SRC/MODE (any of SRC's when mode is None)."""
    return args.only is None or any(n.split("/")[0] == src and mode in (None, n.split("/")[1]) for n in args.only)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke version (tiny sizes, own runs and weights)")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10"),
                    help="CIFAR-10 as an image folder: DIR/train/<class>/*.jpg (default ../shared/data/cifar10)")
    ap.add_argument("--runs", default=None, help="run directories (default bench/runs/roli_cifar10)")
    ap.add_argument("--out-md", default=None, help="results file (default bench/results/roli_cifar10.md)")
    ap.add_argument("--archive", default=None, help="finished runs' records (default <out-md>_runs)")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v}")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the results file from what is on disk")
    ap.add_argument("--skip-aa", action="store_true", help="no AutoAttack subset evaluations")
    ap.add_argument("--budget-minutes", type=float, default=None, help="stop AA evaluations beyond this total time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default=None, type=parse_only,
                    help="only these sweeps, comma-separated SOURCE/MODE or SOURCE (e.g. standard,robust/bias): "
                         f"one part of the benchmark; `make bench-roli` runs {PART_A} and {PART_B} side by side")
    args = ap.parse_args(argv)
    for k, v in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    name = "roli_cifar10_quick" if args.quick else "roli_cifar10"
    args.runs = args.runs or os.path.join(ROOT, "bench", "runs", name)
    args.out_md = args.out_md or (os.path.join(args.runs, "roli_cifar10.md") if args.quick
                                  else os.path.join(ROOT, "bench", "results", "roli_cifar10.md"))
    args.archive = args.archive or os.path.splitext(args.out_md)[0] + "_runs"
    args.robust = os.path.join(args.runs, "robust_src.safetensors") if args.quick else os.path.join(ROOT, ROBUST_WEIGHTS)
    args.standard = (os.path.join(args.runs, "standard_src.safetensors") if args.quick
                     else os.path.join(ROOT, STANDARD_WEIGHTS))
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


# ------------------------------------------------------------------------------------------------ backbones
def source_weights(args, which: str, timings) -> dict:
    """The robust (committed, transfer v2) or standard (eps 0: no attack, otherwise the same recipe) source backbone;
    trained here when its file is missing (--quick trains both)."""
    import transfer_cifar10 as T
    from autolora.workflows.pretrain import pretrain, pretrain_summary

    path = args.robust if which == "robust" else args.standard
    meta_path = os.path.splitext(path)[0] + ".json"
    if os.path.exists(path):
        return read_json(meta_path) or {}
    out = os.path.join(args.runs, f"pretrain_{which}")
    settings = T.pretrain_settings(args)
    if which == "standard":
        settings.update(eps=0.0)  # the same recipe without the attack: standard training
    resume = os.path.exists(os.path.join(out, "config.yaml")) and not os.path.exists(os.path.join(out, "results.json"))
    log(f"{'resuming' if resume else 'training'} the {which} source backbone ({args.pretrain_epochs} epochs)")
    if not os.path.exists(os.path.join(out, "results.json")):
        pretrain("small", "imagefolder", args.data_dir, out=out, overwrite=not resume, resume=resume, progress=False,
                 **settings)
    timings.made()
    meta = pretrain_summary(out)
    meta["robust_test"] = source_robustness(out, args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copyfile(meta["weights"], path)
    meta.update({"weights": os.path.relpath(path, ROOT), "remake_command": remake_command(args, which, path)})
    atomic_write_json(meta_path, meta)
    return meta


def source_robustness(run_dir: str, args) -> dict:
    """The source backbone's own accuracy on its held-out source test images: clean and PGD-10 at L∞ 8/255, step
    2/255 (whatever budget it was trained with: the standard one's run has eps 0)."""
    from autolora.config import TrainConfig, load_yaml
    from autolora.data import run_data
    from autolora.eval import evaluate
    from autolora.models.export import load_model

    cfg = TrainConfig.from_saved(load_yaml(os.path.join(run_dir, "config.yaml")), "config.yaml")
    model, _ = load_model(os.path.join(run_dir, "model.safetensors"))
    test = run_data(cfg).test
    res = evaluate(model, test, attacks=["clean", "pgd10"], eps=8 / 255, step_size=2 / 255, seed=0)
    return {"sa": res["sa"], "pgd10 (L∞ 8/255, step 2/255)": res["pgd10"], "num_test": len(test)}


def predictions(run_dir: str, timings) -> None:
    """RUN/predictions.json: how the run's test predictions spread over its classes (the share of the most-predicted
    class shows a collapse onto one class). Needs the run's weights: a run restored without them keeps what its
    record has."""
    out = os.path.join(run_dir, "predictions.json")
    weights = os.path.join(run_dir, "model.safetensors")
    if os.path.exists(out) or not (os.path.exists(weights) and os.path.exists(os.path.join(run_dir, "results.json"))):
        return
    import torch
    from torch.utils.data import DataLoader

    from autolora.config import TrainConfig, load_yaml
    from autolora.data import run_data
    from autolora.models.export import load_model

    cfg = TrainConfig.from_saved(load_yaml(os.path.join(run_dir, "config.yaml")), "config.yaml")
    model, meta = load_model(weights)  # in eval mode
    counts = torch.zeros(len(meta["classes"]), dtype=torch.long)
    with torch.no_grad():
        for x, _ in DataLoader(run_data(cfg).test, batch_size=500):  # the run's whole test split, as its figures
            counts += torch.bincount(model(x).argmax(1), minlength=len(counts))
    n = int(counts.sum())
    atomic_write_json(out, {"classes": meta["classes"], "counts": counts.tolist(), "images": n,
                            "largest_share": int(counts.max()) / n})
    timings.made()


def remake_command(args, which: str, path: str) -> str:
    import transfer_cifar10 as T

    s = T.pretrain_settings(args)
    eps = "0" if which == "standard" else "8/255"
    return ("OMP_NUM_THREADS=2 .venv/bin/autolora pretrain --arch small --dataset imagefolder --data-dir "
            f"../shared/data/cifar10 --classes {','.join(T.SOURCE)} --train-attack fgsm_rs --eps {eps} --epochs "
            f"{s['epochs']} --lr {s['lr']} --batch-size 128 --input-size none --limit-train {s['limit_train']} "
            f"--val-fraction {s['val_fraction']:.6g} --test-fraction {s['test_fraction']:.6g} --limit-eval "
            f"{s['limit_eval']} --eval-attacks clean,pgd10 --seed 0 --device {s['device']} --out "
            f"bench/runs/pretrain_{which} && cp bench/runs/pretrain_{which}/model.safetensors {os.path.relpath(path, ROOT)}")


# ------------------------------------------------------------------------------------------------ runs
def base_config(args, target_dir: str, weights: str):
    from autolora.config import TrainConfig
    import json

    pool = json.load(open(os.path.join(target_dir, "manifest.json")))["counts"]["dog"]["train_pool"]
    return TrainConfig(
        dataset="imagefolder", data_dir=os.path.abspath(target_dir), arch="small", input_size="none",
        weights=os.path.abspath(weights), epochs=args.epochs, batch_size=args.batch_size, train_steps=args.train_steps,
        eval_attacks=["clean", "pgd"], limit_train=args.per_class * 5, val_fraction=(args.val_per_class + 0.25) / pool,
        split_seed=0, lr_schedule="warmup_cosine", warmup_epochs=0, head_init="roli", pgd_keep="best_batch",
        augmentation="roli", device=args.device, progress=False, amp=False, channels_last=True)


def sweeps(args, target_dir):
    """(source, mode, out_root, base config, specs, seeds, overrides) of every sweep of the main stage, in order: per
    source, linear probing alone (all seeds), then per mode and seed RanLI and RoLI, whose stage 2 starts from that
    seed's probing run (`--probe-from`, as RoLI's code loads the RanLI-Linear checkpoint: stage 1 is not rerun)."""
    out = []
    for src in SOURCES:
        weights = args.robust if src == "robust" else args.standard
        cfg = base_config(args, target_dir, weights)
        probe = dataclasses.replace(cfg, method="linear_probe", epochs=args.probe_epochs, lr=args.lr_probe)
        probe_root = os.path.join(args.runs, src, "probe")
        out.append((src, "probe", probe_root, probe, ["linear_probe"], args.seed_list, {}))
        for mode in MODES:
            if not selected(args, src, mode):
                continue
            lr = {"full": args.lr_full, "lora": args.lr_lora, "bias": args.lr_bias}[mode]
            extra = {"peft": PEFT[mode], "lr": lr, **({"rank": args.rank} if mode == "lora" else {})}
            for seed in args.seed_list:
                roli = {**extra, "probe_from": run_dir(probe_root, "linear_probe", seed)}
                out.append((src, mode, os.path.join(args.runs, src, mode), cfg, ["madry_ft", "madry_ft:roli"], [seed],
                            {"madry_ft": extra, "madry_ft:roli": roli}))
    return out


def run_dir(root: str, spec: str, seed: int) -> str:
    from autolora.workflows.compare import parse_spec, run_name

    m, init = parse_spec(spec)
    return os.path.join(root, run_name(m, init, seed))


def collect(args) -> dict:
    """{(source, mode, init, seed): {"res", "aa", "pred", "rows", "dir"}}; mode "probe" is linear probing alone."""
    data = {}
    for src in SOURCES:
        for mode in ("probe", *MODES):
            for init, spec in ((("random", "linear_probe"),) if mode == "probe" else
                               (("random", "madry_ft"), ("roli", "madry_ft:roli"))):
                for s in args.seed_list:
                    d = run_dir(os.path.join(args.runs, src, mode), spec, s)
                    data[(src, mode, init, s)] = {"dir": d, "res": read_json(os.path.join(d, "results.json")),
                                                  "aa": read_json(os.path.join(d, "aa_subset.json")),
                                                  "pred": read_json(os.path.join(d, "predictions.json")),
                                                  "rows": read_rows(os.path.join(d, "metrics.jsonl"))}
    return data


# ------------------------------------------------------------------------------------------------ report
def write_results(args, meta: dict, timings, command: str) -> None:
    D = collect(args)
    seeds = args.seed_list
    val = lambda src, mode, init, key, aa=False: [((D[(src, mode, init, s)]["aa" if aa else "res"]) or {}).get(key)  # noqa: E731
                                                   for s in seeds]
    n_done = sum(1 for v in D.values() if v["res"])
    n_aa = sum(1 for v in D.values() if v["aa"])
    md = [f"# RoLI's claims on a CPU proxy: CIFAR-10 5 → 5 classes{' (QUICK smoke run)' if args.quick else ''}", "",
          "Command (from the repository root; rerunning it continues where it stopped):", "", "```", command, "```", "",
          f"Written {time.strftime('%Y-%m-%d %H:%M')}; the runs and their evaluations were made by commit(s) "
          f"{', '.join(timings.commits()) or 'n/a'}. Status: {n_done}/{len(D)} runs finished, AA subset evaluated for "
          f"{n_aa}/{len(D)}.", ""]
    def src_line(which):
        m = meta.get(which) or {}
        # the transfer bench's robust backbone was tested at its training budget, L∞ 8/255 with step 2/255
        figures = m.get("robust_test") or {("pgd10 (L∞ 8/255, step 2/255)" if k == "pgd10" else k): v
                                           for k, v in (m.get("test") or {}).items()}
        return ", ".join(f"{k} {100 * v:.1f} %" for k, v in figures.items() if isinstance(v, float)) or "n/a"

    setup = [
        ("data", f"the transfer benchmark's v2 splits: target dog, frog, horse, ship, truck; per class train "
                 f"{args.per_class} (per seed), validation {args.val_per_class} and test {args.test_per_class} "
                 "(fixed)"),
        ("robust source", f"`{os.path.relpath(args.robust, ROOT)}` (FGSM-RS 8/255); source test: {src_line('robust')}"),
        ("standard source", f"`{os.path.relpath(args.standard, ROOT)}` (the same recipe, eps 0; trained in "
                            f"{(meta.get('standard') or {}).get('seconds', 0) / 60:.1f} min); source test: "
                            f"{src_line('standard')}; remake: `{(meta.get('standard') or {}).get('remake_command', 'n/a')}`"),
        ("linear probing", f"{args.probe_epochs} epochs, SGD LR {args.lr_probe:g}, per-epoch cosine without warm-up, "
                           "encoder in eval mode (RoLI stage 1; alone it is its own run)"),
        ("fine-tuning", f"{args.epochs} epochs, Madry's objective, SGD momentum 0.9, per-epoch cosine without warm-up; LR full "
                        f"{args.lr_full:g}, LoRA {args.lr_lora:g}, bias {args.lr_bias:g}; LoRA r {args.rank} on every conv "
                        "(A ~ N(0, 1), B = 0, scale 1/r: AutoLoRa's init); "
                        "bias: every parameter named *bias*; PEFT encoder in eval mode"),
        ("RanLI / RoLI", "RanLI: a fresh head, initialised as RoLI's (kaiming-normal fan_out, bias −log 99); RoLI: "
                         "stage 2 starts from the best head (by validation PGD-10) of the same seed's linear-probing "
                         "run (`--probe-from`, as RoLI's code loads the RanLI-Linear checkpoint)"),
        ("as RoLI runs it", "PGD returns the iterate of the highest batch-mean loss (training, validation, test); "
                            "no training augmentation (their CIFAR)"),
        ("attacks", f"training PGD-{args.train_steps}, validation PGD-10, test PGD-10 on {args.test_per_class * 5} "
                    f"images; standard AutoAttack on a fixed {args.aa_limit}-image subset; L∞ 8/255, step 2/255"),
        ("adapter, prompt", "not run: the CIFAR ResNet has no transformer blocks and RoLI's code has no "
                            "convolutional adapter"),
    ]
    md += ["## Setup", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in setup], ""]
    st = timings.data["stages"]
    epoch_s = [r["seconds"] for v in D.values() for r in v["rows"] if r.get("seconds")]
    aa_s = [v["aa"]["seconds"] for v in D.values() if v["aa"] and v["aa"].get("seconds")]
    wall = timings.wall_seconds()
    threads = sorted({v["res"].get("threads") for v in D.values() if v["res"] and v["res"].get("threads")})
    md += ["## Measured cost", "", f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
           f"{'/'.join(map(str, threads)) or args.threads} per process. Time per stage, summed over invocations (processes side by side each count): "
           + ", ".join(f"{k} {v / 60:.1f} min" for k, v in st.items()) + f"; total {sum(st.values()) / 60:.1f} min"
           + (f"; wall time {wall / 3600:.2f} h (the union of the invocations' spans)" if wall else "") + ". "
           + (f"An epoch: median {statistics.median(epoch_s):.1f} s; " if epoch_s else "")
           + (f"AA on the subset: {statistics.mean(aa_s):.0f} s per run on average ({min(aa_s):.0f}–{max(aa_s):.0f} s)."
              if aa_s else ""), ""]

    md += ["## Results (test accuracy %, mean ± std over seeds " + ",".join(map(str, seeds)) + ")", "",
           f"| source | mode | init | n | trainable params | SA | PGD-10 ({args.test_per_class * 5}) | "
           f"PGD-10 (AA subset) | AA ({args.aa_limit}) |", "|---|---|---|---|---|---|---|---|---|"]
    for src in SOURCES:
        for mode in ("probe", *MODES):
            for init in (("random",) if mode == "probe" else ("random", "roli")):
                rs = [D[(src, mode, init, s)]["res"] for s in seeds]
                params = {r.get("trainable_params") for r in rs if r} - {None}
                md.append(f"| {src} | {LABEL[mode]} | {'—' if mode == 'probe' else ('RoLI' if init == 'roli' else 'RanLI')} | "
                          f"{sum(1 for r in rs if r)} | {params.pop() if len(params) == 1 else 'n/a'} | "
                          f"{ms(val(src, mode, init, 'test_sa'))} | {ms(val(src, mode, init, 'test_pgd10'))} | "
                          f"{ms(val(src, mode, init, 'test_pgd10', True))} | {ms(val(src, mode, init, 'test_aa', True))} |")
    md.append("")

    tests, claims = [], {}
    for src in SOURCES:
        for mode in MODES:
            for key, name, aa in (("test_pgd10", "PGD-10", False), ("test_aa", "AA", True), ("test_sa", "SA", False)):
                t = paired(val(src, mode, "roli", key, aa), val(src, mode, "random", key, aa))
                tests.append((f"RoLI − RanLI, {LABEL[mode]}, {src} source", name, t))
                claims[("roli", src, mode, name)] = t
    for mode in MODES:
        for init in ("random", "roli"):
            t = paired(val("robust", mode, init, "test_pgd10"), val("standard", mode, init, "test_pgd10"))
            tests.append((f"robust − standard source, {LABEL[mode]} ({'RoLI' if init == 'roli' else 'RanLI'})",
                          "PGD-10", t))
            claims[("source", mode, init)] = t
    t = paired(val("robust", "probe", "random", "test_pgd10"), val("standard", "probe", "random", "test_pgd10"))
    tests.append(("robust − standard source, linear probing alone", "PGD-10", t))
    claims[("source", "probe")] = t
    t = paired(val("robust", "probe", "random", "test_pgd10"), val("robust", "full", "random", "test_pgd10"))
    tests.append(("linear probing alone − RanLI full FT, robust source", "PGD-10", t))
    claims[("probe_vs_full",)] = t
    gain = {m: claims[("roli", "robust", m, "PGD-10")]["diffs"] for m in MODES}
    for m in ("lora", "bias"):
        t = paired(gain[m], gain["full"])
        tests.append((f"RoLI's gain on {LABEL[m]} − its gain on full FT, robust source", "PGD-10", t))
        claims[("gain", m)] = t
    md += [f"## Test predictions: the share of the {args.test_per_class * 5} test images in the most-predicted class "
           "(%, per seed)", "", "Near 100 %: the classifier collapsed onto one class; the 5 test classes are balanced, "
           "so an even spread is 20 % (`predictions.json` of each run, counted from its weights).", "",
           "| source | mode | init | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|---|" + "---|" * len(seeds)]
    for src in SOURCES:
        for mode in ("probe", *MODES):
            for init in (("random",) if mode == "probe" else ("random", "roli")):
                shares = [(D[(src, mode, init, s)]["pred"] or {}).get("largest_share") for s in seeds]
                md.append(f"| {src} | {LABEL[mode]} | {'—' if mode == 'probe' else ('RoLI' if init == 'roli' else 'RanLI')} | "
                          + " | ".join("n/a" if v is None else f"{100 * v:.0f}" for v in shares) + " |")
    md += [""]
    md += ["## Paired differences (percentage points; paired t-test over seeds, Welch p, seeds for 80 % power)", "",
           "| A − B | metric | per-seed Δ | mean Δ | paired p | Welch p | seeds needed |", "|---|---|---|---|---|---|---|"]
    for name, metric, t in tests:
        md.append(f"| {name} | {metric} | {', '.join(num(x, '+.2f') for x in t['diffs']) or 'n/a'} | "
                  f"{num(t['mean'], '+.2f')} | {fmt_p(t['p'])} | {fmt_p(t['welch'])} | {t['seeds_for_power'] or 'n/a'} |")
    md.append("")

    probe_keep = [ratio(a, b) for a, b in zip(val("robust", "probe", "random", "test_pgd10"),
                                              val("robust", "full", "random", "test_pgd10"))]
    md += ["## RoLI's claims on this benchmark (computed)", "",
           "Verdicts: **holds** = the paper's sign with paired p < 0.05; **fails** = the opposite sign with p < 0.05; "
           "**not shown** = otherwise.", "",
           "1. With the robust backbone RoLI beats RanLI: full FT "
           f"{verdict(claims[('roli', 'robust', 'full', 'PGD-10')])}; LoRA {verdict(claims[('roli', 'robust', 'lora', 'PGD-10')])}; "
           f"bias {verdict(claims[('roli', 'robust', 'bias', 'PGD-10')])} (PGD-10). More so for PEFT than for full FT: "
           f"LoRA {verdict(claims[('gain', 'lora')])}; bias {verdict(claims[('gain', 'bias')])}.",
           "2. PEFT from the standard backbone falls behind PEFT from the robust one (PGD-10, robust − standard): "
           f"LoRA RanLI {verdict(claims[('source', 'lora', 'random')])}, RoLI {verdict(claims[('source', 'lora', 'roli')])}; "
           f"bias RanLI {verdict(claims[('source', 'bias', 'random')])}, RoLI {verdict(claims[('source', 'bias', 'roli')])}. "
           f"For comparison, full FT RanLI: {verdict(claims[('source', 'full', 'random')])}.",
           "3. Adversarial linear probing alone keeps much of the source robustness: robust − standard source "
           f"{verdict(claims[('source', 'probe')])}. How much of full fine-tuning's robustness probing alone reaches "
           f"(not a claim, so no verdict): its PGD-10 is {ms(probe_keep, 1, 3)} of RanLI full FT's "
           f"({side(claims[('probe_vs_full',)])}).", ""]
    md += discussion(args.out_md)
    md += [f"Run directories: `{os.path.relpath(args.runs, ROOT)}/<source>/<mode>/<run>` (git-ignored); each finished "
           f"run's record is kept in `{os.path.relpath(args.archive, ROOT)}/`, from which a fresh clone restores them.", ""]
    write_text(args.out_md, "\n".join(md).rstrip() + "\n")
    atomic_write_json(os.path.splitext(args.out_md)[0] + ".json", {
        "seeds": seeds, "stages_seconds": st,
        "runs": {"|".join(map(str, k)): {"res": v["res"], "aa": v["aa"]} for k, v in D.items()},
        "tests": [{"name": n, "metric": m, **{k: t[k] for k in ("mean", "sd", "p", "welch", "wins", "n", "diffs")}}
                  for n, m, t in tests]})
    log(f"wrote {os.path.relpath(args.out_md, ROOT)}")


def side(t) -> str:
    """A − B described without a verdict: below / above (paired p < 0.05) or no difference shown, with the figures."""
    if t["mean"] is None:
        return "not measured yet"
    sig = t["p"] is not None and t["p"] < 0.05
    word = ("above" if t["mean"] > 0 else "below") if sig else "no difference shown"
    return f"{word}: Δ {num(t['mean'], '+.2f')} points, paired p {fmt_p(t['p'])}, {t['n']} seeds"


def ratio(a, b):
    return None if a is None or not b else a / b


# ------------------------------------------------------------------------------------------------ probe heads
HEAD = "probe_head.safetensors"  # a probing run's best head (kB): with the source weights it remakes model.safetensors


def keep_probe_head(run: str) -> None:
    """RUN/probe_head.safetensors: the head tensors and metadata of a finished probing run's model.safetensors, so
    that its archived record (no weights) still starts RoLI's stage 2 in a fresh clone (`probe_ready`)."""
    from safetensors.torch import save_file

    from autolora.models.export import read_model_file

    model, head = os.path.join(run, "model.safetensors"), os.path.join(run, HEAD)
    if os.path.basename(os.path.dirname(run)) != "probe" or os.path.exists(head) or not os.path.exists(model):
        return
    sd, meta = read_model_file(model)
    keys = tuple(k + "." for k in meta["head_keys"])
    tmp = f"{head}.{os.getpid()}.tmp"  # the two parts may both record it
    save_file({k: v for k, v in sd.items() if k.startswith(keys)}, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, head)


def probe_ready(run: str, weights: str) -> None:
    """Wait for the probing run RUN (the other part makes it), then make sure its model.safetensors is there: a
    run restored from the archive has none, so it is remade from the source `weights` and the recorded head."""
    from safetensors.torch import load_file, save_file

    from autolora.models import create_model
    from autolora.models.export import canonical_safetensors, read_model_file

    said = False
    while not os.path.exists(os.path.join(run, "results.json")):
        if not said:
            log(f"waiting for {os.path.relpath(run, ROOT)} (RoLI's stage 1; the other part makes it)")
            said = True
        time.sleep(30)
    model = os.path.join(run, "model.safetensors")
    if os.path.exists(model):
        return
    head, meta = read_model_file(os.path.join(run, HEAD))
    sd = create_model(meta["arch"], meta["num_classes"], "none", weights=weights).plain_state_dict()
    sd.update(head)
    tmp = f"{model}.{os.getpid()}.tmp"  # the two parts may both remake it
    save_file(sd, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    with open(tmp, "rb") as f:
        blob = canonical_safetensors(f.read())
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, model)
    assert set(load_file(model)) == set(sd)
    log(f"remade {os.path.relpath(model, ROOT)} from the source weights and the recorded head")


# ------------------------------------------------------------------------------------------------ main
def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(argv)
    args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    import torch

    torch.set_num_threads(args.threads)
    import transfer_cifar10 as T
    from autolora.workflows.compare import compare

    os.makedirs(args.runs, exist_ok=True)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    if "--only" in given:  # one part of `make bench-roli`, which runs both side by side
        i = given.index("--only")
        given = given[:i] + given[i + 2:]
    given = "".join(" " + a for a in given)
    command = (f"make bench-roli   # = side by side, 1 thread each:\n.venv/bin/python bench/roli_cifar10.py{given} --only "
               f"{PART_A}\n.venv/bin/python bench/roli_cifar10.py{given} --only {PART_B}")
    meta_of = lambda: {w: read_json(os.path.splitext(p)[0] + ".json") or {}  # noqa: E731
                       for w, p in (("robust", args.robust), ("standard", args.standard))}
    restore_runs(args.archive, args.runs, log)
    if args.report_only:
        write_results(args, meta_of(), Timings(os.path.join(args.runs, "timings.json"), record=False, log=log),
                      command)
        return
    signal.signal(signal.SIGTERM, _interrupt)
    timings = Timings(os.path.join(args.runs, "timings.json"), log=log)
    tdata = argparse.Namespace(runs=args.runs, data_dir=args.data_dir, test_per_class=args.test_per_class)
    try:
        with timings.stage("data"), exclusive(os.path.join(args.runs, "data.lock")):
            target = T.make_target_data(tdata)
        with timings.stage("sources"), exclusive(os.path.join(args.runs, "sources.lock")):
            if args.quick and selected(args, "robust"):  # the quick version trains its own robust source too
                source_weights(args, "robust", timings)
            if selected(args, "standard"):
                source_weights(args, "standard", timings)

        aa_args = argparse.Namespace(aa_limit=args.aa_limit, budget_minutes=args.budget_minutes, device=args.device,
                                     archive=args.archive)

        def done(run_dir):  # after each run trained here
            timings.made()
            keep_probe_head(run_dir)
            if not args.skip_aa:
                T.run_aa(aa_args, [run_dir], timings, nested=True)
            predictions(run_dir, timings)
            archive_run(args.archive, run_dir, timings, runs_root=args.runs)
            write_results(args, meta_of(), timings, command)

        with timings.stage("main"):
            for src, mode, root, cfg, specs, seeds, overrides in sweeps(args, target):
                if mode == "probe":
                    for d in (run_dir(root, "linear_probe", s) for s in seeds):
                        keep_probe_head(d)  # runs finished before the head was recorded: record and archive it
                        archive_run(args.archive, d, timings, runs_root=args.runs)
                    if not selected(args, src, mode):
                        continue
                elif not os.path.exists(os.path.join(run_dir(root, "madry_ft:roli", seeds[0]), "results.json")):
                    # RoLI's stage 1: the same seed's probing run, perhaps made by the other part
                    probe_ready(overrides["madry_ft:roli"]["probe_from"], cfg.weights)
                log(f"== {src} source, {LABEL[mode]}, seed(s) {','.join(map(str, seeds))} ==")
                compare(cfg, specs, seeds, root, overrides=overrides, report=False, quiet=True, on_run_done=done)
        if not args.skip_aa:  # finished runs still without AA
            with timings.stage("aa"):
                dirs = [v["dir"] for k, v in collect(args).items() if v["res"] and selected(args, k[0], k[1])]
                T.run_aa(aa_args, dirs, timings, lambda d: archive_run(args.archive, d, timings, runs_root=args.runs),
                         nested=True)
        with timings.stage("predictions"):  # finished runs still without their prediction counts
            for k, v in collect(args).items():
                if v["res"] and not v["pred"] and selected(args, k[0], k[1]):
                    predictions(v["dir"], timings)
                    archive_run(args.archive, v["dir"], timings, runs_root=args.runs)
        write_results(args, meta_of(), timings, command)
    finally:
        archive_timings(args.archive, timings)


if __name__ == "__main__":
    main()
