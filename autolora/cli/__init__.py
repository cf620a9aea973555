"""`autolora` command line: a thin layer over the Python API (`autolora.train`, `autolora.evaluate_run`, ...),
one module per subcommand (each has `add_parser(sub)` and `run(args)`).

Every `train` option is a `TrainConfig` field (`options`); precedence: defaults < --config FILE.yaml < explicit
flags. Bad input exits with status 2 and one line `autolora: error: ...`.
"""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import UserError
from . import compare, convert_weights, demo, pretrain, report, train
from . import eval as eval_

COMMANDS = {"train": train, "eval": eval_, "pretrain": pretrain, "demo": demo, "report": report,
            "compare": compare, "convert-weights": convert_weights}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autolora", description="Automated robust fine-tuning (AutoLoRa, ICLR 2024)")
    ap.add_argument("--version", action="version", version=f"autolora {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for mod in COMMANDS.values():
        mod.add_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except UserError as e:
        print(f"autolora: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = {"train": "`autolora train --resume RUN_DIR`", "pretrain": "`autolora pretrain --resume RUN_DIR`",
                 "compare": "the same `autolora compare` command"}.get(args.command, "the same command")
        print(f"autolora: interrupted; continue with {again}", file=sys.stderr)
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
