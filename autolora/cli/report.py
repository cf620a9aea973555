"""`autolora report RUN_DIR...`: per-run plots, a mean ± std table over seeds and Welch t-tests, as Markdown."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="plots and tables (mean ± std over seeds, Welch t-tests) of runs, as Markdown",
                       description="Render OUT/report.md with a table of test SA / PGD-10 / AA per method "
                                   "(mean ± std over seeds), Welch t-test p-values between methods, and PNG "
                                   "plots of each run's curves (OUT/plots/).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories of `autolora train`, or folders holding them (e.g. runs/demo)")
    p.add_argument("--out", default=None,
                   help="report directory (default: <common parent of the runs>/report)")
    p.add_argument("--title", default="autolora report", help="the report's heading (default: autolora report)")


def run(args) -> int:
    from ..workflows.report import summary_markdown, tests_markdown, write_report

    res = write_report(args.run_dirs, args.out, title=args.title)
    for s in res["skipped"]:
        print(f"autolora: note: skipped {s}: not a run directory and holds none", file=sys.stderr)
    if res["summary"]:
        print(summary_markdown(res["summary"]))
    if res["tests"]:
        print()
        print(tests_markdown(res["tests"]))
    print(f"\nreport: {res['report']} ({len(res['runs'])} runs, {len(res['plots'])} plots)")
    return 0
