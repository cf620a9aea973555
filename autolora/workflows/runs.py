"""Reading finished (or running, or diverged) run directories and the statistics over seeds: what `report`,
`compare`, `pretrain` and the benchmarks share. No plotting here (`workflows.report` draws and writes Markdown).

Runs are pooled into one row only when they are seeds of one experiment: their resolved configs are equal except
the seed and settings that do not change what is computed (diagnostics, workers, progress bars). A seed that
appears twice in such a group is not an independent sample: those runs get a row each. Every mean says its n.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

from ..attacks.registry import label as attack_label
from ..utils.pixels import format_pixels
from ..errors import UserError, require

ALPHA = 0.05  # p-values below this are bold in the report
FAILED = "FAILED.json"
# config fields that do not make two runs different experiments (the seed is what a group varies)
NOT_THE_EXPERIMENT = ("seed", "progress", "workers", "tensorboard", "log_gradsim", "gradsim_samples", "gradsim_mode",
                      "eval_attacks", "download", "quiet")


@dataclass
class Run:
    path: str
    name: str
    config: dict
    rows: list
    results: dict | None
    failed: dict | None = None  # FAILED.json of a sweep (e.g. a diverged run)
    group: tuple = field(default=())
    label: str = ""

    @property
    def method(self) -> str:
        return self.label or (self.group[2] if self.group else "?")

    @property
    def seed(self):
        return (self.results or {}).get("seed", self.config.get("seed"))

    @property
    def diverged(self) -> bool:
        return self.results is None and self.failed is not None


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("metrics.jsonl", "results.json", FAILED))


def find_runs(paths, max_depth: int = 3) -> tuple[list[str], list[str]]:
    """(run directories, skipped arguments): each argument is a run directory (has metrics.jsonl, results.json or
    FAILED.json) or a folder holding run directories up to `max_depth` levels down (e.g. `runs/demo`)."""
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


def check_results(path: str, res) -> dict | None:
    """results.json as written by autolora: a mapping whose figures (test_*, best_val_*) are numbers in [0, 1] or
    null; anything else is one UserError naming the file and the key."""
    if res is None:
        return None
    if not isinstance(res, dict):
        raise UserError(f"{path} is not an autolora results file (a {type(res).__name__}, not a mapping): the run "
                        "directory is damaged")
    for k, v in res.items():
        if k.startswith(("test_", "best_val_")) and v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise UserError(f"{path}: {k} is {v!r}, not an accuracy in [0, 1] or null: the file is damaged; "
                                "re-evaluate the run (`autolora eval`) or remove it from the report")
    return res


def method_label(method: str, cfg: dict) -> str:
    label = method
    if method == "madry_ft" and cfg.get("peft") not in (None, "none"):
        label += f"[{cfg['peft']}]"
    if cfg.get("init") == "roli" and method != "linear_probe":
        label += "+roli"
    return label


def load_run(path: str, name: str | None = None) -> Run:
    """A run directory's config.yaml, metrics.jsonl rows, results.json (None while it runs) and FAILED.json."""
    from ..config import load_yaml, migrate_saved

    failed = read_json(os.path.join(path, FAILED))
    cfg_file = os.path.join(path, "config.yaml")
    cfg = migrate_saved(load_yaml(cfg_file)) if os.path.isfile(cfg_file) else \
        dict((failed or {}).get("config") or {})
    results = check_results(os.path.join(path, "results.json"), read_json(os.path.join(path, "results.json")))
    rows = read_rows(os.path.join(path, "metrics.jsonl"))
    r = results or {}
    method = r.get("method") or cfg.get("method") or "?"
    group = (r.get("dataset") or cfg.get("dataset") or "?", r.get("arch") or cfg.get("arch") or "?",
             method_label(method, {**cfg, **{k: r[k] for k in ("init",) if k in r}}), budget_text(cfg))
    return Run(path, name or os.path.basename(os.path.normpath(path)), cfg, rows, results,
               failed if isinstance(failed, dict) else None, group)


def budget_text(cfg: dict) -> str:
    """A run's budget as tables group it: `8/255` under L∞ (the default norm), `L2 0.5` under L2."""
    if cfg.get("norm", "linf") == "linf":
        return format_pixels(cfg.get("eps"))
    return f"L2 {cfg['eps']:g}" if isinstance(cfg.get("eps"), (int, float)) else "L2 ?"


def threat_text(budget: str) -> str:
    """`L∞ 8/255` or `L2 0.5` from a `budget_text`."""
    return budget if budget.startswith("L2") else f"L∞ {budget}"


def experiment_key(run: Run) -> str:
    """What must be equal for two runs to be seeds of one experiment: the config but for NOT_THE_EXPERIMENT."""
    return json.dumps({k: v for k, v in run.config.items() if k not in NOT_THE_EXPERIMENT}, sort_keys=True)


def assign_labels(runs: list[Run]) -> None:
    """Give each run its row label: the method, plus `key=value` for the config fields in which its experiment
    differs from the other experiments of the same (dataset, arch, method, eps); plus the run's name when its seed
    occurs twice in its experiment (such runs are not independent seeds: one row each; the others still pool)."""
    by_group: dict[tuple, list[Run]] = {}
    for r in runs:
        by_group.setdefault(r.group, []).append(r)
    for group, members in by_group.items():
        experiments: dict[str, list[Run]] = {}
        for r in members:
            experiments.setdefault(experiment_key(r), []).append(r)
        keys = sorted({k for r in members for k in r.config} - set(NOT_THE_EXPERIMENT))
        differ = [k for k in keys if len({json.dumps(e[0].config.get(k), sort_keys=True)
                                          for e in experiments.values()}) > 1]
        for exp in experiments.values():
            tag = ", ".join(f"{k}={_short(exp[0].config.get(k))}" for k in differ)
            base = f"{group[2]} ({tag})" if tag else group[2]
            seeds = [str(r.seed) for r in exp]
            for r in exp:  # a seed that occurs twice: its runs are not independent samples, each gets its own row
                r.label = f"{base} [{r.name}]" if seeds.count(str(r.seed)) > 1 else base


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and os.sep in v:
        return os.path.basename(v)
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def unique_names(paths: list[str]) -> list[str]:
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


def metric_keys(runs: list[Run]) -> list[str]:
    """The test figures the finished runs report, named by what ran: test_sa, test_pgd<k>..., test_aa."""
    keys = {k for r in runs if r.results for k in r.results if k.startswith("test_")}

    def order(k):
        name = k[len("test_"):]
        n = re.fullmatch(r"pgd(\d+)", name)
        return (0, 0) if name == "sa" else (1, int(n.group(1))) if n else (2, 0) if name == "aa" else (3, name)

    return sorted(keys, key=order)


def metric_label(key: str) -> str:
    return attack_label(key)


def summarize(runs: list[Run]) -> list[dict]:
    """One row per experiment (`assign_labels`) of finished runs: n, seeds, and per metric the mean, std, values and
    their count (a metric some runs did not evaluate has fewer values than n)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.results is not None:
            groups.setdefault((*r.group[:2], r.method, r.group[3]), []).append(r)
    keys = metric_keys(runs)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[3])):
        members = sorted(groups[key], key=lambda r: (str(r.seed), r.name))
        row = {"dataset": key[0], "arch": key[1], "method": key[2], "eps": key[3], "n": len(members),
               "seeds": [r.seed for r in members], "runs": [r.name for r in members], "metrics": keys}
        for k in keys:
            vals = [float(r.results[k]) for r in members if r.results.get(k) is not None]
            m, s = mean_std(vals)
            row[k] = {"mean": m, "std": s, "values": vals, "n": len(vals)}
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
    """Every pair of rows of the same dataset, arch and eps: mean difference and Welch p-value per metric."""
    out = []
    by_setting: dict[tuple, list[dict]] = {}
    for row in summary:
        by_setting.setdefault((row["dataset"], row["arch"], row["eps"]), []).append(row)
    for (dataset, arch, eps), rows in by_setting.items():
        for a, b in itertools.combinations(rows, 2):
            test = {"dataset": dataset, "arch": arch, "eps": eps, "a": a["method"], "b": b["method"], "n_a": a["n"],
                    "n_b": b["n"], "metrics": a["metrics"]}
            for k in a["metrics"]:
                va, vb = a[k]["values"], b[k]["values"]
                diff = (a[k]["mean"] - b[k]["mean"]) if va and vb else None
                test[k] = {"diff": diff, "p": welch_p(va, vb), "n_a": len(va), "n_b": len(vb)}
            out.append(test)
    return out


# ------------------------------------------------------------------------------------------------ numbers as text
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
