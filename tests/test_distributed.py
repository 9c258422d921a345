"""Several processes (gloo, 2 CPU processes, float64): a Monitor on each rank's shard returns the
single-process values on the concatenated probe batch; only rank 0 writes; a failing rank makes
every rank raise; PopRiskAdamW under DDP equals one process on the global batch; FSDP2."""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WORLD = 2
SHARDS = (24, 16)  # unequal shards: the economy preset's "first 32 examples" straddle the ranks


# --------------------------------------------------------------------------------------------
# models and data (the same on every process: fixed seeds)
# --------------------------------------------------------------------------------------------


def make_case(name: str):
    """``(model, loss_fn, global batch)`` in float64."""
    from lmech.models.cnn1d import CNN1D
    from lmech.models.transformer import Transformer

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = sum(SHARDS)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
    elif name == "conv":
        model = CNN1D(in_len=20, n_classes=3, channels=4).double()
        x = torch.randn(n, 20, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
    elif name == "transformer":
        model = Transformer(vocab_size=7, seq_len=3, n_out=5, d_model=8, n_heads=2, n_layers=1, d_mlp=16).double()
        x = torch.randint(0, 7, (n, 3), generator=g)
        y = torch.randint(0, 5, (n,), generator=g)
    else:
        raise ValueError(name)
    return model, F.cross_entropy, (x, y)


# "rank0": subsamples that lie on rank 0 alone (computed there, the metrics broadcast)
CASES = [("mlp", "economy"), ("conv", "economy"), ("transformer", "economy"), ("conv", "full"),
         ("transformer", "full"), ("conv", "rank0")]


def probes_of(preset):
    if preset != "rank0":
        return preset
    from lmech.probes.gradnoise import GradNoiseProbe
    from lmech.probes.sharpness import SharpnessProbe

    return [GradNoiseProbe(num_examples=10), SharpnessProbe(k=2, num_examples=16)]


@contextlib.contextmanager
def float64():
    """Float64 by default, as in the workers (the models' initial weights depend on it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def shard(batch, rank: int):
    x, y = batch
    a = sum(SHARDS[:rank])
    return x[a:a + SHARDS[rank]], y[a:a + SHARDS[rank]]


def nudge(model):
    """A small deterministic change between two measurements (warm starts must agree)."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * torch.cos(torch.arange(p.numel(), dtype=p.dtype) + i).view_as(p))


def run_monitor(model, loss_fn, batch, preset, **kwargs):
    from lmech.monitor import Monitor

    mon = Monitor(model, loss_fn, batch, probes=probes_of(preset), every=1, budget_mb=64, **kwargs)
    out = [mon.measure(0)]
    if preset != "full":  # a second measurement: the warm starts must agree too
        nudge(model.module if hasattr(model, "module") else model)
        out.append(mon.measure(1))
    return mon, out


def plain(metrics):
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else float(v)) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# process plumbing
# --------------------------------------------------------------------------------------------


def _init(rank: int, tmp: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)


def _spawn(fn, tmp, *args, timeout=120):
    """Run ``fn(rank, tmp, *args)`` on 2 processes; each pickles its result to tmp/out<rank>."""
    # fork (Linux): the workers inherit the imported torch and lmech (spawn re-imports them, about
    # 10 s per process on a loaded 2-core machine); each worker sets one thread first
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_entry, args=(fn, tmp, args), nprocs=WORLD, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish in {timeout} s")
    results = []
    for r in range(WORLD):
        with open(os.path.join(tmp, f"out{r}"), "rb") as f:
            results.append(pickle.load(f))
    for r, res in enumerate(results):
        if isinstance(res, dict) and "crash" in res:
            pytest.fail(f"rank {r} crashed:\n{res['crash']}")
    return results


def _entry(rank, fn, tmp, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        res = fn(rank, tmp, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        res = {"crash": traceback.format_exc()}
    with open(os.path.join(tmp, f"out{rank}"), "wb") as f:
        pickle.dump(res, f)
    os._exit(0)  # do not wait in the process group's destructor


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------


def _equivalence_worker(rank, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmech.monitor import ListSink

    _init(rank, tmp)
    out = {}
    for i, (name, preset) in enumerate(CASES):
        model, loss_fn, batch = make_case(name)
        sink = ListSink()
        wrapped = DDP(model) if i % 2 == 0 else model  # the wrapper or its module: same values
        _, ms = run_monitor(wrapped, loss_fn, shard(batch, rank), preset, sinks=[sink], timeout_s=60)
        out[(name, preset)] = {"metrics": [plain(m) for m in ms], "records": len(sink.records)}
    out["poprisk"] = _poprisk(rank, POPRISK_STEPS)
    out["fsdp"] = _fsdp(rank)
    return out


def _failure_worker(rank, tmp, timeout_s):
    from lmech.core.distributed import CollectiveError
    from lmech.monitor import LossProbe, Monitor
    from lmech.probes.gradnoise import GradNoiseProbe

    _init(rank, tmp)
    model, loss_fn, batch = make_case("mlp")

    def failing_loss(out, y):
        if rank == 1:
            raise ValueError("rank 1's loss is broken")
        return loss_fn(out, y)

    class FailsOnRank1:  # no collectives: the ranks learn of it at the status exchange
        name, cost = "fragile", "low"

        def measure(self, state):
            if rank == 1:
                raise RuntimeError("fragile probe broke")
            return {"x": 1.0}

    warned = Monitor(model, loss_fn, shard(batch, rank), probes=[LossProbe(), FailsOnRank1(), GradNoiseProbe()],
                     timeout_s=timeout_s, on_error="warn")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = sorted(warned.measure(0))
    warn_result = {"kept": kept, "warned": any("fragile" in str(w.message) for w in caught)}

    mon = Monitor(model, failing_loss, shard(batch, rank), probes=[GradNoiseProbe(), LossProbe()],
                  timeout_s=timeout_s)
    t0 = time.monotonic()
    try:
        mon.measure(0)
    except CollectiveError as e:
        return {"error": "CollectiveError", "message": str(e), "seconds": time.monotonic() - t0, **warn_result}
    except ValueError as e:
        return {"error": "ValueError", "message": str(e), "seconds": time.monotonic() - t0, **warn_result}
    return {"error": None, "seconds": time.monotonic() - t0, **warn_result}


POPRISK_STEPS = 4


def _poprisk(rank, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmech.optim import PopRiskAdamW

    model, loss_fn, batch = make_case("mlp")
    ddp = DDP(model)
    opt = PopRiskAdamW(ddp.parameters(), lr=1e-2)
    x, y = batch
    half = x.shape[0] // WORLD  # DDP averages the ranks' mean gradients: equal shards
    xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(ddp(xs), ys).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _fsdp(rank):
    from torch.distributed.fsdp import fully_shard

    from lmech.monitor import LossProbe, Monitor

    model, loss_fn, batch = make_case("mlp")
    fully_shard(model)
    try:
        Monitor(model, loss_fn, shard(batch, rank), probes="economy")
        refused = None
    except ValueError as e:
        refused = str(e)
    mon = Monitor(model, loss_fn, shard(batch, rank), probes=[LossProbe()])
    return {"refused": refused, "metrics": plain(mon.measure(0))}


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def close(a, b, rtol=1e-8):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        if a.shape != b.shape:
            return False
        both_nan = torch.isnan(a) & torch.isnan(b)
        same_inf = torch.isinf(a) & (a == b)
        ok = (a - b).abs() <= rtol * torch.maximum(a.abs(), b.abs()).clamp_min(1e-6)
        return bool((both_nan | same_inf | ok).all())
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-6)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ddp"))
    return _spawn(_equivalence_worker, tmp)


@pytest.mark.parametrize("name,preset", CASES)
def test_monitor_equals_single_process_on_global_batch(equivalence, name, preset):
    with float64():
        model, loss_fn, batch = make_case(name)
        _, reference = run_monitor(model, loss_fn, batch, preset, group=None)
    for rank in range(WORLD):
        got = equivalence[rank][(name, preset)]["metrics"]
        for step, (ref, val) in enumerate(zip(reference, got)):
            keys = {k for k in ref if not k.endswith("/seconds")}
            assert keys == {k for k in val if not k.endswith("/seconds")}, (rank, step)
            bad = [(k, ref[k], val[k]) for k in sorted(keys) if not close(ref[k], val[k])]
            assert not bad, f"rank {rank} step {step}: {bad[:5]}"
    # every rank returns the same values, bit for bit (timings are rank 0's)
    r0, r1 = (equivalence[r][(name, preset)]["metrics"] for r in range(WORLD))
    for a, b in zip(r0, r1):
        assert a.keys() == b.keys()
        for k in a:
            assert close(a[k], b[k], rtol=0.0), k


def test_only_rank_zero_writes(equivalence):
    for case in CASES:
        assert equivalence[0][case]["records"] == (1 if case[1] == "full" else 2)
        assert equivalence[1][case]["records"] == 0


def test_a_failing_rank_makes_every_rank_raise(tmp_path):
    timeout_s = 3.0
    t0 = time.monotonic()
    r0, r1 = _spawn(_failure_worker, str(tmp_path), timeout_s, timeout=90)
    assert r1["error"] == "ValueError" and "rank 1's loss is broken" in r1["message"]
    assert r0["error"] == "CollectiveError" and "rank" in r0["message"]
    assert r0["seconds"] < 3 * timeout_s + 2 and r1["seconds"] < 3 * timeout_s + 2
    # on_error="warn": every rank warns and keeps the probes before the failed one, the same keys
    for r in (r0, r1):
        assert r["warned"] and r["kept"] == ["probe/accuracy", "probe/loss", "probe/seconds"]
    assert time.monotonic() - t0 < 60


def test_poprisk_under_ddp_equals_one_process_on_global_batch(equivalence):
    from lmech.optim import PopRiskAdamW

    steps = POPRISK_STEPS
    r0, r1 = equivalence[0]["poprisk"], equivalence[1]["poprisk"]
    with float64():
        model, loss_fn, (x, y) = make_case("mlp")
        opt = PopRiskAdamW(model.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    for p, a, b in zip(model.parameters(), r0, r1):
        torch.testing.assert_close(a, p.detach(), rtol=1e-10, atol=1e-12)
        assert torch.equal(a, b)


def test_fsdp2_loss_exact_other_probes_refused(equivalence):
    r0, r1 = equivalence[0]["fsdp"], equivalence[1]["fsdp"]
    with float64(), torch.no_grad():
        model, loss_fn, batch = make_case("mlp")
        ref = float(loss_fn(model(batch[0]), batch[1]))
        acc = float((model(batch[0]).argmax(-1) == batch[1]).double().mean())
    for r in (r0, r1):
        assert r["refused"] is not None and "FSDP2" in r["refused"] and "\n" not in r["refused"]
        assert close(r["metrics"]["probe/loss"], ref)
        assert close(r["metrics"]["probe/accuracy"], acc)


def test_global_subsample_and_counts():
    from lmech.core.distributed import local_count

    counts = [24, 16]
    assert [local_count(c, counts, r, 32) for r, c in enumerate(counts)] == [24, 8]
    assert [local_count(c, counts, r, 10) for r, c in enumerate(counts)] == [10, 0]
    assert [local_count(c, counts, r, None) for r, c in enumerate(counts)] == [24, 16]
