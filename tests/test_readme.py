"""The README stays true: every Python block runs (in a temporary directory holding what the blocks name: a small
image folder `data/`, a robustness-layout ResNet-18 checkpoint and an exported model), and every `autolora ...`
command line of the shell blocks parses with the real CLI parser."""
import os
import re
import shlex

import pytest
import torch

from helpers import make_imagefolder

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", open(README).read(), re.S)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from autolora.models import create_model
    from autolora.models.export import save_model

    make_imagefolder(tmp_path / "data", classes=3, per_class=10, test_per_class=2, size=16)
    torch.manual_seed(0)
    sd = create_model("resnet18", 1000, "native").plain_state_dict()  # as Salman et al.'s files hold it
    ckpt = {"model": {**{f"module.model.{k}": v for k, v in sd.items()},
                      **{f"module.attacker.model.{k}": v for k, v in sd.items()},
                      "module.normalizer.new_mean": torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
                      "module.normalizer.new_std": torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}, "epoch": 90}
    torch.save(ckpt, tmp_path / "resnet18_linf_eps4.0.ckpt")
    save_model(create_model("resnet18", 3, input_size=32), str(tmp_path / "runs" / "r18" / "model.safetensors"),
               {"classes": ["a", "b", "c"], "method": "autolora"})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_python_block_runs(workdir, capsys):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, README, "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "'sa':" in out and "test_pgd10" in out


def _command_lines():
    lines = []
    for block in _blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            m = re.search(r"(?:^|\s|/)autolora (.*)$", line)
            if m and "[" not in m.group(1):  # usage lines with [optional] parts are not commands
                lines.append(shlex.split(m.group(1)))
    return lines


def test_every_command_line_parses():
    from autolora.cli import build_parser

    lines = _command_lines()
    assert len(lines) >= 8 and {argv[0] for argv in lines} >= {"train", "eval", "pretrain", "compare",
                                                               "convert-weights"}
    for argv in lines:
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"README command does not parse: autolora {' '.join(argv)}") from e
