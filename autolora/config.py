"""Typed run configuration: one validated dataclass, YAML round-trip.

Defaults are the papers' protocols: AutoLoRa (Xu et al., ICLR 2024, Sec. 5: E = 60, batch 128, SGD
momentum 0.9, weight decay 1e-4, r = 8, alpha = 1, lambda2_max = 6, 5 % validation, PGD-10 8/255 step 2/255)
and the baselines' Table 5 (LR, weight decay, gamma per dataset).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields

import yaml

from .attacks.norms import EPS_HELP, NORM_HELP, STEP_HELP, check_norm, resolve_budget
from .attacks.registry import EVAL_HELP, TRAIN_HELP, check_train_attack, parse_attacks
from .errors import UserError, suggest
from .utils.pixels import pixels

GRADSIM_MODES = ("batch", "per_example")
AUTO_LR_RULES = ("authors", "apgd")  # engine.schedules.AutoLR: the authors' bookkeeping, or AutoAttack's APGD rule
ITERATION_SCHEDULES = ("onecycle", "cosine")  # per-iteration LR (engine.schedules.iteration_lr)
EPOCH_SCHEDULES = ("step", "auto", "warmup_cosine")  # decided per epoch (engine.schedules)
LR_SCHEDULES = (*EPOCH_SCHEDULES, *ITERATION_SCHEDULES)
PEFT_MODES = ("none", "lora", "bias", "adapter", "prompt")
OPTIMIZERS = ("sgd", "adamw")


GROUPS = {"method": "method (AutoLoRa, the baselines, RoLI)", "data": "data", "model": "model",
          "optimisation": "optimisation", "attack": "attack (pixel units)", "diagnostics": "diagnostics",
          "runtime": "runtime"}


def opt(default, group: str, help: str, item=None):
    """A TrainConfig field with its CLI help and group in the metadata (`autolora train --help` shows them).
    A list default becomes a default_factory; `item` is the element type of a list flag."""
    meta = {"help": help, "group": group, "item": item}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run needs. `None` means "the method's / dataset's preset" (see `resolve`)."""

    # what to train
    method: str = opt("vanilla_rft", "method", "a method of the registry (autolora.methods: {names}; "
                      "roli is shorthand for --init roli --method madry_ft)")
    init: str = opt("random", "method", "the head before fine-tuning: random, or roli (adversarial linear probing "
                    "first; Hua et al., CVPR 2024)")
    peft: str = opt("none", "method", "madry_ft: what trains besides the head: none (everything), lora, bias, "
                    "adapter (ViT/Swin blocks) or prompt (VPT-deep, ViT)")
    # data
    dataset: str = opt("cifar10", "data", "cifar10, cifar100, dtd, caltech256, cub200, dogs120, imagefolder, digits")
    data_dir: str | None = opt(None, "data", "the dataset's directory (its official layout; see the README)")
    download: bool = opt(False, "data", "download cifar10/cifar100/dtd/caltech256 with torchvision when missing")
    classes: list | None = opt(None, "data", "keep only these classes (comma list of class names; default all)")
    val_fraction: float = opt(0.05, "data", "stratified validation split of train: chooses the best epoch and drives "
                              "the automated LR")
    test_fraction: float = opt(0.2, "data", "held-out test fraction for datasets without a test split")
    limit_train: int | None = opt(None, "data", "a seeded stratified subset of this many training images")
    limit_eval: int | None = opt(None, "data", "a seeded stratified subset of this many validation and test images")
    split_seed: int | None = opt(None, "data", "seed of the held-out test and validation splits and the limit-eval "
                                 "subsets (default: --seed); one value for all runs of a comparison tests them on "
                                 "the same images")
    skip_bad_images: bool = opt(False, "data", "skip unreadable images (with a warning) instead of stopping")
    val_split: str = opt("stratified", "data", "how validation is held out of train: stratified (a seeded "
                         "stratified --val-fraction) or tail (the last --val-fraction of the train split, RoLI's "
                         "CIFAR split)")
    augmentation: str = opt("autolora", "data", "training augmentation: autolora (RandomCrop(pad 4) + flip at low "
                            "resolution; Resize(256) + RandomResizedCrop(224) + flip at high), roli (none at low "
                            "resolution; Resize(256) + RandomCrop(224) + flip at high) or none")
    workers: int | None = opt(None, "data", "DataLoader worker processes (default: 0 on CPU, up to 8 per process on "
                              "CUDA)")
    # model
    arch: str | None = opt(None, "model", "tiny, small (CIFAR ResNets), a torchvision or timm model name (timm:NAME / "
                           "torchvision:NAME to choose; torchvision's for resnet18, resnet50, wide_resnet50_2, "
                           "wide_resnet50_4, ...) or robustbench:DATASET/THREAT/NAME (default: the arch --weights "
                           "implies, else resnet18)")
    weights: str | None = opt(None, "model", "pretrained backbone: a .safetensors/.pth/.pt/.bin/.ckpt file; a source, "
                              "whose arch it implies: salman:resnet50_l2_eps3 (Salman et al. 2020, any L2/Linf model of "
                              "Hugging Face madrylab/robust-imagenet-models), robustbench:imagenet/Linf/Salman2020Do_R18 "
                              "(RobustBench's model zoo), timm:vit_base_patch16_224.augreg_in21k_ft_in1k (timm's "
                              "pretrained tags), torchvision:resnet50.IMAGENET1K_V2 (torchvision's weight enums); or "
                              "none (train from random weights without the warning). README: Backbones")
    trust_pickle: bool = opt(False, "model", "unpickle a --weights file that needs more than tensors and numpy "
                             "float64 scalars (weights_only=False: it can run code in the file); only for a file "
                             "you trust. Not needed for checkpoints written by the robustness library (salman:); "
                             "better convert a file once with `autolora convert-weights IN OUT.safetensors "
                             "--trust-pickle` and share OUT")
    resize: str = opt("nearest", "model", "how the model resizes its inputs to --input-size: nearest (the AutoLoRa "
                      "paper's) or bilinear (RoLI's)")
    head_init: str = opt("default", "model", "the fresh head's initialisation: default (torch's nn.Linear) or roli "
                         "(kaiming-normal fan_out weights, bias -log(99): RoLI's RanLI head)")
    input_size: str = opt("native", "model", "resize inputs (inside the model) to N, native (the "
                          "backbone's own size) or none")
    # optimisation
    epochs: int = opt(60, "optimisation", "training epochs E (0: evaluate the starting weights only)")
    batch_size: int = opt(128, "optimisation", "batch size per process")
    lr: float | None = opt(None, "optimisation", "initial LR (default: 0.01 for autolora; Table 5 per dataset for "
                           "the baselines)")
    weight_decay: float | None = opt(None, "optimisation", "weight decay (default: 1e-4, Table 5)")
    optimizer: str = opt("sgd", "optimisation", "sgd (momentum --momentum, decay on every parameter) or adamw (as "
                         "RoLI runs it: betas 0.9/0.999, eps 1e-6, decoupled decay on every parameter whose name has "
                         "no 'bias'; with --weight-decay 0 it is SGD, as in RoLI's optimizer.py)")
    momentum: float = opt(0.9, "optimisation", "SGD momentum, in [0, 1)")
    lr_schedule: str | None = opt(None, "optimisation", "step (÷10 at --milestones), auto (AutoLoRa's Algorithm 1), "
                                  "warmup_cosine (per epoch: --warmup-epochs linear from 0, then cosine; RoLI's), "
                                  "onecycle or cosine (per iteration); default: auto for autolora, step otherwise")
    select: str = opt("best", "optimisation", "the result: best (the epoch of the best validation PGD accuracy; "
                      "never test data) or last")
    milestones: list | None = opt(None, "optimisation", "step schedule: distinct epochs in 1..E-1 where the LR "
                                  "drops ÷10 (default: E/2 and 5E/6, 30 and 50 of 60; for short runs the distinct "
                                  "ones of those inside the run)", int)
    auto_lr_interval: int = opt(4, "optimisation", "automated LR: decide after epochs 4, 8, ... (the authors' "
                                "checkpoint epochs), never after the final one")
    auto_lr_rules: str = opt("authors", "optimisation", "automated LR bookkeeping: authors (their script) or apgd "
                             "(AutoAttack's rule as this project first read it; README: choices)")
    reset_momentum_on_rollback: bool = opt(False, "optimisation", "also clear SGD momentum when the automated LR "
                                           "rolls back (the authors reload the weights only)")
    min_lr: float = opt(1e-5, "optimisation", "the automated LR stops training below this LR")
    warmup_epochs: int = opt(10, "optimisation", "warmup_cosine: epochs of linear warm-up from LR 0 (epoch 0 trains at "
                             "LR 0, as RoLI's per-epoch LambdaLR does)")
    # attack (pixel units)
    norm: str = opt("linf", "attack", NORM_HELP)
    eps: float | None = opt(None, "attack", EPS_HELP)
    step_size: float | None = opt(None, "attack", STEP_HELP)
    train_steps: int = opt(10, "attack", "PGD steps of the training attack")
    train_attack: str = opt("pgd", "attack", f"training attack: {TRAIN_HELP}")
    eval_steps: int = opt(10, "attack", "PGD steps of validation and of `pgd` in --eval-attacks")
    pgd_keep: str = opt("last", "attack", "which PGD iterate the training and evaluation attacks return: last, "
                        "best_batch (the iterate of the highest batch-mean loss: RoLI's use_best) or best_example "
                        "(each example's highest-loss iterate)")
    eval_attacks: list = opt(["clean", "pgd", "aa"], "attack", f"final test attacks, comma list of {EVAL_HELP}; each "
                             "figure is named by what ran (test_pgd10, test_pgd2, ...)")
    # losses
    beta: float = opt(6.0, "method", "TRADES weight β (vanilla RFT, TWINS)")
    gamma: float | None = opt(None, "method", "TWINS: weight γ of the frozen-BN branch (default: Table 5)")
    rank: int = opt(8, "method", "AutoLoRa / --peft lora: rank r of the LoRa branch")
    lora_filter: str | None = opt(None, "method", "regex on backbone module names that get a LoRa branch (default: "
                                  "every Conv2d and Linear)")
    lora_std: float = opt(1.0, "method", "σ of the LoRa factor A ~ N(0, σ) (B = 0, scaling 1/r; the authors' 1)")
    lora_alpha: float | None = opt(None, "method", "--peft lora: scaling α/r of BA (default: 1/r, AutoLoRa's; RoLI: "
                                   "α = r = 16)")
    lora_init: str = opt("normal", "method", "--peft lora: A ~ N(0, --lora-std) (normal, AutoLoRa's authors) or "
                         "kaiming-uniform with a = √5 (kaiming, loralib / RoLI's RanLI-LoRA); B = 0 either way")
    lora_qkv: str = opt("all", "method", "--peft lora on a fused qkv projection (ViT/Swin attention): all rows, or "
                        "qv (the query and value rows only, as RoLI's LoRA)")
    adapter_reduction: int = opt(8, "method", "--peft adapter: bottleneck reduction factor (Pfeiffer; RoLI's 8)")
    adapter_init: str = opt("learn", "method", "--peft adapter: learn (down projection as nn.Linear, up zero: the "
                            "adapter starts at identity and learns) or authors (all four tensors zero, as RoLI's code: "
                            "only the up-projection's bias can learn)")
    prompt_tokens: int = opt(10, "method", "--peft prompt: VPT-deep prompt tokens per layer (RoLI: 10, 20 for CUB)")
    prompt_dropout: float = opt(0.1, "method", "--peft prompt: dropout on the prompts")
    peft_encoder: str = opt("eval", "method", "--peft lora/bias/adapter/prompt: the frozen encoder's mode during "
                            "training: eval (batch norm statistics and dropout fixed, as RoLI's vit_models.py) or train")
    sharpen_alpha: float = opt(1.0, "method", "AutoLoRa: sharpening α of λ1 = 1 − SA^α, λ2 = λ2max·SA^α (Eq. 6, "
                               "7); not the PGD step, which is --step-size")
    lambda2_max: float = opt(6.0, "method", "AutoLoRa: λ2max (Eq. 7)")
    detach_soft_labels: bool = opt(False, "method", "AutoLoRa: no gradient through the branch's soft labels in the "
                                   "KL term (the authors keep it)")
    # linear probing / RoLI stage 1
    probe_epochs: int | None = opt(None, "method", "--init roli: epochs of adversarial linear probing (RoLI stage "
                                   "1; default E/2)")
    probe_lr: float = opt(0.01, "method", "--init roli: LR of adversarial linear probing")
    probe_weight_decay: float | None = opt(None, "method", "--init roli: weight decay of linear probing (default: "
                                           "--weight-decay)")
    probe_lr_schedule: str = opt("step", "method", "--init roli: LR schedule of linear probing: step (÷10 at E/2 and "
                                 "5E/6) or warmup_cosine (RoLI's)")
    probe_from: str | None = opt(None, "method", "--init roli: take stage 1 from this finished linear-probing run "
                                 "(its directory or model.safetensors; same data and --weights) instead of running it, "
                                 "as RoLI's code loads the RanLI-Linear checkpoint (MODEL.WEIGHT_PATH)")
    # diagnostics
    log_gradsim: bool = opt(False, "diagnostics", "log the gradient similarity (Eq. 3, 4, 8) after every epoch")
    gradsim_samples: int = opt(128, "diagnostics", "training images the gradient similarity is measured on")
    gradsim_mode: str = opt("batch", "diagnostics", "batch (cosine of batch-objective gradients, mean over "
                            "mini-batches) or per_example (mean of each example's cosine, the paper's; about B× the "
                            "backward passes)")
    tensorboard: bool = opt(False, "diagnostics", "also write the metrics.jsonl scalars to RUN_DIR/tensorboard "
                            "(needs the tensorboard package: pip install 'autolora[tensorboard]')")
    # runtime
    seed: int = opt(0, "runtime", "seed of initialisation, data order, augmentation and attacks")
    device: str = opt("auto", "runtime", "auto, cpu, cuda or cuda:N")
    amp: bool | None = opt(None, "runtime", "bf16 autocast in training, first conv kept fp32, evaluation fp32 "
                           "(default: on for CUDA, off on CPU)")
    channels_last: bool | None = opt(None, "runtime", "NHWC memory format (default: on for conv nets)")
    compile: bool = opt(False, "runtime", "torch.compile the training forward and the training attack's model")
    sync_bn: bool = opt(False, "runtime", "under torchrun on CUDA: SyncBatchNorm across ranks")
    deterministic: bool = opt(False, "runtime", "deterministic kernels (cuDNN, cuBLAS) and seeded DataLoader "
                              "workers")
    progress: bool | None = opt(None, "runtime", "progress bars (default: when stderr is a terminal)")

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, coerce(f, getattr(self, f.name), "TrainConfig"))
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Ranges and names that do not depend on the method (`autolora.methods.resolve_config` checks those that
        do: the method's name, its flags, its presets). One UserError naming the flag and the fix."""
        def need(ok, msg):
            if not ok:
                raise UserError(msg)

        need(self.init in ("random", "roli"), f"--init must be 'random' or 'roli', got '{self.init}'")
        need(self.peft in PEFT_MODES, f"--peft must be one of {', '.join(PEFT_MODES)}, got '{self.peft}'")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                                           f"'{self.optimizer}'{suggest(self.optimizer, OPTIMIZERS)}")
        for flag, value, choices in (("val-split", self.val_split, ("stratified", "tail")),
                                     ("augmentation", self.augmentation, ("autolora", "roli", "none")),
                                     ("resize", self.resize, ("nearest", "bilinear")),
                                     ("head-init", self.head_init, ("default", "roli")),
                                     ("pgd-keep", self.pgd_keep, ("last", "best_batch", "best_example")),
                                     ("lora-qkv", self.lora_qkv, ("all", "qv")),
                                     ("lora-init", self.lora_init, ("normal", "kaiming")),
                                     ("adapter-init", self.adapter_init, ("learn", "authors")),
                                     ("peft-encoder", self.peft_encoder, ("eval", "train")),
                                     ("probe-lr-schedule", self.probe_lr_schedule, ("step", "warmup_cosine"))):
            need(value in choices, f"--{flag} must be one of {', '.join(choices)}, got '{value}'{suggest(value, choices)}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        need(self.adapter_reduction >= 1, f"--adapter-reduction must be >= 1, got {self.adapter_reduction}")
        need(self.prompt_tokens >= 1, f"--prompt-tokens must be >= 1, got {self.prompt_tokens}")
        need(0 <= self.prompt_dropout < 1, f"--prompt-dropout must be in [0, 1), got {self.prompt_dropout}")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}")
        need(self.probe_weight_decay is None or self.probe_weight_decay >= 0, "--probe-weight-decay must be >= 0")
        need(self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}")
        need(self.batch_size >= 2, f"--batch-size must be >= 2 (a batch of one breaks batch norm in train mode), "
                                   f"got {self.batch_size}")
        self.norm = check_norm(self.norm)
        linf = self.norm == "linf"
        top = 1 if linf else math.nextafter(math.inf, 0)  # L2: any finite radius
        need(self.eps is None or 0 <= self.eps <= top,
             f"--eps must be in [0, 1] (pixel units of images in [0, 1], e.g. 8/255), got {self.eps}" if linf else
             f"--eps must be >= 0 (an L2 radius in pixel units of images in [0, 1], e.g. 0.5), got {self.eps}")
        need(self.step_size is None or 0 < self.step_size <= top,
             f"--step-size must be > 0 (and at most 1 under L∞: pixel units of images in [0, 1], e.g. 2/255), got "
             f"{self.step_size}")
        check_train_attack(self.train_attack, self.norm)
        need(self.train_steps >= 1 or self.train_attack == "fgsm_rs",
             f"--train-steps must be >= 1, got {self.train_steps}: PGD-0 is only the random start, not an attack")
        need(self.eval_steps >= 1, f"--eval-steps must be >= 1, got {self.eval_steps}: validation and `pgd` in "
                                   "--eval-attacks run PGD with this many steps")
        parse_attacks(self.eval_attacks, self.eval_steps)  # an unknown name fails now, not after training
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(self.min_lr >= 0, f"--min-lr must be >= 0, got {self.min_lr}")
        need(self.workers is None or self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(self.rank >= 1, f"--rank must be >= 1, got {self.rank}")
        need(self.lr is None or 0 < self.lr < 3.4e38, f"--lr must be > 0 and a float32 number (below 3.4e38), "
                                                     f"got {self.lr}")
        need(self.weight_decay is None or self.weight_decay >= 0, "--weight-decay must be >= 0")
        need(0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        need(0 < self.test_fraction < 1, f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        need(self.limit_train is None or self.limit_train >= 2,
             f"--limit-train must be >= 2 (a training step needs 2 images), got {self.limit_train}")
        need(self.limit_eval is None or self.limit_eval >= 1, "--limit-eval must be >= 1")
        need(self.split_seed is None or self.split_seed >= 0, "--split-seed must be >= 0")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        need(self.lr_schedule in (None, *LR_SCHEDULES),
             f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'")
        need(self.select in ("best", "last"), f"--select must be 'best' or 'last', got '{self.select}'")
        need(not (self.select == "last" and self.lr_schedule == "auto"),
             "--select last conflicts with --lr-schedule auto, which rolls back to the best epoch: use --select best")
        need(self.sharpen_alpha > 0, f"--sharpen-alpha must be > 0, got {self.sharpen_alpha}")
        need(self.lambda2_max >= 0, "--lambda2-max must be >= 0")
        need(self.beta >= 0, "--beta must be >= 0")
        need(self.gamma is None or self.gamma >= 0, f"--gamma must be >= 0, got {self.gamma}")
        need(self.probe_epochs is None or self.probe_epochs >= 0, "--probe-epochs must be >= 0")
        need(self.probe_lr > 0, f"--probe-lr must be > 0, got {self.probe_lr}")
        need(self.probe_from is None or (isinstance(self.probe_from, str) and self.probe_from.strip() != ""),
             "--probe-from must name a linear-probing run (its directory or model.safetensors)")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device must be auto, cpu or cuda, got '{self.device}'")
        need(self.auto_lr_interval >= 1, "--auto-lr-interval must be >= 1")
        need(self.auto_lr_rules in AUTO_LR_RULES,
             f"--auto-lr-rules must be one of {', '.join(AUTO_LR_RULES)}, got '{self.auto_lr_rules}'")
        need(self.lora_std > 0, f"--lora-std must be > 0, got {self.lora_std}")
        if self.lora_filter is not None:
            try:
                re.compile(self.lora_filter)
            except re.error as e:
                raise UserError(f"--lora-filter {self.lora_filter!r} is not a valid regular expression ({e}): "
                                "e.g. 'layer4' or '^layer[1-4]\\.1\\.conv'") from None
        need(self.gradsim_mode in GRADSIM_MODES,
             f"--gradsim-mode must be one of {', '.join(GRADSIM_MODES)}, got '{self.gradsim_mode}'")
        need(self.gradsim_samples >= 1, "--gradsim-samples must be >= 1")
        if self.milestones is not None:
            check_milestones(self.milestones, self.epochs)

    def warnings(self) -> list[str]:
        """Settings that are legal but almost surely a mistake: one line each (the trainer prints them)."""
        out = []
        if self.eps is not None and self.step_size is not None and 0 < self.eps < self.step_size and \
                self.train_attack == "pgd":
            out.append(f"--step-size {self.step_size:.4g} is larger than --eps {self.eps:.4g}: every PGD step then "
                       "jumps to the edge of the eps-ball (usual: eps/4, e.g. 2/255 for 8/255)")
        if self.norm == "l2" and self.eps is not None and 0 < self.eps < 0.1:
            out.append(f"--eps {self.eps:.4g} under --norm l2 is tiny: an L2 radius is summed over every pixel "
                       "(RobustBench's CIFAR-10 L2 budget is 0.5, Salman et al.'s 3.0 at 224²); was an L∞ budget meant?")
        if self.lr is not None and self.lr > 1:
            out.append(f"--lr {self.lr:g} is above 1: SGD fine-tuning usually diverges there (the papers use 0.001-0.1)")
        return out

    def resolve_budget(self, resolution: str) -> "TrainConfig":
        """A copy with eps and step_size filled in where None: the norm's defaults for data of `resolution` ("low":
        at most 64 px a side; "high") and eps/4 (`attacks.norms`). The trainer calls it once the data is known, so
        config.yaml holds numbers."""
        eps, step = resolve_budget(self.norm, self.eps, self.step_size, resolution)
        return dataclasses.replace(self, eps=eps, step_size=step)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """A config from a mapping of option: value (a YAML file, flags), each checked for its type."""
        known = {f.name: f for f in fields(cls)}
        for k in d:
            if k == "alpha":
                raise UserError(f"{source}: 'alpha' is ambiguous: the PGD step is step_size (--step-size), AutoLoRa's "
                                "sharpening α of λ1, λ2 is sharpen_alpha (--sharpen-alpha)")
            if k not in known:
                raise UserError(f"{source}: unknown key '{k}'{suggest(k, known)}; valid keys are the `autolora train` options")
        return cls(**{k: coerce(known[k], v, source) for k, v in d.items()})

    @classmethod
    def from_saved(cls, d: dict, source: str) -> "TrainConfig":
        """The config of a run directory (its config.yaml), written by this or an earlier autolora."""
        return cls.from_dict(migrate_saved(d), source)


def migrate_saved(d: dict) -> dict:
    """A run's saved config in today's names. Before sharpen_alpha a saved config had `alpha` (AutoLoRa's sharpening
    α), and `pgd10` in eval_attacks meant PGD with eval_steps steps (today `pgd`). Before `norm` every run was L∞
    (its eps and step_size are numbers, as they still are in every saved config)."""
    if isinstance(d, dict) and "norm" not in d:
        d = {**d, "norm": "linf"}
    if "alpha" in d and "sharpen_alpha" not in d:
        d = dict(d)
        d["sharpen_alpha"] = d.pop("alpha")
        if isinstance(d.get("eval_attacks"), list):
            d["eval_attacks"] = ["pgd" if str(a).strip().lower() == "pgd10" else a for a in d["eval_attacks"]]
    return d


def default_milestones(epochs: int) -> list[int]:
    """E/2 and 5E/6 (30 and 50 of 60), keeping the distinct ones inside the run (1..E-1): E = 2 gives [1], not
    [1, 1] (÷100 at once)."""
    return sorted({m for m in (epochs // 2, (5 * epochs) // 6) if 0 < m < epochs})


def check_milestones(milestones, epochs: int) -> None:
    """UserError unless the milestones are distinct epochs inside the run (1..E-1)."""
    ms = list(milestones)
    if len(set(ms)) != len(ms):
        raise UserError(f"--milestones {','.join(map(str, ms))} repeats an epoch: each milestone divides the LR by 10 "
                        "once; give distinct epochs")
    outside = [m for m in ms if not 0 < m < epochs]
    if outside and epochs > 0:
        raise UserError(f"--milestones {','.join(map(str, ms))}: epoch {outside[0]} is not inside the run (milestones "
                        f"must be in 1..{epochs - 1} for --epochs {epochs})"
                        + ("; a 1-epoch run has no milestone" if epochs == 1 else ""))


def coerce(f, value, source: str):
    """`value` as field `f`'s declared type (int, float, str, bool, list, each maybe None), or one UserError
    naming `source`, the field and the expected type. Floats accept fractions (`eps: 8/255`); ints refuse
    fractional values (`epochs: 2.5`); lists accept comma-separated text; str fields accept numbers
    (`input_size: 224`)."""
    kinds = {k.strip() for k in str(f.type).split("|")}
    if value is None:
        if "None" in kinds:
            return None
        raise UserError(f"{source}: {f.name} needs a value (got nothing)")

    def bad(what):
        return UserError(f"{source}: {f.name} must be {what}, got {value!r}")

    if "bool" in kinds:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if "int" in kinds:
        try:
            return coerce_int(value)
        except ValueError:
            raise bad("an integer") from None
    if "float" in kinds:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return pixels(value)
        except (ValueError, ZeroDivisionError):
            raise bad("a number (e.g. 0.01, or 8/255 for pixel budgets)") from None
    if "list" in kinds:
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad("a list (or comma-separated text)")
        if f.name == "milestones":
            try:
                return [coerce_int(v) for v in items]
            except ValueError:
                raise bad("a list of integer epochs") from None
        if any(isinstance(v, (list, dict)) or v is None for v in items):
            raise bad("a list of names")
        return [str(v).strip() for v in items]
    if "str" in kinds:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad("text")
        return str(value)
    return value


def coerce_int(v) -> int:
    """An int from an int, a whole float (3.0) or integer text ("3"); ValueError otherwise (bools included)."""
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())
                                   or (isinstance(v, str) and v.strip().lstrip("-").isdigit())):
        raise ValueError(v)
    return int(v)


def load_yaml(path: str, presets=()) -> dict:
    """A YAML mapping from `path` (`presets`: the names `--config` also takes, for the error message)."""
    listed = f"; or a preset: {', '.join(presets)}" if presets else ""
    if not os.path.exists(path):
        raise UserError(f"config file not found: {path}{suggest(path, presets) if presets else ''}{listed}")
    if os.path.isdir(path):
        raise UserError(f"config file {path} is a directory: pass a YAML file{listed}")
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start}): pass a YAML file") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path} ({e.strerror or e})") from None
    except yaml.constructor.ConstructorError as e:
        raise UserError(f"config file {path} is not a plain config: it holds a tag that safe loading refuses "
                        f"({(e.problem or str(e)).strip()}); autolora writes and reads plain YAML only: "
                        "remove the tag or regenerate the file") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    return d
