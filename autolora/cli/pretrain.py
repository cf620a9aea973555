"""`autolora pretrain`: adversarial pre-training of a backbone from scratch (PGD-k or FGSM-RS). Its flags are
`autolora train`'s (one per TrainConfig field) with pre-training's own defaults, less the method's."""
from __future__ import annotations

# pre-training's long-standing short names for three flags
ALIASES = {"train_attack": ["--attack"], "train_steps": ["--steps"], "lr_schedule": ["--schedule"]}


def add_parser(sub) -> None:
    from ..workflows.pretrain import DEFAULTS, NOT_TAKEN
    from .options import add_train_options

    p = sub.add_parser("pretrain", help="adversarially pre-train a backbone from scratch (PGD-k or FGSM-RS)",
                       description="Adversarial training from scratch (Madry's objective, a run of the one trainer: "
                                   "it resumes, logs metrics.jsonl and runs under torchrun); writes "
                                   "OUT/model.safetensors (plain layout, for `autolora train --weights`). The step "
                                   "size defaults to 2.5·eps/steps for pgd and eps/4 (the evaluation's) for fgsm_rs, "
                                   "whose own step is 1.25·eps (--norm l2 without --eps: eps from the data's "
                                   "resolution, step eps/4). Numbers accept fractions (--eps 8/255).")
    r = p.add_argument_group("run directory")
    r.add_argument("--out", help="run directory (must not exist or be empty)")
    r.add_argument("--resume", metavar="OUT", help="continue the pre-training in OUT from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    r.add_argument("--quiet", action="store_true", help="no log lines on stdout")
    add_train_options(p, exclude=NOT_TAKEN, defaults=DEFAULTS, aliases=ALIASES)


def run(args) -> int:
    import os

    from ..config import TrainConfig, load_yaml
    from ..engine.loop import resume, train
    from ..errors import UserError
    from ..workflows.pretrain import config_from_values
    from .options import given_flags

    given = given_flags(args)
    if args.resume:
        if args.out and args.out != args.resume:
            raise UserError(f"--out {args.out} conflicts with --resume {args.resume}: a resumed run stays in its directory")
        resume(args.resume, quiet=args.quiet, command="pretrain", overrides=given)
        out = args.resume
    else:
        if not args.out:
            raise UserError("pretrain needs --out RUN_DIR (or --resume RUN_DIR)")
        train(config_from_values(given), args.out, overwrite=args.overwrite, quiet=args.quiet, command="pretrain")
        out = args.out
    cfg_file = os.path.join(out, "config.yaml")
    arch = TrainConfig.from_saved(load_yaml(cfg_file), cfg_file).arch
    path = os.path.join(out, "model.safetensors")
    print(f"weights: {path}  (fine-tune with: autolora train --arch {arch} --weights {path} ...)")
    return 0
