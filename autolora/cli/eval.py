"""`autolora eval RUN_DIR`: re-evaluate a run's best model (`autolora.evaluate_run`) under either threat model, at
one budget or a list of them, and on CIFAR-10-C / CIFAR-100-C; under torchrun the test batches are shared out over
the ranks."""
from __future__ import annotations

import json
import os
import sys


def add_parser(sub) -> None:
    from ..attacks.norms import NORMS
    from ..attacks.registry import AA_VERSIONS, EVAL_HELP
    from .options import pixel_arg, pixel_list

    e = sub.add_parser("eval", help="re-evaluate a run's best model (either norm, budgets, corruptions)",
                       description="Re-evaluate a run's best model. Every setting defaults to the run's own (its "
                                   "norm, eps, step, --eval-steps, --eval-attacks), but the images: the whole test "
                                   "split unless --limit. The figures are printed first (JSON on stdout, a table on "
                                   "stderr), then written to one file per evaluation, named by the data and the "
                                   "attack configuration (RUN_DIR/eval_<data>_<norm>-<eps>_<attacks>_<images>_<hash>"
                                   ".json; a list of budgets also gives a .png plot beside it); the path is printed.")
    e.add_argument("run_dir", help="a run directory of `autolora train`")
    e.add_argument("--attacks", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help=f"comma list of {EVAL_HELP} (default: the run's --eval-attacks; none with --corruptions)")
    e.add_argument("--norm", choices=NORMS, default=None, help="threat model: linf or l2 (default: the run's)")
    e.add_argument("--eps", type=pixel_list, default=None, metavar="E[,E,...]",
                   help="budget in pixel units, or a comma list for a robustness-vs-budget table and plot (e.g. "
                        "2/255,4/255,8/255); default: the run's, or under another --norm that norm's for the run's "
                        "resolution (L∞ 8/255; L2 0.5 up to 64 px a side, 3.0 above)")
    e.add_argument("--steps", type=int, default=None, help="PGD steps of `pgd` in --attacks (default: the run's "
                                                            "--eval-steps)")
    e.add_argument("--step-size", type=pixel_arg, default=None,
                   help="PGD step in pixel units (default: the run's for its own budget, else eps/4 per budget)")
    e.add_argument("--restarts", type=int, default=1,
                   help="PGD random restarts: an image counts as robust only if it survives every one (default 1)")
    e.add_argument("--aa-version", choices=AA_VERSIONS, default="standard",
                   help="AutoAttack version (pyautoattack's): standard, plus, or rand for randomised models "
                        "(default standard)")
    e.add_argument("--limit", type=int, default=None,
                   help="a seeded stratified subset of this many test images (default: the whole test split; the "
                        "run's own figures used its --limit-eval)")
    e.add_argument("--corruptions", default=None, metavar="DIR",
                   help="also evaluate CIFAR-10-C / CIFAR-100-C in their official layout (DIR/<corruption>.npy, "
                        "DIR/labels.npy): accuracy per corruption and severity, and the mean over the 15 × 5")
    e.add_argument("--corruptions-limit", type=int, default=None, metavar="N",
                   help="images per corruption and severity (default: all 10,000)")
    e.add_argument("--dataset", default=None, help="evaluate on another copy of the data (classes matched by name)")
    e.add_argument("--data-dir", default=None, help="that copy's directory (default: the run's)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    e.add_argument("--out", default=None, metavar="FILE",
                   help="write the figures here (default: RUN_DIR/eval_<data>_<threat>_<attacks>_<images>_<hash>.json)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="evaluation batch; attacks are seeded per batch, so the default reproduces the run's own "
                        "figures (default: the run's, max(its --batch-size, 256))")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress lines (default: a bar on a terminal, else 'batch i/n, ETA' lines on stderr)")


def run(args) -> int:
    from ..utils.dist import is_launched_rank0, resolve_device
    from ..workflows.evaluate import eval_plan, figures_text, output_lock, run_plan, write_eval

    plan = eval_plan(args.run_dir, attacks=args.attacks, limit=args.limit, dataset=args.dataset,
                     data_dir=args.data_dir, batch_size=args.batch_size, norm=args.norm, eps=args.eps,
                     steps=args.steps, step_size=args.step_size, restarts=args.restarts, aa_version=args.aa_version,
                     corruptions=args.corruptions, corruptions_limit=args.corruptions_limit, out=args.out)
    dev = resolve_device(args.device)
    with output_lock(args.run_dir, plan.out):
        res = run_plan(plan, dev, progress=not args.no_progress)
        if is_launched_rank0():  # under torchrun: rank 0 prints, first: a failed write cannot hide the figures
            print(json.dumps(res, indent=2), flush=True)
            print(figures_text(res), file=sys.stderr, flush=True)
        path = write_eval(res, plan.out)
    if path and is_launched_rank0():
        print(f"written to {path}" + (f" (plot: {os.path.splitext(path)[0]}.png)" if res.get("sweep") else ""), file=sys.stderr)
    return 0
