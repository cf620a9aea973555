"""`autolora train`: robust fine-tuning into a run directory (`autolora.train`)."""
from __future__ import annotations

import os

from ..errors import UserError
from .options import add_train_options, config_from_args, given_flags


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="robust fine-tuning of a pretrained backbone",
                       description="Robust fine-tuning into a run directory. Precedence: defaults < --config < flags. "
                                   "Numbers accept fractions (--eps 8/255).")
    r = t.add_argument_group("run directory")
    r.add_argument("--config", help="YAML file of train options, or a preset whose values follow --dataset (and --peft, "
                                    "--init): roli (RoLI as its authors ran it), twins-authors (TWINS' scripts); "
                                    "flags override it")
    r.add_argument("--out", help="run directory (must not exist or be empty)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    r.add_argument("--quiet", action="store_true", help="no log lines on stdout")
    add_train_options(t)


def run(args) -> int:
    from ..engine.loop import resume, train

    if args.resume:
        if args.out and args.out != args.resume:
            raise UserError(f"--out {args.out} conflicts with --resume {args.resume}: a resumed run stays in its directory")
        if args.overwrite:
            raise UserError(f"--overwrite conflicts with --resume {args.resume}: resuming keeps the run; drop one of them")
        if getattr(args, "config", None):
            raise UserError(f"--config {args.config} conflicts with --resume {args.resume}: a resumed run keeps its "
                            "saved config.yaml; drop --config")
        resume(args.resume, quiet=args.quiet, overrides=given_flags(args))
        return 0
    if not args.out:
        raise UserError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    cfg, _ = config_from_args(args)
    config_file = args.config if getattr(args, "config", None) and os.path.exists(args.config) else None
    train(cfg, args.out, overwrite=args.overwrite, quiet=args.quiet, inputs={"--config": config_file})
    return 0
