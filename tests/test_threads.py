"""lmech.core.threads: BLAS held to a thread count inside the block, restored after."""

from __future__ import annotations

import doctest
import importlib
import sys
import types

import torch
from threadpoolctl import threadpool_info

from lmech.core import threads
from lmech.core.threads import blas_threads


def blas_counts():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_doctests():
    assert doctest.testmod(importlib.import_module("lmech.core.threads"), raise_on_error=True).attempted > 0


def test_limit_inside_restored_after_default_is_torch_threads():
    before, torch_threads = blas_counts(), torch.get_num_threads()
    assert before  # NumPy's OpenBLAS is loaded
    with blas_threads(1):
        assert set(blas_counts()) == {1}
    assert blas_counts() == before
    torch.set_num_threads(1)
    try:
        with blas_threads():
            assert set(blas_counts()) == {1}
    finally:
        torch.set_num_threads(torch_threads)


def test_library_scan_is_kept_until_something_is_imported():
    with blas_threads(1):
        pass
    kept = threads._controller
    with blas_threads(1):
        pass
    assert threads._controller is kept
    sys.modules["_lmech_test_new_import"] = types.ModuleType("_lmech_test_new_import")
    try:
        with blas_threads(1):
            pass
        assert threads._controller is not kept  # rescanned: the import may have loaded a BLAS
    finally:
        del sys.modules["_lmech_test_new_import"]
