"""benchmarks/scale.py --quick: every probe on the three tiny models runs, in about a minute, with
the peers that are installed (issue 18: the smallest full size took more than 10 minutes)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def quick_run():
    spec = importlib.util.spec_from_file_location("scale_benchmark", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            table = mod.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    return mod, table, out.getvalue()


def test_quick_mode_runs_every_model_at_the_tiny_size(quick_run):
    mod, table, log = quick_run
    for kind in ("mlp", "cnn", "transformer"):
        assert re.search(rf"== {kind} tiny: [\d,]+ parameters, batch 64 ==", log), kind
    # the NTK recipe is torch.func (always there): one row per model, lmech's kernel equal to it
    ntk_rows = [row for row in table if row[3].startswith("NTK")]
    assert sorted(row[0] for row in ntk_rows) == ["cnn", "mlp", "transformer"]
    assert all(row[1] == "tiny" and len(row[7]) == 1 for row in ntk_rows)
    diffs = [float(d) for d in re.findall(r"max rel diff ([\d.e+-]+)", log)]
    assert len(diffs) == 3 and max(diffs) < 1e-5
    peers = {row[4] for row in table}
    assert ("WeightWatcher" in peers) == mod.installed("WeightWatcher")
    assert ("PyHessian" in peers) == mod.installed("PyHessian")
    # without PyHessian its algorithm stands in, and lmech reaches its accuracy on every model
    if not mod.installed("PyHessian"):
        stand_in = [row for row in table if row[4] == "power iteration (PyHessian's algorithm)"]
        assert len(stand_in) == 6 and all(len(row[7]) == 1 for row in stand_in)


def test_quick_mode_sharpness_reaches_the_peers_accuracy(quick_run):
    mod, _, log = quick_run
    # per model and k: lmech's ladder stops at the first tolerance at least as accurate as every
    # peer (or the 2e-5 float32 floor); its last rung is that accurate
    blocks = re.split(r"reference top-\d", log)[1:]
    assert len(blocks) == 6  # three models, k = 1 and 3
    for block in blocks:
        block = block.split("reference trace")[0]
        lmech = re.findall(r"lmech tol \de-0\d\s+s .* max ([\d.e+-]+)", block)
        peers = [float(e) for e in re.findall(r"^    (?!lmech).* error median ([\d.e+-]+)", block, re.M)]
        assert lmech and peers, block
        assert float(lmech[-1]) <= max(min(peers), mod.ERROR_FLOOR), block
