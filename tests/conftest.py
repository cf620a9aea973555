import os

import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from more; oversubscription on a busy 2-core box costs 10x
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the CLI subprocesses the tests start
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
