"""GPU readiness checked on the CPU: every probe, the Monitor and the PathRecorder under
``torch.autocast`` (bfloat16), and no host synchronisation inside ``PopRiskAdamW.step`` or a
non-measuring ``Monitor.step`` (recorded at the dispatcher: every ``.item()``, ``float(t)``,
``bool(t)`` and ``.tolist()`` reaches ``aten._local_scalar_dense``, the op that waits for a GPU)."""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lmech import Monitor
from lmech.optim import PopRiskAdamW
from lmech.probes import GramianProbe, PathRecorder
from lmech.probes.gramian import half_mse
from lmech.probes.precision import full_precision

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(n=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def trained(opt_steps=3):
    net = mlp()
    x, y = batch()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(opt_steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt, (x, y)


def assert_wide_and_equal(got: dict, want: dict):
    """Same keys; float32+ values; equal to the values measured outside autocast (same math)."""
    assert got.keys() == want.keys()
    for k, v in got.items():
        if k.endswith("/seconds"):
            continue
        if isinstance(v, torch.Tensor):
            assert v.dtype in (torch.float32, torch.float64, torch.int64), (k, v.dtype)
            assert torch.equal(torch.isfinite(v), torch.isfinite(want[k])), k
            torch.testing.assert_close(v, want[k], equal_nan=True, rtol=1e-6, atol=1e-9)
        else:
            assert isinstance(v, (float, int)), (k, type(v))
            assert math.isfinite(v) == math.isfinite(want[k]), k
            if math.isfinite(v):
                assert v == pytest.approx(want[k], rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("preset", ["economy", "full"])
def test_every_probe_of_the_presets_under_bfloat16_autocast(preset):
    net, opt, probe_batch = trained()
    loss = nn.functional.cross_entropy
    plain = Monitor(net, loss, probe_batch, probes=preset, every=1).measure(0, opt)
    with torch.autocast(**BF16):
        mixed = Monitor(net, loss, probe_batch, probes=preset, every=1).measure(0, opt)
        assert torch.is_autocast_enabled("cpu")           # the Monitor restores the caller's autocast
    assert_wide_and_equal(mixed, plain)
    finite = [k for k, v in mixed.items() if not isinstance(v, torch.Tensor) and math.isfinite(v)]
    assert len(finite) > 10
    for key in ("probe/loss", "sharpness/lambda_1", "gradnoise/snr"):
        assert math.isfinite(mixed[key])


def test_probe_classes_switch_autocast_off_themselves():
    """Called directly (no Monitor) inside autocast: the probe classes and functions that the
    Monitor's presets use."""
    from lmech.probes import (GradNoiseProbe, HessianTraceProbe, NTKProbe, RepresentationProbe, SharpnessProbe,
                              SpectralDensityProbe, WeightSpectrumProbe, grad_noise, sharpness)
    from lmech.probes.base import TrainState

    net, opt, probe_batch = trained()
    make = [lambda: SharpnessProbe(k=2), lambda: HessianTraceProbe(num_matvecs=8), SpectralDensityProbe,
            lambda: NTKProbe(num_examples=16), WeightSpectrumProbe, RepresentationProbe, GradNoiseProbe]
    for factory in make:
        state = TrainState(net, nn.functional.cross_entropy, probe_batch, 0, opt)
        plain = factory().measure(state)
        with torch.autocast(**BF16):
            mixed = factory().measure(TrainState(net, nn.functional.cross_entropy, probe_batch, 0, opt))
        assert_wide_and_equal(mixed, plain)
    x, y = probe_batch
    with torch.autocast(**BF16):
        res = sharpness(net, nn.functional.cross_entropy, (x, y), k=1)
    assert res.eigenvalues.dtype in (torch.float32, torch.float64) and torch.isfinite(res.eigenvalues).all()
    with torch.autocast(**BF16):
        noise = grad_noise(net, nn.functional.cross_entropy, (x, y))
    assert math.isfinite(noise.total.snr) and noise.total.snr == grad_noise(net, nn.functional.cross_entropy, (x, y)).total.snr


def test_path_recorder_and_gramian_probe_under_autocast():
    def run(autocast: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 1))
        x, xq = torch.randn(10, 3), torch.randn(5, 3)
        y = torch.sin(x[:, :1])
        opt = PopRiskAdamW(model.parameters(), lr=1e-2, gate="snr")
        probe = GramianProbe(PathRecorder(model, x, y, xq, optimizer=opt), readout_every=2)
        mon = Monitor(model, half_mse, (x, y), probes=[probe], every=1)
        outs = []
        with torch.autocast(**BF16, enabled=autocast):
            for step in range(5):
                if step:
                    opt.zero_grad()
                    half_mse(model(x), y).backward()
                    opt.step()
                outs.append(mon.step(step, opt))
        return outs

    plain, mixed = run(False), run(True)
    assert "gramian/readout/coupling_corr" in mixed[-1]
    for a, b in zip(mixed, plain):
        # the training forward/backward ran in bfloat16 in the autocast run, so the weights differ
        # after step 0: compare keys, precision and which values are finite (nan where documented:
        # the path leave-one-out with weight decay)
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype in (torch.float32, torch.float64) and torch.isfinite(v).all() == torch.isfinite(b[k]).all()
            else:
                assert isinstance(v, float) and math.isfinite(v) == math.isfinite(b[k]), k
    assert math.isfinite(mixed[-1]["gramian/loss"]) and math.isfinite(mixed[-1]["gramian/kernel_trace"])


def test_full_precision_restores_the_callers_autocast():
    with torch.autocast(**BF16):
        with full_precision():
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with full_precision():                               # a no-op outside autocast
        assert not torch.is_autocast_enabled("cpu")


# --------------------------------------------------------------------------------------------
# No host synchronisation in the training-step path
# --------------------------------------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Records every op and every tensor read back to the host (``aten._local_scalar_dense``)."""

    SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                torch.ops.aten.masked_select.default, torch.ops.aten.unique_dim.default}

    def __init__(self):
        super().__init__()
        self.ops, self.reads = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        if func in self.SYNC_OPS:
            self.reads.append((func, args[0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("gate,reduction,blocked", list(itertools.product(
    ("soft", "hard", "snr", "none"), ("element", "tensor"), (True, False))))
def test_poprisk_step_reads_nothing_back_from_the_device(gate, reduction, blocked):
    """The only host reads in step() are the step counters, which live on the CPU on every device
    (a GPU run reads them without waiting for the GPU); no parameter, gradient or state tensor is read."""
    net = mlp()
    x, y = batch()
    opt = PopRiskAdamW(net.parameters(), gate=gate, reduction=reduction, weight_decay=0.1, gate_warmup=1,
                       gate_weight_decay=(gate == "soft"))
    opt.block_elements = 50 if blocked else None
    for step in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        with HostReads() as mode:
            opt.step()
        assert mode.ops, "the mode saw the step's ops"
        steps = {st["step"].data_ptr() for st in opt.state.values()}
        read = [(f, t) for f, t in mode.reads if t.data_ptr() not in steps]
        assert not read, f"step {step} read {[(str(f), tuple(t.shape)) for f, t in read]} back to the host"
        assert all(st["step"].device.type == "cpu" for st in opt.state.values())


def test_poprisk_step_counters_stay_on_the_cpu_after_load_state_dict_of_a_fused_group():
    net = mlp()
    opt = PopRiskAdamW(net.parameters(), fused=True)
    state = {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                           "exp_var": torch.zeros_like(p)} for i, p in enumerate(net.parameters())},
             "param_groups": [dict(opt.param_groups[0], params=list(range(len(opt.param_groups[0]["params"]))))]}
    opt.load_state_dict(state)
    assert all(st["step"].device.type == "cpu" and st["step"].dtype == torch.float32 for st in opt.state.values())


def test_monitor_step_off_schedule_does_no_tensor_work():
    net, opt, probe_batch = trained()
    mon = Monitor(net, nn.functional.cross_entropy, probe_batch, probes="economy", every=10)
    with HostReads() as mode:
        for step in range(1, 10):
            assert mon.step(step, opt) is None
    assert mode.ops == []


def test_poprisk_step_under_autocast_is_the_step_outside():
    """Autocast changes the forward's products, not the optimizer's elementwise float32 update."""
    nets = [mlp(), mlp()]
    opts = [PopRiskAdamW(n.parameters(), weight_decay=0.1, gate=g) for n, g in zip(nets, ("soft", "soft"))]
    x, y = batch()
    for step in range(4):
        grads = None
        for i, (net, opt) in enumerate(zip(nets, opts)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            if grads is None:
                grads = [p.grad.clone() for p in net.parameters()]
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()                             # the same gradients for both
            with torch.autocast(**BF16, enabled=(i == 1)):
                opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b)
