"""The one trainer for every method: epochs, validation, best-epoch selection, LR schedules, checkpoints.

    train(cfg, out)  ->  check the location  ->  resolve and validate everything (config, data, model, weights,
    each stage's method)  ->  open the run directory (locked)  ->  each stage: build, restore, then per epoch
    run_epoch -> decide_lr -> save  ->  finish: export, test, results.json

Each epoch: (method hook, e.g. AutoLoRa's λ) → train → clean and PGD-k accuracy on the validation split → keep the
best epoch by validation PGD-k (never by test data) → LR decision (step or automated, with roll-back) → atomic
checkpoint. At the end the best model is exported and evaluated on the test split. `resume(out)` continues a run
from its last checkpoint with its saved config.

The run directory's lifecycle (lock, `--overwrite` built beside the old run and swapped in once the new run has a
checkpoint, nothing left behind by a failed start) is `engine.rundir.RunDir`'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Subset

from ..attacks.base import eval_mode
from ..attacks.norms import budget_label
from ..attacks.registry import attack_record, parse_attacks, pgd_name
from ..config import ITERATION_SCHEDULES, TrainConfig, load_yaml
from ..data import run_data
from ..errors import UserError
from ..eval import eval_batch_size, eval_loader, evaluate
from ..methods import METHOD_REGISTRY, create_method, resolve_config
from ..models import resolve_arch, run_model
from ..models.export import save_model
from ..models.precision import cpu_has_native_bf16
from ..data.samplers import EpochSampler, SeededItems
from ..utils import dist
from ..utils.fileio import WriteFailed, append_line, atomic_write_json, atomic_write_text
from ..utils.seeding import get_rng_state, seed_everything, seed_worker, set_deterministic, set_rng_state
from .checkpoints import load_checkpoint, save_checkpoint
from .faults import fault_armed, maybe_fault, maybe_wait
from .rundir import RunDir
from .runlog import RunLog, Scalars
from .schedules import AutoLR, StepLR, WarmupCosine, iteration_lr
from .speed import resolve_runtime

CKPT_VERSION = 2  # 2: AutoLR state of the authors' rules (schedules.py)


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops, the last good checkpoint (if any) stays."""


class InterruptedBeforeStart(KeyboardInterrupt):
    """Ctrl-C / SIGTERM before the run had anything to keep: what it made was removed, an old run left as it was."""


# ------------------------------------------------------------------------------------------------
# context shared with methods
# ------------------------------------------------------------------------------------------------
@dataclass
class Context:
    cfg: TrainConfig
    device: torch.device
    data: object
    log: RunLog
    progress: bool
    amp: bool = False  # bf16 autocast in training steps
    channels_last: bool = False
    scalars: Scalars | None = None  # --tensorboard
    train_eval_loader: DataLoader | None = None  # the stage's training split in evaluation batches (AutoLoRa's SA)
    eval_modules: list = field(default_factory=list)  # put in eval mode by `accuracy`
    params: dict = field(default_factory=dict)  # per stage: trainable and LoRa parameter counts

    @torch.inference_mode()
    def accuracy(self, fn, loader) -> float:
        """Clean accuracy of `fn` (logits of a batch) in eval mode over a loader, summed across DDP ranks. Counts
        accumulate on the device and are read once."""
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        total = 0
        with contextlib.ExitStack() as stack:
            for mod in self.eval_modules:
                stack.enter_context(eval_mode(mod))
            for x, y in loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                correct += (fn(x).argmax(1) == y).sum()
                total += y.numel()
        correct, total = dist.all_reduce_sum(int(correct), total, device=self.device)
        return correct / max(total, 1)


def _workers(cfg: TrainConfig, device) -> int:
    """DataLoader worker processes: --workers, else 0 on CPU and up to 8 per process on CUDA."""
    if cfg.workers is not None:
        return cfg.workers
    return 0 if device.type != "cuda" else min(8, max(1, (os.cpu_count() or 1) // max(1, dist.world_size())))


def train_loader(ds, cfg: TrainConfig, device, stage_index: int) -> DataLoader:
    """The training loader of a stage, built once (its workers persist across epochs): call
    `loader.sampler.set_epoch(e)` before epoch e. The order of epoch e depends only on (seed, stage, e) and each
    item's augmentation only on (seed, stage, e, index) (`data.samplers.EpochSampler`, `SeededItems`), so the run is
    the same whatever --workers and world size, and a resumed run continues it exactly. Under torchrun each rank
    takes its round-robin share of the permutation. On CUDA: pinned memory, so copies overlap the GPU's work."""
    workers = _workers(cfg, device)
    seed = _stage_seed(cfg, stage_index)
    sampler = EpochSampler(len(ds), seed)
    drop_last = len(sampler) % cfg.batch_size == 1  # a batch of one breaks batch norm in train mode; same on all ranks
    return DataLoader(SeededItems(ds, seed), batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=workers > 0,
                      worker_init_fn=seed_worker if workers else None,
                      generator=torch.Generator().manual_seed(seed), **({"prefetch_factor": 4} if workers else {}))


def _eval_loader(ds, cfg: TrainConfig, device, keyed: bool = False) -> DataLoader:
    """Validation / test / SA-pass loader: whole batches, this rank's share under torchrun (`ShardBatches`)."""
    return eval_loader(ds, eval_batch_size(cfg), workers=_workers(cfg, device), pin_memory=device.type == "cuda",
                       shard=dist.is_dist(), keyed=keyed)


def _stage_seed(cfg: TrainConfig, stage_index: int) -> int:
    """Seed of a stage's data order and augmentation (`train_loader`, the SA pass)."""
    return cfg.seed * 1_000_003 + stage_index * 10_007


def val_key(cfg: TrainConfig) -> str:
    """The metrics key of the validation robust accuracy: val_pgd<eval-steps> (named by what ran)."""
    return "val_" + pgd_name(cfg.eval_steps)


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
def plan_stages(cfg: TrainConfig) -> list[tuple[str, str, int]]:
    """[(stage name, method, epochs)]: RoLI (Hua et al. 2024) prepends adversarial linear probing."""
    if cfg.init == "roli" and cfg.method != "linear_probe" and cfg.probe_from is None:  # else stage 1 was a run
        return [("probe", "linear_probe", cfg.probe_epochs), ("main", cfg.method, cfg.epochs)]
    return [("main", cfg.method, cfg.epochs)]


def stage_config(cfg: TrainConfig, stage: str, epochs: int) -> TrainConfig:
    """The config a stage trains with: RoLI's probing stage has its own LR, weight decay and schedule, and SGD."""
    if stage != "probe":
        return cfg
    from ..config import default_milestones

    wd = cfg.weight_decay if cfg.probe_weight_decay is None else cfg.probe_weight_decay
    return dataclasses.replace(cfg, lr=cfg.probe_lr, lr_schedule=cfg.probe_lr_schedule, select="best", epochs=epochs,
                               milestones=default_milestones(epochs), weight_decay=wd, optimizer="sgd")


def _param_count(params) -> int:
    return sum(p.numel() for p in params)


def _val_metrics(method, ctx: Context, val_loader) -> dict:
    cfg = ctx.cfg
    k = pgd_name(cfg.eval_steps)
    # fp32; under torchrun each rank attacks its shard and the counts are summed: every rank gets the figures
    # of the whole split, so the best-epoch and LR decisions are the same on all ranks
    res = evaluate(method.eval_model(), val_loader, attacks=["clean", k], eps=cfg.eps, step_size=cfg.step_size,
                   norm=cfg.norm, device=ctx.device, progress=False, desc="val", all_reduce=dist.is_dist(),
                   seed=cfg.seed, keep=cfg.pgd_keep)
    return {"val_sa": res["sa"], "val_" + k: res[k]}


def _grad_similarity(method, ctx: Context) -> float | None:
    """The paper's gradient similarity (Eq. 3, 4, 8) on a fixed seeded subset of `gradsim_samples` training
    images, in mini-batches of up to 64: `gradsim_mode` "batch" averages the per-batch cosines of batch-objective
    gradients; "per_example" averages every example's own cosine, as the paper defines it (B× the backward work).

    Runs under a forked RNG, so logging it does not change the training run."""
    ds = ctx.data.train
    n = min(ctx.cfg.gradsim_samples, len(ds))
    g = torch.Generator().manual_seed(ctx.cfg.seed + 12345)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    loader = DataLoader(Subset(ds, idx), batch_size=min(64, n), shuffle=False)
    per_example = ctx.cfg.gradsim_mode == "per_example"
    sims = []
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(ctx.cfg.seed + 777)
        for x, y in loader:
            if len(y) < 2:
                continue
            s = method.grad_similarity(x.to(ctx.device), y.to(ctx.device), per_example=per_example)
            if s is None:
                return None
            sims.extend(s) if per_example else sims.append(s)
    return sum(sims) / len(sims) if sims else None


def train_epoch(method, opt, ctx: Context, loader, stage: str, epoch: int, lr_at_step=None,
                has_checkpoint: bool = True) -> dict:
    """One epoch of training steps; `lr_at_step(step)`, when given, sets the LR of each step (per-iteration
    schedules). The step never waits for the device: loss and correct counts accumulate there and are read once
    at the end (and every 20 steps for a progress bar), so on a GPU the host queues step after step. A non-finite
    loss is found then, by its step, and stops the run (`TrainingDiverged`) before anything is saved."""
    dev = ctx.device
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if ctx.amp else None
    losses, sizes, n = [], [], 0
    correct = {"correct_nat": torch.zeros((), device=dev), "correct_adv": torch.zeros((), device=dev)}
    seen = set()
    it = loader
    bar = ctx.progress and dist.is_main()
    if bar:
        from tqdm import tqdm

        it = tqdm(loader, desc=f"{stage} epoch {epoch}", leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(it):
        maybe_fault("kill_at_step", stage, epoch, step)  # test-only (AUTOLORA_FAULT)
        maybe_wait("wait_at_step", stage, epoch, step)
        if lr_at_step is not None:
            _set_lr(opt, lr_at_step(step))
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        method.train_mode()
        if amp is not None:
            with amp:
                out = method.training_step(x, y)
        else:
            out = method.training_step(x, y)
        loss = out["loss"]
        if fault_armed("nan_loss", stage, epoch, step):  # test-only (AUTOLORA_FAULT)
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        b = y.numel()
        n += b
        losses.append(loss.detach().float())
        sizes.append(b)
        for k in correct:
            if k in out:
                correct[k] += out[k]
                seen.add(k)
        if bar and hasattr(it, "set_postfix") and step % 20 == 0:
            it.set_postfix(loss=f"{loss.item():.3f}")
    per_step = torch.stack(losses) if losses else torch.zeros(0, device=dev)
    bad = (~torch.isfinite(per_step)).nonzero()
    if len(bad):
        step = int(bad[0])
        kept = ("the last good checkpoint is kept" if has_checkpoint else
                "it had no checkpoint yet, so nothing of it was kept")
        raise TrainingDiverged(
            f"non-finite training loss ({float(per_step[step])}) in {stage} epoch {epoch}, step {step}: the run "
            f"stopped; {kept}; lower --lr or check the data")
    loss_sum = float((per_step * torch.tensor(sizes, dtype=per_step.dtype, device=dev)).sum()) if losses else 0.0
    loss_sum, nat, adv, n = dist.all_reduce_sum(loss_sum, float(correct["correct_nat"]),
                                             float(correct["correct_adv"]), n, device=dev)
    return {"train_loss": loss_sum / max(n, 1), "train_sa": nat / n if "correct_nat" in seen and n else None,
            "train_ra": adv / n if "correct_adv" in seen and n else None}


def make_optimizer(method, cfg: TrainConfig):
    """The stage's optimiser over the method's trainable parameters, at its initial LR:
    - `sgd`: momentum `cfg.momentum`, weight decay on every parameter (the AutoLoRa paper's protocol);
    - `adamw` as RoLI runs it (`src/solver/optimizer.py`): betas (0.9, 0.999), eps 1e-6, decoupled decay on every
      parameter whose name has no 'bias' (so Swin's relative_position_bias_table is not decayed; LayerNorm weights,
      named norm*.weight, are), none on the others; with weight decay 0 their code switches to SGD with momentum and
      no decay, and so does this."""
    named = method.named_trainable_parameters()
    if not named:
        raise UserError(f"method '{method.name}' has no trainable parameters")
    if cfg.optimizer == "adamw" and cfg.weight_decay > 0:
        decay = [p for n, p in named if "bias" not in n]
        rest = [p for n, p in named if "bias" in n]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6)
    wd = 0.0 if cfg.optimizer == "adamw" else cfg.weight_decay
    return torch.optim.SGD([p for _, p in named], lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _cpu_state(module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@dataclass
class Stage:
    """One stage of a run (RoLI has two: probe, main) as it trains."""

    index: int
    name: str
    method: object
    cfg: TrainConfig  # the stage's config (`stage_config`)
    epochs: int
    opt: object
    sched: object  # AutoLR or StepLR
    loader: DataLoader
    val_loader: DataLoader
    best: dict = field(default_factory=lambda: {"epoch": None, "val_sa": None, "val_ra": -1.0})
    best_state: dict | None = None
    start: int = 0
    stopped: bool = False
    improved: bool = False  # the last epoch is the best so far

    @property
    def auto(self) -> bool:
        return self.cfg.lr_schedule == "auto"


def build_stage(ctx: Context, si: int, name: str, method_name: str, epochs: int, model) -> Stage:
    """The stage's method (on the device, DDP-wrapped under torchrun), loaders, optimiser and LR schedule."""
    cfg = ctx.cfg
    scfg = stage_config(cfg, name, epochs)
    method = create_method(method_name, model, scfg)
    method.prepare(ctx.device, amp=bool(cfg.amp), channels_last=bool(cfg.channels_last), compile=cfg.compile,
                   sync_bn=cfg.sync_bn)
    ctx.eval_modules = [method.net]
    # AutoLoRa's SA (Eq. 6, 7) of epoch e: the training split as augmented in epoch e, whoever loads it
    ctx.train_eval_loader = _eval_loader(SeededItems(ctx.data.train, _stage_seed(cfg, si)), cfg, ctx.device,
                                         keyed=True)
    if scfg.lr_schedule == "auto":
        sched = AutoLR(lr=scfg.lr, interval=scfg.auto_lr_interval, min_lr=scfg.min_lr, epochs=epochs,
                       rules=scfg.auto_lr_rules)
    elif scfg.lr_schedule == "warmup_cosine":
        sched = WarmupCosine(scfg.lr, scfg.warmup_epochs, epochs)
    else:
        sched = StepLR(scfg.lr, scfg.milestones)
    ctx.params[name] = {"trainable_params": _param_count(method.trainable_parameters()),
                        "lora_params": _param_count(method.lora_parameters())}
    total = _param_count(method.net.parameters())
    ctx.log(f"{name}: {method_name}" + (f" --peft {scfg.peft}" if scfg.peft != "none" and method_name == "madry_ft" else "")
            + f", trainable parameters {ctx.params[name]['trainable_params']:,} of {total:,} "
            f"({100 * ctx.params[name]['trainable_params'] / max(total, 1):.2f} %)")
    return Stage(si, name, method, scfg, epochs, make_optimizer(method, scfg), sched,
                 train_loader(ctx.data.train, cfg, ctx.device, si), _eval_loader(ctx.data.val, cfg, ctx.device))


def restore_stage(ctx: Context, run: RunDir, st: Stage, state: dict) -> None:
    """Continue a stage from `last.pt`: weights, optimiser, schedule, method state, best epoch, RNG."""
    if state.get("version") != CKPT_VERSION:
        raise UserError(f"{run.last} was written by an older autolora (checkpoint version {state.get('version')}, this "
                        f"one writes {CKPT_VERSION}), whose schedules differ: start a new run instead of resuming it")
    load_state(st.method.net, state["net"], run, state)
    st.opt.load_state_dict(state["optimizer"])
    if st.auto:
        st.sched.load_state_dict(state["sched"])
    st.method.load_extra_state(state.get("method", {}))
    best = dict(state["best"])
    best.setdefault("val_ra", best.pop("val_pgd10", -1.0))  # checkpoints before the figures were named by steps
    st.best = best
    st.start = state["epoch"] + 1
    st.stopped = state.get("stopped", False)
    st.best_state = _load_best(run, st.name, st.best, state)
    rng_ranks = state.get("rng_ranks")
    if rng_ranks and len(rng_ranks) == dist.world_size():
        set_rng_state(rng_ranks[dist.rank()])
    elif dist.is_main():  # another world size than the saved run's: the other ranks keep their fresh seeds
        set_rng_state(state["rng"])
    ctx.log(f"resumed {st.name} stage after epoch {state['epoch']} (best epoch {st.best['epoch']})")


def load_state(net, sd: dict, run: RunDir, state: dict) -> None:
    """`net.load_state_dict(sd)`, or one UserError saying which setting of config.yaml differs from the checkpoint."""
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        saved = state.get("config") or {}
        now = TrainConfig.from_saved(load_yaml(run.file("config.yaml")), run.file("config.yaml")).to_dict()
        keys = ("method", "init", "peft", "arch", "input_size", "rank", "lora_filter", "classes", "dataset", "weights")
        diff = [f"{k}: checkpoint {saved[k]!r}, config.yaml {now.get(k)!r}" for k in keys
                if k in saved and saved[k] != now.get(k)]
        detail = "; ".join(diff) if diff else str(e).strip().splitlines()[0][:160]
        raise UserError(f"{run.last} does not fit {run.file('config.yaml')} ({detail}): config.yaml was edited after "
                        "the run started; put the setting back, or start a new run with the new settings") from None


def start_auto_lr(ctx: Context, st: Stage) -> None:
    """Algorithm 1: the validation robust accuracy before training, then the checkpoint epochs."""
    ra0 = _val_metrics(st.method, ctx, st.val_loader)[val_key(ctx.cfg)]
    st.sched.start(ra0)
    checks = [e for e in range(st.epochs) if st.sched.is_check(e)]
    ctx.log(f"{st.name}: automated LR ({st.sched.rules} rules), eta0={st.sched.lr:g}, checked after epochs "
            f"{', '.join(map(str, checks)) or 'none'}; validation PGD-{ctx.cfg.eval_steps} before training {ra0:.4f}")


def run_epoch(ctx: Context, st: Stage, epoch: int, has_checkpoint: bool) -> dict:
    """Train one epoch and validate: the epoch's metrics row; the best epoch updated."""
    cfg, t0 = ctx.cfg, time.perf_counter()
    ctx.train_eval_loader.batch_sampler.set_epoch(epoch)
    records = st.method.on_epoch_start(ctx)
    st.loader.sampler.set_epoch(epoch)
    lr_at_step = None
    if st.cfg.lr_schedule in ITERATION_SCHEDULES:
        n = len(st.loader)
        lr_at_step = lambda step, e=epoch, n=n: iteration_lr(  # noqa: E731
            st.cfg.lr_schedule, st.cfg.lr, e * n + step, st.epochs * n)
        lr = lr_at_step(0)
    else:
        lr = st.sched.lr if st.auto else st.sched.lr_at(epoch)
    _set_lr(st.opt, lr)
    tr = train_epoch(st.method, st.opt, ctx, st.loader, st.name, epoch, lr_at_step, has_checkpoint)
    dist.broadcast_buffers(st.method.net)  # BN statistics: rank 0's on every rank before evaluating / saving
    val = _val_metrics(st.method, ctx, st.val_loader)
    ra = val[val_key(cfg)]
    st.improved = st.cfg.select == "last" or ra > st.best["val_ra"]
    if st.improved:
        st.best = {"epoch": epoch, "val_sa": val["val_sa"], "val_ra": ra}
        st.best_state = _cpu_state(st.method.net)
    row = {"stage": st.name, "epoch": epoch, "lr": lr, **tr, **val, **records}
    if cfg.log_gradsim:
        row["grad_sim"] = _grad_similarity(st.method, ctx)
    row["_t0"] = t0
    return row


def decide_lr(ctx: Context, st: Stage, epoch: int, row: dict) -> None:
    """The automated LR (Algorithm 1): halve at a checkpoint epoch on Condition 1 or 2 and roll back to the best
    epoch; stop below --min-lr. The step and per-iteration schedules decide nothing here."""
    if not st.auto:
        return
    cfg = ctx.cfg
    dec = st.sched.observe(epoch, row[val_key(cfg)])
    if dec.halve:
        row["lr_event"] = f"halved to {st.sched.lr:g} ({dec.reason}); rolled back to epoch {st.best['epoch']}"
        ctx.log(f"{st.name} epoch {epoch}: LR halved {row['lr']:g} -> {st.sched.lr:g} by {dec.reason}; rolling back "
                f"to the best epoch {st.best['epoch']} (val PGD-{cfg.eval_steps} {st.best['val_ra']:.4f})"
                + ("; optimiser momentum cleared" if cfg.reset_momentum_on_rollback else ""))
        st.method.net.load_state_dict(st.best_state)
        if cfg.reset_momentum_on_rollback:
            st.opt.state.clear()
    if dec.stop:
        st.stopped = True
        row["lr_event"] = row.get("lr_event", "") + f"; stop: LR {st.sched.lr:g} < {st.cfg.min_lr:g}"


def save_epoch(ctx: Context, run: RunDir, st: Stage, epoch: int, row: dict, rows: list, finished: list) -> None:
    """The epoch's checkpoint (last.pt, then best.pt when it improved), its metrics row and log line. The run is
    committed (an --overwrite's new directory swapped in) once its first checkpoint exists."""
    row["seconds"] = round(time.perf_counter() - row.pop("_t0"), 3)
    rows.append(row)
    _checkpoint(ctx, run, st, epoch, rows, finished)
    if dist.is_main():
        run.commit()
    maybe_fault("kill_after_checkpoint", st.name, epoch)  # test-only: last.pt written, best.pt not yet
    if st.improved and dist.is_main():
        save_checkpoint({"version": CKPT_VERSION, "stage": st.name, "epoch": epoch, "net": st.best_state},
                        run.best(st.name))
    if dist.is_main():
        append_line(run.file("metrics.jsonl"), json.dumps(row))
    ctx.scalars.add(row, len(rows))  # after the checkpoint: a resumed run does not write this epoch twice
    ctx.log(_row_line(row))
    if st.stopped:
        ctx.log(f"{st.name}: learning rate below {st.cfg.min_lr:g}; training stops after epoch {epoch}")


def run_stage(ctx: Context, run: RunDir, si: int, name: str, method_name: str, epochs: int, model,
              resume_state: dict | None, rows: list, finished: list) -> dict:
    """Train one stage; returns its summary (best epoch and validation figures)."""
    st = build_stage(ctx, si, name, method_name, epochs, model)
    if resume_state is not None:
        restore_stage(ctx, run, st, resume_state)
    elif st.auto:
        start_auto_lr(ctx, st)
    epoch = st.start - 1
    for epoch in range(st.start, epochs if not st.stopped else st.start):  # a resumed stage that had stopped: done
        row = run_epoch(ctx, st, epoch, has_checkpoint=bool(rows) or resume_state is not None)
        decide_lr(ctx, st, epoch, row)
        save_epoch(ctx, run, st, epoch, row, rows, finished)
        if st.stopped:
            break
    if st.best_state is None:  # zero epochs: the starting weights are the result
        st.best_state = _cpu_state(st.method.net)
    st.method.net.load_state_dict(st.best_state)
    k = val_key(ctx.cfg)
    return {"stage": name, "method": method_name, "best_epoch": st.best["epoch"], "best_val_sa": st.best["val_sa"],
            "best_" + k: st.best["val_ra"] if st.best["epoch"] is not None else None,
            "epochs_run": epoch + 1 if epochs else 0, "method_obj": st.method}


def _load_best(run: RunDir, stage: str, best: dict, resume_state: dict):
    if best["epoch"] is None:
        return None
    if best["epoch"] == resume_state["epoch"]:
        # last.pt holds the best weights (a roll-back at the best epoch itself restores exactly them). best.pt
        # lags when the process died between writing last.pt and best.pt: write it now, or a later resume that
        # needs it would find the older epoch there.
        net = {k: v.clone() for k, v in resume_state["net"].items()}
        if dist.is_main():
            save_checkpoint({"version": CKPT_VERSION, "stage": stage, "epoch": best["epoch"], "net": net},
                            run.best(stage))
        return net
    ck = load_checkpoint(run.best(stage))
    if ck.get("epoch") != best["epoch"]:
        raise UserError(f"{run.best(stage)} holds epoch {ck.get('epoch')} but the run's best epoch is "
                        f"{best['epoch']}: the run directory is inconsistent; start a new run")
    return ck["net"]


def _checkpoint(ctx: Context, run: RunDir, st: Stage, epoch: int, rows: list, finished: list) -> None:
    rng_ranks = dist.all_gather_object(get_rng_state()) if dist.is_dist() else None  # collective: before the rank test
    if not dist.is_main():
        return
    save_checkpoint({
        "version": CKPT_VERSION, "stage_index": st.index, "stage": st.name, "epoch": epoch,
        "net": st.method.net.state_dict(), "optimizer": st.opt.state_dict(),
        "sched": st.sched.state_dict() if st.auto else None, "method": st.method.extra_state(),
        "best": st.best, "rows": rows, "finished_stages": finished, "rng": get_rng_state(), "stopped": st.stopped,
        "rng_ranks": rng_ranks,  # under torchrun: every rank's RNG state (rank r resumes with its own)
        "config": ctx.cfg.to_dict(), "threads": torch.get_num_threads(),
    }, run.last, fault_where=(st.name, epoch))


def _row_line(row: dict) -> str:
    parts = [f"{row['stage']} epoch {row['epoch']}", f"lr {row['lr']:.3g}", f"loss {row['train_loss']:.4f}"]
    for k, v in row.items():
        if (k in ("train_sa", "lambda1", "lambda2", "lora_train_sa", "grad_sim") or k.startswith("val_")) \
                and v is not None:
            parts.append(f"{k} {v:.4f}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out: str, *, overwrite: bool = False, quiet: bool = False, command: str = "train",
          inputs: dict | None = None, resume: bool = False, model=None) -> dict:
    """Train as `cfg` says into run directory `out`; returns results.json's content.

    Nothing is created, replaced or removed until the config, the data, the model with its weights and each
    stage's method have been checked; `overwrite` replaces an existing run directory only then, by building the new
    run beside it and swapping it in once it has its first checkpoint (`engine.rundir.RunDir`). The directory is
    locked while the run goes on. `inputs` names further files the run reads (e.g. {"--config": path}) that `out`
    must not hold. `command` is the CLI command that error messages tell the user to resume with. `model` is a
    classifier of your own, `create_model(module, num_classes, mean=..., std=...)` (cfg.arch and cfg.weights then
    stay unset; config.yaml records its arch as `module:<class>`), fine-tuned instead of one built from the config.

    Under torchrun (WORLD_SIZE > 1) this initialises the process group (nccl on CUDA with one GPU per process,
    gloo on CPU) unless the caller did, trains with DDP (each rank a shard of every epoch; validation counts and
    the λ schedule's SA summed over ranks, so every decision is the same on all ranks), and rank 0 alone writes
    logs, checkpoints and results. The final test evaluation (AutoAttack included) is shared out over the ranks in
    whole batches and the counts summed, so its figures equal a 1-process `autolora eval`.
    Every rank returns the same results. (`resume=True` is `resume(out)`, kept for callers of the earlier API.)"""
    if resume:
        return globals()["resume"](out, quiet=quiet, command=command, model=model)
    return _launch(cfg, out, cfg.device, command, resume=False, overwrite=overwrite, quiet=quiet,
                   inputs=inputs or {}, model=model)


# what a resumed run may change: evaluation and display only, never what the run computes
RESUME_MAY_CHANGE = ("eval_attacks", "progress")


def resume(out: str, *, quiet: bool = False, command: str = "train", overrides: dict | None = None,
           model=None) -> dict:
    """Continue the run in `out` from its last checkpoint, with its saved config.yaml (read once, here).
    `overrides` are options given again (the CLI's flags): one that differs from the saved value is an error,
    unless it is in RESUME_MAY_CHANGE (--eval-attacks: they do not change training; config.yaml records it). A run
    of your own module needs `model` again (a fresh `create_model(module, ...)`; the checkpoint gives its weights)."""
    run = RunDir(out)
    run.check(resume=True, overwrite=False)
    cfg = TrainConfig.from_saved(load_yaml(run.file("config.yaml")), run.file("config.yaml"))
    if os.path.exists(run.file("results.json")):
        raise UserError(f"run {out} has already finished (results.json exists); nothing to resume")
    changed = {}
    for k, v in (overrides or {}).items():
        if getattr(cfg, k) == v:
            continue
        if k not in RESUME_MAY_CHANGE:
            raise UserError(f"--{k.replace('_', '-')} {v} conflicts with --resume {out}: the run's saved value is "
                            f"{getattr(cfg, k)!r}; drop the flag (a resumed run keeps its config; only "
                            f"{', '.join('--' + f.replace('_', '-') for f in RESUME_MAY_CHANGE)} may change)")
        changed[k] = v
    if "eval_attacks" in changed:
        parse_attacks(changed["eval_attacks"], cfg.eval_steps)
    if str(cfg.arch).startswith("module:") and model is None:
        raise UserError(f"run {out} fine-tunes a module of your own ({cfg.arch[len('module:'):]}): resume it from "
                        "Python with autolora.resume(out, model=create_model(module, num_classes, mean=..., std=...))")
    cfg = dataclasses.replace(cfg, **changed)
    return _launch(cfg, out, cfg.device, command, resume=True, overwrite=False, quiet=quiet, inputs={},
                   update_config="eval_attacks" in changed, model=model)


def _launch(cfg, out, device_name, command, **kw) -> dict:
    device = dist.resolve_device(device_name)
    with dist.process_group(device):
        try:
            return _train(cfg, out, device, **kw)
        except WriteFailed as e:
            raise WriteFailed(f"{e}. Nothing else is lost: once the disk has room, `autolora {command} --resume {out}` "
                              "continues from the last good checkpoint") from None


def _train(cfg: TrainConfig, out: str, device, *, resume: bool, overwrite: bool, quiet: bool, inputs: dict,
           update_config: bool = False, model=None) -> dict:
    dist.setup_groups()
    run = RunDir(out)
    run.check(resume=resume, overwrite=overwrite,
              inputs={"--data-dir": cfg.data_dir, "--weights": cfg.weights, **inputs})
    if dist.is_main():
        run.lock_existing()  # another process training this directory: an error now, naming its PID
    dist.barrier()
    log = RunLog(run, quiet=quiet)
    try:
        return _run(cfg, run, device, log, resume=resume, overwrite=overwrite, update_config=update_config,
                    model=model)
    except KeyboardInterrupt:
        if dist.is_main() and not run.committed:
            run.abort()
            raise InterruptedBeforeStart() from None
        raise
    except BaseException:
        if dist.is_main():
            run.abort()  # only before the run had anything to keep: its own files; an old run stays as it was
        raise
    finally:
        log.close()
        run.close()


def _preflight(cfg: TrainConfig, device, log: RunLog, resume: bool, given=None):
    """Everything that can be wrong with the run, checked before its directory is touched: the config resolved
    with the method's presets, the data, the model with its weights (or the `given` classifier; either way the arch
    it has is the config's), each stage's method against the model."""
    cfg = resolve_config(cfg)
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel): drop it for a CPU run")
    if cfg.tensorboard:
        Scalars.writer_class()  # missing package: fail before anything is built or written
    if given is None:
        resolve_arch(cfg.arch, cfg.weights)  # the names of arch and weights, before the data is read
    if cfg.download and not dist.is_main():
        dist.barrier()  # rank 0 downloads first
    data = run_data(cfg)
    if cfg.download and dist.is_main():
        dist.barrier()
    cfg = cfg.resolve_budget(data.resolution)  # eps / step None: the norm's defaults for the data's resolution
    model = run_model(cfg, len(data.classes), given)
    if cfg.init == "roli" and cfg.probe_from is not None and not resume:  # resumed: the checkpoint holds the head
        from ..models.export import load_probe_head

        load_probe_head(model, cfg.probe_from, list(data.classes))
    own = {"input_size": str(model.input_size or "none")} if given is not None else {}
    cfg = dataclasses.replace(cfg, arch=model.arch, **own)
    cfg = resolve_runtime(cfg, device, model)  # amp / channels_last resolved for this device, saved as such
    stages = plan_stages(cfg)
    for stage, method_name, epochs in stages:  # e.g. TWINS without batch norm, a LoRa filter that matches nothing
        METHOD_REGISTRY[method_name].check_model(model, stage_config(cfg, stage, epochs))
    if any(e > 0 for _, _, e in stages) and len(data.val) == 0:
        raise UserError(f"the validation split is empty ({len(data.train)} training images of {len(data.classes)} "
                        "classes): it chooses the best epoch, so a class needs at least 2 training images, one of them "
                        "for validation; add images, or raise --val-fraction")
    if any(e > 0 for _, _, e in stages):
        steps = len(train_loader(data.train, dataclasses.replace(cfg, workers=0), torch.device("cpu"), 0))
        if steps == 0:
            raise UserError(f"{len(data.train)} training image(s) make no training step at batch size "
                            f"{cfg.batch_size}{' per process' if dist.is_dist() else ''} (a batch of one is dropped: "
                            "batch norm needs 2): use more images (--limit-train) or train nothing (--epochs 0)")
    if dist.is_main() and not resume:
        for msg in cfg.warnings():
            log.warn(msg)
        if cfg.weights is None and given is None:
            log.warn(f"no --weights: the {cfg.arch} backbone starts from random weights, and robust fine-tuning of a "
                     "random backbone is almost never meant: pass --weights (a file, or e.g. salman:resnet50_l2_eps3, "
                     "robustbench:..., timm:..., torchvision:...), or --weights none to train from scratch")
        if cfg.amp and device.type == "cpu" and not cpu_has_native_bf16():
            log.warn("--amp on a CPU without native bf16 (no AVX512-BF16 or AMX): bf16 autocast is emulated there and "
                     "many times slower than fp32 (bench/results/throughput_formats_*); drop --amp")
    return cfg, data, model, stages


def _run(cfg: TrainConfig, run: RunDir, device, log: RunLog, *, resume: bool, overwrite: bool,
         update_config: bool, model=None) -> dict:
    set_deterministic(cfg.deterministic)
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    seed_everything(cfg.seed + dist.rank())
    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    t_start = time.perf_counter()
    cfg, data, model, stages = _preflight(cfg, device, log, resume, model)
    state = load_checkpoint(run.last) if resume and os.path.exists(run.last) else None
    if state is not None and dist.is_main():
        threads = state.get("threads")
        if threads is not None and threads != torch.get_num_threads():
            log.warn(f"the run was trained with {threads} CPU thread(s), this process has {torch.get_num_threads()}: "
                     "float sums then differ, so the resumed run is not bitwise the uninterrupted one (set "
                     f"OMP_NUM_THREADS={threads} for that)")

    if dist.is_main():  # the other ranks touch no file; they wait at the barrier below
        run.open(resume=resume, overwrite=overwrite)
        log.release()
        if not resume or update_config:
            atomic_write_text(run.file("config.yaml"), cfg.to_yaml())
    model.to(device)
    amp, channels_last = cfg.amp, cfg.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.is_main() and not (resume and os.path.exists(run.file("split.json"))):
        atomic_write_json(run.file("split.json"), {**data.record, "classes": list(data.classes),
                                                   "num_train": len(data.train), "num_val": len(data.val),
                                                   "num_test": len(data.test)})
    log(f"{cfg.method} (init {cfg.init}) on {cfg.dataset}: {len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test, {len(data.classes)} classes; arch {cfg.arch}, input size {model.input_size}, "
        f"device {device}, amp {amp}, channels_last {channels_last}, compile {cfg.compile}, "
        f"{torch.get_num_threads()} CPU thread(s)"
        + (f", DDP over {dist.world_size()} processes (global batch {cfg.batch_size * dist.world_size()})"
           if dist.is_dist() else "")
        + f"; threat model {budget_label(cfg.norm, cfg.eps)}, PGD step {cfg.step_size:.4g}")

    ctx = Context(cfg, device, data, log, progress, amp=bool(amp), channels_last=bool(channels_last),
                  scalars=Scalars(run.path, cfg.tensorboard))
    try:
        rows = list(state["rows"]) if state else []
        finished = list(state["finished_stages"]) if state else []
        if dist.is_main():  # metrics.jsonl = exactly the checkpointed rows (drops a partly written epoch)
            atomic_write_text(run.file("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        dist.barrier()  # the run directory is ready on rank 0 before any rank trains

        summary = None
        if all(epochs == 0 for _, _, epochs in stages):
            log("--epochs 0: nothing is trained; the starting weights" + (f" ({cfg.weights})" if cfg.weights else
                " (random: no --weights)") + " with a random head are evaluated on the test split (an evaluation-only "
                "run; results.json says evaluation_only: true)")
        for si, (stage, method_name, epochs) in enumerate(stages):
            if state is not None and si < state["stage_index"]:
                continue  # finished before the crash; the resumed stage's checkpoint holds all weights
            resume_state = state if state is not None and state["stage_index"] == si else None
            if resume_state is None:
                maybe_fault("kill_before_stage", stage)  # test-only: e.g. between the RoLI stages
            summary = run_stage(ctx, run, si, stage, method_name, epochs, model, resume_state, rows, finished)
            finished.append({k: v for k, v in summary.items() if k != "method_obj"})
            if si + 1 < len(stages):
                log(f"stage {stage} done: best epoch {summary['best_epoch']}, val PGD-{cfg.eval_steps} "
                    f"{summary['best_' + val_key(cfg)]}; the next stage starts from its best weights")
        return finish(ctx, run, summary["method_obj"], finished, rows, time.perf_counter() - t_start)
    finally:
        ctx.scalars.close()


def finish(ctx: Context, run: RunDir, method, stages: list, rows: list, seconds: float) -> dict:
    """Export the best model, evaluate it on the test split, write results.json (the run then commits)."""
    cfg, log = ctx.cfg, ctx.log
    final = stages[-1]
    export = method.export_model()
    if dist.is_main():
        save_model(export, run.file("model.safetensors"), {"classes": list(ctx.data.classes), "method": cfg.method})
    maybe_fault("kill_in_final_eval")  # test-only: model.safetensors written, results.json not yet
    attacks = parse_attacks(cfg.eval_attacks, cfg.eval_steps)
    log(f"evaluating the best model (epoch {final['best_epoch']}) on {len(ctx.data.test)} test images: {', '.join(attacks)}")
    export.to(ctx.device)
    # under torchrun every rank evaluates its share of the test batches (AutoAttack included) and the counts are
    # summed: the figures equal a 1-process `autolora eval`
    t_eval = time.perf_counter()
    test = evaluate(export, _eval_loader(ctx.data.test, cfg, ctx.device), attacks=attacks, eps=cfg.eps,
                    step_size=cfg.step_size, norm=cfg.norm, device=ctx.device,
                    progress=ctx.progress and dist.is_main(), desc="test", all_reduce=dist.is_dist(), seed=cfg.seed,
                    keep=cfg.pgd_keep)
    params = ctx.params.get("main", {})
    record = lambda name: attack_record(name, eps=cfg.eps, step_size=cfg.step_size, norm=cfg.norm,  # noqa: E731
                                        keep=cfg.pgd_keep)
    results = {
        **{f"test_{k}": v for k, v in test.items()},
        "best_epoch": final["best_epoch"], "best_val_sa": final["best_val_sa"],
        "best_" + val_key(cfg): final["best_" + val_key(cfg)], "epochs_run": final["epochs_run"],
        "method": cfg.method, "init": cfg.init, "arch": cfg.arch, "dataset": cfg.dataset, "seed": cfg.seed,
        "backbone_params": _param_count(export.backbone.parameters()),
        "lora_params": params.get("lora_params", 0), "trainable_params": params.get("trainable_params"),
        "stages": stages, "num_test": len(ctx.data.test), "num_val": len(ctx.data.val),
        "attacks": {"test": {n: record(n) for n in attacks}, "val": record(pgd_name(cfg.eval_steps))},
        "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
        "eval_seconds": round(time.perf_counter() - t_eval, 1),
        "evaluation_only": all(st["epochs_run"] == 0 for st in stages),
    }
    if dist.is_main():
        atomic_write_json(run.file("results.json"), results)
        run.commit()
    log("test: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("test_") and v is not None))
    return results
