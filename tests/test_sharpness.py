"""lmech.probes.sharpness against explicit Hessians and closed forms."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmech.core import FunctionalModel, flatten, hvp, unflatten
from lmech.errors import MemoryBudgetError
from lmech.probes.base import TrainState, differentiable_kernels
from lmech.probes.sharpness import (
    HessianOperator,
    HessianTraceProbe,
    SharpnessProbe,
    SpectralDensityProbe,
    adam_preconditioner,
    hessian_spectral_density,
    hessian_trace,
    sharpness,
    sharpness_per_layer,
)

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def mse(o, y):
    return 0.5 * ((o - y) ** 2).mean()


def explicit_hessian(model, loss_fn, x, y, params=None):
    """H by core.hvp on every basis vector (core.hvp is tested against torch.autograd)."""
    fm = FunctionalModel(model, params)
    cols = []
    for i in range(fm.numel):
        e = torch.zeros(fm.numel, dtype=DT)
        e[i] = 1
        cols.append(flatten(hvp(fm, loss_fn, x, y, unflatten(e, fm.params))))
    H = torch.stack(cols, 1)
    return (H + H.T) / 2


def small_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(20, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (20,), generator=g)
    return model, x, y


@pytest.mark.parametrize("name", ["sharpness", "hessian", "hessian_spectrum"])
def test_doctests(name):
    module = importlib.import_module(f"lmech.probes.{name}")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("bias", [False, True])
def test_linear_least_squares_hessian_is_xtx_over_n(bias):
    g = torch.Generator().manual_seed(0)
    n, d = 200, 12
    x = torch.randn(n, d, generator=g, dtype=DT) * torch.linspace(0.2, 3, d, dtype=DT)
    y = torch.randn(n, 1, generator=g, dtype=DT)
    model = nn.Linear(d, 1, bias=bias).to(DT)
    X = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1) if bias else x
    exact = torch.linalg.eigvalsh(X.T @ X / n).flip(0)
    res = sharpness(model, mse, (x, y), k=3, tol=1e-10)
    assert res.converged and res.threshold is None
    torch.testing.assert_close(res.eigenvalues, exact[:3], rtol=1e-9, atol=1e-12)
    assert res.top == pytest.approx(float(exact[0]))
    assert res.num_hvps <= X.shape[1]


def test_quadratic_with_known_spectrum():
    eigs = torch.cat([torch.tensor([7.0, 5.0, 4.5]), torch.linspace(-1, 1, 97)]).to(DT)
    Q, _ = torch.linalg.qr(torch.randn(100, 100, generator=torch.Generator().manual_seed(1), dtype=DT))
    A = (Q * eigs) @ Q.T

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(100, dtype=DT))

        def forward(self, x):
            return self.w + 0 * x.sum()

    loss = lambda w, _: 0.5 * w @ A @ w
    res = sharpness(Quad(), loss, (torch.zeros(1, dtype=DT), None), k=3, tol=1e-8)
    torch.testing.assert_close(res.eigenvalues, eigs[:3], rtol=1e-7, atol=0)
    assert (res.relative_error_bound <= 1e-8).all()


def test_sharpness_matches_explicit_hessian_and_per_layer_blocks():
    model, x, y = small_mlp()
    H = explicit_hessian(model, F.cross_entropy, x, y)
    res = sharpness(model, F.cross_entropy, (x, y), k=2, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-8, atol=1e-10)
    per = sharpness_per_layer(model, F.cross_entropy, (x, y), tol=1e-10)
    assert list(per) == ["0", "2"]
    fm = FunctionalModel(model)
    sizes = [fm.params[n].numel() for n in fm.names]
    start = 0
    blocks = {}
    for n, s in zip(fm.names, sizes):
        blocks[n] = slice(start, start + s)
        start += s
    for layer in ("0", "2"):
        idx = torch.cat([torch.arange(start=blocks[n].start, end=blocks[n].stop)
                         for n in (f"{layer}.weight", f"{layer}.bias")])
        block = H[idx][:, idx]
        assert per[layer].top == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-8)
        assert per[layer].top <= res.top + 1e-10  # interlacing


def test_preconditioned_sharpness_matches_explicit_adam_form():
    model, x, y = small_mlp(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.99), weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    H = explicit_hessian(model, F.cross_entropy, x, y)
    # P from the optimizer state, written out independently of adam_preconditioner
    diag = []
    for p in model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        diag.append(((1 - 0.8**t) * ((st["exp_avg_sq"] / (1 - 0.99**t)).sqrt() + 1e-8) / 0.05).reshape(-1))
    d = torch.cat(diag).rsqrt()
    explicit = torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).flip(0)
    res = sharpness(model, F.cross_entropy, (x, y), k=2, preconditioner=opt, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, explicit[:2], rtol=1e-8, atol=1e-10)
    assert res.threshold == pytest.approx((2 + 2 * 0.8) / (1 - 0.8))
    # the same through an explicit dict of diagonals
    P, thr = adam_preconditioner(opt, model)
    res2 = sharpness(model, F.cross_entropy, (x, y), k=1, preconditioner=P, tol=1e-10)
    assert res2.top == pytest.approx(res.top, rel=1e-9) and res2.threshold is None


def test_adam_preconditioner_update_identity():
    """Adam's step equals -P^{-1} m_t on the raw EMA m_t (what the threshold assumes)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2).to(DT)
    opt = torch.optim.Adam(net.parameters(), lr=0.03, betas=(0.9, 0.95))
    x = torch.randn(8, 3, dtype=DT)
    for _ in range(4):
        before = [p.detach().clone() for p in net.parameters()]
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        P, _ = adam_preconditioner(opt, net)
        for (name, p), b in zip(net.named_parameters(), before):
            m = opt.state[p]["exp_avg"]
            torch.testing.assert_close(p.detach() - b, -m / P[name], rtol=1e-9, atol=1e-12)


def test_preconditioner_errors():
    model, x, y = small_mlp()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="take at least one"):
        sharpness(model, F.cross_entropy, (x, y), preconditioner=opt)
    with pytest.raises(ValueError, match="not an Adam-type"):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        sharpness(model, F.cross_entropy, (x, y), preconditioner=sgd)
    with pytest.raises(ValueError, match="lacks"):
        sharpness(model, F.cross_entropy, (x, y), preconditioner={"0.weight": torch.ones(6, 4)})
    with pytest.raises(TypeError, match="preconditioner must be"):
        sharpness(model, F.cross_entropy, (x, y), preconditioner=3.0)
    with pytest.raises(ValueError, match="batch must be a pair"):
        sharpness(model, F.cross_entropy, x)


def test_tied_embedding_model_and_param_subset():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.hid = nn.Linear(4, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(torch.tanh(self.hid(self.emb(t))))

    torch.manual_seed(0)
    model = Tied().to(DT).eval()
    x = torch.randint(0, 7, (5, 3))
    y = torch.randint(0, 7, (5, 3))
    loss = lambda o, t: F.cross_entropy(o.reshape(-1, 7), t.reshape(-1))
    H = explicit_hessian(model, loss, x, y)
    res = sharpness(model, loss, (x, y), k=2, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-8, atol=1e-10)
    sub = sharpness(model, loss, (x, y), params="out.weight", tol=1e-10)  # tied alias -> emb.weight
    Hs = explicit_hessian(model, loss, x, y, params="emb.weight")
    assert sub.names == ["emb.weight"]
    assert sub.top == pytest.approx(float(torch.linalg.eigvalsh(Hs)[-1]), rel=1e-8)


def test_chunked_batch_equals_full_and_chunked_operator_matches():
    model, x, y = small_mlp(seed=5)
    full = HessianOperator(model, F.cross_entropy, (x, y))
    chunked = HessianOperator(model, F.cross_entropy, (x, y), batch_size=7)
    v = torch.randn(full.dim, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(chunked.matvec(v), full.matvec(v), rtol=1e-10, atol=1e-12)
    assert full.num_matvecs == chunked.num_matvecs == 1


def test_loss_linear_in_a_parameter_gives_zero_rows():
    model = nn.Linear(3, 1).to(DT)  # MSE: bias enters the gradient; use a loss linear in the output
    x = torch.randn(6, 3, dtype=DT)
    op = HessianOperator(model, lambda o, _: o.sum(), (x, None))
    assert torch.equal(op.matvec(torch.ones(4, dtype=DT)), torch.zeros(4, dtype=DT))


def test_trace_and_density_vs_explicit():
    model, x, y = small_mlp(seed=7)
    H = explicit_hessian(model, F.cross_entropy, x, y)
    d = H.shape[0]
    exact = float(torch.trace(H))
    est = hessian_trace(model, F.cross_entropy, (x, y), num_matvecs=3 * d)
    assert est.value == pytest.approx(exact, rel=1e-8)
    hut = hessian_trace(model, F.cross_entropy, (x, y), method="hutchinson", num_matvecs=200)
    assert abs(hut.value - exact) < 4 * hut.stderr
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, F.cross_entropy, (x, y), method="exact")
    sd = hessian_spectral_density(model, F.cross_entropy, (x, y), num_probes=3, num_steps=8)
    # moments up to degree 15 are exact per probe; their average estimates tr(H^p)/d
    for p in (1, 2):
        est_p = float((sd.weights * sd.nodes**p).sum(1).mean())
        assert abs(est_p - float(torch.trace(torch.linalg.matrix_power(H, p))) / d) < 0.5 * abs(
            float(torch.trace(torch.linalg.matrix_power(H, p))) / d) + 1e-6


def test_lanczos_basis_budget_refusal():
    model, x, y = small_mlp()
    with pytest.raises(MemoryBudgetError, match="lower max_iter or select fewer parameters"):
        sharpness(model, F.cross_entropy, (x, y), max_bytes=1024)


def test_probes_measure_and_leave_model_untouched():
    model, x, y = small_mlp(seed=9)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    opt_state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    state = TrainState(model, F.cross_entropy, (x, y), step=1, optimizer=opt)
    probe = SharpnessProbe(k=2, preconditioned=True, per_layer=True, tol=1e-6)
    out = probe.measure(state)
    assert {"lambda_1", "lambda_2", "rel_error", "hvps", "adaptive_lambda_1", "adaptive_threshold",
            "lambda_1/0", "lambda_1/2"} <= set(out)
    assert out["adaptive_threshold"] == pytest.approx(38.0)
    again = probe.measure(state)  # warm start: the top eigenvector is already converged
    assert again["hvps"] < out["hvps"]
    assert again["lambda_1"] == pytest.approx(out["lambda_1"], rel=1e-5)
    tr = HessianTraceProbe(num_matvecs=12, per_layer=True).measure(state)
    assert {"trace", "trace_stderr", "trace/0", "trace/2"} <= set(tr)
    dens = SpectralDensityProbe(num_probes=2, num_steps=5, grid_size=50).measure(state)
    assert dens["density"].shape == (50,) and dens["nodes"].shape == (10,)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n])
    for k, v in opt.state[next(model.parameters())].items():
        assert torch.equal(v, opt_state[k])


def test_attention_model_second_derivatives():
    """Fused SDPA kernels have no double backward; the probes switch to the math backend."""
    from lmech.models import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=5, seq_len=4, n_out=3, d_model=4, n_heads=2, n_layers=1, d_mlp=4).to(DT).eval()
    x = torch.randint(0, 5, (5, 4))
    y = torch.randint(0, 3, (5,))
    with differentiable_kernels():
        H = explicit_hessian(model, F.cross_entropy, x, y, params="blocks.0.attn")
    res = sharpness(model, F.cross_entropy, (x, y), params="blocks.0.attn", tol=1e-10, max_iter=H.shape[0])
    assert res.top == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)


def test_operator_gradient_matches_loss_and_grad_chunked_and_preconditioned():
    from lmech.core import loss_and_grad

    model, x, y = small_mlp(seed=11)
    _, g = loss_and_grad(model, F.cross_entropy, x, y)
    g = flatten(g)
    torch.testing.assert_close(HessianOperator(model, F.cross_entropy, (x, y)).gradient(), g,
                               rtol=1e-12, atol=1e-14)
    chunked = HessianOperator(model, F.cross_entropy, (x, y), batch_size=6)
    torch.testing.assert_close(chunked.gradient(), g, rtol=1e-10, atol=1e-12)
    P = {n: torch.rand_like(p) + 0.5 for n, p in model.named_parameters()}
    pre = HessianOperator(model, F.cross_entropy, (x, y), preconditioner=P)
    torch.testing.assert_close(pre.gradient(), g * flatten(P).rsqrt(), rtol=1e-12, atol=1e-14)
    assert pre.num_matvecs == 0


@pytest.mark.parametrize("k", [1, 3])
def test_gradient_start_equals_random_start_and_explicit_hessian(k):
    """The start vector changes the number of products, not the answer: both starts converge to
    the explicit eigenvalues, and the gradient start is g/|g| + z/|z| with the seeded z."""
    model, x, y = small_mlp(seed=13)
    H = explicit_hessian(model, F.cross_entropy, x, y)
    exact = torch.linalg.eigvalsh(H).flip(0)[:k]
    a = sharpness(model, F.cross_entropy, (x, y), k=k, tol=1e-10, start="gradient")
    b = sharpness(model, F.cross_entropy, (x, y), k=k, tol=1e-10, start="random")
    torch.testing.assert_close(a.eigenvalues, exact, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(b.eigenvalues, exact, rtol=1e-8, atol=1e-10)
    op = HessianOperator(model, F.cross_entropy, (x, y))
    g = op.gradient()
    z = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=DT)
    v0 = g / g.norm() + z / z.norm()
    c = sharpness(model, F.cross_entropy, (x, y), k=k, tol=1e-10, v0=v0)
    assert c.num_hvps == a.num_hvps
    torch.testing.assert_close(c.eigenvalues, a.eigenvalues, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="start"):
        sharpness(model, F.cross_entropy, (x, y), start="ones")


def test_gradient_start_falls_back_to_random_at_a_stationary_point():
    # loss linear in the output with zero inputs: gradient exactly 0 for the weight, H = 0 there
    model = nn.Linear(3, 1, bias=False).to(DT)
    x = torch.randn(8, 3, dtype=DT)
    loss = lambda o, _: 0.5 * (o**2).mean()  # noqa: E731  minimum at w = 0
    with torch.no_grad():
        model.weight.zero_()
    a = sharpness(model, loss, (x, None), k=1, tol=1e-10, start="gradient")
    b = sharpness(model, loss, (x, None), k=1, tol=1e-10, start="random")
    assert a.num_hvps == b.num_hvps and a.top == pytest.approx(b.top, rel=1e-12)
    assert a.top == pytest.approx(float(torch.linalg.eigvalsh(x.T @ x / 8)[-1]), rel=1e-8)
