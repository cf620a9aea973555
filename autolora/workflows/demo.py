"""`autolora demo`: the whole pipeline offline, on real images shipped inside a dependency, on a CPU.

1. **Pre-train** a robust `tiny` ResNet from scratch on scikit-learn's handwritten digits 0–4 (FGSM-RS
   adversarial training, Wong et al. 2020) → OUT/pretrain/model.safetensors.
2. **Robust fine-tuning** of that backbone on the *other* digits, 5–9 (a new task with a fresh head), once with
   vanilla RFT (TRADES-style, the paper's baseline) and once with AutoLoRa (automated LR and λ), per seed, with
   the gradient-similarity diagnostic logged → OUT/<method>-s<seed>/ (ordinary `autolora train` run directories).
3. **Evaluation** of each run's best epoch (validation PGD-10) on held-out digits 5–9: clean, PGD-10 and the
   standard AutoAttack.
4. **Report** → OUT/report/report.md (the table, Welch t-tests with 2+ seeds, the curves of every run).

Budget: L∞ eps = 32/255 (digits are high-contrast: at 8/255 the pretrained model keeps 100 % PGD accuracy, so
nothing would be measured), step 8/255, PGD-5 in training and PGD-10 in evaluation. `--norm l2`: the same at L2
eps 1.0, step 0.25, pre-trained with PGD-3 (FGSM-RS is L∞ only). Every image stays at its
native 8x8 (see `autolora.data.digits`).

Time: the fine-tuning runs go in parallel worker processes (one thread each on a 2-core machine). AutoAttack
dominates: its Square attack runs 5,000 query iterations over the points that stay robust, so the held-out test set
is a seeded stratified subset of `test_size` = 50 images (10 per digit; the same cap applies to the validation
split). `--test-size 179` uses every held-out image (several times the AutoAttack time); `--seeds 3` gives Welch
t-test p-values. The README gives the measured wall time.

A second `autolora demo --out OUT` with the same settings resumes: finished parts are kept (pre-training with
results.json, runs likewise), interrupted ones continue from their last checkpoint, and the report is
rendered again. Other settings need `--overwrite`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

from ..attacks.norms import budget_label
from ..errors import UserError
from .compare import run_name

VERSION = 1
DEMO_METHODS = ("vanilla_rft", "autolora")
DEMO_FILES = {"demo.json", "pretrain", "report"}  # besides the fine-tuning runs <method>-s<seed>
# per norm: (eps, step, pre-training attack); digits are 8×8 and high-contrast, so both are 4× the usual budgets
DEMO_BUDGET = {"linf": (32 / 255, 8 / 255, "fgsm_rs"), "l2": (1.0, 0.25, "pgd")}


@dataclass
class DemoSettings:
    arch: str = "tiny"
    dataset: str = "digits"
    pretrain_classes: list = field(default_factory=lambda: ["0", "1", "2", "3", "4"])
    finetune_classes: list = field(default_factory=lambda: ["5", "6", "7", "8", "9"])
    norm: str = "linf"
    eps: float | None = None  # the norm's demo budget (DEMO_BUDGET)
    step_size: float | None = None
    # pre-training
    pretrain_attack: str | None = None  # fgsm_rs under L∞, pgd (PGD-3) under L2
    pretrain_steps: int = 3  # of a pgd pre-training
    pretrain_epochs: int = 15
    pretrain_lr: float = 0.2
    pretrain_batch_size: int = 64
    # robust fine-tuning (the methods' own presets otherwise: LR 0.01, step / automated schedule)
    methods: list = field(default_factory=lambda: list(DEMO_METHODS))
    seeds: list = field(default_factory=lambda: [0])
    epochs: int = 10
    batch_size: int = 64
    train_steps: int = 5
    limit_train: int | None = None
    val_fraction: float = 0.1  # 10 % of train (~70 images): the best epoch and AutoLoRa's LR halvings follow it
    auto_lr_interval: int = 2  # AutoLoRa's LR checked after epochs 2, 4, 6, 8 of 10 (the paper: every 4 of 60)
    test_size: int | None = 50  # held-out test images (stratified subset); AutoAttack's time grows with it
    eval_attacks: list = field(default_factory=lambda: ["clean", "pgd10", "aa"])
    gradsim_samples: int = 64
    device: str = "auto"

    def __post_init__(self):
        from ..attacks.norms import check_norm

        self.norm = check_norm(self.norm)
        eps, step, attack = DEMO_BUDGET[self.norm]
        self.eps = eps if self.eps is None else self.eps
        self.step_size = step if self.step_size is None else self.step_size
        self.pretrain_attack = attack if self.pretrain_attack is None else self.pretrain_attack

    @classmethod
    def quick(cls, **kw) -> "DemoSettings":
        """A seconds-long smoke version (tests, CI): tiny data, two epochs, no AutoAttack."""
        base = dict(pretrain_epochs=2, epochs=2, limit_train=60, test_size=20, train_steps=2,
                    eval_attacks=["clean", "pgd10"], gradsim_samples=16)
        return cls(**{**base, **kw})

    def finetune_config(self, method: str, seed: int, weights: str):
        from ..config import TrainConfig

        return TrainConfig(method=method, dataset=self.dataset, classes=list(self.finetune_classes), arch=self.arch,
                           weights=weights, input_size="native", epochs=self.epochs, batch_size=self.batch_size,
                           norm=self.norm, eps=self.eps, step_size=self.step_size, train_steps=self.train_steps,
                           eval_steps=10,
                           eval_attacks=list(self.eval_attacks), limit_train=self.limit_train,
                           val_fraction=self.val_fraction, auto_lr_interval=self.auto_lr_interval,
                           limit_eval=self.test_size, log_gradsim=True, gradsim_samples=self.gradsim_samples,
                           seed=seed, device=self.device, workers=0, progress=False)


# ------------------------------------------------------------------------------------------- workers
def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _pretrain_job(s: dict, out: str, threads: int | None, resume: bool) -> str:
    import torch

    from .pretrain import pretrain

    s = DemoSettings(**s)
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, threads or saved))  # the only job running: all cores
    try:
        return pretrain(s.arch, s.dataset, out=out, classes=s.pretrain_classes, attack=s.pretrain_attack,
                        steps=s.pretrain_steps, norm=s.norm, eps=s.eps, step_size=None, epochs=s.pretrain_epochs, lr=s.pretrain_lr,
                        batch_size=s.pretrain_batch_size, limit_train=s.limit_train, limit_eval=s.test_size,
                        eval_attacks=("clean", "pgd10"), seed=0, device=s.device, overwrite=not resume,
                        resume=resume, quiet=True, progress=False)
    finally:
        torch.set_num_threads(saved)


def _finetune_job(s: dict, method: str, seed: int, weights: str, out: str, resume: bool) -> dict:
    from ..engine.loop import train

    cfg = DemoSettings(**s).finetune_config(method, seed, weights)
    return train(cfg, out, resume=resume, overwrite=not resume, quiet=True)


class _Tail:
    """Prints the new lines of log files, prefixed with a name, while jobs run."""

    def __init__(self, echo):
        self.echo = echo
        self.pos: dict[str, int] = {}

    def watch(self, name: str, path: str, from_end: bool = False) -> None:
        self.pos[path] = (name, os.path.getsize(path) if from_end and os.path.exists(path) else 0)

    def poll(self) -> None:
        for path, (name, pos) in list(self.pos.items()):
            try:
                with open(path) as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            if "\n" not in chunk:
                continue
            done, _ = chunk.rsplit("\n", 1)
            self.pos[path] = (name, pos + len(done.encode()) + 1)
            for line in done.splitlines():
                stamp, _, text = line.partition("] ")
                self.echo(f"  [{name} {stamp.lstrip('[')}] {text}" if text else f"  [{name}] {line}")


class _Runner:
    """Runs (fn, args) jobs and echoes their logs meanwhile. One worker: in this process (no start-up cost);
    more: a pool of spawned processes with `threads` torch threads each, started at once so that their imports
    overlap with the first job."""

    def __init__(self, workers: int, threads: int, tail: _Tail):
        self.workers, self.threads, self.tail = workers, threads, tail
        self.pool = None

    def __enter__(self):
        # Idle OpenMP threads sleep instead of spinning: on a busy machine the spinning threads of several
        # processes slow each other down by an order of magnitude. Effective where torch is imported later;
        # where it was imported before without it, jobs run here single-threaded instead.
        passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
        self.inline_threads = self.threads if passive or "torch" not in sys.modules else 1
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                            initializer=_init_worker, initargs=(self.threads,))
            for _ in range(self.workers):  # start the workers now: they import torch while we go on
                self.pool.submit(int)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return False

    def run(self, jobs: list[tuple]) -> list:
        if self.pool is None:
            return self._inline(jobs)
        from concurrent.futures import FIRST_COMPLETED, wait

        futures = [self.pool.submit(fn, *args) for fn, args in jobs]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                self.tail.poll()
                for f in done:
                    f.result()  # re-raise a worker's error now (a UserError keeps its message)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        self.tail.poll()
        return [f.result() for f in futures]

    def _inline(self, jobs):
        import threading

        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(max(1, self.inline_threads))
        stop = threading.Event()

        def follow():
            while not stop.wait(1.0):
                self.tail.poll()

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        try:
            return [fn(*args) for fn, args in jobs]
        finally:
            stop.set()
            t.join()
            self.tail.poll()
            torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------------- the demo
def _prepare(out: str, s: DemoSettings, overwrite: bool) -> bool:
    """Create or check OUT; True when an earlier demo with the same settings is resumed."""
    from ..utils.fileio import atomic_write_json, check_writable

    check_writable(out)
    state = os.path.join(out, "demo.json")
    mine = {"version": VERSION, "settings": dataclasses.asdict(s)}
    entries = [e for e in os.listdir(out) if e != ".lock"] if os.path.isdir(out) else []
    if entries:
        if overwrite:
            foreign = sorted(e for e in entries if e not in DEMO_FILES and not e.startswith(tuple(s.methods)))
            if foreign or not os.path.exists(state):
                raise UserError(f"--overwrite {out}: it is not a demo directory (no demo.json, or files the demo did not "
                                f"write: {', '.join(foreign[:5]) or 'none'}); move it away or choose another --out")
            for e in entries:
                p = os.path.join(out, e)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        else:
            try:
                with open(state) as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                raise UserError(f"{out} exists and is not a demo directory (no readable demo.json): pass --overwrite "
                                "to replace it, or choose another --out") from None
            if saved.get("version") != VERSION or saved.get("settings") != mine["settings"]:
                old = saved.get("settings") or {}
                diff = [f"{k} {old.get(k)!r} → {v!r}" for k, v in mine["settings"].items() if old.get(k) != v]
                raise UserError(f"{out} holds a demo with other settings ({'; '.join(diff[:4]) or 'older version'}): "
                                "pass --overwrite to replace it, or choose another --out")
            return True
    os.makedirs(out, exist_ok=True)
    atomic_write_json(state, mine)
    return False


def _pretrain_section(pre: dict, out: str) -> str:
    test = pre.get("test") or {}
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    return "\n".join([
        "## Pre-training (digits " + ", ".join(pre.get("classes", [])) + ")", "",
        f"`{pre['arch']}` trained from scratch with {pre['attack'].upper().replace('_', '-')} adversarial training, "
        f"{budget_label(pre.get('norm', 'linf'), pre['eps'])}, {pre['epochs']} epochs ({pre['schedule']} LR, peak "
        f"{pre['lr']:g}) on "
        f"{pre['num_train']} images in {pre['seconds']:.0f} s; last-epoch training accuracy on its adversarial "
        f"examples {fmt(pre.get('train_ra'))}. On its {pre['num_test']} held-out test images: "
        f"clean {fmt(test.get('sa'))}, PGD-10 {fmt(test.get('pgd10'))}. Weights: "
        f"`{os.path.relpath(pre['weights'], out) if os.path.isabs(pre['weights']) else pre['weights']}` "
        "(plain layout; the fine-tuning runs load its backbone with `--weights` and train a new head).",
    ])


def run_demo(out: str = "runs/demo", settings: DemoSettings | None = None, *, overwrite: bool = False,
             jobs: int | None = None, echo=print) -> dict:
    """Run (or resume) the demo into `out`; returns {"report", "summary", "tests", "table", "seconds"}. The demo
    directory is locked while the demo runs; `overwrite` replaces only a demo directory (one with demo.json)."""
    from ..utils.fileio import check_writable
    from ..utils.dist import resolve_device
    from ..utils.lock import lock_dir

    s = settings or DemoSettings()
    if not s.methods or not s.seeds:
        raise UserError("the demo needs at least one method and one seed")
    resolve_device(s.device)  # a device this machine lacks is refused before anything is written
    check_writable(out)
    t0 = time.perf_counter()
    lock = lock_dir(out, f"demo directory {out}") if os.path.isdir(out) else None
    try:
        resumed = _prepare(out, s, overwrite)
        lock = lock or lock_dir(out, f"demo directory {out}")
        return _run_demo(out, s, resumed, jobs, echo, t0)
    finally:
        if lock is not None:
            lock.release()


def _run_demo(out, s, resumed, jobs, echo, t0) -> dict:
    from ..utils.fileio import atomic_write_json
    from .pretrain import pretrain_summary
    from .report import summary_markdown, write_report

    sd = dataclasses.asdict(s)
    cpus = _cpus()
    tail = _Tail(echo)
    echo(f"autolora demo → {out}{' (resuming: finished parts are kept)' if resumed else ''}")

    # what is left to do (a resumed demo keeps finished parts)
    pre_dir = os.path.join(out, "pretrain")
    pre_json = os.path.join(pre_dir, "results.json")
    weights = os.path.join(pre_dir, "model.safetensors")
    pre_done = os.path.exists(pre_json)
    todo, run_dirs = [], []
    for seed in s.seeds:
        for method in s.methods:
            d = os.path.join(out, run_name(method, "random", seed))
            run_dirs.append(d)
            if pre_done and os.path.exists(os.path.join(d, "results.json")):
                continue
            resume = pre_done and os.path.exists(os.path.join(d, "checkpoints", "last.pt")) and \
                os.path.exists(os.path.join(d, "config.yaml"))  # else (re)started from the new backbone
            todo.append((method, seed, d, resume))
    workers = max(1, min(len(todo), jobs or cpus))
    threads = max(1, cpus // workers)

    with _Runner(workers, threads, tail) as runner:
        # 1. pre-training on digits 0-4
        if pre_done:
            echo(f"1/3 pre-training: done earlier ({pre_json})")
        else:
            echo(f"1/3 pre-training a robust {s.arch} backbone on digits {','.join(s.pretrain_classes)} "
                 f"({s.pretrain_attack}, {budget_label(s.norm, s.eps)}, {s.pretrain_epochs} epochs)")
            pre_resume = os.path.exists(os.path.join(pre_dir, "config.yaml"))  # interrupted earlier: continue it
            tail.watch("pretrain", os.path.join(pre_dir, "train.log"), from_end=pre_resume)
            runner.run([(_pretrain_job, (sd, pre_dir, cpus if runner.pool is not None else None, pre_resume))])

        # 2. robust fine-tuning on digits 5-9
        if todo:
            echo(f"2/3 robust fine-tuning on digits {','.join(s.finetune_classes)}: {len(todo)} run(s) "
                 f"({', '.join(run_name(m, 'random', sd_) + (' resumed' if r else '') for m, sd_, _, r in todo)}), "
                 f"{workers} in parallel; {s.epochs} epochs, then test {'/'.join(s.eval_attacks)} on "
                 f"{s.test_size or 'all'} held-out images")
            for method, seed, d, resume in todo:
                tail.watch(run_name(method, "random", seed), os.path.join(d, "train.log"), from_end=resume)
            runner.run([(_finetune_job, (sd, m, seed, weights, d, r)) for m, seed, d, r in todo])
        else:
            echo("2/3 robust fine-tuning: all runs done earlier")
    pre = pretrain_summary(pre_dir)

    # 3. report
    echo("3/3 report")
    intro = (f"The offline demo: a `{s.arch}` ResNet adversarially pre-trained from scratch on scikit-learn's "
             f"handwritten digits {', '.join(s.pretrain_classes)}, then robustly fine-tuned on the other digits "
             f"({', '.join(s.finetune_classes)}) with vanilla RFT and with AutoLoRa; {budget_label(s.norm, s.eps)}, "
             f"PGD-{s.train_steps} in training, {s.epochs} epochs, "
             f"{len(s.seeds)} seed(s). Images are 8x8. Made by `autolora demo --out {out}` (running it again re-renders "
             f"this report; `autolora report {out}` renders the tables and plots alone).")
    rep = write_report(run_dirs, os.path.join(out, "report"), title="autolora demo: robust fine-tuning on digits",
                       intro=intro, extra_sections=[_pretrain_section(pre, os.path.join(out, "report"))])
    table = summary_markdown(rep["summary"])
    seconds = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "demo.json")) as f:
        state = json.load(f)
    state.update({"table": table, "summary": rep["summary"], "last_seconds": seconds})
    atomic_write_json(os.path.join(out, "demo.json"), state)
    return {"report": rep["report"], "summary": rep["summary"], "tests": rep["tests"], "table": table,
            "seconds": seconds, "pretrain": pre}

