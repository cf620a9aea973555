"""bench/throughput.py still runs against the library (it drives the trainer's own epoch loop)."""
import json
import os

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow  # end-to-end runs in real processes: `make test`, not `make test-fast`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_throughput_bench_smoke():
    p = run_cli("--arch", "tiny", "--input-size", "none", "--device", "cpu", "--batch-size", "4", "--steps", "1",
                "--rounds", "1", "--no-save", "--methods", "vanilla_rft,autolora,twins", "--threads", "1",
                script=os.path.join(ROOT, "bench", "throughput.py"))
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(res["methods"]) == {"vanilla_rft", "autolora", "twins"}
    assert all(m["images_per_s"] > 0 and m["floor_fraction"] > 0 for m in res["methods"].values())
