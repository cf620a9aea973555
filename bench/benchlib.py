"""What the benchmarks share: the log line, stage timings summed over invocations, the commit that made the figures,
an archive of finished runs' records (so a fresh clone resumes a benchmark instead of retraining it), and paired
statistics with a verdict per claim. Statistics and file writes reuse the package's (`autolora.workflows.runs`,
`autolora.utils.fileio`); importing this module does not import torch."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from autolora.utils.fileio import atomic_path, atomic_write_json  # noqa: E402
from autolora.workflows.runs import fmt_p, mean_std, read_json, read_rows, welch_p  # noqa: E402,F401

# what a finished run's record is: everything but its weights and checkpoints
RECORD = ("config.yaml", "split.json", "metrics.jsonl", "train.log", "results.json", "aa_subset.json",
          "predictions.json", "probe_head.safetensors")
# the archive is portable: its text files say ROOT_TOKEN where the checkout's path was (a run's config names its data
# and weights by absolute path, and a resumed sweep compares them), and a restore writes this checkout's path back
ROOT_TOKEN = "${ROOT}"


def copy_record(src: str, dst: str, old: str, new: str) -> None:
    """Copy a record file, its text with `old` replaced by `new` (binary files as they are)."""
    if src.endswith((".yaml", ".json", ".jsonl", ".log")):
        with open(src, encoding="utf-8") as f:
            text = f.read()
        with open(dst, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))
    else:
        shutil.copyfile(src, dst)


def logger(name: str):
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {msg}", flush=True)
    return log


def git_commit(root: str = ROOT) -> str | None:
    """The commit of the code that runs (the figures belong to it), with "+local changes" when the library or
    the bench scripts differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "autolora", ":(glob)bench/*.py"],
                               capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return head + (" +local changes" if dirty else "") if head else None


class exclusive:
    """A blocking flock on `path` while the block runs: parts of a benchmark side by side make shared things (data,
    weights) one at a time, the second finding them made."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


class Timings:
    """Seconds per stage, accumulated over invocations (RUNS/timings.json), so a resumed benchmark reports the total
    time it took; `stage(name)` times one stage, `add(..., nested=True)` charges work done inside another stage.
    Processes running side by side (e.g. one per part of a benchmark) share the file: each update re-reads it under
    a lock, and each invocation records its span (t0, t1), from which `wall_seconds` is the time the benchmark took."""

    def __init__(self, path, record=True, log=print):
        self.path, self.log = path, log
        self.data = self._load()
        self.t_stage = time.perf_counter()
        self.nested = 0.0
        self.me = None
        if record:
            self.me = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "commit": git_commit(),
                       "pid": os.getpid(), "t0": round(time.time(), 1), "t1": round(time.time(), 1), "made": 0}
            self._update(lambda d: d["invocations"].append(dict(self.me)))

    def _load(self) -> dict:
        return json.load(open(self.path)) if os.path.exists(self.path) else {"stages": {}, "invocations": []}

    def _update(self, change) -> None:
        """Re-read the file, apply `change`, stamp this invocation's span, write: under a lock (concurrent parts)."""
        with exclusive(self.path + ".lock"):
            self.data = self._load()
            change(self.data)
            if self.me is not None:
                for inv in self.data["invocations"]:
                    if inv.get("pid") == self.me["pid"] and inv.get("t0") == self.me["t0"]:
                        inv.update(t1=round(time.time(), 1), made=self.me["made"])
            atomic_write_json(self.path, self.data)

    def add(self, stage, seconds, nested: bool = False):
        """Add `seconds` to `stage`; `nested`: spent inside the running stage, which is not charged for them."""
        def change(d):
            d["stages"][stage] = round(d["stages"].get(stage, 0.0) + seconds, 1)
        self._update(change)
        if nested:
            self.nested += seconds

    def spent(self) -> float:
        """Seconds of all finished stages plus the running one."""
        return sum(self.data["stages"].values()) + time.perf_counter() - self.t_stage - self.nested

    def wall_seconds(self) -> float | None:
        """The union of the invocations' spans (processes side by side count once); None before any recorded one."""
        spans = sorted((i["t0"], i["t1"]) for i in self.data["invocations"] if "t0" in i and "t1" in i)
        total, end = 0.0, None
        for t0, t1 in spans:
            if end is None or t0 > end:
                total, end = total + (t1 - t0), t1
            elif t1 > end:
                total, end = total + (t1 - end), t1
        return total if spans else None

    def made(self) -> None:
        """Count one thing this invocation made (a run, an AA result, a source backbone: each counts once), so that
        `commits` names only the code that made figures."""
        if self.me is not None:
            self.me["made"] += 1
            self._update(lambda d: None)  # stamps the count on this invocation's record

    def commits(self) -> list[str]:
        """The commits of the invocations that made something (records from before `made` existed all count)."""
        return list(dict.fromkeys(i["commit"] for i in self.data["invocations"] if i.get("commit") and i.get("made", 1)))

    def stage(self, name):
        timings = self

        class _Stage:
            def __enter__(self):
                self.t0 = timings.t_stage = time.perf_counter()
                timings.nested = 0.0
                timings.log(f"== stage {name} ==")

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t0 - timings.nested
                timings.nested = 0.0
                timings.add(name, dt)
                timings.t_stage = time.perf_counter()
                timings.log(f"== stage {name}: {dt:.0f}s{' (interrupted)' if exc[0] else ''} ==")
        return _Stage()


# ------------------------------------------------------------------------------------------------ archive
def archive_run(archive: str, run_dir: str, timings: Timings | None = None, runs_root: str | None = None) -> None:
    """Copy a finished run's record (RECORD) to ARCHIVE/<group>/<run>/ (group: the run directory's parent's path
    below `runs_root`, else its parent's name), and the stage timings to ARCHIVE/timings.json, so that a fresh clone
    restores it instead of retraining."""
    if os.path.islink(run_dir) or not os.path.exists(os.path.join(run_dir, "results.json")):
        return
    parent = os.path.dirname(os.path.abspath(run_dir))
    group = os.path.relpath(parent, os.path.abspath(runs_root)) if runs_root else os.path.basename(parent)
    dst = os.path.join(archive, group, os.path.basename(run_dir))
    os.makedirs(dst, exist_ok=True)
    for f in RECORD:
        if os.path.exists(os.path.join(run_dir, f)):
            with atomic_path(os.path.join(dst, f)) as tmp:  # a temporary name of its own: two parts may archive at once
                copy_record(os.path.join(run_dir, f), tmp, ROOT + os.sep, ROOT_TOKEN + "/")
    if timings is not None:
        archive_timings(archive, timings)


def archive_timings(archive: str, timings: Timings) -> None:
    """ARCHIVE/timings.json: the stage times so far (when the archive holds runs), so a fresh clone adds to them."""
    if os.path.isdir(archive):
        with atomic_path(os.path.join(archive, "timings.json")) as tmp:  # parts side by side: a temporary name each
            copy_record(timings.path, tmp, ROOT + os.sep, ROOT_TOKEN + "/")


def restore_runs(archive: str, runs: str, log=print) -> int:
    """Recreate the run directories of archived runs that are missing under `runs` (a fresh clone, wherever it is),
    and the stage timings; a run directory that exists is left alone. Returns the number of runs restored. Parts started side by
    side (`make bench-roli` on a fresh clone) restore one at a time."""
    n = 0
    if not os.path.isdir(archive):
        return n
    os.makedirs(runs, exist_ok=True)
    with exclusive(os.path.join(runs, "restore.lock")):  # parts side by side: one restores, the next finds it done
        timings = os.path.join(runs, "timings.json")
        if not os.path.exists(timings) and os.path.exists(os.path.join(archive, "timings.json")):
            copy_record(os.path.join(archive, "timings.json"), timings, ROOT_TOKEN + "/", ROOT + os.sep)
        for src_dir, dirs, files in os.walk(archive):
            dirs.sort()
            if "results.json" not in files or os.path.samefile(src_dir, archive):
                continue
            dirs.clear()  # a run's record holds no runs
            dst = os.path.join(runs, os.path.relpath(src_dir, archive))
            if os.path.lexists(dst):
                continue
            os.makedirs(dst + ".restoring", exist_ok=True)
            for f in RECORD:
                if os.path.exists(os.path.join(src_dir, f)):
                    copy_record(os.path.join(src_dir, f), os.path.join(dst + ".restoring", f), ROOT_TOKEN + "/",
                                ROOT + os.sep)
            os.replace(dst + ".restoring", dst)
            n += 1
    if n:
        log(f"restored {n} finished runs from {os.path.relpath(archive, ROOT)} (records only, no weights)")
    return n


# ------------------------------------------------------------------------------------------------ statistics
def ms(vals, scale=100.0, nd=2) -> str:
    """mean ± sample std of the non-missing values, times `scale`, `nd` decimals; n/a when none."""
    m, s = mean_std([v for v in vals if v is not None])
    if m is None:
        return "n/a"
    return f"{scale * m:.{nd}f}" + ("" if s is None else f" ± {scale * s:.{nd}f}")


def num(x, spec: str, scale: float = 100.0) -> str:
    """`x · scale` formatted with `spec`, or n/a."""
    return "n/a" if x is None else format(scale * x, spec)


TIE = 1e-9  # differences and spreads below this are float rounding of equal figures
MAX_SEEDS = 1000  # beyond this the power search stops: "seeds needed" is then n/a


def paired(a, b) -> dict:
    """Per-seed lists a, b (same seed order) -> mean paired difference, its std, paired t p, Welch p, the number of
    seeds in which a > b, and the seeds a two-sided paired t-test at α 0.05 would need for 80 % power at the observed
    mean and std of the differences (None when undefined: no spread, no mean difference, or more than MAX_SEEDS).
    When every seed's difference is the same (float rounding aside) the paired p is None: t is undefined."""
    from scipy import stats

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    out = {"n": len(pairs), "diffs": [x - y for x, y in pairs], "mean": None, "sd": None, "p": None, "welch": None,
           "wins": sum(x > y for x, y in pairs), "seeds_for_power": None}
    if not pairs:
        return out
    d = out["diffs"]
    out["mean"], out["sd"] = mean_std(d)
    if len(pairs) < 2:
        return out
    out["welch"] = welch_p([x for x, _ in pairs], [y for _, y in pairs])
    if out["sd"] < TIE:
        out["sd"] = 0.0  # every seed's difference is the same (up to float rounding): the paired t is undefined
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs]).pvalue)
    out["p"] = None if math.isnan(p) else p
    if abs(out["mean"]) >= TIE:
        effect = abs(out["mean"]) / out["sd"]
        for n in range(2, MAX_SEEDS + 1):  # noncentral t power of the two-sided paired test
            t = stats.t.ppf(0.975, n - 1)
            power = 1 - stats.nct.cdf(t, n - 1, effect * math.sqrt(n)) + stats.nct.cdf(-t, n - 1, effect * math.sqrt(n))
            if power >= 0.8:
                out["seeds_for_power"] = n
                break
    return out


def verdict(t, scale: float = 100.0, spec: str = ".2f") -> str:
    """holds (a > b, paired p < 0.05) / fails (a < b, paired p < 0.05) / not shown, with the figures."""
    if t["mean"] is None:
        return "not measured yet"
    sig = t["p"] is not None and t["p"] < 0.05
    word = ("holds" if t["mean"] > 0 else "fails") if sig else "not shown"
    return (f"{word} (Δ {num(t['mean'], '+' + spec, scale)}, better in {t['wins']} of {t['n']} seeds, paired p "
            f"{fmt_p(t['p'])}, Welch p {fmt_p(t['welch'])})")


def run_config(run_dir: str) -> dict:
    """A run directory's config.yaml as a mapping."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f) or {}


def discussion(out_md: str) -> list[str]:
    """The hand-written `<out>_discussion.md` beside a results file (a rerun rewrites the results, not it), as lines
    of the results file; none when there is none."""
    path = os.path.splitext(out_md)[0] + "_discussion.md"
    return [open(path).read().strip(), ""] if os.path.exists(path) else []


def write_text(path: str, text: str) -> None:
    from autolora.utils.fileio import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)
