"""GPU check: lmech's instruments and optimizer on one accelerator, printed as one table.

    python benchmarks/gpu_check.py                     # on a CUDA machine (under 8 minutes on one H200)
    python benchmarks/gpu_check.py --device cpu --tiny # the same code paths in seconds (CI runs this)

Sections (one row per check; ``value`` against ``target``; ``ok`` / ``FAIL`` / ``skip`` / ``ERROR``):

1. **agreement** -- every probe of the ``full`` preset (plus the gramian ``PathRecorder``) on the
   same float64 model and batch, once on the CPU and once on ``--device``: the largest relative
   difference over each probe's scalar metrics (an MLP, and a small transformer with
   embeddings); PopRiskAdamW's foreach and fused paths trained 20 steps on both devices. Float64
   with TF32 off, so agreement is expected to about 1e-9 (target 1e-6).
2. **sync** -- ``torch.cuda.set_sync_debug_mode("error")`` around ``PopRiskAdamW.step`` (foreach
   and fused) and a ``Monitor.step`` off its schedule: any host synchronisation raises (CUDA only).
3. **monitor** -- a GPT-2-small-sized transformer (:class:`lmech.models.Transformer`, 12 layers,
   d 768, 12 heads, vocabulary 50,257, unembedding tied to the token embedding: 124M
   parameters, random init) trained with ``torch.autocast(bfloat16)`` and ``AdamW(fused=True)``:
   median step time, median time of one Monitor ``economy`` measurement (probes run in float32:
   :mod:`lmech.probes.precision`) with its per-probe cost, and the overhead at ``every=100``,
   measurement / (100 x step) (target 5%).
4. **optimizer** -- one step on that model's 124M gradients: ``AdamW(fused=True)`` (baseline),
   ``AdamW(foreach=True)``, PopRiskAdamW's default (foreach) path and ``fused=True``
   (``torch.compile``; compile time reported apart), interleaved repetitions, medians, ratios.
5. **ddp** -- with two or more GPUs: two NCCL processes train a small model under
   ``DistributedDataParallel`` with PopRiskAdamW for 5 steps in float64; weights are compared
   across ranks (equal) and with one process on the global batch (target 1e-9 relative: DDP
   averages the shards' mean gradients, which is the global mean up to rounding, so the gate sees
   the variance EMA of the global-batch gradient). With one GPU the row says so.

``--tiny`` shrinks every model (transformer: 2 layers, d 32, vocabulary 64) so that the CPU run
takes seconds; on the CPU the fused (compiled) arm is skipped unless ``--compile`` is given
(about 20 s of C++ compilation). Exit status 1 if any row is ``FAIL`` or ``ERROR``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import traceback
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmech import Monitor
from lmech.models import Transformer
from lmech.optim import PopRiskAdamW
from lmech.probes import GramianProbe, PathRecorder
from lmech.probes.gramian import half_mse

ROWS: list[tuple[str, str, str, str, str]] = []


def row(section: str, check: str, value: str, target: str = "", result: str = "") -> None:
    ROWS.append((section, check, value, target, result))


def guarded(section: str, fn: Callable[[], None]) -> None:
    """Run one section; an exception becomes an ERROR row (the other sections still run)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the table reports it
        row(section, "(section)", f"{type(e).__name__}: {str(e).splitlines()[0][:90]}", "", "ERROR")
        traceback.print_exc(file=sys.stderr)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_diff(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b) or a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "FAIL"


# --------------------------------------------------------------------------------------------
# 1. CPU-vs-device agreement
# --------------------------------------------------------------------------------------------


def mlp(d_in=6, width=32, d_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, d_out)).double()


def seq_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def agreement_cases(tiny: bool):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    torch.manual_seed(0)
    vocab, seq = (16, 12) if tiny else (32, 16)       # seq > 10: the representation probe's k-NN (k = 10)
                                                          # also sees the positional embedding, (T, d)
    tr = Transformer(vocab, seq, vocab, d_model=16 if tiny else 32, n_heads=2, n_layers=2,
                     d_mlp=32 if tiny else 64, output="all").double()
    tokens = torch.randint(0, vocab, (64, seq), generator=gen)
    return [("mlp", mlp(), F.cross_entropy, (x, y)),
            ("transformer", tr, seq_loss, (tokens, torch.roll(tokens, -1, dims=1)))]


def to_device(batch, device):
    return tuple(t.to(device) for t in batch)


def max_rel_by_probe(a: dict, b: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, va in a.items():
        if key.endswith("/seconds") or key not in b:
            continue
        vb = b[key]
        if isinstance(va, torch.Tensor):
            ta, tb = va.detach().double().cpu().reshape(-1), vb.detach().double().cpu().reshape(-1)
            if ta.shape != tb.shape:
                d = float("inf")
            else:
                both = torch.isfinite(ta) & torch.isfinite(tb)
                scale = ta[both].abs().max().clamp_min(1e-300) if both.any() else torch.tensor(1.0)
                d = float(((ta - tb)[both].abs().max() / scale)) if both.any() else 0.0
                if not torch.equal(torch.isfinite(ta), torch.isfinite(tb)):
                    d = float("inf")
        else:
            fa, fb = float(va), float(vb)
            d = rel_diff(fa, fb) if math.isfinite(fa) and math.isfinite(fb) else (0.0 if (math.isfinite(fa) == math.isfinite(fb)) else float("inf"))
        probe = key.split("/")[0]
        out[probe] = max(out.get(probe, 0.0), d)
    return out


def section_agreement(device: torch.device, tiny: bool) -> None:
    for name, model, loss, batch in agreement_cases(tiny):
        dev_model = _clone(model).to(device)
        res = {}
        for where, m, b in (("cpu", model, batch), ("device", dev_model, to_device(batch, device))):
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)       # for the preconditioned sharpness
            m.zero_grad()
            loss(m(b[0]), b[1]).backward()
            opt.step()
            with torch.no_grad():
                for p_src, p in zip(model.parameters(), m.parameters()):
                    p.copy_(p_src.to(p.device))                   # both measure the same weights
            res[where] = Monitor(m, loss, b, probes="full", every=1, budget_mb=2048).measure(0, opt)
        for probe, d in max_rel_by_probe(res["cpu"], res["device"]).items():
            row("agreement", f"{name}: {probe}", f"{d:.1e}", "<= 1e-6", verdict(d, 1e-6))
    # the gramian path recorder, 4 recorded SGD steps with PopRiskAdamW's gates in the preconditioner
    outs = {}
    for where, dev in (("cpu", torch.device("cpu")), ("device", device)):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double().to(dev)
        gen = torch.Generator().manual_seed(2)
        x, xq = (torch.randn(n, 3, generator=gen, dtype=torch.float64).to(dev) for n in (12, 6))
        y = torch.sin(x[:, :1])
        opt = PopRiskAdamW(m.parameters(), lr=1e-2, gate="snr", weight_decay=0.0)
        probe = GramianProbe(PathRecorder(m, x, y, xq, optimizer=opt), readout_every=4)
        mon = Monitor(m, half_mse, (x, y), probes=[probe], every=1)
        for step in range(5):
            if step:
                opt.zero_grad()
                half_mse(m(x), y).backward()
                opt.step()
            outs[where] = mon.step(step, opt)
    d = max_rel_by_probe(outs["cpu"], outs["device"]).get("gramian", float("nan"))
    row("agreement", "PathRecorder (gramian probe, 4 steps + readout)", f"{d:.1e}", "<= 1e-6", verdict(d, 1e-6))
    # PopRiskAdamW trajectories
    for fused in (False, True):
        if fused and device.type == "cpu" and not ARGS.compile:
            row("agreement", "PopRiskAdamW fused, 20 steps", "skipped on CPU (compile ~20 s; --compile)", "", "skip")
            continue
        final = {}
        for where, dev, f in (("cpu", torch.device("cpu"), False), ("device", device, fused)):
            m = mlp().to(dev)
            opt = PopRiskAdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=f)
            gen = torch.Generator().manual_seed(3)
            for _ in range(20):
                x = torch.randn(32, 6, generator=gen, dtype=torch.float64).to(dev)
                y = (x[:, :3] + 0.5 * torch.randn(32, 3, generator=gen, dtype=torch.float64).to(dev)).argmax(1)
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()
            final[where] = torch.cat([p.detach().cpu().reshape(-1) for p in m.parameters()])
        d = float((final["cpu"] - final["device"]).abs().max() / final["cpu"].abs().max())
        label = "fused (device) vs foreach (CPU)" if fused else "foreach"
        row("agreement", f"PopRiskAdamW {label}, 20 steps, weights", f"{d:.1e}", "<= 1e-6", verdict(d, 1e-6))


def _clone(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model)


# --------------------------------------------------------------------------------------------
# 2. host synchronisation (CUDA only)
# --------------------------------------------------------------------------------------------


def section_sync(device: torch.device) -> None:
    if device.type != "cuda":
        row("sync", "set_sync_debug_mode('error') around the step path", "skipped (CUDA only; the CPU "
            "test tests/test_gpu_readiness.py records host reads instead)", "", "skip")
        return
    m = mlp().float().to(device)
    x = torch.randn(64, 6, device=device)
    y = torch.randint(0, 3, (64,), device=device)
    mon = Monitor(m, F.cross_entropy, (x, y), probes="economy", every=1000)
    for fused in (False, True):
        opt = PopRiskAdamW(m.parameters(), lr=1e-3, fused=fused)
        for step in range(1, 5):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if step == 1:                                      # the first step compiles the fused kernel
                opt.step()
                continue
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
                mon.step(step, opt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        row("sync", f"PopRiskAdamW.step ({'fused' if fused else 'foreach'}) + Monitor.step off schedule",
            "no synchronisation", "none", "ok")


# --------------------------------------------------------------------------------------------
# 3. Monitor economy on a GPT-2-small-sized transformer, bf16 autocast; 4. optimizer step times
# --------------------------------------------------------------------------------------------


def gpt(tiny: bool, device: torch.device) -> tuple[nn.Module, int, int]:
    vocab, seq = (64, 16) if tiny else (50257, 1024)
    torch.manual_seed(0)
    if tiny:
        model = Transformer(vocab, seq, vocab, d_model=32, n_heads=4, n_layers=2, d_mlp=128, output="all")
    else:
        model = Transformer(vocab, seq, vocab, d_model=768, n_heads=12, n_layers=12, d_mlp=3072, output="all")
    model.unembed.weight = model.tok_emb.weight               # GPT-2 ties them: 124M parameters
    return model.to(device), vocab, seq


def section_monitor_and_optimizer(device: torch.device, tiny: bool) -> None:
    model, vocab, seq = gpt(tiny, device)
    n_params = sum(p.numel() for p in model.parameters())
    batch, t_train, t_probe = (4, 16, 16) if tiny else (16, 512, 128)
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, vocab, (batch, t_train + 1), device=device, generator=gen)
    probe_tokens = torch.randint(0, vocab, (64, t_probe + 1), device=device, generator=gen)
    probe_batch = (probe_tokens[:, :-1], probe_tokens[:, 1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    amp = dict(device_type=device.type, dtype=torch.bfloat16)

    def train_step():
        with torch.autocast(**amp):
            loss = seq_loss(model(data[:, :-1]), data[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        train_step()
    steps = []
    for _ in range(5 if tiny else 20):
        sync(device)
        t0 = time.perf_counter()
        train_step()
        sync(device)
        steps.append(time.perf_counter() - t0)
    step_s = statistics.median(steps)
    budget = 512 if tiny else 16384
    mon = Monitor(model, seq_loss, probe_batch, probes="economy", every=100, budget_mb=budget)
    meas, per_probe = [], {}
    for i in range(3):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(**amp):                           # as a training loop would call it
            metrics = mon.step(100 * i, opt)
        sync(device)
        meas.append(time.perf_counter() - t0)
        for k, v in metrics.items():
            if k.endswith("/seconds"):
                per_probe.setdefault(k.split("/")[0], []).append(float(v))
    finite = all(math.isfinite(float(v)) for k, v in metrics.items()
                 if not isinstance(v, torch.Tensor) and "noise_scale" not in k)
    meas_s = statistics.median(meas[1:])                      # the first holds one-time setup
    overhead = meas_s / (100 * step_s)
    label = f"{n_params / 1e6:.1f}M params, batch {batch}x{t_train} tokens, bf16 autocast"
    row("monitor", f"training step ({label})", f"{1e3 * step_s:.1f} ms")
    row("monitor", f"economy measurement (probe batch 64x{t_probe}; first {1e3 * meas[0]:.0f} ms)",
        f"{1e3 * meas_s:.1f} ms", "", "ok" if finite else "FAIL")
    for probe, secs in per_probe.items():
        row("monitor", f"  {probe}", f"{1e3 * statistics.median(secs[1:] or secs):.1f} ms")
    row("monitor", "overhead at every=100", f"{100 * overhead:.1f}%", "<= 5%",
        "" if tiny or device.type == "cpu" else verdict(overhead, 0.05))
    section_optimizer(model, train_step, device, tiny)


def section_optimizer(model: nn.Module, train_step: Callable[[], None], device: torch.device, tiny: bool) -> None:
    params = list(model.parameters())
    train_step()                                              # fresh gradients on every parameter
    grads = [p.grad.detach().clone() for p in params]
    hyper = dict(lr=1e-4, betas=(0.9, 0.98), weight_decay=0.1)

    def copies():
        out = []
        for p, g in zip(params, grads):
            q = nn.Parameter(p.detach().clone())
            q.grad = g.clone()
            out.append(q)
        return out

    cuda = device.type == "cuda"
    arms: dict[str, torch.optim.Optimizer] = {}
    arms["AdamW fused (baseline)"] = torch.optim.AdamW(copies(), fused=True, **hyper)
    arms["AdamW foreach"] = torch.optim.AdamW(copies(), foreach=True, **hyper)
    arms["PopRiskAdamW default (foreach)"] = PopRiskAdamW(copies(), **hyper)
    if cuda or ARGS.compile:
        arms["PopRiskAdamW fused (compile)"] = PopRiskAdamW(copies(), fused=True, **hyper)
    warm = {}
    for name, opt in arms.items():
        sync(device)
        t0 = time.perf_counter()
        for _ in range(2):
            opt.step()
        sync(device)
        warm[name] = time.perf_counter() - t0
    reps, per = (3, 2) if tiny else (15, 5)
    times: dict[str, list[float]] = {n: [] for n in arms}
    names = list(arms)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per):
                arms[name].step()
            sync(device)
            times[name].append((time.perf_counter() - t0) / per)
    base = statistics.median(times[names[0]])
    n = sum(p.numel() for p in params)
    for name in names:
        med = statistics.median(times[name])
        extra = f"; warm-up {warm[name]:.1f} s" if "compile" in name else ""
        row("optimizer", f"{name}, {n / 1e6:.1f}M params", f"{1e3 * med:.2f} ms ({med / base:.2f}x{extra})")
    if not (cuda or ARGS.compile):
        row("optimizer", "PopRiskAdamW fused (compile)", "skipped on CPU (compile ~20 s; --compile)", "", "skip")


# --------------------------------------------------------------------------------------------
# 5. DDP with NCCL
# --------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    m = mlp().to(dev)                                          # float64
    ddp = DDP(m, device_ids=[rank])
    opt = PopRiskAdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
        y = (x[:, :3] + 0.5 * torch.randn(64, 3, generator=gen, dtype=torch.float64)).argmax(1)
        shard = slice(rank * 64 // world, (rank + 1) * 64 // world)
        opt.zero_grad()
        F.cross_entropy(ddp(x[shard].to(dev)), y[shard].to(dev)).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        queue.put(torch.stack(gathered).cpu().tolist())        # plain floats: no shared memory to outlive
    dist.destroy_process_group()


def section_ddp(device: torch.device) -> None:
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    if n_gpu < 2:
        row("ddp", "DDP + NCCL, 2 processes", f"skipped: {n_gpu} GPU(s) on this machine", "", "skip")
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = 29500 + os.getpid() % 1000
    procs = mp.spawn(_ddp_worker, args=(2, port, queue), nprocs=2, join=False)
    ranks = torch.tensor(queue.get(), dtype=torch.float64)     # read before joining: the pipe never fills
    while not procs.join():
        pass
    across = float((ranks[0] - ranks[1]).abs().max() / ranks[0].abs().max())
    # one process, the global batch of 64 (DDP averages the two shards' mean gradients: the same mean)
    m = mlp().to(device)
    opt = PopRiskAdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
        y = (x[:, :3] + 0.5 * torch.randn(64, 3, generator=gen, dtype=torch.float64)).argmax(1)
        opt.zero_grad()
        F.cross_entropy(m(x.to(device)), y.to(device)).backward()
        opt.step()
    single = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).cpu()
    vs_single = float((ranks[0] - single).abs().max() / single.abs().max())
    row("ddp", "DDP + NCCL, 2 ranks, PopRiskAdamW 5 steps: rank 0 vs rank 1", f"{across:.1e}", "0", verdict(across, 0.0))
    row("ddp", "  rank 0 vs one process on the global batch (float64)", f"{vs_single:.1e}", "<= 1e-9",
        verdict(vs_single, 1e-9))


# --------------------------------------------------------------------------------------------


def main() -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the accelerator to check (default cuda; cpu runs the same code)")
    ap.add_argument("--tiny", action="store_true", help="small models: the CPU run takes seconds")
    ap.add_argument("--compile", action="store_true", help="run the fused (torch.compile) arms on the CPU too")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ARGS = ap.parse_args()
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    device = torch.device(ARGS.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run with --device cpu --tiny, or on a GPU machine", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False          # float64/float32 agreement, not TF32
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    start = time.perf_counter()
    guarded("agreement", lambda: section_agreement(device, ARGS.tiny))
    guarded("sync", lambda: section_sync(device))
    guarded("monitor", lambda: section_monitor_and_optimizer(device, ARGS.tiny))
    guarded("ddp", lambda: section_ddp(device))
    total = time.perf_counter() - start
    print(f"lmech gpu_check: torch {torch.__version__}, device {device} ({name}), "
          f"{torch.cuda.device_count() if device.type == 'cuda' else 0} GPU(s), {'tiny' if ARGS.tiny else 'full'} "
          f"size, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {total:.0f} s")
    widths = [max(len(r[i]) for r in ROWS + [("section", "check", "value", "target", "result")]) for i in range(5)]
    header = ("section", "check", "value", "target", "result")
    for r in [header, tuple("-" * w for w in widths)] + ROWS:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 1 if any(r[4] in ("FAIL", "ERROR") for r in ROWS) else 0


ARGS = argparse.Namespace(compile=False)

if __name__ == "__main__":
    sys.exit(main())
