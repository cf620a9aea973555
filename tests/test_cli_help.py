"""The CLI explains itself: help on every flag of every command, defaults shown, train's flags grouped,
`--version`, and one pixel-unit parser for every number flag (`--eps 8/255` everywhere)."""
import argparse
import dataclasses

import pytest

from autolora import __version__
from autolora.cli import build_parser, main
from autolora.config import GROUPS, TrainConfig


def _subparsers():
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return ap, sub.choices


def test_every_flag_of_every_command_has_help():
    ap, commands = _subparsers()
    assert {"train", "eval", "pretrain", "demo", "report", "compare", "convert-weights"} <= set(commands)
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in commands.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert missing == []


def test_train_help_shows_defaults_and_groups():
    _, commands = _subparsers()
    train = commands["train"]
    titles = [g.title for g in train._action_groups]
    assert set(GROUPS.values()) <= set(titles) and "run directory" in titles
    by_dest = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert f.name in by_dest, f.name
        if default not in (None, False):
            assert "default" in by_dest[f.name].help, f.name  # the value, or what None/preset means
    text = train.format_help()
    assert "--eps EPS" in text and "(default: 8/255)" in text and "(default: clean,pgd,aa)" in text


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
    _, commands = _subparsers()
    floats = [f for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)]
    assert len(floats) > 10
    for f in floats:
        args = commands["train"].parse_args([f"--{f.name.replace('_', '-')}", "1/4"])
        assert getattr(args, f.name) == 0.25, f.name
