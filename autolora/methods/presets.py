"""Named presets that depend on the dataset (and the fine-tuning mode): `--config roli`, `--config twins-authors`.
A preset gives option values below the flags: defaults < preset < explicit flags (`preset_values`).

**roli** — RoLI as its authors ran it (Hua et al., CVPR 2024; `DongXzz/RoLI` configs/{linear,finetune,lora,adapter,
bias,prompt}/*.yaml, `train.py`, `src/solver`, `src/engine/trainer.py`, `src/adv_func.py`):
- stage 1, adversarial linear probing (`configs/linear/<ds>_ranli.yaml`): SGD momentum 0.9, per-epoch cosine with 10
  warm-up epochs from LR 0; LR 0.05 / 0.1 / 0.5 / 1.0 / 1.0, weight decay 0.01 / 0.001 / 0.01 / 0.001 / 0.01, epochs
  20 / 20 / 40 / 60 / 40 for CIFAR-10 / CIFAR-100 / Caltech-256 / CUB / Stanford Dogs;
- stage 2 (`--init roli`, or RanLI with `--init random`): AdamW (decay 0.01 on every parameter without "bias" in
  its name; SGD where the config's weight decay is 0), per-epoch cosine with 10 warm-up epochs, the same epochs;
  LR and the weight-decay switch per mode and dataset from the tables below;
- every LR is the YAML's BASE_LR × batch / 256 (`train.py`: `cfg.SOLVER.BASE_LR = cfg.SOLVER.BASE_LR/ 256 *
  cfg.DATA.BATCH_SIZE`), at their batch 64 (× 0.25);
- PGD-7 in training, PGD-10 in validation and test, 8/255 with step 2/255 from a random start, both returning the
  iterate of the highest batch-mean loss (`use_best=True`); the best epoch by validation PGD accuracy;
- data: CIFAR without augmentation, resized bilinearly to the backbone's 224 inside the model, the last 10 % of the
  train split as validation; the others Resize(256) + RandomCrop(224) + flip;
- PEFT: LoRA on the query and value rows, r = α = 16; Pfeiffer adapters, reduction 8; VPT-deep with 10 prompts (20
  for CUB); the encoder in eval mode; the RanLI head kaiming-normal (fan_out) with bias −log 99.

**twins-authors** — the settings of TWINS' own scripts (Liu et al., CVPR 2023; `ziquanliu/CVPR2023-TWINS`
`TWINS_cifar/train.sh`: LR 0.003, wd 1e-5, γ 1.0; `TWINS_high_res_data/train.sh`: LR 0.003, wd 0.001, γ 0.4 on
Caltech-256); batch 128, PGD-10, ÷10 at epochs 30 and 50 of 60. Their scripts set nothing else, so only CIFAR-10 and
Caltech-256 have the preset. The AutoLoRa paper's Table 5 stays TWINS' default.
"""
from __future__ import annotations

from ..errors import UserError, suggest

ROLI_DATASETS = ("cifar10", "cifar100", "caltech256", "cub200", "dogs120")
ROLI_BATCH = 64
# configs/linear/<ds>_ranli.yaml: (BASE_LR, WEIGHT_DECAY, TOTAL_EPOCH)
ROLI_PROBE = {"cifar10": (0.05, 0.01, 20), "cifar100": (0.1, 0.001, 20), "caltech256": (0.5, 0.01, 40),
              "cub200": (1.0, 0.001, 60), "dogs120": (1.0, 0.01, 40)}
# stage 2 BASE_LR and WEIGHT_DECAY per (mode, init): configs/{finetune,lora,adapter,bias,prompt}/<ds>_{roli,ranli}.yaml;
# a weight decay of 0 makes their optimizer SGD without decay (src/solver/optimizer.py)
ROLI_STAGE2 = {
    ("none", "roli"): {"cifar10": (1e-4, 0.01), "cifar100": (1e-4, 0.001), "caltech256": (1e-4, 1e-4),
                       "cub200": (1e-4, 0.01), "dogs120": (5e-5, 0.001)},
    ("none", "random"): {"cifar10": (5e-4, 0.01), "cifar100": (5e-4, 0.001), "caltech256": (5e-4, 1e-4),
                         "cub200": (5e-4, 0.001), "dogs120": (5e-4, 0.01)},
    ("lora", "roli"): {"cifar10": (0.001, 1e-4), "cifar100": (0.001, 1e-4), "caltech256": (1e-4, 1e-4),
                       "cub200": (0.005, 1e-4), "dogs120": (0.001, 0.01)},
    ("lora", "random"): {"cifar10": (0.01, 1e-4), "cifar100": (0.05, 0.0), "caltech256": (0.001, 1e-4),
                         "cub200": (0.005, 1e-4), "dogs120": (0.005, 1e-4)},
    ("adapter", "roli"): {"cifar10": (0.05, 0.01), "cifar100": (0.05, 1e-4), "caltech256": (5e-4, 0.0),
                          "cub200": (0.05, 0.001), "dogs120": (1e-4, 1e-4)},
    ("adapter", "random"): {"cifar10": (0.05, 0.01), "cifar100": (0.005, 1e-4), "caltech256": (0.005, 1e-4),
                            "cub200": (0.05, 1e-4), "dogs120": (0.005, 1e-4)},
    ("bias", "roli"): {"cifar10": (0.005, 0.001), "cifar100": (0.005, 0.01), "caltech256": (1e-5, 0.0),
                       "cub200": (5e-4, 1e-4), "dogs120": (5e-5, 1e-4)},
    ("bias", "random"): {"cifar10": (0.005, 0.001), "cifar100": (0.005, 0.001), "caltech256": (0.001, 0.01),
                         "cub200": (0.005, 0.001), "dogs120": (0.001, 1e-4)},
    ("prompt", "random"): {"cifar10": (0.5, 1e-3), "cifar100": (0.5, 0.01), "caltech256": (0.05, 1e-3),
                           "cub200": (0.05, 1e-3), "dogs120": (0.05, 1e-4)},
}
ADAMW_DECAY = 0.01  # src/solver/optimizer.py: the AdamW group's decay, whatever the YAML's positive WEIGHT_DECAY

TWINS_AUTHORS = {"cifar10": {"lr": 0.003, "weight_decay": 1e-5, "gamma": 1.0},
                 "caltech256": {"lr": 0.003, "weight_decay": 1e-3, "gamma": 0.4}}


def scaled(base_lr: float, batch: int = ROLI_BATCH) -> float:
    """RoLI's linear scaling of the configured LR: BASE_LR / 256 × batch."""
    return base_lr / 256 * batch


def roli(dataset: str, peft: str = "none", init: str = "roli") -> dict:
    if dataset not in ROLI_DATASETS:
        raise UserError(f"the roli preset has RoLI's settings for {', '.join(ROLI_DATASETS)}, not '{dataset}'"
                        f"{suggest(dataset, ROLI_DATASETS)}: give the options yourself (see the README's RoLI section)")
    if (peft, init) not in ROLI_STAGE2:
        raise UserError(f"RoLI's configs have no {'RoLI' if init == 'roli' else 'RanLI'} run with --peft {peft} (VPT-deep "
                        "is configured for RanLI only): use --init random with --peft prompt")
    probe_lr, probe_wd, epochs = ROLI_PROBE[dataset]
    lr, wd = ROLI_STAGE2[(peft, init)][dataset]
    low_res = dataset in ("cifar10", "cifar100")
    out = {
        "method": "madry_ft", "init": init, "peft": peft, "batch_size": ROLI_BATCH, "epochs": epochs,
        "optimizer": "adamw", "lr": scaled(lr), "weight_decay": ADAMW_DECAY if wd > 0 else 0.0,
        "lr_schedule": "warmup_cosine", "warmup_epochs": 10,
        "train_steps": 7, "eval_steps": 10, "pgd_keep": "best_batch",  # eps, step: the norm's defaults (L∞ 8/255, 2/255)
        "augmentation": "roli", "resize": "bilinear", "head_init": "roli",
        "val_split": "tail" if low_res else "stratified",
        # their val splits: the last 10 % of CIFAR's train split; 3 (CUB, Caltech-256) or 10 (Dogs) per class
        "val_fraction": {"caltech256": 0.05}.get(dataset, 0.1),
    }
    if init == "roli":
        out.update({"probe_epochs": epochs, "probe_lr": scaled(probe_lr), "probe_weight_decay": probe_wd,
                    "probe_lr_schedule": "warmup_cosine"})
    if peft != "none":
        out["peft_encoder"] = "eval"
    if peft == "lora":
        out.update({"rank": 16, "lora_alpha": 16.0, "lora_qkv": "qv", "lora_init": "kaiming"})
    elif peft == "adapter":
        out["adapter_reduction"] = 8
    elif peft == "prompt":
        out.update({"prompt_tokens": 20 if dataset == "cub200" else 10, "prompt_dropout": 0.1})
    return out


def twins_authors(dataset: str, peft: str = "none", init: str = "random") -> dict:
    if dataset not in TWINS_AUTHORS:
        raise UserError(f"TWINS' scripts set their options for {', '.join(TWINS_AUTHORS)} only, not '{dataset}': use "
                        "the default (the AutoLoRa paper's Table 5) or give --lr/--weight-decay/--gamma")
    return {"method": "twins", "batch_size": 128, "epochs": 60, "train_steps": 10, "lr_schedule": "step", "milestones": [30, 50], **TWINS_AUTHORS[dataset]}


PRESETS = {"roli": roli, "twins-authors": twins_authors}


def preset_values(name: str, given: dict) -> dict:
    """Preset `name`'s option values for the dataset, PEFT mode and init in `given` (the flags; else the defaults),
    with the given options on top: defaults < preset < flags."""
    from ..config import TrainConfig

    base = TrainConfig()
    fn = PRESETS[name]
    kw = {"peft": given.get("peft", base.peft)}
    if "init" in given:
        kw["init"] = given["init"]
    values = fn(given.get("dataset", base.dataset), **kw)
    if given.get("method") not in (None, values.get("method")):
        values.pop("method")  # e.g. --config twins-authors --method twins_at: TWINS-AT with the scripts' settings
    return {**values, **given}
