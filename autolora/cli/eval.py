"""`autolora eval RUN_DIR`: re-evaluate a run's best model (`autolora.evaluate_run`); under torchrun the test
batches are shared out over the ranks."""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    from ..attacks.registry import EVAL_HELP

    e = sub.add_parser("eval", help="re-evaluate a run's best model")
    e.add_argument("run_dir", help="a run directory of `autolora train`")
    e.add_argument("--attacks", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help=f"comma list of {EVAL_HELP} (default: the run's --eval-attacks)")
    e.add_argument("--limit", type=int, default=None, help="seeded stratified subset of the test split")
    e.add_argument("--dataset", default=None, help="evaluate on another copy of the data (classes matched by name)")
    e.add_argument("--data-dir", default=None, help="that copy's directory (default: the run's)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    e.add_argument("--out", default=None, metavar="FILE",
                   help="write the figures here (default: RUN_DIR/eval.json, or eval_<dataset>.json on other data)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="evaluation batch; attacks are seeded per batch, so the default reproduces the run's own "
                        "figures (default: the run's, max(its --batch-size, 256))")


def run(args) -> int:
    from ..utils.dist import is_launched_rank0
    from ..workflows.evaluate import default_eval_path, evaluate_run, output_lock, write_eval

    target = args.out or default_eval_path(args.run_dir, args.dataset or args.data_dir)
    with output_lock(args.run_dir, target):
        res = evaluate_run(args.run_dir, attacks=args.attacks, limit=args.limit, dataset=args.dataset,
                           data_dir=args.data_dir, device=args.device, batch_size=args.batch_size, write=False)
        if is_launched_rank0():  # under torchrun: rank 0 prints, first: a failed write cannot hide the figures
            print(json.dumps(res, indent=2), flush=True)
        path = write_eval(res, target)
    if path and is_launched_rank0():
        print(f"written to {path}", file=sys.stderr)
    return 0
