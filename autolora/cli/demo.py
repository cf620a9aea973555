"""`autolora demo`: the main job on the offline embedded default (see `autolora.workflows.demo`)."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from ..attacks.norms import NORMS

    p = sub.add_parser("demo", help="offline demo: pre-train on digits 0-4, robust fine-tuning on 5-9, report",
                       description="Pre-train a robust tiny ResNet on scikit-learn's digits 0-4, robust-fine-tune "
                                   "it on digits 5-9 with vanilla RFT and AutoLoRa, evaluate clean / PGD-10 / "
                                   "AutoAttack on held-out digits, and write OUT/report/report.md. Offline, CPU.")
    p.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT (default: resume a demo there with the same settings)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="fine-tuning seeds per method (default 1; 2+ gives Welch t-test p-values)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 10)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="pre-training epochs (default 15)")
    p.add_argument("--test-size", type=int, default=None,
                   help="held-out test images of digits 5-9 (default 50; AutoAttack's cost grows with it)")
    p.add_argument("--norm", choices=NORMS, default="linf",
                   help="threat model: linf (eps 32/255, step 8/255, FGSM-RS pre-training) or l2 (eps 1.0, step 0.25, "
                        "PGD-3 pre-training); digits are 8x8 and high-contrast, so both are 4× the usual budgets "
                        "(default linf)")
    p.add_argument("--no-aa", action="store_true", help="evaluate clean and PGD-10 only (much faster)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run: tiny data, 2 epochs, no AA")
    p.add_argument("--jobs", type=int, default=None, help="parallel fine-tuning processes (default: CPU cores)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="print only the table and the report's path")


def run(args) -> int:
    from ..workflows.demo import DemoSettings, run_demo
    from ..errors import UserError

    kw = {"device": args.device, "norm": args.norm}
    for name in ("epochs", "pretrain_epochs", "test_size"):
        v = getattr(args, name)
        if v is not None:
            if v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
            kw[name] = v
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {args.seeds}")
        kw["seeds"] = list(range(args.seeds))
    if args.no_aa:
        kw["eval_attacks"] = ["clean", "pgd10"]
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    settings = DemoSettings.quick(**kw) if args.quick else DemoSettings(**kw)
    echo = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    try:
        res = run_demo(args.out, settings, overwrite=args.overwrite, jobs=args.jobs, echo=echo)
    except KeyboardInterrupt:
        print(f"autolora: interrupted; run the same `autolora demo --out {args.out}` again to resume",
              file=sys.stderr)
        return 130
    print()
    print(res["table"])
    print(f"\nreport: {res['report']}  ({res['seconds']:.0f} s)")
    return 0
