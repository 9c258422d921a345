"""lmech.probes.ntk: both algorithms against the batch Jacobian of lmech.core and closed forms."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmech.core import jacobian
from lmech.errors import MemoryBudgetError
from lmech.probes.base import TrainState, differentiable_kernels
from lmech.probes.ntk import (
    NTKProbe,
    kernel_alignment,
    kernel_drift,
    kernel_spectrum,
    kernel_target_alignment,
    ntk,
    ntk_cost,
    per_example_jacobian,
)

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.lin = nn.Linear(3, 4)

    def forward(self, x):  # (b, t) long -> (b, 4)
        return self.lin(self.emb(x).tanh().mean(1))


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.hid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):  # (b, t) long -> (b, t, 7): 3-D output
        return self.out(torch.tanh(self.hid(self.emb(x))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) * self.b(z)


def make_case(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(6, 3, generator=g, dtype=DT)
    elif name == "embedding":
        model = EmbModel()
        x = torch.randint(0, 7, (6, 3), generator=g)
        x[0, 0] = x[1, 1] = x[1, 2]
    elif name == "tied":
        model = TiedModel()
        x = torch.randint(0, 7, (5, 3), generator=g)
    elif name == "batchnorm":
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
        with torch.no_grad():
            model[1].running_mean.copy_(torch.randn(4, generator=g))
            model[1].running_var.copy_(torch.rand(4, generator=g) + 0.5)
            model[1].weight.copy_(torch.rand(4, generator=g) + 0.5)
        x = torch.randn(6, 3, generator=g, dtype=DT)
    elif name == "out3d":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        x = torch.randn(5, 3, 3, generator=g, dtype=DT)  # (b, t, c) -> (b, t, 2)
    elif name == "transformer":  # attention: forward-mode AD needs the math SDPA backend
        from lmech.models import Transformer

        model = Transformer(vocab_size=7, seq_len=4, n_out=3, d_model=8, n_heads=2, n_layers=1, d_mlp=16)
        x = torch.randint(0, 7, (4, 4), generator=g)
    elif name == "two_inputs":
        model = TwoInputs()
        x = (torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT))
    else:
        raise KeyError(name)
    return model.to(DT).eval(), x


CASES = ["mlp", "embedding", "tied", "batchnorm", "out3d", "two_inputs", "transformer"]


def reference_ntk(model, x, x2=None, params=None, weights=None):
    """J M J^T from the batch Jacobian of lmech.core (jacrev over the batched forward)."""
    with differentiable_kernels():  # fused attention has no vmap rule for its backward
        J1 = jacobian(model, x, params)
        J2 = J1 if x2 is None else jacobian(model, x2, params)
    n1 = next(iter(J1.values())).shape[0]
    n2 = next(iter(J2.values())).shape[0]
    K = 0
    for name in J1:
        pshape = J1[name].shape[-len(dict(model.named_parameters())[name].shape):] if J1[name].dim() else ()
        size = dict(model.named_parameters())[name].numel()
        a = J1[name].reshape(-1, size)
        b = J2[name].reshape(-1, size)
        if weights is not None:
            b = b * weights[name].reshape(1, -1)
        K = K + a @ b.T
        del pshape
    o = K.shape[0] // n1
    assert K.shape == (n1 * o, n2 * o)
    return K, o


def traced(K, n1, n2, o):
    return K.reshape(n1, o, n2, o).diagonal(dim1=1, dim2=3).sum(-1)


def test_doctests():
    module = importlib.import_module("lmech.probes.ntk")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("bias", [False, True])
def test_linear_model_ntk_is_gram_matrix(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=g, dtype=DT)
    model = nn.Linear(4, 3, bias=bias).to(DT)
    gram = x @ x.T + (1 if bias else 0)
    expected = torch.kron(gram, torch.eye(3, dtype=DT))  # delta_ab (x_i . x_j + 1)
    for impl in ("jacobian", "products", "auto"):
        torch.testing.assert_close(ntk(model, x, impl), expected, **TOL)
        torch.testing.assert_close(ntk(model, x, impl, trace_outputs=True), 3 * gram, **TOL)


@pytest.mark.parametrize("name", CASES)
def test_implementations_agree_with_batch_jacobian(name):
    model, x = make_case(name)
    K_ref, o = reference_ntk(model, x)
    n = K_ref.shape[0] // o
    for impl in ("jacobian", "products"):
        K = ntk(model, x, impl)
        torch.testing.assert_close(K, K_ref, **TOL)
        torch.testing.assert_close(ntk(model, x, impl, trace_outputs=True), traced(K_ref, n, n, o), **TOL)
    assert per_example_jacobian(model, x).shape == (n, o, sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("name", ["mlp", "tied", "out3d"])
def test_cross_kernel_weights_and_param_subset(name):
    model, x = make_case(name)
    x2 = x[:3] if isinstance(x, torch.Tensor) else tuple(t[:3] for t in x)
    sel = [n for n, _ in model.named_parameters()][:1]
    g = torch.Generator().manual_seed(3)
    w = {n: torch.rand(p.shape, generator=g, dtype=DT) + 0.1 for n, p in model.named_parameters() if n in sel}
    K_ref, o = reference_ntk(model, x, x2, sel, w)
    for impl in ("jacobian", "products"):
        K = ntk(model, x, impl, params=sel, x2=x2, weights=w)
        torch.testing.assert_close(K, K_ref, **TOL)
    flat_w = torch.cat([w[n].reshape(-1) for n in sel])
    torch.testing.assert_close(ntk(model, x, params=sel, x2=x2, weights=flat_w), K_ref, **TOL)


def test_blocked_paths_equal_unblocked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(DT).eval()
    x = torch.randn(20, 6, dtype=DT)
    full = ntk(model, x, "jacobian")
    budgets = {"jacobian": 120_000, "products": 200_000}
    assert 1 <= ntk_cost(model, x, max_bytes=budgets["jacobian"]).jacobian_block < 20
    assert 1 <= ntk_cost(model, x, max_bytes=budgets["products"]).products_block < 20
    for impl in ("jacobian", "products"):
        torch.testing.assert_close(ntk(model, x, impl, max_bytes=budgets[impl]), full, **TOL)
        torch.testing.assert_close(ntk(model, x, impl, chunk_size=3), full, **TOL)
    x2 = torch.randn(9, 6, dtype=DT)
    torch.testing.assert_close(ntk(model, x, "jacobian", x2=x2, max_bytes=120_000),
                               ntk(model, x, "jacobian", x2=x2), **TOL)


def test_auto_cost_model_choices():
    torch.manual_seed(0)
    x = torch.randn(32, 10)
    one = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 1))
    many = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 50))
    c1, c2 = ntk_cost(one, x), ntk_cost(many, x)
    P = sum(p.numel() for p in one.parameters())
    assert c1.forward_flops == 2 * (10 * 64 + 64 * 1)  # measured by the FLOP counter
    assert c1.choice == "jacobian" and c2.choice == "products"
    assert c1.jacobian_bytes == 32 * 1 * P * 4
    # traced kernel: the contraction loses its o^2 factor, the Jacobian path wins again
    assert ntk_cost(many, x, trace_outputs=True).choice == "jacobian"
    # a budget too small for the Jacobians but fine for product blocks moves auto to products
    tight = ntk_cost(one, x, max_bytes=c1.kernel_bytes + 2 * c1.example_jacobian_bytes + 10)
    assert tight.jacobian_block == 1


def test_memory_refusals_name_what_to_shrink():
    model, x = make_case("mlp")
    with pytest.raises(MemoryBudgetError, match="use fewer examples or trace_outputs=True"):
        ntk(model, x, max_bytes=100)
    with pytest.raises(MemoryBudgetError, match="select fewer parameters"):
        ntk(model, x, "jacobian", trace_outputs=True, max_bytes=300)
    with pytest.raises(MemoryBudgetError, match="per-example Jacobians"):
        per_example_jacobian(model, x, max_bytes=100)
    with pytest.raises(ValueError, match="implementation"):
        ntk(model, x, "exact")


def test_train_mode_batchnorm_and_dropout_refused():
    model, x = make_case("batchnorm")
    model.train()
    with pytest.raises(ValueError, match="call model.eval"):
        ntk(model, x)
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT).train()
    with pytest.raises(ValueError, match="Dropout is in training mode"):
        ntk(drop, torch.randn(4, 3, dtype=DT))


def test_kernel_readouts():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 4, generator=g, dtype=DT)
    K = X @ X.T
    ev = kernel_spectrum(K)
    assert torch.all(ev[:-1] >= ev[1:]) and kernel_spectrum(K, 2).shape == (2,)
    torch.testing.assert_close(ev.sum(), torch.trace(K))
    assert kernel_alignment(K, 5 * K) == pytest.approx(1.0)
    # centered alignment ignores a constant shift of the kernel; uncentered does not
    assert kernel_alignment(K, K + 3.0) == pytest.approx(1.0)
    assert kernel_alignment(K, K + 3.0, centered=False) < 0.99
    d = kernel_drift(2 * K, K)
    assert d.distance == pytest.approx(0.0, abs=1e-12) and d.rel_op_change == pytest.approx(1.0)
    assert d.rel_fro_change == pytest.approx(1.0)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2, 0])
    Y = F.one_hot(y).to(DT)
    assert kernel_target_alignment(Y @ Y.T, y) == pytest.approx(1.0)
    assert kernel_target_alignment(torch.kron(Y @ Y.T, torch.eye(3, dtype=DT)), y) < 1.0
    real = torch.randn(10, 2, generator=g, dtype=DT)
    assert kernel_target_alignment(real @ real.T, real) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="do not match"):
        kernel_target_alignment(K, torch.randn(7))
    with pytest.raises(ValueError, match="square"):
        kernel_spectrum(torch.randn(3, 4))


def test_probe_drift_is_zero_at_reference_and_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = NTKProbe(num_examples=10, k=3, per_layer=True)
    state = TrainState(model, F.cross_entropy, (x, y))
    out = probe.measure(state)
    assert out["drift"] == pytest.approx(0.0, abs=1e-6) and "velocity" not in out
    assert out["spectrum"].shape == (10,) and {"lambda_1", "lambda_3", "effective_rank",
                                               "target_alignment", "trace/0", "drift/2"} <= set(out)
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # a "training step" that changes the kernel
    out2 = probe.measure(state)
    assert out2["drift"] > 1e-4 and out2["velocity"] == pytest.approx(out2["drift"], rel=1e-6)
    assert out2["drift_op"] > 0.5
    model[2].weight.data.div_(3.0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
