"""`autolora compare`: methods × seeds (× initial LRs) in one command; finished runs are skipped, interrupted
ones resumed; then the report. Every `autolora train` option applies to all runs of the sweep."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from .options import add_train_options, pixel_list

    p = sub.add_parser(
        "compare", help="run methods × seeds (× LRs), skip finished runs, resume interrupted ones, then report",
        description="Each run goes to OUT_ROOT/<method>[-<init>]-s<seed>[-lr<lr>]. Rerunning the same command "
                    "skips finished runs and resumes interrupted ones; a run directory made with another config "
                    "is an error. Train options (--dataset, --epochs, ...) apply to every run.")
    p.add_argument("--methods", required=True, type=lambda s: [v for v in s.split(",") if v.strip()],
                   metavar="M[,M:roli,...]", help="methods, e.g. vanilla_rft,twins,autolora,autolora:roli")
    p.add_argument("--seeds", default=[0], type=_ints, metavar="0,1,2", help="seeds (default 0)")
    p.add_argument("--lrs", default=None, type=pixel_list, metavar="0.001,0.01",
                   help="also sweep the initial LR (run names get -lr<LR>)")
    p.add_argument("--out-root", required=True, help="directory holding the sweep's run directories")
    p.add_argument("--config", help="YAML file of train options for every run (flags override it)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--retry-failed", action="store_true", help="start runs that failed before again")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log lines of the runs")
    add_train_options(p)
    # per-run fields that the sweep itself sets
    p.set_defaults(method=None, seed=None)


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{s}'") from None


def run(args) -> int:
    from ..workflows.compare import compare
    from .options import config_from_args
    from ..errors import UserError

    if getattr(args, "method", None) is not None:
        raise UserError("compare takes --methods (a list), not --method")
    if getattr(args, "seed", None) is not None:
        raise UserError("compare takes --seeds (a list), not --seed")
    if args.lrs is not None and getattr(args, "lr", None) is not None:
        raise UserError("--lr conflicts with --lrs: give one of them")
    cfg, _ = config_from_args(args)
    compare(cfg, args.methods, args.seeds, args.out_root, lrs=args.lrs, report=not args.no_report,
            retry_failed=args.retry_failed, quiet=args.quiet)
    return 0
