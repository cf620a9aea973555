"""`evaluate_run(run_dir, ...)`: re-evaluate a finished run's best model, on its own test split or on another copy of
the data (classes matched by folder name), under either threat model, at one budget or a list of them (a
robustness-vs-budget table and plot), and on CIFAR-10-C / CIFAR-100-C; `write_eval` saves the figures (after the
caller has shown them: a read-only run directory still gives its figures).

`eval_plan` resolves what an evaluation measures before anything is read or written: the run's own settings where
none is given, and the output file, named by the data and the attack configuration (`eval_<data>_<threat>_<attacks>_
<images>_<hash>.json` in the run directory), so a different evaluation never overwrites another.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys

from ..attacks.norms import NORM_LABEL, budget_label, check_norm, eps_text, resolve_budget
from ..attacks.pgd import check_budget
from ..attacks.registry import attack_record, check_version, label, parse_attacks
from ..config import TrainConfig, load_yaml
from ..engine.rundir import RunDir
from ..errors import UserError, require
from ..eval import check_sizes, count_correct, eval_batch_size
from ..utils import dist
from ..utils.fileio import atomic_write_json
from .runs import read_json


@dataclasses.dataclass
class EvalPlan:
    """Everything an evaluation measures, resolved (`eval_plan`)."""

    run_dir: str
    cfg: TrainConfig
    attacks: list  # names as figures are keyed: clean, pgd10, pgd10_r5, aa, aa_plus, ...
    norm: str
    eps: list  # one budget, or a sweep
    step_sizes: list  # the PGD step of each budget
    limit: int | None
    dataset: str | None
    data_dir: str | None
    batch_size: int
    corruptions: str | None
    corruptions_limit: int | None
    out: str

    def spec(self) -> dict:
        """What the figures depend on (the output file's name hashes it)."""
        return {"attacks": self.attacks, "norm": self.norm, "eps": self.eps, "step_sizes": self.step_sizes,
                "limit": self.limit, "dataset": self.dataset, "data_dir": self.data_dir, "batch_size": self.batch_size,
                "seed": self.cfg.seed, "corruptions": self.corruptions and os.path.abspath(self.corruptions),
                "corruptions_limit": self.corruptions_limit}


def _run_config(run_dir: str) -> TrainConfig:
    run = RunDir(run_dir)
    if not os.path.exists(run.file("config.yaml")):
        raise UserError(f"{run_dir} is not an autolora run directory (no config.yaml)")
    return TrainConfig.from_saved(load_yaml(run.file("config.yaml")), run.file("config.yaml"))


def _run_resolution(run_dir: str, cfg: TrainConfig) -> str:
    """The run's data resolution ("low"/"high"), from its split.json (CIFAR and digits are low without one)."""
    res = (read_json(os.path.join(run_dir, "split.json")) or {}).get("resolution")
    return res or ("low" if cfg.dataset in ("cifar10", "cifar100", "digits") else "high")


def eval_plan(run_dir: str, *, attacks=None, limit: int | None = None, dataset: str | None = None,
              data_dir: str | None = None, batch_size: int | None = None, norm: str | None = None, eps=None,
              steps: int | None = None, step_size: float | None = None, restarts: int = 1,
              aa_version: str = "standard", corruptions: str | None = None, corruptions_limit: int | None = None,
              out: str | None = None) -> EvalPlan:
    """The evaluation's settings, each the given one or the run's: `norm` (the run's), `eps` (a number or a list;
    default the run's under its norm, else the norm's default for the run's resolution), `step_size` (the run's for
    its own budget, else eps/4 for each budget), `steps` (of `pgd`; the run's --eval-steps), `attacks` (the run's
    --eval-attacks; none with `corruptions`), `limit` (default: the whole test split). Every value is checked here,
    before anything is read or written. `out`: default RUN_DIR/eval_<data>_<threat>_<attacks>_<images>_<hash>.json."""
    cfg = _run_config(run_dir)
    run_norm = check_norm(cfg.norm)
    norm = run_norm if norm is None else check_norm(norm)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(f"--steps must be an integer >= 1, got {steps}")
    own_budget = eps is None and norm == run_norm
    resolution = _run_resolution(run_dir, cfg)
    if eps is None:
        eps_list = [cfg.eps if own_budget else resolve_budget(norm, None, None, resolution)[0]]
    else:
        eps_list = [float(e) for e in (eps if isinstance(eps, (list, tuple)) else [eps])]
        if not eps_list:
            raise UserError("--eps is empty: give a budget, or a comma list such as 2/255,4/255,8/255")
    if len(set(eps_list)) != len(eps_list):
        raise UserError(f"--eps repeats a budget: {','.join(eps_text(norm, e) for e in eps_list)}")
    steps_sizes = [cfg.step_size if own_budget and step_size is None else
                   resolve_budget(norm, e, step_size, resolution)[1] for e in eps_list]
    for e, s in zip(eps_list, steps_sizes):
        check_budget(e, s, 0, norm)
    version = check_version(aa_version)
    if attacks is None:
        attacks = [] if corruptions else cfg.eval_attacks
    names = parse_attacks(attacks, steps or cfg.eval_steps, restarts=restarts, version=version) if attacks else []
    if len(eps_list) > 1:
        if not [n for n in names if n != "clean"]:
            raise UserError(f"--eps lists {len(eps_list)} budgets, but no attack uses one: add pgd or aa to --attacks")
        require("matplotlib", "report", "the plot of a budget sweep")  # before the evaluation, not after it
    check_sizes(256 if batch_size is None else batch_size, limit)
    if corruptions_limit is not None and (isinstance(corruptions_limit, bool) or not isinstance(corruptions_limit, int)
                                          or corruptions_limit < 1):
        raise UserError(f"--corruptions-limit must be >= 1 (images per corruption and severity), got {corruptions_limit}")
    if corruptions:
        from ..data.corruptions import find_corruptions

        find_corruptions(corruptions)  # a missing directory or file: an error now
    plan = EvalPlan(run_dir, cfg, names, norm, eps_list, steps_sizes, limit, dataset, data_dir,
                    eval_batch_size(cfg) if batch_size is None else batch_size, corruptions, corruptions_limit, "")
    plan.out = out or default_eval_path(plan)
    return plan


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "x"


def default_eval_path(plan: EvalPlan) -> str:
    """RUN_DIR/eval_<data>_<threat>_<attacks>_<images>_<hash>.json: `own` (the run's test split) or the other data's
    name, `c-<dir>` for corruptions; the norm and budget(s); the attacks; `all` or n<limit>; a hash of every setting
    (`EvalPlan.spec`), so two different evaluations never share a file."""
    data = os.path.basename(os.path.normpath(plan.data_dir)) if plan.data_dir else plan.dataset or "own"
    parts = [data]
    if plan.attacks:
        threat = plan.norm + "-" + "+".join(eps_text(plan.norm, e) for e in plan.eps)
        parts += [threat, "-".join(plan.attacks), "all" if plan.limit is None else f"n{plan.limit}"]
    if plan.corruptions:
        parts.append("c-" + os.path.basename(os.path.normpath(plan.corruptions)))
    digest = hashlib.sha1(json.dumps(plan.spec(), sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(plan.run_dir, "eval_" + "_".join(_slug(p) for p in parts) + f"_{digest}.json")


def evaluate_run(run_dir: str, *, attacks=None, limit: int | None = None, dataset: str | None = None,
                 data_dir: str | None = None, device: str = "auto", batch_size: int | None = None,
                 progress: bool | None = None, write: bool = True, out: str | None = None, norm: str | None = None,
                 eps=None, steps: int | None = None, step_size: float | None = None, restarts: int = 1,
                 aa_version: str = "standard", corruptions: str | None = None,
                 corruptions_limit: int | None = None, model=None) -> dict:
    """Re-evaluate a run's best model (see `eval_plan` for the settings and their defaults); returns the figures
    (`test_<attack>`, named by what ran, with `images` per figure and an `attacks` record; for a list of budgets a
    `sweep` of rows; `corruptions`) and writes them to `out` unless `write=False` (the path is `res["file"]`).

    With `limit=N` (the run's --limit-eval), the attacks, batch and seed of the run, the figures are the run's own
    final evaluation. Under torchrun each rank evaluates its share of the batches and the counts are summed (the
    same figures as one process); rank 0 writes the file. Writing into the run directory locks it for the whole
    evaluation. `progress` (default: stderr is a terminal): a bar, or "batch i/n, ETA" lines. A run of a module of
    your own needs `model`, a fresh instance of its class (`load_model`)."""
    plan = eval_plan(run_dir, attacks=attacks, limit=limit, dataset=dataset, data_dir=data_dir,
                     batch_size=batch_size, norm=norm, eps=eps, steps=steps, step_size=step_size, restarts=restarts,
                     aa_version=aa_version, corruptions=corruptions, corruptions_limit=corruptions_limit, out=out)
    dev = dist.resolve_device(device)
    with (output_lock(run_dir, plan.out) if write else contextlib.nullcontext()):
        res = run_plan(plan, dev, progress, model)
        if write:
            write_eval(res, plan.out)
    return res


@contextlib.contextmanager
def output_lock(run_dir: str, target: str):
    """Lock the run directory while an evaluation that writes into it runs (rank 0; a training or another evaluation
    of it is then an error naming its PID). Nothing to lock for a file written elsewhere, or a read-only directory
    without a lock file (the write then fails with the advice to pass --out FILE)."""
    lock = None
    inside = os.path.realpath(os.path.dirname(os.path.abspath(target))) == os.path.realpath(run_dir)
    if inside and dist.is_launched_rank0() and os.path.isdir(run_dir):
        from ..utils.lock import lock_dir

        try:
            lock = lock_dir(run_dir)
        except (PermissionError, FileNotFoundError):
            lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def write_eval(res: dict, path: str) -> str | None:
    """Write the figures of `evaluate_run` to `path` (and a budget sweep's plot beside it, `.png`), atomically, on
    rank 0; a place that cannot be written is one UserError that says where else to write (--out FILE)."""
    if not dist.is_main():
        return None
    try:
        atomic_write_json(path, res)
        if res.get("sweep"):
            sweep_plot(res, os.path.splitext(path)[0] + ".png")
    except UserError as e:
        raise UserError(f"{e}; pass --out FILE somewhere writable to save the figures") from None
    return path


def run_plan(plan: EvalPlan, dev, progress: bool | None = None, module=None) -> dict:
    """The figures of a resolved evaluation (every rank under torchrun gets them; see `evaluate_run`)."""
    from ..models.export import load_model

    run = RunDir(plan.run_dir)
    model, meta = load_model(run.file("model.safetensors"), model=module)
    classes = meta.get("classes")
    progress = (progress if progress is not None else sys.stderr.isatty()) and dist.is_main()
    out = {"run_dir": plan.run_dir, "norm": plan.norm, "batch_size": plan.batch_size, "seed": plan.cfg.seed,
           "file": plan.out}
    if plan.corruptions:  # the sets against the model's classes: an error before any attack runs
        from ..data.corruptions import check_classes, find_corruptions

        found = find_corruptions(plan.corruptions)
        check_classes(found[1], classes, plan.corruptions)
    with dist.process_group(dev):
        dist.setup_groups()
        model.to(dev)
        if plan.attacks:
            out.update(_attack_figures(plan, model, classes, dev, progress))
        if plan.corruptions:
            out["corruptions"] = corruption_figures(plan, model, classes, dev, progress, *found)
    return out


def _test_set(plan: EvalPlan, classes):
    from ..data import build_test_set, run_data, split_seed_of

    cfg = plan.cfg
    if plan.dataset or plan.data_dir:
        return build_test_set(plan.dataset or cfg.dataset, plan.data_dir or cfg.data_dir, run_classes=classes,
                              limit_eval=plan.limit, seed=split_seed_of(cfg), test_fraction=cfg.test_fraction,
                              skip_bad_images=cfg.skip_bad_images)
    data = run_data(dataclasses.replace(cfg, limit_eval=plan.limit))  # no limit: the whole test split
    if list(data.classes) != list(classes):
        raise UserError(f"the data's classes differ from the run's: {data.classes} vs {classes}")
    return data.test


def _attack_figures(plan: EvalPlan, model, classes, dev, progress) -> dict:
    """The attacks at every budget of the plan: flat `test_<attack>` figures for one budget, a `sweep` of rows for
    several (clean accuracy once); each with its number of images and what it measured."""
    test = _test_set(plan, classes)
    cfg = plan.cfg
    rows, images, clean = [], {}, None
    for i, (eps, step) in enumerate(zip(plan.eps, plan.step_sizes)):
        names = [n for n in plan.attacks if n != "clean" or i == 0]
        if not names:
            continue
        counts = count_correct(model, test, attacks=names, eps=eps, step_size=step, norm=plan.norm,
                               batch_size=plan.batch_size, device=dev, progress=progress,
                               desc=f"eval {budget_label(plan.norm, eps)}", all_reduce=dist.is_dist(), seed=cfg.seed,
                               keep=cfg.pgd_keep)
        row = {"eps": eps, "step_size": step}
        for k, (c, t) in counts.items():
            if k == "sa":
                clean = c / t if t else None
                images["test_sa"] = t
            else:
                row[f"test_{k}"] = c / t if t else None
                images[f"test_{k}"] = t
        rows.append(row)
    out = {"test_sa": clean} if "clean" in plan.attacks else {}
    if len(plan.eps) == 1:
        out.update({k: v for k, v in rows[0].items() if k.startswith("test_")})
        out["eps"], out["step_size"] = plan.eps[0], plan.step_sizes[0]
    else:
        out["sweep"] = rows
    out["images"] = images
    out["attacks"] = {n: (attack_record(n, eps=plan.eps[0], step_size=plan.step_sizes[0], norm=plan.norm,
                                        keep=cfg.pgd_keep)
                          if len(plan.eps) == 1 or n == "clean" else
                          {**(rec := attack_record(n, eps=None, step_size=None, norm=plan.norm, keep=cfg.pgd_keep)),
                           "eps": "per sweep row", **({"step_size": "per sweep row"} if "step_size" in rec else {})})
                  for n in plan.attacks}
    out.update({"num_test": len(test), "dataset": plan.dataset or cfg.dataset, "data_dir": plan.data_dir or cfg.data_dir,
                "data": "own" if not (plan.dataset or plan.data_dir) else "other", "limit": plan.limit})
    return out


def corruption_figures(plan: EvalPlan, model, classes, dev, progress, names, labels) -> dict:
    """Clean accuracy on each corruption × severity of CIFAR-10-C / CIFAR-100-C (the run's classes; at most
    `corruptions_limit` images per severity) and the mean over the 15 standard corruptions × 5 severities
    (RobustBench's `corruptions_acc`), plus the mean of the extra ones present. `names`, `labels`: what
    `find_corruptions` found in the directory."""
    from ..data.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, CorruptedImages, set_name
    acc, n = {}, None
    for name in names:
        acc[name] = []
        for s in SEVERITIES:
            ds = CorruptedImages(plan.corruptions, name, s, labels, classes, plan.corruptions_limit)
            c, t = count_correct(model, ds, attacks="clean", batch_size=plan.batch_size, device=dev,
                                 all_reduce=dist.is_dist())["sa"]
            acc[name].append(c / t if t else None)
            n = t
        if progress:
            print(f"corruptions: {name}: " + " ".join(f"{100 * a:.1f}" for a in acc[name]) + f" % (severities 1-5, "
                  f"{n} images each)", file=sys.stderr, flush=True)
    standard = [c for c in CORRUPTIONS if c in acc]
    extra = [c for c in EXTRA_CORRUPTIONS if c in acc]
    mean = lambda cs: sum(a for c in cs for a in acc[c]) / (len(SEVERITIES) * len(cs)) if cs else None  # noqa: E731
    return {"dir": os.path.abspath(plan.corruptions), "set": set_name(labels) + "-C",
            "images_per_severity": n, "accuracy": acc, "mean": mean(standard),
            "mean_of": f"{len(standard)} of the 15 standard corruptions × 5 severities",
            "complete": len(standard) == len(CORRUPTIONS), "missing": [c for c in CORRUPTIONS if c not in acc],
            "extra_mean": mean(extra)}


# ------------------------------------------------------------------------------------------------ showing
def figures_text(res: dict) -> str:
    """The figures as a person reads them: one line per figure with its attack and images, a sweep's table, the
    corruptions' table."""
    lines = []
    images, records = res.get("images") or {}, res.get("attacks") or {}
    norm = NORM_LABEL.get(res.get("norm"), res.get("norm"))

    def what(name):
        rec = records.get(name) or {}
        if rec.get("attack") == "pgd":
            return (f"{norm} PGD, {rec['steps']} steps" + (f", {rec['restarts']} restarts" if rec["restarts"] > 1 else ""))
        return f"{norm} AutoAttack ({rec.get('version')})" if rec.get("attack") == "autoattack" else "clean"

    if "sweep" in res:
        keys = [k for k in res["sweep"][0] if k.startswith("test_")]
        if res.get("test_sa") is not None:
            lines.append(f"clean accuracy {100 * res['test_sa']:.2f} % ({images.get('test_sa')} images)")
        lines += [f"| eps ({norm}) | step | " + " | ".join(f"{label(k)} (%)" for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for row in res["sweep"]:
            lines.append(f"| {eps_text(res['norm'], row['eps'])} | {row['step_size']:.4g} | "
                         + " | ".join("n/a" if row[k] is None else f"{100 * row[k]:.2f}" for k in keys) + " |")
        lines.append("(" + "; ".join(f"{label(k)}: {what(k[5:])} on {images.get(k)} images" for k in keys) + ")")
    else:
        for k, v in res.items():
            if k.startswith("test_") and v is not None:
                name = "clean" if k == "test_sa" else k[5:]
                budget = "" if name == "clean" else f" at {budget_label(res['norm'], res['eps'])}" + (
                    f", step {res['step_size']:.4g}" if name.startswith("pgd") else "")
                lines.append(f"{label(k)}: {100 * v:.2f} % ({what(name)}{budget}; {images.get(k)} images)")
    if res.get("corruptions"):
        c = res["corruptions"]
        lines += [f"{c['set']} ({c['images_per_severity']} images per corruption and severity):",
                  "| corruption | 1 | 2 | 3 | 4 | 5 |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | " + " | ".join(f"{100 * a:.2f}" for a in accs) + " |"
                  for name, accs in c["accuracy"].items()]
        if c["mean"] is not None:
            lines.append(f"mean accuracy over {c['mean_of']}: {100 * c['mean']:.2f} %"
                         + ("" if c["complete"] else f" (missing: {', '.join(c['missing'])})"))
    return "\n".join(lines)


def sweep_plot(res: dict, path: str) -> str:
    """Accuracy against the budget, one line per attack (clean accuracy dashed), to `path` (PNG)."""
    from ..utils.fileio import atomic_path
    from .report import _matplotlib

    plt = _matplotlib()

    rows = res["sweep"]
    keys = [k for k in rows[0] if k.startswith("test_")]
    xs = [r["eps"] * (255 if res["norm"] == "linf" else 1) for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, k in enumerate(keys):
        ax.plot(xs, [None if r[k] is None else 100 * r[k] for r in rows], "o-", color=f"C{i}",
                label=f"{label(k)} ({res['images'].get(k)} images)")
    if res.get("test_sa") is not None:
        ax.axhline(100 * res["test_sa"], color="k", ls="--", lw=1, label=f"clean ({res['images'].get('test_sa')})")
    norm = NORM_LABEL.get(res["norm"], res["norm"])
    ax.set_xlabel(f"{norm} eps" + (" (×1/255)" if res["norm"] == "linf" else ""))
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 101)
    ax.set_title(f"{os.path.basename(os.path.normpath(res['run_dir']))}: robustness vs budget ({norm})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path

