"""`autolora report RUN_DIR...`: plots and tables of finished (or running) runs, as a Markdown report.

Per run: one PNG of its curves over epochs (LR with the automated LR's halvings/roll-backs, λ1 and λ2, training
SA (and the LoRa branch's), validation SA and PGD-10, gradient similarity when logged, training loss), drawn
from RUN_DIR/metrics.jsonl. Across runs, grouped by (dataset, arch, method): mean ± sample std over seeds of
the test SA / PGD-10 / AutoAttack accuracy of each run's best epoch (RUN_DIR/results.json), and two-sided
Welch t-tests (scipy.stats.ttest_ind, equal_var=False) between every pair of methods of the same dataset and
arch, as in the AutoLoRa paper's Tables 1 and 7 (n/a with fewer than 2 seeds in a group).

OUT/report.md    the tables and the plots (relative links: readable on GitHub)
OUT/report.json  the same numbers, machine-readable
OUT/plots/       <run>.png per run, curves.png (validation curves of all runs)

Python API: `find_runs`, `load_run`, `summarize`, `welch_tests`, `plot_run`, `write_report`; helpers shared
with `autolora.workflows.compare` and the benchmarks: `read_json`, `read_rows`, `mean_std`, `pct`, `welch_p`, `fmt_p`.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

from ..errors import UserError, require

METRICS = (("test_sa", "SA"), ("test_pgd10", "PGD-10"), ("test_aa", "AA"))
ALPHA = 0.05  # p-values below this are bold in the report


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Run:
    path: str
    name: str
    config: dict
    rows: list
    results: dict | None
    group: tuple = field(default=())

    @property
    def method(self) -> str:
        return self.group[2] if self.group else "?"

    @property
    def seed(self):
        return (self.results or {}).get("seed", self.config.get("seed"))


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("metrics.jsonl", "results.json"))


def find_runs(paths, max_depth: int = 3) -> tuple[list[str], list[str]]:
    """(run directories, skipped arguments): each argument is a run directory (has metrics.jsonl or results.json)
    or a folder holding run directories up to `max_depth` levels down (e.g. `runs/demo`)."""
    found, skipped = [], []
    for p in paths:
        p = os.path.normpath(str(p))
        if not os.path.exists(p):
            raise UserError(f"{p} does not exist: pass run directories written by `autolora train`")
        if is_run_dir(p):
            found.append(p)
            continue
        inner = []
        if os.path.isdir(p):
            base = p.rstrip(os.sep).count(os.sep)
            for dirpath, dirnames, _ in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "checkpoints", "plots")))
                if dirpath != p and is_run_dir(dirpath):
                    inner.append(dirpath)
                    dirnames[:] = []
                elif dirpath.count(os.sep) - base >= max_depth:
                    dirnames[:] = []
        (found.extend(inner) if inner else skipped.append(p))
    seen, out = set(), []
    for p in found:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out, skipped


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): the run directory is damaged") from None


def read_rows(path: str) -> list:
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line being written right now by a running job: stop there
                break
    return rows


def method_label(method: str, cfg: dict) -> str:
    label = method
    if method == "madry_ft" and cfg.get("peft") not in (None, "none"):
        label += f"[{cfg['peft']}]"
    if cfg.get("init") == "roli" and method != "linear_probe":
        label += "+roli"
    return label


def eps_label(eps) -> str:
    """8/255 for eps = 8/255 (within rounding), else the number; "?" when unknown."""
    if eps is None:
        return "?"
    k = float(eps) * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-3 and round(k) > 0 else f"{float(eps):.4g}"


def load_run(path: str, name: str | None = None) -> Run:
    """A run directory's config.yaml, metrics.jsonl rows and results.json (None while it runs)."""
    from ..config import load_yaml

    cfg = load_yaml(os.path.join(path, "config.yaml")) if os.path.isfile(os.path.join(path, "config.yaml")) else {}
    results = read_json(os.path.join(path, "results.json"))
    rows = read_rows(os.path.join(path, "metrics.jsonl"))
    r = results or {}
    method = r.get("method") or cfg.get("method") or "?"
    group = (r.get("dataset") or cfg.get("dataset") or "?", r.get("arch") or cfg.get("arch") or "?",
             method_label(method, {**cfg, **{k: r[k] for k in ("init",) if k in r}}), eps_label(cfg.get("eps")))
    return Run(path, name or os.path.basename(os.path.normpath(path)), cfg, rows, results, group)


# config fields that split a method's runs into separate rows when they differ (e.g. an LR sweep); seeds do not
VARIANT_KEYS = ("lr", "lr_schedule", "epochs", "batch_size", "weight_decay", "weights", "train_steps", "rank",
                "alpha", "lambda2_max", "beta", "gamma", "classes", "input_size", "limit_train")


def refine_groups(runs: list[Run]) -> None:
    """Append `key=value` to the method label of runs whose group holds runs that differ in a VARIANT_KEYS field."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    for key, members in groups.items():
        if len(members) < 2:
            continue
        differ = [k for k in VARIANT_KEYS if len({json.dumps(m.config.get(k), sort_keys=True) for m in members}) > 1]
        for m in members:
            if differ:
                tag = ", ".join(f"{k}={_short(m.config.get(k))}" for k in differ)
                m.group = (key[0], key[1], f"{key[2]} ({tag})", key[3])


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and os.sep in v:
        return os.path.basename(v)
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def _unique_names(paths: list[str]) -> list[str]:
    """Short unique names: basenames, or paths relative to the common parent when basenames collide."""
    base = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(base)) == len(base):
        names = base
    else:
        common = os.path.commonpath([os.path.abspath(p) for p in paths])
        names = [os.path.relpath(os.path.abspath(p), common) for p in paths]
    return [re.sub(r"[^A-Za-z0-9_.+=-]+", "_", n).strip("_") or "run" for n in names]


# ------------------------------------------------------------------------------------------------ stats
def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample std); std None for one value, both None for none."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarize(runs: list[Run]) -> list[dict]:
    """One row per (dataset, arch, method) group of finished runs: n, seeds, mean/std/values per metric."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.results is not None:
            groups.setdefault(r.group, []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[3])):
        members = sorted(groups[key], key=lambda r: (str(r.seed), r.name))
        row = {"dataset": key[0], "arch": key[1], "method": key[2], "eps": key[3], "n": len(members),
               "seeds": [r.seed for r in members], "runs": [r.name for r in members]}
        for k, _ in METRICS:
            vals = [float(r.results[k]) for r in members if r.results.get(k) is not None]
            m, s = mean_std(vals)
            row[k] = {"mean": m, "std": s, "values": vals}
        params = {r.results.get("trainable_params") for r in members} - {None}
        row["trainable_params"] = params.pop() if len(params) == 1 else None
        out.append(row)
    return out


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value, None when a group has fewer than 2 values or both have zero variance
    (the test is undefined; identical constant groups give no evidence of a difference)."""
    if len(a) < 2 or len(b) < 2:
        return None
    ttest_ind = require("scipy.stats", "report", "the Welch t-tests of a report").ttest_ind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p


def welch_tests(summary: list[dict]) -> list[dict]:
    """Every pair of methods of the same dataset, arch and eps: mean difference and Welch p-value per metric."""
    out = []
    by_setting: dict[tuple, list[dict]] = {}
    for row in summary:
        by_setting.setdefault((row["dataset"], row["arch"], row["eps"]), []).append(row)
    for (dataset, arch, eps), rows in by_setting.items():
        for a, b in itertools.combinations(rows, 2):
            test = {"dataset": dataset, "arch": arch, "eps": eps, "a": a["method"], "b": b["method"], "n_a": a["n"], "n_b": b["n"]}
            for k, _ in METRICS:
                va, vb = a[k]["values"], b[k]["values"]
                diff = (a[k]["mean"] - b[k]["mean"]) if va and vb else None
                test[k] = {"diff": diff, "p": welch_p(va, vb)}
            out.append(test)
    return out


# ------------------------------------------------------------------------------------------------ plots
def _matplotlib():
    matplotlib = require("matplotlib", "report", "plotting a report")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rows, key):
    xs = [i for i, r in enumerate(rows) if r.get(key) is not None]
    return xs, [float(rows[i][key]) for i in xs]


def _stage_marks(ax, rows):
    for i in range(1, len(rows)):
        if rows[i].get("stage") != rows[i - 1].get("stage"):
            ax.axvline(i - 0.5, color="0.6", ls="--", lw=0.8)


def plot_run(run: Run, path: str) -> str | None:
    """A PNG of the run's curves over epochs (only the panels it has data for); None without metrics."""
    rows = run.rows
    if not rows:
        return None
    plt = _matplotlib()
    panels = []
    if any(r.get("lr") is not None for r in rows):
        panels.append("lr")
    if any(r.get("lambda1") is not None or r.get("lambda2") is not None for r in rows):
        panels.append("lambda")
    panels.append("train")
    panels.append("val")
    if any(r.get("grad_sim") is not None for r in rows):
        panels.append("gs")
    if any(r.get("train_loss") is not None for r in rows):
        panels.append("loss")
    ncols = 3 if len(panels) > 4 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False)
    multi_stage = len({r.get("stage") for r in rows}) > 1
    xlabel = "epoch (all stages; dashed: next stage)" if multi_stage else "epoch"
    ticks = list(range(len(rows)))
    ticklabels = [str(r.get("epoch", i)) for i, r in enumerate(rows)]
    for ax, panel in zip(axes.flat, panels):
        if panel == "lr":
            xs, ys = _series(rows, "lr")
            ax.plot(xs, ys, marker="o", ms=3, color="C0", label="LR")
            halved = [i for i, r in enumerate(rows) if "halved" in str(r.get("lr_event") or "")]
            if halved:
                ax.plot(halved, [rows[i]["lr"] for i in halved], "x", color="C3", ms=8, mew=2,
                        label="halved → roll-back")
            if ys and min(ys) > 0 and max(ys) / min(ys) > 5:
                ax.set_yscale("log")
            ax.set_title("learning rate")
        elif panel == "lambda":  # λ1 in [0, 1] on the left axis, λ2 in [0, λ2max] on the right
            xs, ys = _series(rows, "lambda1")
            ax.plot(xs, ys, marker="o", ms=3, color="C0", label="λ1 (left)")
            ax.set_ylabel("λ1", color="C0")
            xs2, ys2 = _series(rows, "lambda2")
            if xs2:
                ax2 = ax.twinx()
                ax2.plot(xs2, ys2, marker="s", ms=3, color="C1", label="λ2 (right)")
                ax2.set_ylabel("λ2", color="C1")
                ax.plot([], [], marker="s", ms=3, color="C1", label="λ2 (right)")  # one legend for both axes
            ax.set_title("loss scalars λ1, λ2")
        elif panel == "train":
            for key, name, c in (("train_sa", "train SA", "C0"), ("lora_train_sa", "LoRa branch train SA", "C2"),
                                 ("train_ra", "train adversarial acc.", "C3")):
                xs, ys = _series(rows, key)
                if xs:
                    ax.plot(xs, ys, marker="o", ms=3, color=c, label=name)
            ax.set_title("training accuracy")
        elif panel == "val":
            for key, name, c in (("val_sa", "val SA", "C0"), ("val_pgd10", "val PGD-10", "C3")):
                xs, ys = _series(rows, key)
                if xs:
                    ax.plot(xs, ys, marker="o", ms=3, color=c, label=name)
            best = (run.results or {}).get("best_epoch")
            if best is not None:
                last_stage = rows[-1].get("stage")
                idx = [i for i, r in enumerate(rows) if r.get("epoch") == best and r.get("stage") == last_stage]
                if idx:
                    ax.axvline(idx[0], color="C3", ls=":", lw=1, label=f"best epoch {best}")
            ax.set_title("validation accuracy")
        elif panel == "gs":
            xs, ys = _series(rows, "grad_sim")
            ax.plot(xs, ys, marker="o", ms=3, color="C4", label="GS")
            ax.axhline(0, color="0.7", lw=0.8)
            mode = str(run.config.get("gradsim_mode") or "batch").replace("_", "-")
            ax.set_title(f"gradient similarity (θ1, {mode} form)")
        elif panel == "loss":
            xs, ys = _series(rows, "train_loss")
            ax.plot(xs, ys, marker="o", ms=3, color="C5", label="train loss")
            ax.set_title("training loss")
        _stage_marks(ax, rows)
        step = max(1, len(rows) // 12)
        ax.set_xticks(ticks[::step])
        ax.set_xticklabels(ticklabels[::step])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{run.name}: {run.method} on {run.group[0]} ({run.group[1]}, eps {run.group[3]}, seed {run.seed})",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curves(runs: list[Run], path: str) -> str | None:
    """Validation SA and PGD-10 of every run over epochs, one colour per method."""
    runs = [r for r in runs if r.rows]
    if not runs:
        return None
    plt = _matplotlib()
    methods = sorted({r.method for r in runs})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, title in ((axes[0], "val_sa", "validation SA"), (axes[1], "val_pgd10", "validation PGD-10")):
        used = set()
        for r in runs:
            xs, ys = _series(r.rows, key)
            if not xs:
                continue
            label = r.method if r.method not in used else None
            used.add(r.method)
            ax.plot(xs, ys, marker="o", ms=2.5, lw=1.2, color=colours[r.method], alpha=0.85, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch (row index over stages)" if any(len({x.get('stage') for x in r.rows}) > 1 for r in runs)
                      else "epoch")
        ax.grid(alpha=0.3)
        if used:
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ markdown
def pct(m, s=None) -> str:
    """A fraction as percent with two decimals, "mean ± std" when `s` is given."""
    if m is None:
        return "n/a"
    return f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if s is not None else "")


def fmt_p(p) -> str:
    """A p-value for Markdown: 3 significant digits, bold below ALPHA."""
    if p is None:
        return "n/a"
    text = f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"
    return f"**{text}**" if p < ALPHA else text


def summary_markdown(summary: list[dict]) -> str:
    lines = ["| dataset | arch | eps | method | seeds | SA (%) | PGD-10 (%) | AA (%) | trainable params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        params = f"{row['trainable_params']:,}" if row.get("trainable_params") else "—"
        lines.append(f"| {row['dataset']} | {row['arch']} | {row['eps']} | {row['method']} | {row['n']} | "
                     + " | ".join(pct(row[k]["mean"], row[k]["std"]) for k, _ in METRICS) + f" | {params} |")
    return "\n".join(lines)


def tests_markdown(tests: list[dict]) -> str:
    lines = ["| dataset | arch | eps | A vs B | n | Δ SA (pp) | p SA | Δ PGD-10 (pp) | p PGD-10 | Δ AA (pp) | p AA |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        cells = []
        for k, _ in METRICS:
            d = t[k]["diff"]
            cells += ["n/a" if d is None else f"{100 * d:+.2f}", fmt_p(t[k]["p"])]
        lines.append(f"| {t['dataset']} | {t['arch']} | {t['eps']} | {t['a']} vs {t['b']} | {t['n_a']} vs {t['n_b']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_line(run: Run) -> str:
    r = run.results
    if r is None:
        done = len(run.rows)
        return f"running or unfinished: {done} epoch row(s) so far, no results.json"
    parts = [f"test SA {pct(r.get('test_sa'))} %", f"PGD-10 {pct(r.get('test_pgd10'))} %",
             f"AA {pct(r.get('test_aa'))} %", f"best epoch {r.get('best_epoch')}",
             f"{r.get('epochs_run')} epochs run"]
    if r.get("num_test") is not None:
        parts.append(f"{r['num_test']} test images")
    if r.get("seconds") is not None:
        parts.append(f"{r['seconds']:.0f} s training")
    events = [f"epoch {x.get('epoch')}: {x['lr_event']}" for x in run.rows if x.get("lr_event")]
    line = ", ".join(parts)
    if events:
        line += "; LR events: " + "; ".join(events)
    return line


def default_out(run_dirs: list[str]) -> str:
    """`<common parent of the runs>/report`, or `report` when the runs share no parent below the root."""
    parents = [os.path.dirname(os.path.abspath(os.path.normpath(p))) for p in run_dirs]
    try:
        common = os.path.commonpath(parents)
    except ValueError:  # different drives
        return "report"
    if common in (os.path.abspath(os.sep), os.path.expanduser("~")):
        return "report"
    out = os.path.join(common, "report")
    rel = os.path.relpath(out)
    return out if rel.startswith("..") else rel


def write_report(paths, out: str | None = None, *, title: str = "autolora report", intro: str = "",
                 extra_sections: list[str] | None = None) -> dict:
    """Render the report of the runs in `paths` (run directories or folders holding them) into `out`
    (default: `default_out`). Returns {"report": path of report.md, "summary", "tests", "plots", "skipped"}."""
    run_dirs, skipped = find_runs(paths)
    if not run_dirs:
        raise UserError(f"no run directories in {', '.join(map(str, paths))}: pass directories written by "
                        "`autolora train` (with metrics.jsonl / results.json), or folders holding them")
    out = out or default_out(run_dirs)
    from ..engine.rundir import atomic_write_json, atomic_write_text, check_writable

    check_writable(out)
    runs = [load_run(p, n) for p, n in zip(run_dirs, _unique_names(run_dirs))]
    refine_groups(runs)
    plots_dir = os.path.join(out, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    plots = {}
    for run in runs:
        p = plot_run(run, os.path.join(plots_dir, f"{run.name}.png"))
        if p:
            plots[run.name] = p
    curves = plot_curves(runs, os.path.join(plots_dir, "curves.png"))
    summary = summarize(runs)
    tests = welch_tests(summary)

    md = [f"# {title}", ""]
    if intro:
        md += [intro.strip(), ""]
    md += ["## Results", "",
           "Test accuracy of each run's best epoch (chosen by validation PGD-10), in %: mean ± sample std over "
           "seeds (the std is left out for a single seed). SA = clean, PGD-10 = L∞ PGD-10, AA = standard "
           "AutoAttack (n/a when not evaluated).", ""]
    md += [summary_markdown(summary) if summary else "_No finished runs (results.json) yet._", ""]
    if tests:
        md += ["### Welch t-tests between methods", "",
               f"Two-sided Welch t-test (unequal variances) over seeds; Δ = A − B in percentage points; p < {ALPHA} "
               "in bold; n/a with fewer than 2 seeds per method (or zero variance in both).", "",
               tests_markdown(tests), ""]
    for section in extra_sections or []:
        md += [section.strip(), ""]
    rel = lambda p: os.path.relpath(p, out).replace(os.sep, "/")  # noqa: E731
    if curves:
        md += ["## Validation curves", "", f"![validation curves]({rel(curves)})", ""]
    md += ["## Runs", ""]
    for run in runs:
        md += [f"### {run.name}", "",
               f"`{run.path}` — {run.method} on {run.group[0]}, arch {run.group[1]}, eps {run.group[3]}, "
               f"seed {run.seed}. "
               + _run_line(run), ""]
        if run.name in plots:
            md += [f"![{run.name}]({rel(plots[run.name])})", ""]
    report = os.path.join(out, "report.md")
    atomic_write_text(report, "\n".join(md).rstrip() + "\n")
    atomic_write_json(os.path.join(out, "report.json"), {
        "summary": summary, "tests": tests,
        "runs": [{"name": r.name, "path": r.path, "group": list(r.group), "results": r.results} for r in runs]})
    return {"report": report, "summary": summary, "tests": tests, "plots": [*plots.values(), *([curves] if curves else [])],
            "skipped": skipped, "runs": runs}
