import os

import pytest
import torch

# Tests use tiny models: one thread is faster for them and keeps parallel test workers honest.
torch.set_num_threads(1)


@pytest.fixture
def store_root(tmp_path):
    return tmp_path / "runs"


def pytest_configure(config):
    os.environ.setdefault("MPLBACKEND", "Agg")
