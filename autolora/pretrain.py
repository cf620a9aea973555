"""Adversarial pre-training of a backbone from scratch (Madry et al. 2018 PGD-k AT, or the fast FGSM-RS AT of
Wong, Rice, Kolter 2020), writing weights that `--weights` accepts.

This is how the demo and the benchmark get a robust pretrained feature extractor offline:

    pretrain("tiny", "digits", classes=[0, 1, 2, 3, 4], attack="fgsm_rs", epochs=15, out="runs/pre")
    # -> "runs/pre/model.safetensors"; then `autolora train --arch tiny --weights runs/pre/model.safetensors ...`

Protocol: minimise CE(h(x̃), y) with x̃ the attack's adversarial example (made in eval mode, fp32), SGD with
momentum 0.9 and weight decay, a per-iteration LR schedule ("onecycle": linear 0 → lr over the first 40 % of the
iterations, then linear → 0, as in Wong et al.; or "cosine" from lr to 0), no model selection (the last epoch
is kept; there is no validation split). At the end the model is evaluated on the dataset's test split.

OUT/model.safetensors   the classifier in the plain layout (`autolora.io.save_model`: backbone + head `fc.*`);
                        `--weights` loads its backbone strictly and drops the head
OUT/pretrain.json       what was done: settings, data sizes, per-epoch loss/accuracy, test accuracies, seconds
OUT/pretrain.log        the log
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .errors import UserError, suggest
from .io import atomic_write_json, save_model

ATTACKS = ("pgd", "fgsm_rs")
SCHEDULES = ("onecycle", "cosine")


def lr_at(it: int, total: int, peak: float, schedule: str) -> float:
    """LR of iteration `it` (0-based) of `total`: "onecycle" (0 → peak at 40 %, → 0) or "cosine" (peak → 0)."""
    t = (it + 0.5) / max(total, 1)
    if schedule == "onecycle":
        return peak * (t / 0.4 if t < 0.4 else max(0.0, (1 - t) / 0.6))
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def default_step_size(attack: str, eps: float, steps: int) -> float:
    """FGSM-RS: 1.25·eps (Wong et al.); PGD-k: 2.5·eps/k (Madry et al.; 2/255 for eps 8/255, k = 10)."""
    return 1.25 * eps if attack == "fgsm_rs" else 2.5 * eps / max(steps, 1)


def _check(attack, schedule, epochs, lr, eps, steps, batch_size, weight_decay):
    if attack not in ATTACKS:
        raise UserError(f"unknown pretraining attack '{attack}'{suggest(attack, ATTACKS)}: use pgd or fgsm_rs")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown LR schedule '{schedule}'{suggest(schedule, SCHEDULES)}: use onecycle or cosine")
    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise UserError(f"--lr must be > 0, got {lr}")
    if not 0 <= eps <= 1:
        raise UserError(f"--eps must be in [0, 1] (pixel units, e.g. 8/255), got {eps}")
    if attack == "pgd" and steps < 1:
        raise UserError(f"--steps must be >= 1 for PGD, got {steps}")
    if batch_size < 2:
        raise UserError(f"--batch-size must be >= 2 (batch norm), got {batch_size}")
    if weight_decay < 0:
        raise UserError("--weight-decay must be >= 0")


def _prepare(out: str, overwrite: bool) -> None:
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise UserError(f"output directory {out} exists and is not empty: pass --overwrite to replace it, "
                            "or choose another --out")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)


def pretrain(arch: str = "tiny", dataset: str = "digits", data_dir: str | None = None, *, out: str,
             classes: list | None = None, attack: str = "pgd", steps: int = 10, step_size: float | None = None,
             eps: float = 8 / 255, epochs: int = 10, lr: float = 0.1, schedule: str = "onecycle",
             batch_size: int = 128, weight_decay: float = 5e-4, momentum: float = 0.9,
             input_size: str = "native", limit_train: int | None = None, limit_eval: int | None = None,
             test_fraction: float = 0.2, eval_attacks=("clean", "pgd10"), seed: int = 0, device: str = "auto",
             amp: bool | None = None, download: bool = False, overwrite: bool = False, quiet: bool = False,
             progress: bool | None = None) -> str:
    """Adversarially train `arch` from scratch on `dataset` (optionally only `classes`) and write
    OUT/model.safetensors (plain layout, loadable with `--weights`) and OUT/pretrain.json; returns the weights path.

    attack "pgd": PGD-`steps` with step `step_size` (default 2.5·eps/steps); "fgsm_rs": FGSM from a uniform random
    start with step 1.25·eps. `amp` (None: on for CUDA) runs the training forward/backward under bf16 autocast; the
    attack's perturbation is always computed in fp32. `eval_attacks` on the test split at the end (PGD at step eps/4).
    """
    from .attacks import FGSMRS, PGD
    from .data import build_data
    from .evaluate import evaluate, parse_attacks
    from .models import create_model
    from .runtime import epoch_generator, resolve_device, seed_everything
    from .trainer import Logger

    _check(attack, schedule, epochs, lr, eps, steps, batch_size, weight_decay)
    eval_attacks = parse_attacks(eval_attacks) if eval_attacks else []
    step_size = default_step_size(attack, eps, steps) if step_size is None else float(step_size)
    _prepare(out, overwrite)
    log = Logger(os.path.join(out, "pretrain.log"), quiet=quiet)
    dev = resolve_device(device)
    amp = (dev.type == "cuda") if amp is None else bool(amp)
    progress = sys.stderr.isatty() and not quiet if progress is None else progress
    seed_everything(seed)
    t_start = time.perf_counter()

    data = build_data(dataset, data_dir, download=download, classes=[str(c) for c in classes] if classes else None,
                      val_fraction=0.0, test_fraction=test_fraction, limit_train=limit_train,
                      limit_eval=limit_eval, seed=seed)
    model = create_model(arch, len(data.classes), input_size).to(dev)
    if attack == "fgsm_rs":
        adversary = FGSMRS(model, eps=eps, alpha=step_size)
        attack_name = f"FGSM-RS (step {step_size:.4g})"
    else:
        adversary = PGD(model, eps=eps, alpha=step_size, steps=steps)
        attack_name = f"PGD-{steps} (step {step_size:.4g})"
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n_train = len(data.train)
    drop_last = n_train % batch_size == 1
    per_epoch = n_train // batch_size if drop_last else math.ceil(n_train / batch_size)
    total = per_epoch * epochs
    log(f"adversarial pre-training of {arch} on {dataset} ({len(data.classes)} classes: "
        f"{', '.join(data.classes[:10])}{' ...' if len(data.classes) > 10 else ''}): {n_train} train / "
        f"{len(data.test)} test images; {attack_name}, eps {eps:.4g}; {epochs} epochs, {schedule} LR peak {lr:g}, "
        f"device {dev}, amp {amp}")

    history = []
    it = 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loader = DataLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                            generator=epoch_generator(seed, 0, epoch), num_workers=0)
        batches = loader
        if progress:
            from tqdm import tqdm

            batches = tqdm(loader, desc=f"pretrain epoch {epoch}", leave=False, dynamic_ncols=True)
        loss_sum = correct = n = 0
        for x, y in batches:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            cur = lr_at(it, total, lr, schedule)
            for g in opt.param_groups:
                g["lr"] = cur
            x_adv = adversary(x, y)  # eval mode, fp32
            model.train()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x_adv)
            loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise UserError(f"non-finite pretraining loss in epoch {epoch}: lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        row = {"epoch": epoch, "lr_end": cur, "train_loss": loss_sum / max(n, 1), "train_ra": correct / max(n, 1),
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        log(f"pretrain epoch {epoch} | lr {cur:.3g} | loss {row['train_loss']:.4f} | train adv acc "
            f"{row['train_ra']:.4f} | {row['seconds']:.1f}s")

    model.eval()
    weights = os.path.join(out, "model.safetensors")
    record = {"arch": arch, "dataset": dataset, "data_dir": data_dir, "classes": list(data.classes),
              "attack": attack, "steps": 1 if attack == "fgsm_rs" else steps, "step_size": step_size, "eps": eps,
              "epochs": epochs, "lr": lr, "schedule": schedule, "batch_size": batch_size,
              "weight_decay": weight_decay, "momentum": momentum, "input_size": input_size, "seed": seed,
              "amp": amp, "device": str(dev), "num_train": n_train, "num_test": len(data.test),
              "split": {k: data.record.get(k) for k in ("test_fraction", "limit_train", "limit_eval", "image_size")}}
    save_model(model, weights, {"classes": list(data.classes), "pretrain": {k: record[k] for k in (
        "dataset", "attack", "steps", "eps", "epochs", "seed")}})
    test = {}
    if eval_attacks:
        test = evaluate(model, DataLoader(data.test, batch_size=256, shuffle=False), attacks=eval_attacks, eps=eps,
                        alpha=eps / 4 if eps > 0 else 2 / 255, device=dev, progress=progress, desc="pretrain test")
        log("pretrain test: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if v is not None))
    record.update({"history": history, "test": test, "weights": weights,
                   "seconds": round(time.perf_counter() - t_start, 1)})
    atomic_write_json(os.path.join(out, "pretrain.json"), record)
    log(f"wrote {weights} ({record['seconds']:.0f}s); fine-tune it with --arch {arch} --weights {weights}")
    return weights
