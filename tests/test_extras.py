"""A light core install: training and evaluation need none of the extras (matplotlib, scipy, scikit-learn,
huggingface_hub, tensorboard), and each command that does names the extra to install."""
import os
import tomllib

import pytest

from helpers import FAST_ARGS, make_imagefolder, run_cli

pytestmark = pytest.mark.slow  # end-to-end runs in real processes: `make test`, not `make test-fast`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS = ("matplotlib", "scipy", "sklearn", "huggingface_hub", "tensorboard")
BLOCK = f"import sys; sys.modules.update(dict.fromkeys({list(EXTRAS)!r}))"  # None in sys.modules: ImportError


def _cli(*args):
    """The CLI in a process where none of the extras can be imported."""
    return run_cli(*args, check=False, prelude=BLOCK)


def test_core_dependencies_leave_the_extras_out():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    core = " ".join(project["dependencies"]).lower()
    assert not any(name in core for name in ("matplotlib", "scipy", "scikit-learn", "huggingface", "tensorboard"))
    extras = project["optional-dependencies"]
    assert {"report", "demo", "hub", "datasets", "tensorboard", "all", "test"} <= set(extras)


def test_train_and_eval_run_without_any_extra(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=6, test_per_class=2, size=8)
    p = _cli("train", *FAST_ARGS, "--data-dir", data, "--epochs", "1", "--out", tmp_path / "run")
    assert p.returncode == 0, p.stderr
    p = _cli("eval", tmp_path / "run", "--attacks", "clean")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("argv, extra", [
    (["report", "RUN"], "report"),
    (["train", *FAST_ARGS, "--dataset", "digits", "--out", "OUT"], "demo"),
    (["train", *FAST_ARGS, "--data-dir", "DATA", "--tensorboard", "--out", "OUT"], "tensorboard"),
])
def test_a_command_that_needs_an_extra_names_it(tmp_path, argv, extra):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=6, test_per_class=2, size=8)
    assert _cli("train", *FAST_ARGS, "--data-dir", data, "--epochs", "1", "--out", tmp_path / "run").returncode == 0
    subst = {"RUN": tmp_path / "run", "OUT": tmp_path / "out", "DATA": data}
    p = _cli(*[subst.get(a, a) for a in argv])
    assert p.returncode == 2, p.stderr
    assert f"pip install 'autolora[{extra}]'" in p.stderr and "Traceback" not in p.stderr
