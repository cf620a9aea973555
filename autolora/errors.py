"""One exception type for bad user input: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A problem with what the user asked for (arguments, files, data), with the fix in the message."""


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require(module: str, extra: str, what: str):
    """`import module`, or one UserError saying that `what` needs the `autolora[extra]` extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise UserError(f"{what} needs {top}, which the core install leaves out: pip install 'autolora[{extra}]'") from None


def warn(msg: str) -> None:
    """One line on stderr, `autolora: warning: ...`, for what is legal but almost surely a mistake (a run also
    records it in train.log: `engine.runlog.RunLog.warn`)."""
    import sys

    print(f"autolora: warning: {msg}", file=sys.stderr, flush=True)
