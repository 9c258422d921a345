"""PopRiskAdamW's default CPU path (cache-blocked foreach ops) against the unblocked foreach ops, the
implementation before blocking (which test_optim.py checks against a plain per-parameter reference)."""

import itertools

import pytest
import torch
from torch import nn

from lmech.optim import PopRiskAdamW
from lmech.optim.poprisk_kernels import CPU_BLOCK_ELEMENTS, _cache_blocks

CASES = [dict(gate=g, reduction=r) for g, r in itertools.product(("soft", "hard", "snr", "none"), ("element", "tensor"))]


def make_params(seed=0, dtype=torch.float32):
    """Tensors of many sizes (larger than the test block, smaller, empty), one non-contiguous, one without grad."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (30,), (7, 3, 5), (1,), (0,), (64,), (13, 11)]
    ps = [nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype)) for s in shapes]
    ps.append(nn.Parameter(torch.randn(9, 17, generator=gen, dtype=dtype).t()))  # non-contiguous (17, 9)
    return ps


def grads(ps, step, seed=5):
    """Noisy gradients with a persistent mean (so gates open and close), the same for every copy."""
    gen = torch.Generator().manual_seed(seed + step)
    for i, p in enumerate(ps):
        if i == 3 and step % 3 == 0:
            p.grad = None                                  # a parameter that skips some steps
            continue
        mean = torch.linspace(-1, 1, p.numel(), dtype=p.dtype).reshape(p.shape)
        g = 0.3 * mean + torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = g if p.is_contiguous() else g.t().contiguous().t()


def groups(ps, case):
    first = dict(case, alpha=0.5, softness=3.0, gate_warmup=3, gate_weight_decay=True)
    second = dict(case, alpha="finite", batch_size=32, dataset_size=256, rho=0.9)
    return [dict(params=ps[:4], lr=3e-2, weight_decay=0.1, **first),
            dict(params=ps[4:], lr=1e-2, weight_decay=0.0, **second)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['gate']}-{c['reduction']}")
def test_blocked_equals_unblocked(case):
    pa, pb = make_params(), make_params()
    blocked = PopRiskAdamW(groups(pa, case), betas=(0.9, 0.98))
    blocked.block_elements = 37                        # cuts tensors mid-row, packs small ones together
    unblocked = PopRiskAdamW(groups(pb, case), betas=(0.9, 0.98))
    unblocked.block_elements = None
    for step in range(25):
        for ps, opt in ((pa, blocked), (pb, unblocked)):
            grads(ps, step)
            opt.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)     # float32 rounding
        for key in ("exp_avg", "exp_avg_sq", "exp_var"):
            torch.testing.assert_close(blocked.state[a][key], unblocked.state[b][key], rtol=1e-6, atol=1e-8)
        assert blocked.state[a]["step"] == unblocked.state[b]["step"]
    ga, gb = blocked.gates(), unblocked.gates()
    for a, b in zip(pa, pb):
        if a in ga:
            torch.testing.assert_close(ga[a], gb[b], rtol=1e-5, atol=1e-6)


def test_default_block_size_and_packing():
    assert PopRiskAdamW([nn.Parameter(torch.zeros(1))]).block_elements == CPU_BLOCK_ELEMENTS
    ps = [torch.zeros(10), torch.zeros(3, 4).t(), torch.zeros(25), torch.zeros(0)]
    blocks = _cache_blocks(tuple(list(x) for x in zip(*[(p,) * 5 for p in ps])), 8)
    sizes = [[x.numel() for x in b[0]] for b in blocks]
    # 10 -> 8 + 2; the non-contiguous (4, 3) stays whole; 25 -> 8, 8, 8, 1 (+ the empty tensor)
    assert sizes == [[8], [2], [12], [8], [8], [8], [1, 0]]
    assert all(len(b) == 5 and all(len(lst) == len(b[0]) for lst in b) for b in blocks)
    flat = blocks[0][0][0]
    flat.fill_(1.0)
    assert ps[0][:8].eq(1).all() and ps[0][8:].eq(0).all()  # views: in-place ops reach the tensor


def test_blocked_default_path_on_a_large_tensor_is_bitwise_the_unblocked_ops():
    """Float32, a tensor cut into several default-size blocks: same ops, same scalars, per element."""
    torch.manual_seed(0)
    n = 2 * CPU_BLOCK_ELEMENTS + 1000
    pa, pb = nn.Parameter(torch.randn(n)), nn.Parameter(torch.randn(n))
    pb.data.copy_(pa.data)
    oa, ob = PopRiskAdamW([pa], weight_decay=0.1), PopRiskAdamW([pb], weight_decay=0.1)
    ob.block_elements = None
    for _ in range(3):
        g = torch.randn(n) + 0.5
        pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-8)
    for key in ("exp_avg", "exp_avg_sq", "exp_var"):
        torch.testing.assert_close(oa.state[pa][key], ob.state[pb][key], rtol=1e-6, atol=1e-10)
