"""`autolora pretrain`: adversarial pre-training of a backbone from scratch (PGD-k or FGSM-RS)."""
from __future__ import annotations

import argparse


DEFAULTS: dict = {}  # every flag's default but --out/--resume/--quiet: what --resume may not change


def add_parser(sub) -> None:
    from ..attacks.registry import TRAIN_ATTACKS
    from ..config import ITERATION_SCHEDULES
    from .options import pixel_arg

    p = sub.add_parser("pretrain", help="adversarially pre-train a backbone from scratch (PGD-k or FGSM-RS)",
                       description="Adversarial training from scratch (Madry's objective, a run of the one trainer: "
                                   "it resumes, logs metrics.jsonl and runs under torchrun); writes "
                                   "OUT/model.safetensors (plain layout, for `autolora train --weights`). Numbers "
                                   "accept fractions (--eps 8/255).")
    p.add_argument("--arch", default="tiny", help="tiny, small, resnet18, resnet50 or a timm name (default tiny)")
    p.add_argument("--dataset", default="digits", help="any dataset of `train` (default digits, offline)")
    p.add_argument("--data-dir", default=None, help="the dataset's directory (as in `train`)")
    p.add_argument("--download", action="store_true", help="download the dataset when missing (as in `train`)")
    p.add_argument("--classes", default=None, metavar="A,B,...", type=lambda s: [c for c in s.split(",") if c],
                   help="pre-train on these classes only (e.g. 0,1,2,3,4)")
    p.add_argument("--attack", default="pgd", choices=TRAIN_ATTACKS,
                   help="pgd: PGD-k (Madry et al.); fgsm_rs: FGSM with random start, step 1.25·eps (Wong et al.)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--step-size", type=pixel_arg, default=None,
                   help="PGD step in pixel units, of PGD training and of the PGD evaluation (default: 2.5·eps/steps "
                        "for pgd; eps/4 for fgsm_rs, whose own step is 1.25·eps)")
    p.add_argument("--eps", type=pixel_arg, default=8 / 255, help="L∞ budget in pixel units (default 8/255)")
    p.add_argument("--epochs", type=int, default=10, help="epochs; the last one is kept (default 10)")
    p.add_argument("--lr", type=pixel_arg, default=0.1, help="peak LR (default 0.1)")
    p.add_argument("--schedule", default="onecycle", choices=ITERATION_SCHEDULES,
                   help="per-iteration LR: onecycle (0 → lr → 0) or cosine (lr → 0)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size per process (default 128)")
    p.add_argument("--weight-decay", type=pixel_arg, default=5e-4, help="SGD weight decay (default 5e-4)")
    p.add_argument("--input-size", default="native", help="N, native or none (as in `train`)")
    p.add_argument("--limit-train", type=int, default=None, help="a seeded stratified subset of training images")
    p.add_argument("--limit-eval", type=int, default=None, help="test images for the final evaluation")
    p.add_argument("--val-fraction", type=pixel_arg, default=0.05,
                   help="validation split, logged every epoch (the last epoch is kept; default 0.05)")
    p.add_argument("--test-fraction", type=pixel_arg, default=0.2,
                   help="held-out test fraction for datasets without a test split (default 0.2)")
    p.add_argument("--eval-attacks", default="clean,pgd10", help="final test evaluation (default clean,pgd10)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the training forward/backward (default: on for CUDA)")
    p.add_argument("--out", help="run directory (must not exist or be empty)")
    p.add_argument("--resume", metavar="OUT", help="continue the pre-training in OUT from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no log lines on stdout")
    DEFAULTS.update({a.dest: a.default for a in p._actions if a.dest not in ("help", "resume", "quiet", "out")})


def run(args) -> int:
    import os

    from ..config import TrainConfig, load_yaml
    from ..errors import UserError
    from ..engine.loop import resume
    from ..workflows.pretrain import pretrain

    arch = args.arch
    if args.resume:
        if args.out and args.out != args.resume:
            raise UserError(f"--out {args.out} conflicts with --resume {args.resume}: a resumed run stays in its directory")
        given = [k for k, v in DEFAULTS.items() if getattr(args, k) != v]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UserError(f"{flag} conflicts with --resume {args.resume}: a resumed pre-training keeps its saved "
                            "config.yaml; drop the flag")
        resume(args.resume, quiet=args.quiet, command="pretrain")  # the saved config.yaml is used
        path = os.path.join(args.resume, "model.safetensors")
        cfg_file = os.path.join(args.resume, "config.yaml")
        arch = TrainConfig.from_saved(load_yaml(cfg_file), cfg_file).arch
    else:
        if not args.out:
            raise UserError("pretrain needs --out RUN_DIR (or --resume RUN_DIR)")
        path = pretrain(args.arch, args.dataset, args.data_dir, out=args.out, classes=args.classes,
                        attack=args.attack, steps=args.steps, step_size=args.step_size, eps=args.eps,
                        epochs=args.epochs, lr=args.lr, schedule=args.schedule, batch_size=args.batch_size,
                        weight_decay=args.weight_decay, input_size=args.input_size, limit_train=args.limit_train,
                        limit_eval=args.limit_eval, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        eval_attacks=[a for a in args.eval_attacks.split(",") if a], seed=args.seed,
                        device=args.device, amp=args.amp, download=args.download, overwrite=args.overwrite,
                        quiet=args.quiet)
    print(f"weights: {path}  (fine-tune with: autolora train --arch {arch} --weights {path} ...)")
    return 0
