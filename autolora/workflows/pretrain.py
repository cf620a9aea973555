"""Adversarial pre-training of a backbone from scratch (Madry et al. 2018 PGD-k AT, or the fast FGSM-RS AT of
Wong, Rice, Kolter 2020), writing weights that `--weights` accepts.

This is how the demo and the benchmark get a robust pretrained feature extractor offline:

    pretrain("tiny", "digits", classes=[0, 1, 2, 3, 4], attack="fgsm_rs", epochs=15, out="runs/pre")
    # -> "runs/pre/model.safetensors"; then `autolora train --arch tiny --weights runs/pre/model.safetensors ...`

It is a run of the one trainer (`autolora.engine.loop.train`) with Madry's objective (`madry_ft`: minimise
CE(h(x̃), y), every parameter trains) from a random initialisation: x̃ from the training attack (eval mode,
fp32), SGD with momentum 0.9 and weight decay, a per-iteration LR schedule ("onecycle": linear 0 → lr over the
first 40 % of the iterations, then linear → 0, as in Wong et al.; or "cosine" from lr to 0) and the *last*
epoch kept (`select="last"`; the validation split is only logged). So OUT is an ordinary run directory: it
resumes after a crash (`resume=True`, `autolora pretrain --resume OUT`), runs under torchrun, and writes
metrics.jsonl, results.json (the test split's accuracies) and OUT/model.safetensors in the plain layout.
"""
from __future__ import annotations

import os

from ..attacks.norms import check_norm, default_eps
from ..config import TrainConfig
from ..config import ITERATION_SCHEDULES
from ..errors import UserError, suggest


def default_step_size(attack: str, eps: float, steps: int) -> float:
    """The PGD step of training (pgd) and of the PGD evaluation: 2.5·eps/k for PGD-k (Madry et al.; 2/255 for eps
    8/255, k = 10); for FGSM-RS (whose own step is 1.25·eps, Wong et al.) the evaluation's eps/4. (Under --norm l2
    without --eps, eps comes from the data's resolution and the step is the trainer's eps/4 = 2.5·eps/10.)"""
    if attack == "fgsm_rs" or eps == 0:
        return eps / 4 if eps > 0 else 2 / 255
    return 2.5 * eps / max(steps, 1)


# pre-training's own defaults where they differ from `autolora train`'s (the CLI shows these in `pretrain --help`)
DEFAULTS = {"method": "madry_ft", "arch": "tiny", "dataset": "digits", "train_attack": "pgd", "train_steps": 10,
            "epochs": 10, "lr": 0.1, "lr_schedule": "onecycle", "batch_size": 128,
            "weight_decay": 5e-4, "select": "last", "eval_attacks": ["clean", "pgd"],
            "weights": "none"}  # from random weights, on purpose
# what pre-training does not take: it trains every parameter from scratch with Madry's objective
NOT_TAKEN = ("method", "init", "peft", "weights", "trust_pickle", "select", "beta", "gamma", "rank", "lora_filter",
             "lora_std", "sharpen_alpha", "lambda2_max", "detach_soft_labels", "probe_epochs", "probe_lr",
             "milestones", "auto_lr_interval", "auto_lr_rules", "reset_momentum_on_rollback", "min_lr", "log_gradsim",
             "gradsim_samples", "gradsim_mode")


def config_from_values(values: dict) -> TrainConfig:
    """The TrainConfig of a pre-training run from option values (field names; pretrain's DEFAULTS where absent)."""
    v = {**DEFAULTS, **{k: val for k, val in values.items() if val is not None}}
    bad = [k for k in values if k in NOT_TAKEN and values[k] is not None and k not in ("method", "select")]
    if bad:
        raise UserError(f"pretrain does not take --{bad[0].replace('_', '-')}: it trains a backbone from scratch with "
                        "Madry's objective")
    if v["lr_schedule"] not in ITERATION_SCHEDULES:
        raise UserError(f"unknown LR schedule '{v['lr_schedule']}'{suggest(v['lr_schedule'], ITERATION_SCHEDULES)}: "
                        f"pretrain uses a per-iteration schedule, {' or '.join(ITERATION_SCHEDULES)}")
    if v["epochs"] < 1:
        raise UserError(f"--epochs must be >= 1, got {v['epochs']}")
    if v.get("eps") is None and check_norm(v.get("norm") or "linf") == "linf":
        v["eps"] = default_eps("linf", "low")  # L∞'s budget is the same at every resolution
    if v.get("step_size") is None and v.get("eps") is not None:
        v["step_size"] = default_step_size(v["train_attack"], float(v["eps"]), v["train_steps"])
    return TrainConfig.from_dict(v, "pretrain options")


def pretrain_config(arch: str = "tiny", dataset: str = "digits", data_dir: str | None = None, *,
                    classes: list | None = None, attack: str = "pgd", steps: int = 10, step_size: float | None = None,
                    norm: str = "linf", eps: float | None = None, epochs: int = 10, lr: float = 0.1,
                    schedule: str = "onecycle",
                    batch_size: int = 128, weight_decay: float = 5e-4, momentum: float = 0.9,
                    input_size: str = "native", limit_train: int | None = None, limit_eval: int | None = None,
                    val_fraction: float = 0.05, test_fraction: float = 0.2, eval_attacks=("clean", "pgd"),
                    seed: int = 0, device: str = "auto", amp: bool | None = None, download: bool = False,
                    progress: bool | None = None) -> TrainConfig:
    """The TrainConfig of a pre-training run (see the module docstring)."""
    return config_from_values({
        "arch": arch, "dataset": dataset, "data_dir": data_dir, "download": download,
        "classes": [str(c) for c in classes] if classes else None, "train_attack": attack, "train_steps": steps,
        "step_size": step_size, "norm": norm, "eps": eps, "epochs": epochs, "lr": lr, "lr_schedule": schedule,
        "batch_size": batch_size, "weight_decay": weight_decay, "momentum": momentum, "input_size": input_size,
        "limit_train": limit_train, "limit_eval": limit_eval, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "eval_attacks": list(eval_attacks) if eval_attacks else ["clean"],
        "seed": seed, "device": device, "amp": amp, "progress": progress})


def pretrain(arch: str = "tiny", dataset: str = "digits", data_dir: str | None = None, *, out: str,
             overwrite: bool = False, resume: bool = False, quiet: bool = False, **kw) -> str:
    """Adversarially train `arch` from scratch into the run directory `out` (keyword arguments: those of
    `pretrain_config`); returns OUT/model.safetensors. `resume=True` continues an interrupted pre-training."""
    from ..engine import loop

    if resume:
        loop.resume(out, quiet=quiet, command="pretrain")
    else:
        loop.train(pretrain_config(arch, dataset, data_dir, **kw), out, overwrite=overwrite, quiet=quiet,
                   command="pretrain")
    return os.path.join(out, "model.safetensors")


def pretrain_summary(out: str) -> dict:
    """What a pre-training run did and reached, from its run directory (config, split, metrics, results)."""
    from ..config import load_yaml
    from .runs import read_json, read_rows

    cfg = load_yaml(os.path.join(out, "config.yaml"))
    res = read_json(os.path.join(out, "results.json")) or {}
    split = read_json(os.path.join(out, "split.json")) or {}
    rows = read_rows(os.path.join(out, "metrics.jsonl"))
    return {"arch": cfg["arch"], "dataset": cfg["dataset"], "classes": split.get("classes"), "norm": cfg.get("norm", "linf"),
            "attack": cfg["train_attack"], "steps": 1 if cfg["train_attack"] == "fgsm_rs" else cfg["train_steps"],
            "eps": cfg["eps"], "step_size": cfg["step_size"], "epochs": cfg["epochs"], "lr": cfg["lr"],
            "schedule": cfg["lr_schedule"], "batch_size": cfg["batch_size"], "weight_decay": cfg["weight_decay"],
            "seed": cfg["seed"], "num_train": split.get("num_train"), "num_val": split.get("num_val"),
            "num_test": split.get("num_test"),
            "train_ra": rows[-1].get("train_ra") if rows else None,
            "test": {k[len("test_"):]: v for k, v in res.items() if k.startswith("test_") and v is not None},
            "seconds": res.get("seconds"), "weights": os.path.join(out, "model.safetensors")}
