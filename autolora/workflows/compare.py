"""Sweeps: methods × seeds (× initial LR, the paper's Table 6) from one call, then the report.

    from autolora.workflows.compare import compare
    runs = compare(TrainConfig(dataset="imagefolder", data_dir="data", arch="small", epochs=10),
                   methods=["vanilla_rft", "twins", "autolora", "autolora:roli"], seeds=[0, 1, 2],
                   out_root="runs/cmp", lrs=None)

Each run lives in OUT_ROOT/<method>[-<init>]-s<seed>[-lr<lr>] (a run directory of `autolora.engine.loop.train`):
- results.json there: finished, skipped (its config must match the sweep's; otherwise an error names it);
- config.yaml but no results.json: interrupted, resumed from its last checkpoint (`train(..., resume=True)`);
- FAILED.json there: the run failed before (e.g. diverged at a large LR); skipped unless `retry_failed`;
- missing or empty: trained from scratch.
A run that fails is recorded in its FAILED.json and the sweep goes on with the others.

Method specs: a method name (`vanilla_rft`, `twins`, `autolora`, ...) optionally with an init after a colon
(`autolora:roli` = RoLI's adversarial linear probing, then AutoLoRa; `roli` alone is RoLI∘Madry-FT).
`overrides` maps a spec to TrainConfig fields for that method only (e.g. {"autolora": {"lr_schedule": "step"}}).

At the end OUT_ROOT/compare.json lists every run and its figures, and the report (`autolora.workflows.report`) is
written into OUT_ROOT.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback

from . import report as R
from . import runs as S
from ..config import TrainConfig, load_yaml
from ..errors import UserError, suggest

FAILED = "FAILED.json"
# fields that do not change what a run computes: ignored when checking an existing run dir against the sweep
_IGNORED = {"progress", "workers"}
# None / "auto" in the sweep: whatever the run resolved (eps, step_size: from the data's resolution)
_RUNTIME_AUTO = {"amp", "channels_last", "device", "eps", "step_size"}


def parse_spec(spec: str) -> tuple[str, str]:
    """"autolora" -> ("autolora", "random"); "autolora:roli" (or "roli+autolora", "roli∘autolora") ->
    ("autolora", "roli")."""
    s = str(spec).strip()
    for sep in ("∘", "+"):
        if sep in s:
            init, method = s.split(sep, 1)
            s = f"{method}:{init}"
    method, _, init = s.partition(":")
    method, init = method.strip(), (init.strip() or "random")
    from ..methods import method_names

    names = method_names()
    if method not in names:
        raise UserError(f"unknown method '{method}' in --methods{suggest(method, names)}: choose among "
                        f"{', '.join(names)} (optionally METHOD:roli)")
    if init not in ("random", "roli"):
        raise UserError(f"unknown init '{init}' in --methods spec '{spec}': use METHOD or METHOD:roli")
    return method, init


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def run_name(method: str, init: str, seed: int, lr: float | None = None) -> str:
    """`<method>[-<init>]-s<seed>[-lr<lr>]` (init only when not "random")."""
    return f"{method}{'' if init == 'random' else '-' + init}-s{seed}" + ("" if lr is None else f"-lr{fmt_lr(lr)}")


@dataclasses.dataclass
class PlannedRun:
    name: str
    spec: str
    method: str
    init: str
    seed: int
    lr: float | None
    cfg: TrainConfig


def plan(base_cfg: TrainConfig, methods, seeds, lrs=None, overrides: dict | None = None) -> list[PlannedRun]:
    """The runs of a sweep, seed-major (all methods of seed 0 first), so a partial sweep is paired."""
    if not methods:
        raise UserError("--methods is empty: name at least one method, e.g. vanilla_rft,autolora")
    if not seeds:
        raise UserError("--seeds is empty: give at least one seed, e.g. 0,1,2")
    overrides = dict(overrides or {})
    specs = [str(m) for m in methods]
    parsed = {s: parse_spec(s) for s in specs}
    for key in overrides:
        if key not in parsed:
            raise UserError(f"overrides for '{key}', which is not among the methods {', '.join(specs)}")
    if len(set(parsed.values())) != len(parsed):
        raise UserError(f"--methods names a method twice: {', '.join(specs)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise UserError(f"--seeds: {s!r} is not a non-negative integer")
    if lrs is not None:
        for lr in lrs:
            if not (isinstance(lr, (int, float)) and lr > 0):
                raise UserError(f"--lrs: {lr!r} is not a positive learning rate")
    from ..methods import method_specific_options, readers, used_options

    # a method-specific flag of the sweep goes to the runs whose method reads it (e.g. --rank to autolora only)
    defaults = TrainConfig()
    specific = {k for k in method_specific_options() if getattr(base_cfg, k) != getattr(defaults, k)}
    runs, used_anywhere = [], set()
    for seed in seeds:
        for spec in specs:
            method, init = parsed[spec]
            for lr in (lrs if lrs else [None]):
                fields = {**overrides.get(spec, {}), "method": method, "init": init, "seed": int(seed)}
                if lr is not None:
                    fields["lr"] = float(lr)
                try:
                    cfg = dataclasses.replace(base_cfg, **fields)
                except TypeError as e:
                    raise UserError(f"overrides for '{spec}': {e}") from None
                used = used_options(cfg)
                used_anywhere |= used & specific
                reset = {k: getattr(defaults, k) for k in specific - used if k not in overrides.get(spec, {})}
                cfg = dataclasses.replace(cfg, **reset)
                runs.append(PlannedRun(run_name(method, init, seed, lr), spec, method, init, int(seed), lr, cfg))
    unused = sorted(specific - used_anywhere)
    if unused:
        k = unused[0]
        raise UserError(f"--{k.replace('_', '-')} is read by no method of the sweep ({', '.join(specs)}); it applies "
                        f"to {', '.join(readers(k))}")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError("two runs of the sweep would share a directory name; check --methods/--seeds/--lrs")
    return runs


def config_mismatch(wanted: TrainConfig, saved: dict, resolution: str | None = None) -> list[str]:
    """Fields where a run directory's saved config differs from the sweep's (resolved) config, among those that
    change what the run computes (a method-specific flag its method does not read does not). The sweep's eps and step
    left to their defaults are the norm's for the run's data `resolution` (its split.json; unknown: not compared)."""
    from ..attacks.registry import parse_attacks
    from ..config import migrate_saved
    from ..methods import method_specific_options, resolve_config, used_options

    resolved = resolve_config(wanted)
    if resolution is not None:
        resolved = resolved.resolve_budget(resolution)
    want = resolved.to_dict()
    saved = migrate_saved(saved)
    unread = method_specific_options() - used_options(resolved)
    diffs = []
    for k, v in want.items():
        if k in _IGNORED or k in unread:
            continue
        if k in _RUNTIME_AUTO and v in (None, "auto"):
            continue
        have = saved.get(k)
        if k == "eval_attacks":  # the same attacks however spelled (pgd = pgd<eval_steps>)
            try:
                have = parse_attacks(have, saved.get("eval_steps", 10))
                v = parse_attacks(v, want["eval_steps"])
            except UserError:
                pass
        if have != v:
            diffs.append(f"{k}: run has {saved.get(k)!r}, sweep wants {want[k]!r}")
    return diffs


def run_status(path: str, cfg: TrainConfig) -> str:
    """'done' | 'failed' | 'resume' | 'new' for the run directory `path` of a sweep whose config is `cfg`;
    a directory made with another config -> UserError naming it and the first differences."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path} is a file, not a run directory: move it away")
    if not os.path.isdir(path) or not os.listdir(path):
        return "new"
    cfg_file = os.path.join(path, "config.yaml")
    if not os.path.exists(cfg_file):
        leftovers = set(os.listdir(path)) - {"checkpoints", "train.log", "split.json", "metrics.jsonl", FAILED, ".lock"}
        if leftovers:
            raise UserError(f"{path} exists and is not a run directory of this sweep ({', '.join(sorted(leftovers))} "
                            "there): move it away or choose another --out-root")
        return "failed" if os.path.exists(os.path.join(path, FAILED)) else "new"
    split = S.read_json(os.path.join(path, "split.json")) or {}
    diffs = config_mismatch(cfg, load_yaml(cfg_file), split.get("resolution"))
    if diffs:
        raise UserError(f"run directory {path} was made with a different config ({'; '.join(diffs[:3])}"
                        f"{' ...' if len(diffs) > 3 else ''}): move it away, or use another --out-root")
    if os.path.exists(os.path.join(path, "results.json")):
        return "done"
    if os.path.exists(os.path.join(path, FAILED)):
        return "failed"
    return "resume"


def compare(base_cfg: TrainConfig, methods, seeds, out_root: str, lrs=None, overrides: dict | None = None, *,
            report: bool = True, retry_failed: bool = False, quiet: bool = False, log=None,
            on_run_done=None) -> list[str]:
    """Train every (method, seed[, lr]) run of the sweep into OUT_ROOT (skipping finished runs, resuming
    interrupted ones), write OUT_ROOT/compare.json and the report; returns the run directories (in plan order).

    A failing run (e.g. diverged) is recorded in RUN/FAILED.json and the others still run; with
    `retry_failed` such runs are started again from scratch. `on_run_done(run_dir)` is called after each run
    that finished in this call (e.g. to refresh a results file as the sweep goes)."""
    log = log or (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] compare: {msg}", flush=True))
    runs = plan(base_cfg, methods, seeds, lrs, overrides)
    from ..utils.fileio import check_writable

    check_writable(out_root, "--out-root")
    os.makedirs(out_root, exist_ok=True)
    from ..utils.lock import lock_dir

    with lock_dir(out_root, f"sweep directory {out_root}"):
        return _compare(runs, out_root, report=report, retry_failed=retry_failed, quiet=quiet, log=log,
                        on_run_done=on_run_done)


def _compare(runs, out_root, *, report, retry_failed, quiet, log, on_run_done) -> list[str]:
    from ..engine.loop import TrainingDiverged, resume, train
    from ..utils.lock import Locked

    status = {r.name: run_status(os.path.join(out_root, r.name), r.cfg) for r in runs}  # all checked up front
    todo = [r for r in runs if status[r.name] in ("new", "resume") or (retry_failed and status[r.name] == "failed")]
    log(f"{len(runs)} runs in {out_root}: {sum(s == 'done' for s in status.values())} finished, "
        f"{sum(s == 'resume' for s in status.values())} to resume, {sum(s == 'new' for s in status.values())} new, "
        f"{sum(s == 'failed' for s in status.values())} failed before" + (" (retried)" if retry_failed else ""))
    t_sweep = time.perf_counter()
    for i, r in enumerate(todo):
        path = os.path.join(out_root, r.name)
        st = status[r.name]
        t0 = time.perf_counter()
        log(f"[{i + 1}/{len(todo)}] {'resuming' if st == 'resume' else 'training'} {r.name}")
        try:
            if st == "failed":
                fail = os.path.join(path, FAILED)
                os.unlink(fail)
                st = "resume" if os.path.exists(os.path.join(path, "config.yaml")) else "new"
                if st == "resume":  # a retried failure starts over: its checkpoint is what failed
                    train(r.cfg, path, overwrite=True, quiet=quiet)
                    st = "done"
            if st == "resume":
                resume(path, quiet=quiet)
            elif st == "new":
                train(r.cfg, path, overwrite=os.path.isdir(path) and bool(os.listdir(path)), quiet=quiet)
            status[r.name] = "done"
            log(f"{r.name} finished in {time.perf_counter() - t0:.0f}s")
        except (KeyboardInterrupt, Locked):
            raise  # a run another process is training is not a failure of this sweep's
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            if not os.path.exists(os.path.join(path, "config.yaml")) and not isinstance(e, TrainingDiverged):
                raise  # failed before the run started (bad data, weights, options): every run would; stop here
            status[r.name] = "failed"
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, FAILED), "w") as f:
                json.dump({"error": str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__,
                           "type": type(e).__name__, "diverged": isinstance(e, TrainingDiverged),
                           "config": r.cfg.to_dict(), "traceback": traceback.format_exc()}, f, indent=1)
            log(f"{r.name} FAILED ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                f"recorded in {os.path.join(path, FAILED)}; continuing")
            continue
        if on_run_done is not None:
            on_run_done(path)
    if todo:
        log(f"sweep done in {time.perf_counter() - t_sweep:.0f}s")
    write_summary(runs, out_root, status)
    if report:
        write_sweep_report(out_root, runs, log)
    return [os.path.join(out_root, r.name) for r in runs]


def write_summary(runs: list[PlannedRun], out_root: str, status: dict) -> str:
    """OUT_ROOT/compare.json: one entry per run (name, method, init, seed, lr, status, results)."""
    from ..utils.fileio import atomic_write_json

    rows = []
    for r in runs:
        path = os.path.join(out_root, r.name)
        res = S.read_json(os.path.join(path, "results.json")) if status.get(r.name) == "done" else None
        err = None
        if status.get(r.name) == "failed" and os.path.exists(os.path.join(path, FAILED)):
            err = S.read_json(os.path.join(path, FAILED)).get("error")
        rows.append({"name": r.name, "spec": r.spec, "method": r.method, "init": r.init, "seed": r.seed,
                     "lr": r.lr, "status": status.get(r.name),
                     "error": err, "results": res})
    out = os.path.join(out_root, "compare.json")
    atomic_write_json(out, {"runs": rows})
    return out


def lr_table(runs: list[PlannedRun], out_root: str) -> str:
    """Markdown: test accuracy per (method, initial LR), mean ± std over seeds, the range across LRs, and the runs
    that diverged (FAILED.json) at each LR."""
    by: dict[tuple, list[dict]] = {}
    failed: dict[tuple, int] = {}
    for r in runs:
        f = os.path.join(out_root, r.name, "results.json")
        if os.path.exists(f):
            by.setdefault((r.spec, r.lr), []).append(S.read_json(f))
        elif os.path.exists(os.path.join(out_root, r.name, FAILED)):
            failed[(r.spec, r.lr)] = failed.get((r.spec, r.lr), 0) + 1
    if not by and not failed:
        return ""
    keys = [k for k in ("test_sa",) + tuple(sorted({k for res in by.values() for x in res for k in x
                                                    if k.startswith("test_pgd")})) + ("test_aa",)]
    ra = next((k for k in keys if k.startswith("test_pgd")), None)

    def ms(vals):
        vals = [v for v in vals if v is not None]
        m, s = S.mean_std(vals)
        return m, S.pct(m, s)

    label = {k: S.metric_label(k) for k in keys}
    lines = ["## Initial-LR sensitivity", "",
             f"Test accuracy (%) per method and initial LR (mean ± std over the n seeds); range = max − min of the "
             f"{label.get(ra, 'PGD')} means across LRs (smaller: less sensitive to the initial LR); diverged = runs "
             "stopped by a non-finite loss (FAILED.json), not in the means.", "",
             "| method | LR | n | diverged | " + " | ".join(label[k] for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    specs = list(dict.fromkeys(r.spec for r in runs))
    ranges = []
    for spec in specs:
        means = []
        for lr in sorted({r.lr for r in runs if r.spec == spec}, key=lambda v: v or 0):
            res = by.get((spec, lr), [])
            cells = [ms([x.get(k) for x in res]) for k in keys]
            if ra is not None and cells[keys.index(ra)][0] is not None:
                means.append(cells[keys.index(ra)][0])
            lines.append(f"| {spec} | {fmt_lr(lr) if lr is not None else 'preset'} | {len(res)} | "
                         f"{failed.get((spec, lr), 0)} | " + " | ".join(c[1] for c in cells) + " |")
        if len(means) > 1:
            ranges.append(f"- {spec}: {label[ra]} range across LRs {100 * (max(means) - min(means)):.2f} points")
    return "\n".join(lines + [""] + ranges)


def write_sweep_report(out_root: str, runs: list[PlannedRun] | None = None, log=print, title: str | None = None):
    """OUT_ROOT/report/report.md via `autolora.workflows.report.write_report` (grouped mean ± std table, Welch t-tests,
    per-run plots), plus a per-LR table when the sweep has initial LRs. Returns its result dict (or None)."""
    dirs = [os.path.join(out_root, r.name) for r in runs] if runs is not None else [out_root]
    dirs = [d for d in dirs if os.path.exists(os.path.join(d, "results.json")) or os.path.exists(os.path.join(d, "metrics.jsonl"))]
    if not dirs:
        log("no runs to report")
        return None
    extra = []
    if runs is not None and any(r.lr is not None for r in runs):
        extra.append(lr_table(runs, out_root))
    try:
        out = R.write_report(dirs, os.path.join(out_root, "report"), title=title or f"autolora compare: {out_root}",
                             extra_sections=[e for e in extra if e])
    except UserError as e:
        log(f"report not written: {e}")
        return None
    log(f"report written: {out['report']}")
    return out
