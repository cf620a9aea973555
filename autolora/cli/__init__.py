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


class Parser(argparse.ArgumentParser):
    """No prefix matching (`--out` is never taken for `--out-root`), and a usage error is one line naming the fix,
    with `--help` for the rest, instead of the whole usage text."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message):
        unknown = message.removeprefix("unrecognized arguments: ")
        if unknown != message:
            flag = unknown.split()[0]
            if flag.split("=")[0] == "--alpha":
                message = ("--alpha is ambiguous: the PGD step is --step-size (e.g. 2/255), AutoLoRa's sharpening "
                           "α of λ1, λ2 is --sharpen-alpha")
            else:
                from ..errors import suggest

                flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
                longer = sorted((f for f in flags if f.startswith(flag.split("=")[0])), key=len)  # what prefix matching took
                hint = f" (did you mean '{longer[0]}'?)" if longer else suggest(flag, flags)
                message = f"unrecognized argument {flag}{hint}"
        self.exit(2, f"autolora: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="autolora", description="Automated robust fine-tuning (AutoLoRa, ICLR 2024)")
    ap.add_argument("--version", action="version", version=f"autolora {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    for mod in COMMANDS.values():
        mod.add_parser(sub)
    ap.subcommands = dict(sub.choices)
    return ap


def main(argv=None) -> int:
    problem = _no_temp_dir()
    if problem:
        print(f"autolora: error: {problem}", file=sys.stderr)
        return 2
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:  # the subcommand's own parser says it, with its own flags to suggest from
        ap.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command].run(args)
    except UserError as e:
        print(f"autolora: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from ..engine.loop import InterruptedBeforeStart

        if isinstance(e, InterruptedBeforeStart):
            print("autolora: interrupted before the run had a checkpoint: what it made was removed, and an existing "
                  "run there is as it was", file=sys.stderr)
            return 130
        again = {"train": "`autolora train --resume RUN_DIR`", "pretrain": "`autolora pretrain --resume RUN_DIR`",
                 "compare": "the same `autolora compare` command"}.get(args.command, "the same command")
        print(f"autolora: interrupted; continue with {again}", file=sys.stderr)
        return 130


def _no_temp_dir() -> str | None:
    """Why no temporary file can be written (torch needs one at import), or None."""
    import tempfile

    try:
        tempfile.gettempdir()
    except (FileNotFoundError, OSError) as e:
        return (f"no usable temporary directory ({e}): autolora cannot write any file; check the disk space and a "
                "file size limit (`ulimit -f`), or set TMPDIR to a writable directory")
    return None
def _one_line(e: Exception) -> str:
    """A UserError raised in a DataLoader worker arrives wrapped in a traceback: keep its own message."""
    msg = str(e).strip()
    if "\n" in msg:
        msg = msg.splitlines()[-1]
        msg = msg.split("UserError: ", 1)[-1]
    return msg


def entry() -> None:  # console script
    sys.exit(main())
