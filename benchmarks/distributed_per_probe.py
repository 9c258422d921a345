"""Per-probe time of the economy preset under DDP (2 gloo CPU processes, 128 examples each) against
one process on the 256 examples, interleaved 12 times, medians (rank 0's ``<probe>/seconds``,
which include the per-probe status exchange, i.e. waiting for the other rank).

    python benchmarks/distributed_per_probe.py
"""
import os, sys, time, statistics, tempfile, torch
import torch.multiprocessing as mp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_overhead import make_case
def worker(rank, tmp):
    import torch.distributed as dist
    from lmech.monitor import Monitor
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    model, loss_fn, (x, y) = make_case("mlp", 256, torch.float64)
    ref, _, _ = make_case("mlp", 256, torch.float64)
    sh = (x[rank*128:(rank+1)*128], y[rank*128:(rank+1)*128])
    ddp = Monitor(model, loss_fn, sh, probes="economy", every=1)
    single = Monitor(ref, loss_fn, (x, y), probes="economy", every=1, group=None) if rank == 0 else None
    S, D = {}, {}
    for step in range(12):
        dist.barrier()
        if rank == 0:
            m = single.measure(step)
            for k, v in m.items():
                if k.endswith("seconds"): S.setdefault(k, []).append(v)
        dist.barrier()
        t0 = time.perf_counter(); m = ddp.measure(step); tt = time.perf_counter() - t0
        D.setdefault("total", []).append(tt)
        for k, v in m.items():
            if k.endswith("seconds"): D.setdefault(k, []).append(v)
    if rank == 0:
        for k in S: print(f"{k:<22} single {statistics.median(S[k][1:])*1e3:7.2f}  ddp {statistics.median(D[k][1:])*1e3:7.2f}")
        print("ddp total", statistics.median(D["total"][1:])*1e3)
    dist.barrier(); os._exit(0)
if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(tmp,), nprocs=2, start_method="fork")
