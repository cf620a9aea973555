"""`autolora` command line: a thin layer over the Python API (`autolora.train`, `autolora.evaluate_run`, ...).

Every `train` option is a `TrainConfig` field; precedence: defaults < --config FILE.yaml < explicit flags.
Bad input exits with status 2 and one line `autolora: error: ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import METHODS, TrainConfig, load_yaml
from .errors import UserError

# flags that are not plain `--field-name VALUE` options of TrainConfig
_BOOL_FIELDS = {"download", "skip_bad_images", "trust_pickle", "detach_soft_labels", "log_gradsim", "compile",
                "deterministic", "sync_bn", "reset_momentum_on_rollback"}
_TRISTATE = {"amp", "channels_last", "progress"}
_LISTS = {"classes": str, "eval_attacks": str, "milestones": int}
_HELP = {
    "method": f"one of {', '.join(METHODS)}",
    "init": "random head, or roli (adversarial linear probing first; Hua et al. 2024)",
    "peft": "madry_ft: what trains (none = full, lora, bias)",
    "dataset": "cifar10, cifar100, dtd, caltech256, cub200, dogs120, imagefolder, digits",
    "input_size": "N, native (the backbone's own) or none (keep the data's size)",
    "weights": "PATH (.pth/.pt/.ckpt/.safetensors) or salman:resnet18_linf_eps4 (Hugging Face download)",
    "lr": "initial LR (default: Table 5 preset per dataset; 0.01 for autolora)",
    "lr_schedule": "step (÷10 at milestones, the baselines' default) or auto (AutoLoRa's Algorithm 1)",
    "eval_attacks": "comma list of clean, pgd10 (pgdN), aa",
    "eps": "L∞ budget in pixel units (default 8/255)",
    "step_size": "PGD step in pixel units (default 2/255)",
    "trust_pickle": "unpickle a --weights file that needs more than tensors and numpy float64 scalars "
                    "(weights_only=False: it can run code in the file); only for a file you trust. Not needed for "
                    "checkpoints written by the robustness library (salman:); better convert a file once with "
                    "`autolora convert-weights IN OUT.safetensors --trust-pickle` and share OUT",
    "amp": "bf16 autocast in training, first conv kept fp32, evaluation fp32 (default: on for CUDA, off on CPU)",
    "channels_last": "NHWC memory format (default: on for conv nets)",
    "compile": "torch.compile the training forward and the training attack's model",
    "sync_bn": "under torchrun on CUDA: SyncBatchNorm across ranks",
    "workers": "DataLoader worker processes (default: 0 on CPU, up to 8 per GPU process on CUDA)",
}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        h = _HELP.get(f.name)
        if f.name in _BOOL_FIELDS:
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=h)
        elif f.name in _TRISTATE:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif f.name in _LISTS:
            p.add_argument(flag, dest=f.name, default=None, metavar="A,B,...", help=h,
                           type=lambda s, t=_LISTS[f.name]: [t(v) for v in s.split(",") if v])
        else:
            kinds = {k.strip() for k in str(f.type).split("|")}
            typ = int if "int" in kinds else pixel_arg if "float" in kinds else str
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=h)


def pixel_arg(text: str) -> float:
    """argparse type of every number flag: `0.0314` or a fraction such as `8/255` (pixel units)."""
    from .config import pixels

    try:
        return pixels(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (e.g. 0.0314 or 8/255)") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autolora", description="Automated robust fine-tuning (AutoLoRa, ICLR 2024)")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="robust fine-tuning of a pretrained backbone")
    _add_train_options(t)
    t.add_argument("--config", help="YAML file of train options, or a bundled preset name (roli); flags override it")
    t.add_argument("--out", help="run directory (must not exist or be empty)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    t.add_argument("--quiet", action="store_true", help="no log lines on stdout")

    e = sub.add_parser("eval", help="re-evaluate a run's best model")
    e.add_argument("run_dir")
    e.add_argument("--attacks", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help="comma list of clean, pgd10 (pgdN), aa (default: the run's)")
    e.add_argument("--limit", type=int, default=None, help="seeded stratified subset of the test split")
    e.add_argument("--dataset", default=None, help="evaluate on another copy of the data")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=256)

    for name, mod in _extra_commands().items():
        mod.add_parser(sub)
    return ap


def _extra_commands() -> dict:
    """Commands defined in their own modules (each has `add_parser(sub)` and `run(args)`), by command name:
    module `convert_weights` is command `convert-weights`."""
    import importlib

    cmds = {}
    for name in ("pretrain", "demo", "report", "compare", "convert_weights"):
        try:
            cmds[name.replace("_", "-")] = importlib.import_module(f"autolora.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"autolora.commands.{name}" and e.name != "autolora.commands":
                raise
    return cmds


def config_from_args(args) -> tuple[TrainConfig, dict]:
    """Defaults < --config < explicit flags. Returns the config and the explicitly given flags."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    TrainConfig.from_dict(base, source=args.config or "config")  # unknown keys -> error naming the file
    return TrainConfig.from_dict({**base, **given}), given


def cmd_train(args) -> int:
    from .trainer import train

    if args.resume:
        if args.out and args.out != args.resume:
            raise UserError(f"--out {args.out} conflicts with --resume {args.resume}: a resumed run stays in its directory")
        if args.overwrite:
            raise UserError(f"--overwrite conflicts with --resume {args.resume}: resuming keeps the run; drop one of them")
        if getattr(args, "config", None):
            raise UserError(f"--config {args.config} conflicts with --resume {args.resume}: a resumed run keeps its "
                            "saved config.yaml; drop --config")
        saved = TrainConfig.from_dict(load_yaml(f"{args.resume}/config.yaml"), source=f"{args.resume}/config.yaml") \
            if _exists(f"{args.resume}/config.yaml") else None
        if saved is None:
            raise UserError(f"--resume {args.resume}: no config.yaml there, so there is no run to resume")
        _, given = config_from_args(args)
        for k, v in given.items():
            if k in ("progress",):
                continue
            if getattr(saved, k) != v:
                raise UserError(f"--{k.replace('_', '-')} {v} conflicts with the resumed run's saved value "
                                f"{getattr(saved, k)!r}; drop the flag (a resumed run keeps its config)")
        train(saved, args.resume, resume=True, quiet=args.quiet)
        return 0
    if not args.out:
        raise UserError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    cfg, _ = config_from_args(args)
    train(cfg, args.out, overwrite=args.overwrite, quiet=args.quiet)
    return 0


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)


def cmd_eval(args) -> int:
    import json

    from .trainer import evaluate_run

    from .distributed import is_launched_rank0

    res = evaluate_run(args.run_dir, attacks=args.attacks, limit=args.limit, dataset=args.dataset,
                       data_dir=args.data_dir, device=args.device, batch_size=args.batch_size)
    if is_launched_rank0():  # under torchrun: rank 0 prints
        print(json.dumps(res, indent=2))
    return 0


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "eval":
            return cmd_eval(args)
        return _extra_commands()[args.command].run(args)
    except UserError as e:
        print(f"autolora: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autolora: interrupted; resume with `autolora train --resume RUN_DIR`", file=sys.stderr)
        return 130


def _one_line(e: Exception) -> str:
    """A UserError raised in a DataLoader worker arrives wrapped in a traceback: keep its own message."""
    msg = str(e).strip()
    if "\n" in msg:
        msg = msg.splitlines()[-1]
        msg = msg.split("UserError: ", 1)[-1]
    return msg


def entry() -> None:  # console script
    sys.exit(main())
