"""`autolora report RUN_DIR...`: plots and tables of finished (or running, or diverged) runs, as a Markdown report.

Per run: one PNG of its curves over epochs (LR with the automated LR's halvings/roll-backs, λ1 and λ2, training
SA (and the LoRa branch's), validation SA and PGD-k, gradient similarity when logged, training loss), drawn from
RUN_DIR/metrics.jsonl; each panel is one entry of `PANELS`. Across runs (`workflows.runs`): one row per experiment
(runs equal but for the seed), mean ± sample std over its seeds of each test figure the runs report, named by what
ran (PGD-10, PGD-2, AA), with its n; two-sided Welch t-tests (scipy.stats.ttest_ind, equal_var=False) between every
pair of rows of the same dataset and arch, as in the AutoLoRa paper's Tables 1 and 7 (n/a with fewer than 2 seeds).

OUT/report.md    the tables and the plots (relative links: readable on GitHub)
OUT/report.json  the same numbers, machine-readable
OUT/plots/       <run>.png per run, curves.png (validation curves of all runs)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

from ..attacks.norms import NORM_LABEL
from ..errors import UserError, require
from .runs import (ALPHA, Run, assign_labels, find_runs, fmt_p, load_run, metric_keys, metric_label, pct, summarize,
                   threat_text, unique_names, welch_tests)


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


def val_keys(rows) -> list[str]:
    """The validation robust-accuracy keys in the rows (val_pgd10, or val_pgd2 for --eval-steps 2)."""
    return sorted({k for r in rows for k in r if k.startswith("val_pgd")})


def _lines(ax, rows, specs) -> None:
    for key, name, colour in specs:
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, color=colour, label=name)


def _lr(ax, run):
    rows = run.rows
    xs, ys = _series(rows, "lr")
    ax.plot(xs, ys, marker="o", ms=3, color="C0", label="LR")
    halved = [i for i, r in enumerate(rows) if "halved" in str(r.get("lr_event") or "")]
    if halved:
        ax.plot(halved, [rows[i]["lr"] for i in halved], "x", color="C3", ms=8, mew=2, label="halved → roll-back")
    if ys and min(ys) > 0 and max(ys) / min(ys) > 5:
        ax.set_yscale("log")
    return "learning rate"


def _lambdas(ax, run):  # λ1 in [0, 1] on the left axis, λ2 in [0, λ2max] on the right
    xs, ys = _series(run.rows, "lambda1")
    ax.plot(xs, ys, marker="o", ms=3, color="C0", label="λ1 (left)")
    ax.set_ylabel("λ1", color="C0")
    xs2, ys2 = _series(run.rows, "lambda2")
    if xs2:
        ax2 = ax.twinx()
        ax2.plot(xs2, ys2, marker="s", ms=3, color="C1", label="λ2 (right)")
        ax2.set_ylabel("λ2", color="C1")
        ax.plot([], [], marker="s", ms=3, color="C1", label="λ2 (right)")  # one legend for both axes
    return "loss scalars λ1, λ2"


def _train(ax, run):
    _lines(ax, run.rows, (("train_sa", "train SA", "C0"), ("lora_train_sa", "LoRa branch train SA", "C2"),
                          ("train_ra", "train adversarial acc.", "C3")))
    return "training accuracy"


def _val(ax, run):
    eps = run.group[3] if run.group else "?"
    _lines(ax, run.rows, [("val_sa", "val SA", "C0")] +
           [(k, f"val {metric_label(k)} ({threat_text(eps)})", f"C{3 + i}") for i, k in enumerate(val_keys(run.rows))])
    best = (run.results or {}).get("best_epoch")
    if best is not None:
        last_stage = run.rows[-1].get("stage")
        idx = [i for i, r in enumerate(run.rows) if r.get("epoch") == best and r.get("stage") == last_stage]
        if idx:
            ax.axvline(idx[0], color="C3", ls=":", lw=1, label=f"best epoch {best}")
    n = (run.results or {}).get("num_val")
    return "validation accuracy" + (f" ({n} images)" if n else "")


def _gs(ax, run):
    xs, ys = _series(run.rows, "grad_sim")
    ax.plot(xs, ys, marker="o", ms=3, color="C4", label="GS")
    ax.axhline(0, color="0.7", lw=0.8)
    mode = str(run.config.get("gradsim_mode") or "batch").replace("_", "-")
    return f"gradient similarity (θ1, {mode} form)"


def _loss(ax, run):
    _lines(ax, run.rows, (("train_loss", "train loss", "C5"),))
    return "training loss"


@dataclass(frozen=True)
class Panel:
    """One panel of a run's plot: drawn when `shown(rows)`; `draw(ax, run)` returns its title."""

    shown: Callable[[list], bool]
    draw: Callable


PANELS = (
    Panel(lambda rows: any(r.get("lr") is not None for r in rows), _lr),
    Panel(lambda rows: any(r.get("lambda1") is not None or r.get("lambda2") is not None for r in rows), _lambdas),
    Panel(lambda rows: True, _train),
    Panel(lambda rows: True, _val),
    Panel(lambda rows: any(r.get("grad_sim") is not None for r in rows), _gs),
    Panel(lambda rows: any(r.get("train_loss") is not None for r in rows), _loss),
)


def plot_run(run: Run, path: str) -> str | None:
    """A PNG of the run's curves over epochs (the panels of `PANELS` it has data for); None without metrics."""
    rows = run.rows
    if not rows:
        return None
    plt = _matplotlib()
    panels = [p for p in PANELS if p.shown(rows)]
    ncols = 3 if len(panels) > 4 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False)
    multi_stage = len({r.get("stage") for r in rows}) > 1
    xlabel = "epoch (all stages; dashed: next stage)" if multi_stage else "epoch"
    ticks = list(range(len(rows)))
    ticklabels = [str(r.get("epoch", i)) for i, r in enumerate(rows)]
    step = max(1, len(rows) // 12)
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel.draw(ax, run))
        _stage_marks(ax, rows)
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
    """Validation SA and PGD-k of every run over epochs, one colour per method."""
    runs = [r for r in runs if r.rows]
    if not runs:
        return None
    plt = _matplotlib()
    methods = sorted({r.method for r in runs})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    ra = sorted({k for r in runs for k in val_keys(r.rows)})
    fig, axes = plt.subplots(1, 1 + len(ra), figsize=(5 * (1 + len(ra)), 3.4), squeeze=False)
    eps = sorted({r.group[3] for r in runs})
    for ax, key in zip(axes[0], ["val_sa", *ra]):
        used = set()
        for r in runs:
            xs, ys = _series(r.rows, key)
            if not xs:
                continue
            label = r.method if r.method not in used else None
            used.add(r.method)
            ax.plot(xs, ys, marker="o", ms=2.5, lw=1.2, color=colours[r.method], alpha=0.85, label=label)
        ax.set_title("validation SA" if key == "val_sa" else f"validation {metric_label(key)} ({', '.join(map(threat_text, eps))})")
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
def _cell(stat: dict, n: int) -> str:
    """mean ± std, with "(n=k)" when only k of the row's n runs have the figure."""
    text = pct(stat["mean"], stat["std"])
    return text + (f" (n={stat['n']})" if stat["mean"] is not None and stat["n"] < n else "")


def summary_markdown(summary: list[dict]) -> str:
    keys = summary[0]["metrics"] if summary else ["test_sa"]
    lines = ["| dataset | arch | eps | method | n | " + " | ".join(f"{metric_label(k)} (%)" for k in keys)
             + " | trainable params |", "|---|---|---|---|---|" + "---|" * len(keys) + "---|"]
    for row in summary:
        params = f"{row['trainable_params']:,}" if row.get("trainable_params") else "—"
        lines.append(f"| {row['dataset']} | {row['arch']} | {row['eps']} | {row['method']} | {row['n']} | "
                     + " | ".join(_cell(row[k], row["n"]) for k in keys) + f" | {params} |")
    return "\n".join(lines)


def tests_markdown(tests: list[dict]) -> str:
    keys = tests[0]["metrics"] if tests else []
    head = " | ".join(f"Δ {metric_label(k)} (pp) | p {metric_label(k)}" for k in keys)
    lines = [f"| dataset | arch | eps | A vs B | n | {head} |", "|---|---|---|---|---|" + "---|---|" * len(keys)]
    for t in tests:
        cells = []
        for k in keys:
            d = t[k]["diff"]
            cells += ["n/a" if d is None else f"{100 * d:+.2f}", fmt_p(t[k]["p"])]
        lines.append(f"| {t['dataset']} | {t['arch']} | {t['eps']} | {t['a']} vs {t['b']} | {t['n_a']} vs {t['n_b']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_line(run: Run) -> str:
    r = run.results
    if r is None:
        if run.diverged:
            return f"diverged: {run.failed.get('error', 'failed')} (FAILED.json; `autolora compare --retry-failed` " \
                   "starts it again)"
        return f"running or unfinished: {len(run.rows)} epoch row(s) so far, no results.json"
    n = r.get("num_test")
    parts = [f"test {metric_label(k)} {pct(r.get(k))} %" for k in metric_keys([run])]
    parts += [f"best epoch {r.get('best_epoch')}", f"{r.get('epochs_run')} epochs run"]
    if n is not None:
        parts.append(f"{n} test images")
    if r.get("seconds") is not None:
        parts.append(f"{r['seconds']:.0f} s training")
    events = [f"epoch {x.get('epoch')}: {x['lr_event']}" for x in run.rows if x.get("lr_event")]
    line = ", ".join(parts)
    if events:
        line += "; LR events: " + "; ".join(events)
    return line


def attacks_note(runs: list[Run]) -> str:
    """What each figure of the table measured (attack, norm, eps, steps, step size, images), from results.json."""
    seen = {}
    for r in runs:
        for name, rec in ((r.results or {}).get("attacks") or {}).get("test", {}).items():
            if rec.get("attack") == "clean":
                continue
            desc = (f"{metric_label(name)}: {NORM_LABEL.get(rec.get('norm'), rec.get('norm'))} "
                    + (f"PGD, {rec['steps']} steps of {rec['step_size']:.4g}, random start, {rec.get('restarts', 1)} "
                       f"restart(s)" if rec.get("attack") == "pgd" else f"AutoAttack ({rec.get('version')})")
                    + f", eps {rec['eps']:.4g}")
            seen.setdefault(desc, set()).add((r.results or {}).get("num_test"))
    if not seen:
        return ("SA = clean, PGD-k = L∞ PGD with k steps, AA = standard L∞ AutoAttack (n/a when not evaluated); the "
                "runs' results.json do not record the attack settings (written by an older autolora).")
    return "; ".join(f"{d} (on {', '.join(str(n) for n in sorted(ns, key=str))} test images per run)"
                     for d, ns in seen.items()) + "."


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
    from ..utils.fileio import atomic_write_json, atomic_write_text, check_writable

    check_writable(out)
    runs = [load_run(p, n) for p, n in zip(run_dirs, unique_names(run_dirs))]
    assign_labels(runs)
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
           "Test accuracy of each run's best epoch (chosen on the validation split), in %: mean ± sample std over the "
           "n seeds of each row (the std is left out for a single seed; a figure that fewer of the row's runs "
           "evaluated says its own n). A row pools only runs whose configs are equal but for the seed. "
           + attacks_note(runs), ""]
    md += [summary_markdown(summary) if summary else "_No finished runs (results.json) yet._", ""]
    if tests:
        md += ["### Welch t-tests between rows", "",
               f"Two-sided Welch t-test (unequal variances) over seeds; Δ = A − B in percentage points; p < {ALPHA} "
               "in bold; n/a with fewer than 2 seeds per row (or zero variance in both).", "",
               tests_markdown(tests), ""]
    diverged = [r for r in runs if r.diverged]
    if diverged:
        md += ["### Diverged runs", "", *[f"- {r.name} ({r.method}, seed {r.seed}): {r.failed.get('error')}"
                                          for r in diverged], ""]
    for section in extra_sections or []:
        md += [section.strip(), ""]
    rel = lambda p: os.path.relpath(p, out).replace(os.sep, "/")  # noqa: E731
    if curves:
        md += ["## Validation curves", "", f"![validation curves]({rel(curves)})", ""]
    md += ["## Runs", ""]
    for run in runs:
        md += [f"### {run.name}", "",
               f"`{run.path}` — {run.method} on {run.group[0]}, arch {run.group[1]}, eps {run.group[3]}, "
               f"seed {run.seed}. " + _run_line(run), ""]
        if run.name in plots:
            md += [f"![{run.name}]({rel(plots[run.name])})", ""]
    report = os.path.join(out, "report.md")
    atomic_write_text(report, "\n".join(md).rstrip() + "\n")
    atomic_write_json(os.path.join(out, "report.json"), {
        "summary": summary, "tests": tests,
        "runs": [{"name": r.name, "path": r.path, "group": list(r.group), "label": r.label, "results": r.results,
                  "diverged": r.diverged} for r in runs]})
    return {"report": report, "summary": summary, "tests": tests, "plots": [*plots.values(), *([curves] if curves else [])],
            "skipped": skipped, "runs": runs}
