"""The one trainer for every method: epochs, validation, best-epoch selection, LR schedules, checkpoints.

Each epoch: (method hook, e.g. AutoLoRa's λ) → train → clean and PGD-k accuracy on the validation split →
keep the best epoch by validation PGD-k (never by test data) → LR decision (step or automated, with roll-back)
→ atomic checkpoint. At the end the best model is exported and evaluated on the test split.

`train(cfg, out)` writes the run directory described in `engine.rundir`; the data come from `data.run_data`, the
model from `models.run_model`, the methods from the registry in `methods`, the device/DDP/speed switches from
`engine.runtime`, the LR schedules from `engine.schedules`, and the evaluation from `eval`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Subset

from ..config import TrainConfig, load_yaml
from ..data import run_data
from ..errors import UserError
from ..eval import eval_batch_size, eval_loader, evaluate, run_attacks
from ..methods import METHOD_REGISTRY, create_method
from ..models import run_model
from ..models.export import save_model
from . import runtime as D
from .rundir import (RunDir, RunLog, Scalars, WriteFailed, append_line, atomic_write_json, atomic_write_text,
                     fault_armed, load_checkpoint, maybe_fault, save_checkpoint)
from .runtime import (get_rng_state, prepare_method, resolve_runtime, seed_everything, seed_worker, set_deterministic,
                      set_rng_state)
from .schedules import ITERATION_SCHEDULES, AutoLR, StepLR, iteration_lr

CKPT_VERSION = 2  # 2: AutoLR state of the authors' rules (schedules.py)


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops, the last good checkpoint stays."""


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
        """Clean accuracy of `fn` (logits of a batch) in eval mode over a loader, summed across DDP ranks."""
        modules = list(self.eval_modules)
        flags = [(m, m.training) for mod in modules for m in mod.modules()]
        for mod in modules:
            mod.eval()
        correct = total = 0
        try:
            for x, y in loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                correct += (fn(x).argmax(1) == y).sum().item()
                total += y.numel()
        finally:
            for m, f in flags:
                m.training = f
        correct, total = D.all_reduce_sum(correct, total, device=self.device)
        return correct / max(total, 1)


def _workers(cfg: TrainConfig, device) -> int:
    """DataLoader worker processes: --workers, else 0 on CPU and up to 8 per process on CUDA."""
    if cfg.workers is not None:
        return cfg.workers
    return 0 if device.type != "cuda" else min(8, max(1, (os.cpu_count() or 1) // max(1, D.world_size())))


def train_loader(ds, cfg: TrainConfig, device, stage_index: int) -> DataLoader:
    """The training loader of a stage, built once (its workers persist across epochs): call
    `loader.sampler.set_epoch(e)` before epoch e. The order of epoch e depends only on (seed, stage, e) and each
    item's augmentation only on (seed, stage, e, index) (`engine.runtime.EpochSampler`, `SeededItems`), so the run is
    the same whatever --workers and world size, and a resumed run continues it exactly. Under torchrun each rank
    takes its round-robin share of the permutation. On CUDA: pinned memory, so copies overlap the GPU's work."""
    workers = _workers(cfg, device)
    seed = _stage_seed(cfg, stage_index)
    sampler = D.EpochSampler(len(ds), seed)
    drop_last = len(sampler) % cfg.batch_size == 1  # a batch of one breaks batch norm in train mode; same on all ranks
    return DataLoader(D.SeededItems(ds, seed), batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=workers > 0,
                      worker_init_fn=seed_worker if workers else None,
                      generator=torch.Generator().manual_seed(seed), **({"prefetch_factor": 4} if workers else {}))


def _eval_loader(ds, cfg: TrainConfig, device, keyed: bool = False) -> DataLoader:
    """Validation / test / SA-pass loader: whole batches, this rank's share under torchrun (`ShardBatches`)."""
    return eval_loader(ds, eval_batch_size(cfg), workers=_workers(cfg, device), pin_memory=device.type == "cuda",
                       shard=D.is_dist(), keyed=keyed)


def _stage_seed(cfg: TrainConfig, stage_index: int) -> int:
    """Seed of a stage's data order and augmentation (`train_loader`, the SA pass)."""
    return cfg.seed * 1_000_003 + stage_index * 10_007


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
def plan_stages(cfg: TrainConfig) -> list[tuple[str, str, int]]:
    """[(stage name, method, epochs)]: RoLI (Hua et al. 2024) prepends adversarial linear probing."""
    if cfg.init == "roli" and cfg.method != "linear_probe":
        return [("probe", "linear_probe", cfg.probe_epochs), ("main", cfg.method, cfg.epochs)]
    return [("main", cfg.method, cfg.epochs)]


def _param_count(params) -> int:
    return sum(p.numel() for p in params)


def _val_metrics(method, ctx: Context, val_loader) -> dict:
    cfg = ctx.cfg
    k = f"pgd{cfg.eval_steps}"
    # fp32; under torchrun each rank attacks its shard and the counts are summed: every rank gets the figures
    # of the whole split, so the best-epoch and LR decisions are the same on all ranks
    res = evaluate(method.eval_model(), val_loader, attacks=["clean", k], eps=cfg.eps, alpha=cfg.step_size,
                   device=ctx.device, progress=False, desc="val", all_reduce=D.is_dist(), seed=cfg.seed)
    return {"val_sa": res["sa"], "val_pgd10": res[k]}


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


def _train_epoch(method, opt, ctx: Context, loader, stage: str, epoch: int, lr_at_step=None) -> dict:
    """One epoch of training steps; `lr_at_step(step)`, when given, sets the LR of each step (per-iteration
    schedules)."""
    dev = ctx.device
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if ctx.amp else None
    sums = {"loss": 0.0, "correct_nat": 0.0, "correct_adv": 0.0}
    n = 0
    seen_nat = seen_adv = False
    it = loader
    if ctx.progress and D.is_main():
        from tqdm import tqdm

        it = tqdm(loader, desc=f"{stage} epoch {epoch}", leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(it):
        maybe_fault("kill_at_step", stage, epoch, step)  # test-only (AUTOLORA_FAULT)
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
        if not torch.isfinite(loss).all():
            raise TrainingDiverged(
                f"non-finite training loss ({loss.item()}) in {stage} epoch {epoch}, step {step}: the run stopped; "
                "the last good checkpoint is kept; lower --lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        b = y.numel()
        n += b
        sums["loss"] += loss.item() * b
        if "correct_nat" in out:
            sums["correct_nat"] += float(out["correct_nat"])
            seen_nat = True
        if "correct_adv" in out:
            sums["correct_adv"] += float(out["correct_adv"])
            seen_adv = True
        if ctx.progress and D.is_main() and hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{loss.item():.3f}")
    loss_sum, nat, adv, n = D.all_reduce_sum(sums["loss"], sums["correct_nat"], sums["correct_adv"], n, device=dev)
    return {"train_loss": loss_sum / max(n, 1), "train_sa": nat / n if seen_nat and n else None,
            "train_ra": adv / n if seen_adv and n else None}


def make_optimizer(method, cfg: TrainConfig):
    """SGD over the method's trainable parameters, at the stage's initial LR, momentum and weight decay."""
    params = method.trainable_parameters()
    if not params:
        raise UserError(f"method '{method.name}' has no trainable parameters")
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _cpu_state(module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def run_stage(ctx: Context, run: RunDir, si: int, stage: str, method_name: str, epochs: int,
              model, resume_state: dict | None, rows: list, finished_stages: list) -> dict:
    """Train one stage; returns its summary (best epoch and validation figures)."""
    cfg, log = ctx.cfg, ctx.log
    stage_cfg = cfg
    if stage == "probe":  # RoLI stage 1 / linear probing uses its own LR
        import dataclasses

        stage_cfg = dataclasses.replace(cfg, lr=cfg.probe_lr, lr_schedule="step", select="best",
                                        milestones=[max(1, epochs // 2), max(1, (5 * epochs) // 6)])
    method = create_method(method_name, model, stage_cfg)
    prepare_method(method, ctx.device, amp=bool(cfg.amp), channels_last=bool(cfg.channels_last),
                   compile=cfg.compile, sync_bn=cfg.sync_bn)  # + DDP under torchrun
    ctx.eval_modules = [method.net]
    # AutoLoRa's SA (Eq. 6, 7) of epoch e: the training split as augmented in epoch e, whoever loads it
    ctx.train_eval_loader = _eval_loader(D.SeededItems(ctx.data.train, _stage_seed(cfg, si)), cfg, ctx.device,
                                         keyed=True)
    val_loader = _eval_loader(ctx.data.val, cfg, ctx.device)
    loader = train_loader(ctx.data.train, cfg, ctx.device, si)

    auto = stage_cfg.lr_schedule == "auto"
    per_iteration = stage_cfg.lr_schedule in ITERATION_SCHEDULES
    sched = AutoLR(lr=stage_cfg.lr, interval=stage_cfg.auto_lr_interval, min_lr=stage_cfg.min_lr, epochs=epochs,
                   rules=stage_cfg.auto_lr_rules) if auto else StepLR(stage_cfg.lr, stage_cfg.milestones)
    opt = make_optimizer(method, stage_cfg)
    best = {"epoch": None, "val_sa": None, "val_pgd10": -1.0}
    best_state = None
    start = 0
    stopped = False
    if resume_state is not None and resume_state["stage_index"] == si:
        if resume_state.get("version") != CKPT_VERSION:
            raise UserError(f"{run.last} was written by an older autolora (checkpoint version "
                            f"{resume_state.get('version')}, this one writes {CKPT_VERSION}), whose schedules differ: "
                            "start a new run instead of resuming it")
        method.net.load_state_dict(resume_state["net"])
        opt.load_state_dict(resume_state["optimizer"])
        if auto:
            sched.load_state_dict(resume_state["sched"])
        method.load_extra_state(resume_state.get("method", {}))
        best = dict(resume_state["best"])
        start = resume_state["epoch"] + 1
        stopped = resume_state.get("stopped", False)
        best_state = _load_best(run, stage, best, resume_state)
        rng_ranks = resume_state.get("rng_ranks")
        if rng_ranks and len(rng_ranks) == D.world_size():
            set_rng_state(rng_ranks[D.rank()])
        elif D.is_main():  # another world size than the saved run's: the other ranks keep their fresh seeds
            set_rng_state(resume_state["rng"])
        log(f"resumed {stage} stage after epoch {resume_state['epoch']} (best epoch {best['epoch']})")
    elif auto:
        ra0 = _val_metrics(method, ctx, val_loader)["val_pgd10"]
        sched.start(ra0)
        checks = [e for e in range(epochs) if sched.is_check(e)]
        log(f"{stage}: automated LR ({sched.rules} rules), eta0={sched.lr:g}, checked after epochs "
            f"{', '.join(map(str, checks)) or 'none'}; validation PGD-{cfg.eval_steps} before training {ra0:.4f}")

    n_trainable = _param_count(method.trainable_parameters())
    ctx.params[stage] = {
        "trainable_params": n_trainable,
        "lora_params": method.num_lora_params() if hasattr(method, "num_lora_params") else 0,
    }
    epoch = start - 1
    for epoch in range(start, epochs if not stopped else start):  # a resumed stage that had stopped: done
        t0 = time.perf_counter()
        ctx.train_eval_loader.batch_sampler.set_epoch(epoch)
        records = method.on_epoch_start(ctx)
        loader.sampler.set_epoch(epoch)
        lr_at_step = None
        if per_iteration:
            n = len(loader)
            lr_at_step = lambda step, e=epoch, n=n: iteration_lr(  # noqa: E731
                stage_cfg.lr_schedule, stage_cfg.lr, e * n + step, epochs * n)
            lr = lr_at_step(0)
        else:
            lr = sched.lr if auto else sched.lr_at(epoch)
        _set_lr(opt, lr)
        tr = _train_epoch(method, opt, ctx, loader, stage, epoch, lr_at_step)
        D.broadcast_buffers(method.net)  # BN statistics: rank 0's on every rank before evaluating / saving
        val = _val_metrics(method, ctx, val_loader)
        improved = stage_cfg.select == "last" or val["val_pgd10"] > best["val_pgd10"]
        if improved:
            best = {"epoch": epoch, "val_sa": val["val_sa"], "val_pgd10": val["val_pgd10"]}
            best_state = _cpu_state(method.net)
        row = {"stage": stage, "epoch": epoch, "lr": lr, **tr, **val, **records}
        if cfg.log_gradsim:
            row["grad_sim"] = _grad_similarity(method, ctx)
        if auto:
            dec = sched.observe(epoch, val["val_pgd10"])
            if dec.halve:
                row["lr_event"] = f"halved to {sched.lr:g} ({dec.reason}); rolled back to epoch {best['epoch']}"
                log(f"{stage} epoch {epoch}: LR halved {lr:g} -> {sched.lr:g} by {dec.reason}; "
                    f"rolling back to the best epoch {best['epoch']} (val PGD-{cfg.eval_steps} {best['val_pgd10']:.4f})"
                    + ("; optimiser momentum cleared" if cfg.reset_momentum_on_rollback else ""))
                method.net.load_state_dict(best_state)
                if cfg.reset_momentum_on_rollback:
                    opt.state.clear()
            if dec.stop:
                stopped = True
                row["lr_event"] = row.get("lr_event", "") + f"; stop: LR {sched.lr:g} < {stage_cfg.min_lr:g}"
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        _checkpoint(ctx, run, si, stage, epoch, method, opt, sched if auto else None, best, rows,
                    finished_stages, stopped)
        maybe_fault("kill_after_checkpoint", stage, epoch)  # test-only: last.pt written, best.pt not yet
        if improved and D.is_main():
            save_checkpoint({"version": CKPT_VERSION, "stage": stage, "epoch": epoch, "net": best_state},
                            run.best(stage))
        if D.is_main():
            append_line(run.file("metrics.jsonl"), json.dumps(row))
        ctx.scalars.add(row, len(rows))  # after the checkpoint: a resumed run does not write this epoch twice
        log(_row_line(row))
        if stopped:
            log(f"{stage}: learning rate below {stage_cfg.min_lr:g}; training stops after epoch {epoch}")
            break
    if best_state is None:  # zero epochs: the starting weights are the result
        best_state = _cpu_state(method.net)
    method.net.load_state_dict(best_state)
    return {"stage": stage, "method": method_name, "best_epoch": best["epoch"], "best_val_sa": best["val_sa"],
            "best_val_pgd10": best["val_pgd10"] if best["epoch"] is not None else None,
            "epochs_run": epoch + 1 if epochs else 0, "method_obj": method}


def _load_best(run: RunDir, stage: str, best: dict, resume_state: dict):
    if best["epoch"] is None:
        return None
    if best["epoch"] == resume_state["epoch"]:
        # last.pt holds the best weights (a roll-back at the best epoch itself restores exactly them). best.pt
        # lags when the process died between writing last.pt and best.pt: write it now, or a later resume that
        # needs it would find the older epoch there.
        net = {k: v.clone() for k, v in resume_state["net"].items()}
        if D.is_main():
            save_checkpoint({"version": CKPT_VERSION, "stage": stage, "epoch": best["epoch"], "net": net},
                            run.best(stage))
        return net
    ck = load_checkpoint(run.best(stage))
    if ck.get("epoch") != best["epoch"]:
        raise UserError(f"{run.best(stage)} holds epoch {ck.get('epoch')} but the run's best epoch is "
                        f"{best['epoch']}: the run directory is inconsistent; start a new run")
    return ck["net"]


def _checkpoint(ctx, run, si, stage, epoch, method, opt, sched, best, rows, finished_stages, stopped):
    rng_ranks = D.all_gather_object(get_rng_state()) if D.is_dist() else None  # collective: before the rank test
    if not D.is_main():
        return
    save_checkpoint({
        "version": CKPT_VERSION, "stage_index": si, "stage": stage, "epoch": epoch,
        "net": method.net.state_dict(), "optimizer": opt.state_dict(),
        "sched": sched.state_dict() if sched is not None else None, "method": method.extra_state(),
        "best": best, "rows": rows, "finished_stages": finished_stages, "rng": get_rng_state(), "stopped": stopped,
        "rng_ranks": rng_ranks,  # under torchrun: every rank's RNG state (rank r resumes with its own)
    }, run.last, fault_where=(stage, epoch))


def _row_line(row: dict) -> str:
    parts = [f"{row['stage']} epoch {row['epoch']}", f"lr {row['lr']:.3g}", f"loss {row['train_loss']:.4f}"]
    for k in ("train_sa", "val_sa", "val_pgd10", "lambda1", "lambda2", "lora_train_sa", "grad_sim"):
        if row.get(k) is not None:
            parts.append(f"{k} {row[k]:.4f}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out: str, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
          command: str = "train") -> dict:
    """Train as `cfg` says into run directory `out`; returns results.json's content.

    `resume=True` continues the run in `out` from its last checkpoint with its saved config (`cfg` ignored);
    `command` is the CLI command that error messages tell the user to resume with (`autolora COMMAND --resume`).

    Under torchrun (WORLD_SIZE > 1) this initialises the process group (nccl on CUDA with one GPU per process,
    gloo on CPU) unless the caller did, trains with DDP (each rank a shard of every epoch; validation counts and
    the λ schedule's SA summed over ranks, so every decision is the same on all ranks), and rank 0 alone writes
    logs, checkpoints and results. The final test evaluation (AutoAttack included) is shared out over the ranks in
    whole batches and the counts summed, so its figures equal a 1-process `autolora eval`.
    Every rank returns the same results."""
    dev_name = cfg.device
    if resume and os.path.exists(os.path.join(out, "config.yaml")):
        dev_name = load_yaml(os.path.join(out, "config.yaml")).get("device", dev_name)
    device = D.resolve_device(dev_name)
    with D.process_group(device):
        try:
            return _train(cfg, out, device, resume=resume, overwrite=overwrite, quiet=quiet)
        except WriteFailed as e:
            raise WriteFailed(f"{e}. Nothing else is lost: once the disk has room, `autolora {command} --resume {out}` "
                              "continues from the last good checkpoint") from None


def _train(cfg: TrainConfig, out: str, device, *, resume: bool, overwrite: bool, quiet: bool) -> dict:
    D.setup_groups()
    run = RunDir(out)
    run.check(resume=resume, overwrite=overwrite)  # nothing is created or removed before data and model built
    D.barrier()  # every rank checked before rank 0 creates or empties the directory
    if resume:
        cfg = TrainConfig.from_dict(load_yaml(run.file("config.yaml")), source=run.file("config.yaml"))
        if os.path.exists(run.file("results.json")):
            raise UserError(f"run {out} has already finished (results.json exists); nothing to resume")
    cfg = cfg.resolve()
    log = RunLog(run.file("train.log"), quiet=quiet)
    try:
        return _run(cfg, run, device, log, resume=resume, overwrite=overwrite)
    finally:
        log.close()


def _run(cfg: TrainConfig, run: RunDir, device, log: RunLog, *, resume: bool, overwrite: bool) -> dict:
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel): drop it for a CPU run")
    if cfg.tensorboard:
        Scalars.writer_class()  # missing package: fail before anything is built or written
    set_deterministic(cfg.deterministic)
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    seed_everything(cfg.seed + D.rank())
    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    t_start = time.perf_counter()

    if cfg.download and not D.is_main():
        D.barrier()  # rank 0 downloads first
    data = run_data(cfg)  # bad data or weights fail here, before an --overwrite'n run is removed
    if cfg.download and D.is_main():
        D.barrier()
    model = run_model(cfg, len(data.classes))
    cfg = resolve_runtime(cfg, device, model)  # amp / channels_last resolved for this device, saved as such
    if D.is_main():  # the other ranks touch no file; they wait at the barrier below
        run.prepare(resume=resume, overwrite=overwrite)
    log.release()
    if D.is_main() and not resume:
        atomic_write_text(run.file("config.yaml"), cfg.to_yaml())
    model.to(device)
    amp, channels_last = cfg.amp, cfg.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if D.is_main() and not (resume and os.path.exists(run.file("split.json"))):
        atomic_write_json(run.file("split.json"), {**data.record, "classes": list(data.classes),
                                                   "num_train": len(data.train), "num_val": len(data.val),
                                                   "num_test": len(data.test)})
    log(f"{cfg.method} (init {cfg.init}) on {cfg.dataset}: {len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test, {len(data.classes)} classes; arch {cfg.arch}, input size {model.input_size}, "
        f"device {device}, amp {amp}, channels_last {channels_last}, compile {cfg.compile}"
        + (f", DDP over {D.world_size()} processes (global batch {cfg.batch_size * D.world_size()})"
           if D.is_dist() else ""))

    ctx = Context(cfg, device, data, log, progress, amp=bool(amp), channels_last=bool(channels_last),
                  scalars=Scalars(run.path, cfg.tensorboard))
    try:
        state = load_checkpoint(run.last) if resume and os.path.exists(run.last) else None
        rows = list(state["rows"]) if state else []
        finished = list(state["finished_stages"]) if state else []
        if D.is_main():  # metrics.jsonl = exactly the checkpointed rows (drops a partly written epoch)
            atomic_write_text(run.file("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        D.barrier()  # the run directory is ready on rank 0 before any rank trains

        summary = None
        stages = plan_stages(cfg)
        for _, method_name, _ in stages:  # e.g. TWINS on a backbone without batch norm: fail before any stage trains
            check = getattr(METHOD_REGISTRY.get(method_name), "check_model", None)
            if check is not None:
                check(model)
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
                    f"{summary['best_val_pgd10']}; the next stage starts from its best weights")
        return finish(ctx, run, summary["method_obj"], finished, rows, time.perf_counter() - t_start)
    finally:
        ctx.scalars.close()


def finish(ctx: Context, run: RunDir, method, stages: list, rows: list, seconds: float) -> dict:
    """Export the best model, evaluate it on the test split, write results.json."""
    cfg, log = ctx.cfg, ctx.log
    final = stages[-1]
    export = method.export_model()
    if D.is_main():
        save_model(export, run.file("model.safetensors"), {"classes": list(ctx.data.classes), "method": cfg.method})
    maybe_fault("kill_in_final_eval")  # test-only: model.safetensors written, results.json not yet
    attacks = run_attacks(cfg)
    log(f"evaluating the best model (epoch {final['best_epoch']}) on {len(ctx.data.test)} test images: {', '.join(attacks)}")
    export.to(ctx.device)
    # under torchrun every rank evaluates its share of the test batches (AutoAttack included) and the counts are
    # summed: the figures equal a 1-process `autolora eval`
    t_eval = time.perf_counter()
    test = evaluate(export, _eval_loader(ctx.data.test, cfg, ctx.device), attacks=attacks, eps=cfg.eps,
                    alpha=cfg.step_size, device=ctx.device, progress=ctx.progress and D.is_main(), desc="test",
                    all_reduce=D.is_dist(), seed=cfg.seed)
    params = ctx.params.get("main", {})
    results = {
        "test_sa": test.get("sa"), "test_pgd10": test.get(f"pgd{cfg.eval_steps}"), "test_aa": test.get("aa"),
        "best_epoch": final["best_epoch"], "best_val_sa": final["best_val_sa"],
        "best_val_pgd10": final["best_val_pgd10"], "epochs_run": final["epochs_run"],
        "method": cfg.method, "init": cfg.init, "arch": cfg.arch, "dataset": cfg.dataset, "seed": cfg.seed,
        "backbone_params": _param_count(export.backbone.parameters()),
        "lora_params": params.get("lora_params", 0), "trainable_params": params.get("trainable_params"),
        "stages": stages, "num_test": len(ctx.data.test), "seconds": round(seconds, 1),
        "eval_seconds": round(time.perf_counter() - t_eval, 1),
        "evaluation_only": all(st["epochs_run"] == 0 for st in stages),
    }
    if D.is_main():
        atomic_write_json(run.file("results.json"), results)
    log("test: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("test_") and v is not None))
    return results
