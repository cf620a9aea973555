"""`autolora` command line: a thin layer over the Python API (`autolora.train`, `autolora.evaluate_run`, ...).

Every `train` option is a `TrainConfig` field; precedence: defaults < --config FILE.yaml < explicit flags.
Bad input exits with status 2 and one line `autolora: error: ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from . import __version__
from .config import GROUPS, TrainConfig, load_yaml
from .errors import UserError

def _shown(value, pixels: bool = False) -> str:
    """A default as a user would type it: 8/255 for a pixel budget, a comma list for lists."""
    if isinstance(value, float):
        k = value * 255
        return f"{round(k)}/255" if pixels and 0 < value < 1 and abs(k - round(k)) < 1e-9 else f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, in the field's group, with its help and default from the field's metadata.
    Numbers accept fractions (`--eps 8/255`); bool fields are switches (tri-state ones --x/--no-x); lists are
    comma-separated. Every default is None here, so `config_from_args` can tell given flags from defaults."""
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kinds = {k.strip() for k in str(f.type).split("|")}
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        h = f.metadata["help"]
        if default is not None and default is not False and "default" not in h:
            h += f" (default: {_shown(default, f.metadata['group'] == 'attack')})"
        g = groups[f.metadata["group"]]
        if "bool" in kinds:
            action = argparse.BooleanOptionalAction if "None" in kinds else "store_true"
            g.add_argument(flag, dest=f.name, action=action, default=None, help=h)
        elif "list" in kinds:
            item = f.metadata.get("item") or str
            g.add_argument(flag, dest=f.name, default=None, metavar="A,B,...", help=h,
                           type=lambda text, t=item: [t(v) for v in text.split(",") if v])
        else:
            typ = int if "int" in kinds else pixel_arg if "float" in kinds else str
            g.add_argument(flag, dest=f.name, type=typ, default=None, help=h)


def pixel_arg(text: str) -> float:
    """argparse type of every number flag: `0.0314` or a fraction such as `8/255` (pixel units)."""
    from .config import pixels

    try:
        return pixels(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (e.g. 0.0314 or 8/255)") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autolora", description="Automated robust fine-tuning (AutoLoRa, ICLR 2024)")
    ap.add_argument("--version", action="version", version=f"autolora {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="robust fine-tuning of a pretrained backbone",
                       description="Robust fine-tuning into a run directory. Precedence: defaults < --config < flags. "
                                   "Numbers accept fractions (--eps 8/255).")
    r = t.add_argument_group("run directory")
    r.add_argument("--config", help="YAML file of train options, or a bundled preset name (roli); flags override it")
    r.add_argument("--out", help="run directory (must not exist or be empty)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    r.add_argument("--quiet", action="store_true", help="no log lines on stdout")
    _add_train_options(t)

    e = sub.add_parser("eval", help="re-evaluate a run's best model")
    e.add_argument("run_dir", help="a run directory of `autolora train`")
    e.add_argument("--attacks", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help="comma list of clean, pgd10 (pgdN), aa (default: the run's --eval-attacks)")
    e.add_argument("--limit", type=int, default=None, help="seeded stratified subset of the test split")
    e.add_argument("--dataset", default=None, help="evaluate on another copy of the data (classes matched by name)")
    e.add_argument("--data-dir", default=None, help="that copy's directory (default: the run's)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    e.add_argument("--batch-size", type=int, default=256,
                   help="evaluation batch; attacks are seeded per batch, so 256 reproduces the run's own figures "
                        "(default: 256)")

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
