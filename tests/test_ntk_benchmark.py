"""benchmarks/ntk_vs_naive.py's budgeted case at every width (issue 18: it crashed at 1000)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lmech.errors import MemoryBudgetError
from lmech.probes.ntk import ntk

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ntk_vs_naive.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ntk_vs_naive", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_small_width_keeps_the_32_mib_budget(bench):
    model, x = bench.setup(8, 64, 10)
    assert bench.budget_bytes(model, x, False) == 32 * 2**20


def test_width_1000_budget_fits_and_the_budgeted_kernel_equals_the_naive_one(bench):
    torch.set_num_threads(1)
    model, x = bench.setup(3, 1000, 10)  # 1.05M parameters, 3 examples: seconds
    with pytest.raises(MemoryBudgetError, match="32.0 MiB"):
        ntk(model, x, "auto", max_bytes=32 * 2**20)  # what used to crash the benchmark
    budget = bench.budget_bytes(model, x, False)
    assert budget > 32 * 2**20
    K = bench.compute("lmech-auto-budget", model, x, False)
    ref = bench.naive_ntk(model, x, x, False)
    assert float((K - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
