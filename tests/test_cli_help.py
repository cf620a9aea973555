"""The CLI explains itself: help on every flag of every command, defaults shown, train's flags grouped,
`--version`, and one pixel-unit parser for every number flag (`--eps 8/255` everywhere). Read from `--help` as a
user sees it."""
import dataclasses
import re

import pytest

from autolora import __version__
from autolora.cli import build_parser, main
from autolora.config import GROUPS, TrainConfig

COMMANDS = ("train", "eval", "pretrain", "demo", "report", "compare", "convert-weights")


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def flags_and_help(text: str) -> dict[str, str]:
    """{--flag: its help text} from an argparse help page (help on the flag's line or the lines below it)."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-\S+(?:[ ,][^ ]\S*)*)(?:\s{2,}(.*))?$", line)
        if m and line.startswith("  -"):
            current = re.findall(r"--[\w-]+", m.group(1))[0] if "--" in m.group(1) else m.group(1).split()[0]
            out[current] = (m.group(2) or "").strip()
        elif current and line.startswith(" " * 10) and line.strip():
            out[current] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            current = None
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_every_command_has_help(capsys, command):
    flags = flags_and_help(help_text(capsys, command))
    flags.pop("-h", None)
    assert flags and [f for f, h in flags.items() if not h] == []


def test_train_help_shows_defaults_and_groups(capsys):
    text = help_text(capsys, "train")
    for title in [*GROUPS.values(), "run directory"]:
        assert f"\n{title}:\n" in text, title
    flags = flags_and_help(text)
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, flag
        if default not in (None, False):
            assert "default" in flags[flag], flag  # the value, or what None/preset means
    assert "--eps EPS" in text and "(default: clean,pgd,aa)" in text
    # the budget's defaults per norm and resolution, and the step's rule, are stated
    assert all(s in flags["--eps"] for s in ("L∞ 8/255", "L2 0.5", "64 px", "3.0")), flags["--eps"]
    assert "eps/4" in flags["--step-size"] and "linf or l2" in flags["--norm"]


def test_pretrain_flags_are_trains_with_its_own_defaults(capsys):
    flags = flags_and_help(help_text(capsys, "pretrain"))
    assert "(default: onecycle)" in flags["--lr-schedule"] and "(default: tiny)" in flags["--arch"]
    assert "--method" not in flags and "--weights" not in flags  # it trains from scratch with Madry's objective


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"autolora {__version__}"


@pytest.mark.parametrize("argv", [
    ["train", "--eps", "8/255", "--step-size", "2/255", "--lr", "1/100"],
    ["compare", "--methods", "autolora", "--out-root", "x", "--eps", "8/255"],
    ["pretrain", "--out", "x", "--eps", "8/255", "--step-size", "2/255"],
])
def test_every_command_parses_pixel_fractions(argv):
    args = build_parser().parse_args(argv)
    assert args.eps == pytest.approx(8 / 255)


def test_every_float_flag_of_train_accepts_a_fraction():
    floats = [f for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)]
    assert len(floats) > 10
    for f in floats:
        args = build_parser().parse_args(["train", f"--{f.name.replace('_', '-')}", "1/4"])
        assert getattr(args, f.name) == 0.25, f.name
