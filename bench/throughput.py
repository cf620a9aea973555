"""Training-step throughput of each robust fine-tuning method, against vanilla RFT and against its floor.

    python bench/throughput.py --arch tiny --input-size none --device cpu
    python bench/throughput.py --arch resnet18 --input-size 32 --device cpu
    python bench/throughput.py --arch resnet18 --input-size 224 --device cuda --batch-size 128   # on a GPU
    python bench/throughput.py --arch tiny --input-size none --device cpu --formats   # fp32 / bf16 / channels_last

What is timed, in one process and interleaved (every round times each item once, in a rotated order; a ratio
is the median over rounds of that round's ratio, so a slow stretch of a shared machine hits both sides):

- step[m]: the trainer's own epoch loop (`engine.loop.train_epoch`: attack, forwards, loss, backward, SGD step,
  statistics) over synthetic batches of method m, set up as `engine.loop.build_stage` does (`Method.prepare`:
  amp, channels_last, compile), with the data already in memory (no data loading);
- step[m]+sync (vanilla_rft, autolora): the same with the host syncs the loop made every step before issue 21
  (loss and correct counts read back after each step), to measure what reading statistics once per epoch saves;
- floor: the essential passes of a step alone, on the plain classifier at the same precision and memory
  format: k attack passes (eval-mode forward + backward to the input only, parameters not requiring grad; no
  random start, no projection) plus the train-mode forwards the loss needs and one backward to the parameters
  (vanilla_rft, autolora, twins: natural + adversarial forward; madry_ft: adversarial only). No optimiser step,
  no LoRa merge, no split batch norm, no statistics.

floor fraction = floor time / step time (1.0: the step costs nothing beyond its essential passes).
Targets (issue 7): autolora step <= 1.15 x vanilla_rft step; every method >= 0.8 of its floor on CPU.
A method is included only if it is registered in `autolora.methods.METHOD_REGISTRY` (the table says which
were missing). The last line printed is one JSON object (`autolora_over_vanilla`, `floor_fraction_autolora`,
per-method figures, settings). With `--save` (default) the table and the JSON go to bench/results/.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autolora.models.precision import is_conv_net, keep_first_conv_fp32  # noqa: E402
from autolora.config import TrainConfig  # noqa: E402
from autolora.methods import METHOD_REGISTRY, create_method  # noqa: E402
from autolora.models import create_model  # noqa: E402

METHODS = ("vanilla_rft", "autolora", "twins", "madry_ft")
# train-mode forwards the loss needs, besides the k attack passes
FLOOR_FORWARDS = {"vanilla_rft": 2, "autolora": 2, "twins": 2, "madry_ft": 1}
TARGET_AUTOLORA_OVER_VANILLA = 1.15
TARGET_FLOOR_FRACTION = 0.8


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def make_batches(n: int, batch: int, size: int, classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.rand(batch, 3, size, size, generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        if device.type == "cuda":  # as the trainer's loader would hand them over: pinned host memory
            x, y = x.pin_memory(), y.pin_memory()
        out.append((x, y))
    return out


class _NoLog:
    def __call__(self, msg):
        pass


# ------------------------------------------------------------------------------------------------
# the timed items
# ------------------------------------------------------------------------------------------------
class MethodStep:
    """`steps` training steps of a method through the trainer's epoch loop."""

    def __init__(self, name, base_model, args, device, amp, channels_last):
        from autolora.engine.loop import Context, make_optimizer, train_epoch
        from autolora.methods import resolve_config

        self.name = name
        self._train_epoch = train_epoch
        cfg = resolve_config(TrainConfig(method=name, arch=args.arch, input_size=str(args.input_size), batch_size=args.batch_size,
                          train_steps=args.attack_steps, device=device.type, amp=amp, channels_last=channels_last,
                          compile=args.compile, epochs=1))
        self.method = create_method(name, copy.deepcopy(base_model), cfg)
        self.method.prepare(device, amp=amp, channels_last=channels_last, compile=args.compile)
        if name == "autolora":  # mid-training weights of the three loss terms (the cost does not depend on them)
            self.method.lambda1, self.method.lambda2 = 0.5, 3.0
        self.opt = make_optimizer(self.method, cfg)
        self.ctx = Context(cfg, device, None, _NoLog(), False, amp=amp, channels_last=channels_last)
        self.device = device

    def __call__(self, batches):
        self._train_epoch(self.method, self.opt, self.ctx, batches, "bench", 0)
        sync(self.device)


class SyncedStep(MethodStep):
    """A method's step with the host syncs the trainer's loop made before issue 21: after every step it read the loss
    (`.item()`, `isfinite`) and the correct counts (`float(...)`) back to the host, so a GPU's queue ran dry each
    step. Timed beside `MethodStep` (which reads them once per epoch) to measure what that cost."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        step = self.method.training_step

        def synced(x, y):
            out = step(x, y)
            bool(torch.isfinite(out["loss"]).all())
            out["loss"].item()
            for k in ("correct_nat", "correct_adv"):
                if k in out:
                    float(out[k])
            return out

        self.method.training_step = synced


class Floor:
    """The essential passes of a step (see the module docstring), on a copy of the plain classifier."""

    def __init__(self, n_forwards, base_model, args, device, amp, channels_last):
        self.name = f"floor{n_forwards}"
        self.n_forwards = n_forwards
        self.k = args.attack_steps
        self.alpha = 2 / 255
        model = copy.deepcopy(base_model)
        if amp:
            keep_first_conv_fp32(model)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.params = list(model.parameters())
        self.model = torch.compile(model) if args.compile else model
        self.module = model
        self.device, self.amp, self.channels_last = device, amp, channels_last

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def step(self, x, y):
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for p in self.params:
            p.requires_grad_(False)
        self.module.eval()
        xa = x
        with self._autocast():
            for _ in range(self.k):
                xa = xa.detach().requires_grad_(True)
                loss = F.cross_entropy(self.model(xa).float(), y, reduction="sum")
                (g,) = torch.autograd.grad(loss, [xa])
                xa = xa.detach() + self.alpha * g.sign()
        for p in self.params:
            p.requires_grad_(True)
        self.module.train()
        with self._autocast():
            inputs = [x, xa.detach()] if self.n_forwards == 2 else [xa.detach()]
            loss = sum(F.cross_entropy(self.model(v).float(), y) for v in inputs)
        loss.backward()
        for p in self.params:
            p.grad = None
        return loss.detach()

    def __call__(self, batches):
        for x, y in batches:
            self.step(x, y)
        sync(self.device)


def time_once(item, batches) -> float:
    t0 = time.perf_counter()
    item(batches)
    return (time.perf_counter() - t0) / len(batches)


def run_rounds(items: dict, batches, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each item, one figure per round; the order rotates every round."""
    names = list(items)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(time_once(items[n], batches))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    return times


def med_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# main benchmark
# ------------------------------------------------------------------------------------------------
def build_base(args, device):
    torch.manual_seed(0)
    return create_model(args.arch, args.num_classes, str(args.input_size))


def calibrate_steps(args, items, batch_pool) -> int:
    """Timed steps per measurement: enough that one measurement of the slowest item takes ~`--target-s`."""
    if args.steps:
        return args.steps
    worst = 0.0
    for item in items.values():  # one step each, timed
        worst = max(worst, time_once(item, batch_pool[:1]))
    return max(1, min(len(batch_pool), math.ceil(args.target_s / max(worst, 1e-6))))


def bench_methods(args, device) -> dict:
    base = build_base(args, device)
    amp = device.type == "cuda" if args.amp is None else args.amp  # the trainer's defaults (resolve_runtime)
    cl = is_conv_net(base) if args.channels_last is None else args.channels_last
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    present = [m for m in wanted if m in METHOD_REGISTRY]
    missing = [m for m in wanted if m not in METHOD_REGISTRY]
    if "vanilla_rft" not in present:
        raise SystemExit("vanilla_rft must be benchmarked (it is the reference)")
    items, skipped = {}, {}
    for m in present:
        try:
            items[m] = MethodStep(m, base, args, device, amp, cl)
        except Exception as e:  # e.g. TWINS on a backbone without batch norm
            skipped[m] = f"{type(e).__name__}: {e}"
    floors_needed = sorted({FLOOR_FORWARDS.get(m, 2) for m in items})
    for n in floors_needed:
        items[f"floor{n}"] = Floor(n, base, args, device, amp, cl)
    synced = [m for m in ("vanilla_rft", "autolora") if m in items] if args.sync_compare else []
    for m in synced:
        items[f"{m}+sync"] = SyncedStep(m, base, args, device, amp, cl)

    pool = make_batches(args.max_steps, args.batch_size, args.image_size, args.num_classes, device)
    print(f"device: {device_name(device)}; load {load()}", flush=True)
    print(f"arch {args.arch}, input size {args.input_size}, images {args.image_size}px, batch {args.batch_size}, "
          f"PGD-{args.attack_steps}, amp {amp}, channels_last {cl}, compile {args.compile}", flush=True)
    for _ in range(args.warmup):
        for item in items.values():
            time_once(item, pool[:1])
    steps = calibrate_steps(args, items, pool)
    batches = pool[:steps]
    print(f"timing {steps} step(s) per measurement, {args.rounds} rounds", flush=True)
    load_before = load()
    times = run_rounds(items, batches, args.rounds)
    load_after = load()

    van = times["vanilla_rft"]
    per = {}
    for m in items:
        if m.startswith("floor") or m.endswith("+sync"):
            continue
        fl = times[f"floor{FLOOR_FORWARDS.get(m, 2)}"]
        t = statistics.median(times[m])
        per[m] = {
            "step_s": t, "images_per_s": args.batch_size / t, "over_vanilla": med_ratio(times[m], van),
            "floor_s": statistics.median(fl), "floor_fraction": med_ratio(fl, times[m]),
            "step_s_all": times[m], "floor_forwards": FLOOR_FORWARDS.get(m, 2),
        }
    floors = {n: {"step_s": statistics.median(times[n]), "step_s_all": times[n]} for n in items if n.startswith("floor")}
    res = {
        "arch": args.arch, "input_size": str(args.input_size), "image_size": args.image_size,
        "batch_size": args.batch_size, "attack_steps": args.attack_steps, "device": device.type,
        "device_name": device_name(device), "amp": amp, "channels_last": cl, "compile": args.compile,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "threads_note": args.threads_note,
        "rounds": args.rounds,
        "steps_per_measurement": steps,
        "load_before": load_before, "load_after": load_after,
        "methods": per, "floors": floors, "missing_methods": missing, "skipped_methods": skipped,
        "autolora_over_vanilla": per.get("autolora", {}).get("over_vanilla"),
        "floor_fraction_autolora": per.get("autolora", {}).get("floor_fraction"),
        "floor_fraction_min": min(v["floor_fraction"] for v in per.values()),
        "per_step_sync_over_none": {m: med_ratio(times[f"{m}+sync"], times[m]) for m in synced},
    }
    res["targets"] = {
        "autolora_over_vanilla<=1.15": (res["autolora_over_vanilla"] is not None
                                        and res["autolora_over_vanilla"] <= TARGET_AUTOLORA_OVER_VANILLA),
        "floor_fraction>=0.8": res["floor_fraction_min"] >= TARGET_FLOOR_FRACTION,
    }
    return res


def table(res: dict) -> str:
    lines = ["| method | s / step | images / s | step / vanilla_rft step | floor s / step | fraction of floor |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, v in res["methods"].items():
        lines.append(f"| {m} | {v['step_s']:.4f} | {v['images_per_s']:.1f} | {v['over_vanilla']:.3f} | "
                     f"{v['floor_s']:.4f} ({v['floor_forwards']} fwd) | {v['floor_fraction']:.3f} |")
    return "\n".join(lines)


def report(res: dict, argv: list[str]) -> str:
    t = res["targets"]
    out = [f"# Throughput: {res['arch']}, input size {res['input_size']}, {res['device']}", "",
           f"Command: `python bench/throughput.py {' '.join(argv)}`", "",
           f"- device: {res['device_name']}; torch {res['torch']}",
           f"- {res['threads_note']}",
           f"- batch {res['batch_size']} of {res['image_size']}px images, PGD-{res['attack_steps']} training attack, "
           f"amp {res['amp']}, channels_last {res['channels_last']}, compile {res['compile']}",
           f"- {res['rounds']} interleaved rounds of {res['steps_per_measurement']} step(s) per item; ratios are "
           f"medians of per-round ratios; load average before {res['load_before']}, after {res['load_after']}",
           ""]
    if res["missing_methods"]:
        out.append(f"- not registered in METHOD_REGISTRY, so not benchmarked: {', '.join(res['missing_methods'])}")
    for m, why in res["skipped_methods"].items():
        out.append(f"- {m} skipped: {why}")
    out += ["", table(res), "",
            f"- autolora / vanilla_rft step: **{res['autolora_over_vanilla']:.3f}** (target <= "
            f"{TARGET_AUTOLORA_OVER_VANILLA}: {'met' if t['autolora_over_vanilla<=1.15'] else 'NOT met'})"
            if res["autolora_over_vanilla"] is not None else "- autolora not benchmarked",
            f"- lowest fraction of floor: **{res['floor_fraction_min']:.3f}** (target >= {TARGET_FLOOR_FRACTION}: "
            f"{'met' if t['floor_fraction>=0.8'] else 'NOT met'})", "",
            *([f"- host syncs every step (the loop before issue 21) ÷ statistics read once per epoch (now), same run, "
               f"interleaved: " + ", ".join(f"{m} **{r:.3f}**" for m, r in res["per_step_sync_over_none"].items())
               + " (> 1: the per-step syncs cost time)", ""] if res.get("per_step_sync_over_none") else []),
            "Floor: k attack passes (eval-mode forward + input-only backward, parameters not requiring grad) plus the "
            "train-mode forwards the loss needs and one parameter backward, on the plain classifier; no optimiser step, "
            "no LoRa merge, no dual batch norm, no statistics.", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# precision / memory-format comparison (--formats)
# ------------------------------------------------------------------------------------------------
def bench_formats(args, device) -> dict:
    """vanilla_rft steps in fp32 / fp32+channels_last / bf16 / bf16+channels_last, interleaved."""
    base = build_base(args, device)
    variants = {"fp32": (False, False), "fp32_channels_last": (False, True), "bf16": (True, False),
                "bf16_channels_last": (True, True)}
    items = {k: MethodStep("vanilla_rft", base, args, device, amp, cl) for k, (amp, cl) in variants.items()}
    pool = make_batches(args.max_steps, args.batch_size, args.image_size, args.num_classes, device)
    print(f"device: {device_name(device)}; load {load()}", flush=True)
    for _ in range(args.warmup):
        for item in items.values():
            time_once(item, pool[:1])
    steps = calibrate_steps(args, items, pool)
    times = run_rounds(items, pool[:steps], args.rounds)
    ref = times["fp32"]
    per = {k: {"step_s": statistics.median(v), "images_per_s": args.batch_size / statistics.median(v),
               "speedup_over_fp32": med_ratio(ref, v), "step_s_all": v} for k, v in times.items()}
    best = max(per, key=lambda k: per[k]["speedup_over_fp32"])
    return {"mode": "formats", "arch": args.arch, "input_size": str(args.input_size), "image_size": args.image_size,
            "batch_size": args.batch_size, "attack_steps": args.attack_steps, "device": device.type,
            "device_name": device_name(device), "torch": torch.__version__, "threads_note": args.threads_note,
            "rounds": args.rounds, "steps_per_measurement": steps, "variants": per, "fastest": best,
            "bf16_speedup_over_fp32": per["bf16"]["speedup_over_fp32"]}


def report_formats(res: dict, argv: list[str]) -> str:
    lines = [f"# Precision and memory format: vanilla_rft step, {res['arch']}, input size {res['input_size']}, "
             f"{res['device']}", "", f"Command: `python bench/throughput.py {' '.join(argv)}`", "",
             f"- device: {res['device_name']}; torch {res['torch']}", f"- {res['threads_note']}",
             f"- batch {res['batch_size']} of {res['image_size']}px images, PGD-{res['attack_steps']}; "
             f"{res['rounds']} interleaved rounds of {res['steps_per_measurement']} step(s)", "",
             "| variant | s / step | images / s | speed-up over fp32 |", "|---|---:|---:|---:|"]
    for k, v in res["variants"].items():
        lines.append(f"| {k} | {v['step_s']:.4f} | {v['images_per_s']:.1f} | {v['speedup_over_fp32']:.3f} |")
    lines += ["", f"Fastest here: **{res['fastest']}** (bf16 runs the first conv in fp32; losses in fp32).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--input-size", default="none", help="the model's input size: N, native or none (as `train`)")
    ap.add_argument("--image-size", type=int, default=32, help="side of the synthetic images (CIFAR: 32)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 128 on CUDA, 32 on CPU")
    ap.add_argument("--attack-steps", type=int, default=10, help="k of the PGD-k training attack")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: the trainer's default for the device)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="steps per measurement (default: calibrated)")
    ap.add_argument("--max-steps", type=int, default=8, help="cap of the calibrated steps per measurement")
    ap.add_argument("--target-s", type=float, default=2.0, help="calibration: seconds per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per item (before calibration)")
    ap.add_argument("--threads", default="auto",
                    help="torch threads on CPU: N, or auto = torch's default, but 1 when the machine is already "
                         "oversubscribed (1-minute load average >= its CPU count): an OpenMP region then waits for "
                         "its slowest, descheduled thread and the timings measure the scheduler, not the code")
    ap.add_argument("--formats", action="store_true", help="compare fp32 / bf16 / channels_last instead")
    ap.add_argument("--sync-compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also time vanilla_rft and autolora with the per-step host syncs of the earlier loop")
    ap.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                    help="write bench/results/throughput_*.md and .json")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from autolora.utils.dist import resolve_device

    device = resolve_device(args.device)
    args.threads_note = f"torch threads {torch.get_num_threads()} (torch's default)"
    if args.threads != "auto":
        torch.set_num_threads(int(args.threads))
        args.threads_note = f"torch threads {args.threads} (--threads)"
    elif device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
        args.threads_note = (f"torch threads 1: the machine was oversubscribed (load average {load()} on "
                             f"{os.cpu_count()} CPUs), so `--threads auto` timed with one thread")
        print(args.threads_note + " (--threads N to force)")
        torch.set_num_threads(1)
    if device.type != "cuda":
        args.threads_note += ("; no GPU on this machine" if not torch.cuda.is_available() else "")
    if args.batch_size is None:
        args.batch_size = 128 if device.type == "cuda" else 32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.formats:
        res = bench_formats(args, device)
        text = report_formats(res, argv)
        stem = f"throughput_formats_{args.arch}_{args.input_size}_{device.type}{args.tag}"
    else:
        res = bench_methods(args, device)
        text = report(res, argv)
        stem = f"throughput_{args.arch}_{args.input_size}_{device.type}{args.tag}"
    print()
    print(text)
    if args.save:
        os.makedirs(args.out_dir, exist_ok=True)
        from autolora.utils.fileio import atomic_write_json, atomic_write_text

        atomic_write_text(os.path.join(args.out_dir, stem + ".md"), text)
        atomic_write_json(os.path.join(args.out_dir, stem + ".json"), res)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
