"""The RoLI benchmark (bench/roli_cifar10.py) end to end at smoke size, run as `make bench-roli` runs it: its two
parts side by side in real processes, then the report; and a fresh clone's report from the archive alone."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import make_fake_cifar, read_json

pytestmark = pytest.mark.slow  # real processes: `make test`, not `make test-fast`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("robust/probe,robust/full,robust/lora,standard/bias", "standard/probe,standard/full,standard/lora,robust/bias")


def _bench(tmp, *extra):
    return [sys.executable, os.path.join(ROOT, "bench", "roli_cifar10.py"), "--quick", "--seeds", "0", "--epochs", "1",
            "--data-dir", os.path.join(tmp, "cifar"), "--runs", os.path.join(tmp, "runs"),
            "--out-md", os.path.join(tmp, "res", "roli.md"), "--threads", "1", *extra]


def test_roli_benchmark_two_parts_side_by_side_then_the_report(tmp_path):
    tmp = str(tmp_path)
    make_fake_cifar(os.path.join(tmp, "cifar"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    parts = [subprocess.Popen(_bench(tmp, "--only", p), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=ROOT) for p in PARTS]
    outs = [p.communicate(timeout=900)[0] for p in parts]
    assert [p.returncode for p in parts] == [0, 0], "\n".join(outs)

    md = open(os.path.join(tmp, "res", "roli.md")).read()
    assert "Status: 14/14 runs finished, AA subset evaluated for 14/14." in md
    archive = os.path.join(tmp, "res", "roli_runs")
    records = sorted(os.path.relpath(d, archive) for d, _, files in os.walk(archive) if "results.json" in files)
    assert len(records) == 14 and "robust/probe/linear_probe-s0" in records and "standard/lora/madry_ft-roli-s0" in records
    assert not [f for _, _, files in os.walk(archive) for f in files if f.endswith(".tmp")]
    assert os.path.exists(os.path.join(archive, "robust", "probe", "linear_probe-s0", "probe_head.safetensors"))
    pred = read_json(os.path.join(archive, "standard", "bias", "madry_ft-s0", "predictions.json"))
    assert sum(pred["counts"]) == pred["images"] == 5 * 12 and pred["largest_share"] == max(pred["counts"]) / 60
    assert all(os.path.exists(os.path.join(archive, r, "predictions.json")) for r in records)
    assert "## Test predictions" in md and "| standard | bias | RanLI | n/a |" not in md
    made = {i["pid"]: i["made"] for i in read_json(os.path.join(tmp, "runs", "timings.json"))["invocations"]}
    assert sum(made.values()) == 44 and min(made.values()) >= 21, made  # a part: 7 runs, their AA and predictions

    # a fresh clone: only the archive and the committed sources; the report is rebuilt from the records
    for src in ("robust", "standard"):
        shutil.rmtree(os.path.join(tmp, "runs", src))
    p = subprocess.run(_bench(tmp, "--report-only"), capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and "restored 14 finished runs" in p.stdout, p.stdout + p.stderr
    again = open(os.path.join(tmp, "res", "roli.md")).read()
    strip = lambda text: re.sub(r"(?m)^Written .*$", "", text)  # noqa: E731
    assert strip(again) == strip(md)
