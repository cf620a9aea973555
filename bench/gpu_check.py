#!/usr/bin/env python
"""The GPU check: one command for a lent GPU machine (`bench/gpu_check.sh`; under 8 minutes on one H100).

1. smoke: every method trains 1 epoch on CUDA (tiny generated data, the trainer's CUDA defaults: bf16 autocast,
   channels_last, pinned-memory loading) and is evaluated; pass/fail and seconds per run;
2. throughput at ResNet-18/224, batch 128, PGD-10 (`bench/throughput.py`): every method's step against vanilla
   RFT's and its floor, AutoLoRa ÷ vanilla, the per-step host syncs of the earlier loop; fp32 vs bf16 and
   channels_last (`--formats`); torch.compile (vanilla RFT and AutoLoRa);
3. AutoAttack (standard, pyautoattack) images/s on a ResNet-18/224 with labels = its own predictions (so every
   image is attacked), and PGD-10 images/s on the same images.

Writes bench/results/gpu_check_<device>.md and .json (plus throughput_*_cuda* from step 2), and copies them to $OUT
when that is set (the device tool brings $OUT back). `--quick --device cpu` runs the same steps at toy sizes, to
check the script itself on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
SMOKE = [  # (name, extra train flags)
    ("vanilla_rft", ["--method", "vanilla_rft"]),
    ("autolora", ["--method", "autolora"]),
    ("twins", ["--method", "twins"]),
    ("madry_ft", ["--method", "madry_ft"]),
    ("madry_ft[lora]", ["--method", "madry_ft", "--peft", "lora"]),
    ("madry_ft[bias]", ["--method", "madry_ft", "--peft", "bias"]),
    ("linear_probe", ["--method", "linear_probe"]),
    ("roli", ["--method", "roli", "--probe-epochs", "1"]),
    ("autolora+roli", ["--method", "autolora", "--init", "roli", "--probe-epochs", "1"]),
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] gpu_check: {msg}", flush=True)


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [e.get("PYTHONPATH")])])
    return e


def make_data(root: str, classes=3, per_class=24, size=16):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 6)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                a = rng.random((size, size, 3)) * 110
                a[4:12, 4:12] = np.array([(80 * c) % 256, (140 * c + 60) % 256, 200]) * 0.85
                Image.fromarray(a.astype(np.uint8)).save(os.path.join(d, f"{i:03d}.png"))
    return root


def smoke(args) -> list[dict]:
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    data = make_data(os.path.join(tmp, "data"))
    common = ["--dataset", "imagefolder", "--data-dir", data, "--arch", "tiny", "--input-size", "none",
              "--batch-size", "16", "--epochs", "1", "--train-steps", "2", "--eval-steps", "2",
              "--eval-attacks", "clean,pgd,aa", "--device", args.device, "--quiet", "--workers", "2"]
    out = []
    for name, flags in SMOKE:
        run = os.path.join(tmp, name.replace("[", "_").replace("]", "").replace("+", "_"))
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "autolora", "train", *common, *flags, "--out", run],
                           capture_output=True, text=True, env=env(), timeout=300)
        rec = {"method": name, "rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        if p.returncode == 0:
            res = json.load(open(os.path.join(run, "results.json")))
            rec.update({k: res.get(k) for k in ("test_sa", "test_pgd2", "test_aa", "trainable_params")})
            cfg = open(os.path.join(run, "config.yaml")).read()
            rec["amp"] = "amp: true" in cfg
        else:
            rec["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        log(f"smoke {name}: {'ok' if p.returncode == 0 else 'FAILED'} ({rec['seconds']} s)")
        out.append(rec)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def throughput(args) -> list[dict]:
    size, batch = ("none", 16) if args.quick else ("224", 128)
    arch = "tiny" if args.quick else "resnet18"
    base = [sys.executable, os.path.join(ROOT, "bench", "throughput.py"), "--arch", arch, "--input-size", size,
            "--device", args.device, "--batch-size", str(batch), "--rounds", "2" if args.quick else "3",
            "--target-s", "0.5" if args.quick else "1.5", "--max-steps", "4", "--out-dir", args.results]
    runs = [("methods", []), ("formats", ["--formats"]),
            ("compile", ["--compile", "--methods", "vanilla_rft,autolora", "--no-sync-compare", "--tag", "_compile"])]
    out = []
    for name, extra in runs:
        t0 = time.perf_counter()
        p = subprocess.run([*base, *extra], capture_output=True, text=True, env=env(), timeout=400)
        rec = {"run": name, "rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        if p.returncode == 0 and lines:
            rec["result"] = json.loads(lines[-1])
        else:
            rec["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        log(f"throughput {name}: {'ok' if p.returncode == 0 else 'FAILED'} ({rec['seconds']} s)")
        out.append(rec)
    return out


def attack_speed(args) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    from autolora.eval import count_correct
    from autolora.models import create_model

    device = torch.device(args.device)
    arch, size, n = ("tiny", "none", 16) if args.quick else ("resnet18", "224", 128)
    torch.manual_seed(0)
    model = create_model(arch, 10, size).to(device).eval()
    x = torch.rand(n, 3, 32, 32)
    with torch.no_grad():
        y = torch.cat([model(x[i:i + 64].to(device)).argmax(1).cpu() for i in range(0, n, 64)])
    data = torch.utils.data.TensorDataset(x, y)
    out = {"arch": arch, "input_size": size, "images": n, "labels": "the model's own predictions (every image attacked)"}
    for name in ("pgd10", "aa"):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        c = count_correct(model, data, attacks=[name], eps=8 / 255, step_size=2 / 255, batch_size=n, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out[name] = {"seconds": round(dt, 2), "images_per_s": round(n / dt, 2), "robust": c[name][0]}
        log(f"{name}: {n / dt:.1f} images/s")
    return out


def markdown(res: dict) -> str:
    md = [f"# GPU check ({res['device_name']})", "", f"Command: `bash bench/gpu_check.sh`; {res['when']}; torch "
          f"{res['torch']}; total {res['seconds']:.0f} s.", "", "## Smoke: every method, 1 epoch on the device", "",
          "| method | result | s | amp | test SA | test PGD-2 | test AA |", "|---|---|---|---|---|---|---|"]
    f = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in res["smoke"]:
        md.append(f"| {r['method']} | {'ok' if r['rc'] == 0 else 'FAILED: ' + r.get('error', '')} | {r['seconds']} | "
                  f"{r.get('amp')} | {f(r.get('test_sa'))} | {f(r.get('test_pgd2'))} | {f(r.get('test_aa'))} |")
    md += ["", "## Training-step throughput (bench/throughput.py)", ""]
    for r in res["throughput"]:
        t = r.get("result") or {}
        if r["run"] == "methods" and t:
            md += [f"{t['arch']} @ {t['input_size']}, batch {t['batch_size']}, PGD-{t['attack_steps']}, amp {t['amp']}, "
                   f"channels_last {t['channels_last']}:", "", "| method | images/s | step ÷ vanilla | fraction of floor |",
                   "|---|---:|---:|---:|"]
            md += [f"| {m} | {v['images_per_s']:.1f} | {v['over_vanilla']:.3f} | {v['floor_fraction']:.3f} |"
                   for m, v in t["methods"].items()]
            md += ["", "Host syncs every step ÷ once per epoch: " + ", ".join(
                f"{m} {x:.3f}" for m, x in (t.get("per_step_sync_over_none") or {}).items()), ""]
        elif r["run"] == "formats" and t:
            md += ["Formats (vanilla RFT step):", "", "| format | images/s | speed-up over fp32 |", "|---|---:|---:|"]
            md += [f"| {k} | {v['images_per_s']:.1f} | {v['speedup_over_fp32']:.3f} |"
                   for k, v in t.get("variants", {}).items()]
            md.append("")
        elif r["run"] == "compile" and t:
            md += ["torch.compile: " + ", ".join(f"{m} {v['images_per_s']:.1f} images/s" for m, v in
                                                 t["methods"].items()), ""]
        if r["rc"] != 0:
            md += [f"{r['run']}: FAILED ({r.get('error')})", ""]
    a = res["attacks"]
    md += ["## Attack speed", "", f"{a['arch']} @ {a['input_size']}, {a['images']} images, L∞ 8/255, labels = "
           "the model's own predictions: " + ", ".join(f"{k} {a[k]['images_per_s']} images/s" for k in ("pgd10", "aa")
                                                      if k in a), ""]
    return "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes (check the script on a CPU; results go to a "
                                                         "temporary folder, not bench/results)")
    args = ap.parse_args(argv)
    args.results = tempfile.mkdtemp(prefix="gpu_check_results_") if args.quick else RESULTS
    import torch

    t0 = time.perf_counter()
    res = {"device": args.device, "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu (--quick check)"}
    res["smoke"] = smoke(args)
    res["throughput"] = throughput(args)
    res["attacks"] = attack_speed(args)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    tag = "gpu" if args.device.startswith("cuda") else "cpu_quick"
    sys.path.insert(0, ROOT)
    from autolora.utils.fileio import atomic_write_json, atomic_write_text

    files = [os.path.join(args.results, f"gpu_check_{tag}.md"), os.path.join(args.results, f"gpu_check_{tag}.json")]
    atomic_write_text(files[0], markdown(res) + "\n")
    atomic_write_json(files[1], res)
    if os.environ.get("OUT"):
        for p in files + [os.path.join(args.results, x) for x in os.listdir(args.results) if "_cuda" in x]:
            shutil.copy(p, os.environ["OUT"])
    log(f"done in {res['seconds']:.0f} s: {', '.join(files)}")
    return 0 if all(r["rc"] == 0 for r in res["smoke"] + res["throughput"]) else 1


if __name__ == "__main__":
    sys.exit(main())
