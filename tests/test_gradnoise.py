"""lmech.probes.gradnoise against brute-force leave-one-out computations and a closed form."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmech.core import per_example_grads
from lmech.errors import MemoryBudgetError
from lmech.probes.base import TrainState
from lmech.probes.gradnoise import GradNoiseProbe, grad_noise

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (9,), generator=g)
    return model, x, y


def flat_grads(model, x, y, names=None):
    g = per_example_grads(model, F.cross_entropy, x, y)
    names = names or list(g)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], 1)


def test_doctests():
    module = importlib.import_module("lmech.probes.gradnoise")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


METHODS = pytest.mark.parametrize("method", ["linear", "vmap"])


@METHODS
def test_per_coordinate_statistics_and_exact_leave_one_out(method):
    model, x, y = case()
    G = flat_grads(model, x, y)
    b = G.shape[0]
    gn = grad_noise(model, F.cross_entropy, (x, y), method=method)
    assert gn.method == method
    flat = lambda d: torch.cat([t.reshape(-1) for t in d.values()])  # noqa: E731
    torch.testing.assert_close(flat(gn.mean), G.mean(0))
    torch.testing.assert_close(flat(gn.variance), G.var(0, unbiased=True))
    # jackknife variance of the batch mean, brute force
    loo_means = torch.stack([torch.cat([G[:i], G[i + 1:]]).mean(0) for i in range(b)])
    jack = (b - 1) / b * ((loo_means - G.mean(0)) ** 2).sum(0)
    torch.testing.assert_close(flat(gn.loo_variance), jack)
    # the unbiased signal is the mean of g_i . gbar_{-i} (the U-statistic over pairs i != j)
    u_stat = (G * loo_means).mean(0).sum()
    assert gn.total.signal == pytest.approx(float(u_stat), rel=1e-10)
    torch.testing.assert_close(flat(gn.snr), G.mean(0) ** 2 / jack)
    assert gn.total.gate_fraction == pytest.approx(float((G.mean(0) ** 2 > jack * (1 + 1e-4)).double().mean()))


@METHODS
def test_group_statistics_and_jackknife_errors_brute_force(method):
    model, x, y = case()
    gn = grad_noise(model, F.cross_entropy, (x, y), method=method)
    assert list(gn.groups) == ["0", "2"]

    def stats(G):
        b = G.shape[0]
        m = G.mean(0)
        tr = G.var(0, unbiased=True).sum()
        ns = (m @ m) / (tr / b)
        denom = m @ m - tr / b
        return float(m @ m), float(tr), float(ns), float(tr / denom) if denom > 0 else math.inf

    def jack_se(G, idx):
        b = G.shape[0]
        vals = torch.tensor([stats(torch.cat([G[:i], G[i + 1:]]))[idx] for i in range(b)], dtype=DT)
        return float(((b - 1) / b * ((vals - vals.mean()) ** 2).sum()).sqrt())

    for label, names in [("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"]),
                         (None, ["0.weight", "0.bias", "2.weight", "2.bias"])]:
        G = flat_grads(model, x, y, names)
        res = gn.total if label is None else gn.groups[label]
        norm_sq, tr, snr, scale = stats(G)
        assert res.grad_norm_sq == pytest.approx(norm_sq, rel=1e-10)
        assert res.trace_cov == pytest.approx(tr, rel=1e-10)
        assert res.snr == pytest.approx(snr, rel=1e-10)
        assert res.noise_scale == pytest.approx(scale, rel=1e-10)
        assert res.snr_stderr == pytest.approx(jack_se(G, 2), rel=1e-8)
        if math.isfinite(res.noise_scale_stderr):
            assert res.noise_scale_stderr == pytest.approx(jack_se(G, 3), rel=1e-8)
        assert res.numel == G.shape[1]


def test_chunked_equals_unchunked():
    model, x, y = case()
    full = grad_noise(model, F.cross_entropy, (x, y), method="vmap")
    per_example = sum(p.numel() for p in model.parameters()) * 8
    chunked = grad_noise(model, F.cross_entropy, (x, y), max_bytes=2 * per_example + 1, method="vmap")
    for name in full.mean:
        torch.testing.assert_close(chunked.snr[name], full.snr[name], equal_nan=True)
    assert chunked.total.snr_stderr == pytest.approx(full.total.snr_stderr, rel=1e-10)
    assert chunked.groups["2"].noise_scale == pytest.approx(full.groups["2"].noise_scale, rel=1e-10)
    with pytest.raises(MemoryBudgetError, match="select fewer parameters"):
        grad_noise(model, F.cross_entropy, (x, y), max_bytes=10, method="vmap")
    # the outer-product path holds no b x P matrix: the same budget is no obstacle
    assert grad_noise(model, F.cross_entropy, (x, y), max_bytes=10).method == "linear"


def test_noise_scale_closed_form():
    """loss_i = w * xi_i: per-example gradient xi_i, so B = sigma^2 / mu^2 exactly in expectation."""

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros((), dtype=DT))

        def forward(self, xi):
            return self.w * xi

    mu, sigma, b = 0.5, 2.0, 4000
    xi = mu + sigma * torch.randn(b, generator=torch.Generator().manual_seed(0), dtype=DT)
    gn = grad_noise(Lin(), lambda out, _: out.mean(), (xi, None))
    expected = sigma**2 / mu**2  # 16
    assert abs(gn.total.noise_scale - expected) < 3 * gn.total.noise_scale_stderr
    assert gn.total.noise_scale_stderr < 0.2 * expected
    assert gn.total.snr == pytest.approx(b * float(xi.mean()) ** 2 / float(xi.var()), rel=1e-10)


@METHODS
def test_a_coordinate_without_variance_is_gated_and_has_no_snr(method):
    """loss = mean output of a Linear: every example's bias gradient is exactly 1 (variance 0,
    SNR infinite: it passes the gate; its per-coordinate SNR is reported as nan)."""
    net = nn.Linear(3, 1).to(DT)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    gn = grad_noise(net, lambda out, _: out.mean(), (x, None), method=method)
    assert gn.method == method
    assert gn.variance["bias"].item() == 0 and math.isnan(gn.snr["bias"].item())
    assert gn.groups["bias"].gate_fraction == 1.0 and math.isnan(gn.groups["bias"].mean_gsnr)
    assert gn.groups["weight"].gate_fraction == float((x.mean(0) ** 2 > x.var(0) / 10 * (1 + 1e-4)).double().mean())


def test_bad_input_and_probe():
    model, x, y = case()
    with pytest.raises(ValueError, match="at least 3"):
        grad_noise(model, F.cross_entropy, (x[:2], y[:2]))
    with pytest.raises(ValueError, match="unselected"):
        grad_noise(model, F.cross_entropy, (x, y), params="0", groups={"a": ["2.weight"]})
    out = GradNoiseProbe(per_coordinate=True).measure(TrainState(model, F.cross_entropy, (x, y)))
    assert {"grad_norm", "snr", "snr_stderr", "noise_scale", "snr/0", "gate_fraction/2"} <= set(out)
    assert out["coord_snr/0.weight"].shape == (20,)


@METHODS
def test_group_gsnr_and_gate_fraction_brute_force(method):
    """mean_gsnr and gate_fraction per group (assembled from per-tensor sums) against the
    concatenated per-example gradient matrix of that group."""
    model, x, y = case()
    gn = grad_noise(model, F.cross_entropy, (x, y), method=method)
    b = x.shape[0]
    for label, names in [("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"]),
                         (None, ["0.weight", "0.bias", "2.weight", "2.bias"])]:
        G = flat_grads(model, x, y, names)
        m, var = G.mean(0), G.var(0, unbiased=True)
        res = gn.total if label is None else gn.groups[label]
        keep = var > 0
        assert res.mean_gsnr == pytest.approx(float((m[keep] ** 2 / var[keep]).mean()), rel=1e-10)
        assert res.gate_fraction == pytest.approx(float((m**2 > var / b * (1 + 1e-4)).double().mean()), rel=1e-12)
        assert res.signal == pytest.approx(float((m**2 - var / b).sum()), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_moments_match_brute_force(dtype):
    """The in-place fast reductions against float64 brute force on an offset matrix (mean far
    from zero: a naive sum-of-squares formula would cancel)."""
    from lmech.probes.gradnoise_vmap import _moments

    G = 3.0 + torch.randn(17, 20000, generator=torch.Generator().manual_seed(0))
    G = G.to(dtype)
    G64 = G.to(DT)
    s, m2, sq, dot = _moments(G.clone())
    assert s.dtype == m2.dtype == sq.dtype == dot.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(s.to(DT), G64.sum(0), **tol)
    torch.testing.assert_close(m2.to(DT) / 16, G64.var(0, unbiased=True), **tol)
    torch.testing.assert_close(sq.to(DT), (G64 * G64).sum(1), **tol)
    torch.testing.assert_close(dot.to(DT), G64 @ G64.sum(0), **tol)
    assert _moments(G.clone(), with_dot=False)[3] is None


@METHODS
def test_float32_model_matches_float64_brute_force(method):
    """A float32 model (reductions in float32, accumulated in float64) against the float64
    per-example gradient matrix of the same model."""
    model, x, y = case()
    m32 = model.float()
    gn = grad_noise(m32, F.cross_entropy, (x.float(), y), method=method)
    G = flat_grads(m32, x.float(), y).to(DT)
    flat = lambda d: torch.cat([t.reshape(-1) for t in d.values()])  # noqa: E731
    torch.testing.assert_close(flat(gn.mean).to(DT), G.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat(gn.variance).to(DT), G.var(0, unbiased=True), rtol=1e-4, atol=1e-9)
    b = G.shape[0]
    m, tr = G.mean(0), G.var(0, unbiased=True).sum()
    assert gn.total.grad_norm_sq == pytest.approx(float(m @ m), rel=1e-5)
    assert gn.total.trace_cov == pytest.approx(float(tr), rel=1e-5)
    assert gn.total.snr == pytest.approx(float((m @ m) / (tr / b)), rel=1e-4)


def relu_mlp(inplace=False):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(inplace=inplace), nn.Linear(32, 32), nn.ReLU(inplace=inplace),
                         nn.Linear(32, 4)).eval()


def assert_same_noise(a, b, rtol=1e-4):
    # rtol 1e-4: "vmap" rounds each per-example gradient to float32 before reducing, "linear"
    # forms exact float64 products of float32 factors; the gate counts must agree exactly
    for name in a.mean:
        torch.testing.assert_close(a.mean[name], b.mean[name], rtol=rtol, atol=1e-8)
        torch.testing.assert_close(a.variance[name], b.variance[name], rtol=rtol, atol=1e-10)
    for x, y in [(a.total, b.total), *zip(a.groups.values(), b.groups.values())]:
        for field in ("grad_norm_sq", "trace_cov", "snr", "snr_stderr", "mean_gsnr", "noise_scale", "signal"):
            assert getattr(x, field) == pytest.approx(getattr(y, field), rel=rtol), field
        assert x.gate_fraction == y.gate_fraction


def test_linear_path_equals_vmap_on_a_relu_mlp_with_ties():
    """float32 ReLU MLP: many coordinates are moved by a single example (SNR exactly 1); with
    the gate margin both paths count the same coordinates."""
    model = relu_mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 4, (24,), generator=g)
    lin = grad_noise(model, F.cross_entropy, (x, y))
    ref = grad_noise(model, F.cross_entropy, (x, y), method="vmap")
    assert (lin.method, ref.method) == ("linear", "vmap")
    assert_same_noise(lin, ref)
    single = (per_example_grads(model, F.cross_entropy, x, y)["2.weight"] != 0).sum(0) == 1
    assert single.sum() > 20  # the ties are really there
    # a subset of the layers, and a regression loss with several outputs per example
    sub = grad_noise(model, F.cross_entropy, (x, y), params=["2", "4.weight"])
    assert sub.method == "linear" and list(sub.mean) == ["2.weight", "2.bias", "4.weight"]
    assert_same_noise(sub, grad_noise(model, F.cross_entropy, (x, y), params=["2", "4.weight"], method="vmap"))
    t = torch.randn(24, 4, generator=g)
    assert_same_noise(grad_noise(model, F.mse_loss, (x, t)), grad_noise(model, F.mse_loss, (x, t), method="vmap"))


class SharedWeight(nn.Module):
    """A Linear whose weight is also read directly in forward: sum_i delta_i a_i^T misses that use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)) + x @ self.fc.weight)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.emb(tokens))


class Sequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):  # (b, t, 5) -> (b, 3): the gradient of an example is a sum over t
        return self.fc(x).mean(1)


@pytest.mark.parametrize("model_cls, make_x", [
    (SharedWeight, lambda g: torch.randn(12, 5, generator=g)),
    (CalledTwice, lambda g: torch.randn(12, 5, generator=g)),
    (Tied, lambda g: torch.randint(0, 7, (12,), generator=g)),
    (Sequence, lambda g: torch.randn(12, 4, 5, generator=g)),
])
def test_models_the_outer_product_does_not_describe_fall_back_to_vmap(model_cls, make_x):
    torch.manual_seed(0)
    model = model_cls().eval()
    g = torch.Generator().manual_seed(1)
    x = make_x(g)
    out = model(x)
    y = torch.randint(0, out.shape[-1], (12,), generator=g)
    auto = grad_noise(model, F.cross_entropy, (x, y))
    assert auto.method == "vmap"
    assert_same_noise(auto, grad_noise(model, F.cross_entropy, (x, y), method="vmap"), rtol=1e-6)
    with pytest.raises(ValueError, match="method='vmap'"):
        grad_noise(model, F.cross_entropy, (x, y), method="linear")


def test_in_place_activation_after_a_linear_is_right_either_way():
    """ReLU(inplace=True) rewrites the Linear's output tensor after the hook saw it: whichever
    path runs, the numbers are the per-example gradients' numbers."""
    model = relu_mlp(inplace=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
    assert_same_noise(grad_noise(model, F.cross_entropy, (x, y)),
                      grad_noise(model, F.cross_entropy, (x, y), method="vmap"))


@pytest.mark.parametrize("loss_fn, kind", [
    (F.cross_entropy, "class"), (F.nll_loss, "logprob"), (F.mse_loss, "real"), (F.l1_loss, "real"),
    (F.smooth_l1_loss, "real"), (F.huber_loss, "real"), (F.binary_cross_entropy_with_logits, "prob"),
    (nn.CrossEntropyLoss(reduction="sum"), "class"), (nn.CrossEntropyLoss(label_smoothing=0.1), "class"),
    (nn.MSELoss(reduction="sum"), "real"), (nn.BCEWithLogitsLoss(), "prob"), (nn.HuberLoss(delta=0.3), "real"),
    (F.cross_entropy, "soft"),
])
def test_known_losses_give_the_per_example_output_gradients_of_a_batch_of_one(loss_fn, kind):
    """The shortcut (b times the batch loss's gradient) against vmap over batches of one."""
    from torch.func import grad as fgrad
    from torch.func import vmap as fvmap

    from lmech.probes.gradnoise_linear import _batch_scale, _output_grads

    g = torch.Generator().manual_seed(0)
    out = torch.randn(9, 5, generator=g, dtype=DT)
    if kind == "logprob":
        out = out.log_softmax(1)
    targets = {"class": torch.randint(0, 5, (9,), generator=g), "logprob": torch.randint(0, 5, (9,), generator=g),
               "real": torch.randn(9, 5, generator=g, dtype=DT), "prob": torch.rand(9, 5, generator=g, dtype=DT),
               "soft": torch.softmax(torch.randn(9, 5, generator=g, dtype=DT), 1)}[kind]
    assert _batch_scale(loss_fn, out, targets) is not None
    want = fvmap(fgrad(lambda o, y: loss_fn(o[None], y[None])))(out, targets)
    torch.testing.assert_close(_output_grads(loss_fn, out, targets), want)


def test_losses_that_are_not_a_plain_mean_of_examples_use_vmap():
    from lmech.probes.gradnoise_linear import _batch_scale, _output_grads

    y = torch.tensor([0, 1, -100, 2])
    out = torch.randn(4, 3, dtype=DT)
    assert _batch_scale(F.cross_entropy, out, y) is None  # ignored targets: a weighted mean
    assert _batch_scale(nn.CrossEntropyLoss(weight=torch.ones(3)), out, y.clamp(min=0)) is None
    assert _batch_scale(nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), out, torch.rand(4, 3)) is None
    assert _batch_scale(lambda o, t: F.cross_entropy(o, t), out, y.clamp(min=0)) is None  # unknown callable
    assert _batch_scale(F.mse_loss, out[:, :1], torch.randn(4)) is None  # (4, 1) vs (4,): broadcasts to 4 x 4
    assert _batch_scale(F.mse_loss, out[:, 0], torch.randn(4)) == 4
    e = _output_grads(F.cross_entropy, out, y)  # vmap: each example a batch of one
    ones = torch.stack([torch.autograd.functional.jacobian(lambda o, i=i: F.cross_entropy(o[None], y[i:i + 1]), out[i])
                        for i in range(4)])
    torch.testing.assert_close(e, ones)
    assert (e[2] == 0).all() and (e[[0, 1, 3]] != 0).all()  # b x the batch gradient would be 4/3 too large


# --------------------------------------------------------------------------------------------
# what is asked only (stderr=, summaries=, precision=) and train-mode BatchNorm (issue 18)
# --------------------------------------------------------------------------------------------


@METHODS
def test_skipping_stderr_and_summaries_keeps_the_rest(method):
    model, x, y = case()
    full = grad_noise(model, F.cross_entropy, (x, y), method=method)
    lean = grad_noise(model, F.cross_entropy, (x, y), method=method, stderr=False)
    coords = grad_noise(model, F.cross_entropy, (x, y), method=method, stderr=False, summaries=False)
    assert coords.total is None and coords.groups == {}
    for name in full.mean:
        torch.testing.assert_close(coords.mean[name], full.mean[name], rtol=1e-12, atol=0)
        torch.testing.assert_close(coords.variance[name], full.variance[name], rtol=1e-12, atol=0)
        torch.testing.assert_close(coords.snr[name], full.snr[name], rtol=1e-12, atol=0, equal_nan=True)
    assert math.isnan(lean.total.snr_stderr) and math.isnan(lean.total.noise_scale_stderr)
    for field in ("grad_norm_sq", "trace_cov", "snr", "mean_gsnr", "gate_fraction", "noise_scale", "signal"):
        assert getattr(lean.total, field) == pytest.approx(getattr(full.total, field), rel=1e-12), field


def test_precision_model_matches_float64_brute_force_on_a_float32_mlp():
    """``precision="model"`` (float32 statistics, BackPACK's arithmetic) against the float64
    per-example gradient matrix of the same float32 model: the per-coordinate error stays at
    float32 rounding where the per-example SNR is small."""
    model, x, y = case()
    m32 = model.float()
    gn = grad_noise(m32, F.cross_entropy, (x.float(), y), method="linear", precision="model")
    assert gn.flat_m2.dtype == torch.float32
    G = flat_grads(m32, x.float(), y).to(DT)
    flat = lambda d: torch.cat([t.reshape(-1) for t in d.values()]).to(DT)  # noqa: E731
    torch.testing.assert_close(flat(gn.mean), G.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat(gn.variance), G.var(0, unbiased=True), rtol=1e-3, atol=1e-7)
    m, tr = G.mean(0), G.var(0, unbiased=True).sum()
    assert gn.total.snr == pytest.approx(float((m @ m) / (tr / G.shape[0])), rel=1e-4)
    with pytest.raises(ValueError, match="precision"):
        grad_noise(m32, F.cross_entropy, (x.float(), y), precision="half")


@pytest.mark.parametrize("bn", [nn.BatchNorm1d, nn.SyncBatchNorm])
def test_train_mode_batchnorm_is_refused_with_a_message(bn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), bn(6), nn.Tanh(), nn.Linear(6, 3)).train()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)") as info:
        grad_noise(model, F.cross_entropy, (x, y))
    assert "\n" not in str(info.value) and "'1'" not in str(info.value) and "1 is a" in str(info.value)
    gn = grad_noise(model.eval(), F.cross_entropy, (x, y))  # eval mode: running statistics, exact
    assert math.isfinite(gn.total.snr)
