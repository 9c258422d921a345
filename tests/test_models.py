"""Tests for lmech.models: shapes, causality, init statistics, parameter counts, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from lmech.models import (
    CNN1D,
    MLP,
    MODELS,
    DeepLinear,
    Transformer,
    build_model,
    transformer_num_params,
)


def _finite_grads(model: torch.nn.Module, out: torch.Tensor) -> None:
    model.zero_grad()
    (out.float() ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"


# --------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "silu", "identity", "linear", "quadratic"])
def test_mlp_shapes_features_grads(activation):
    torch.manual_seed(0)
    net = MLP(d_in=6, d_out=3, width=16, depth=3, activation=activation)
    x = torch.randn(5, 6)
    out = net(x)
    assert out.shape == (5, 3)
    feats = net.features(x)
    assert len(feats) == 3 and all(h.shape == (5, 16) for h in feats)
    assert len(net.layers) == 4 and all(isinstance(l, torch.nn.Linear) for l in net.layers)
    torch.testing.assert_close(net.layers[-1](feats[-1]), out)
    _finite_grads(net, out)


def test_mlp_depth_zero_and_no_bias():
    net = MLP(4, 2, depth=0, bias=False)
    assert len(net.layers) == 1 and net.layers[0].bias is None
    assert net.features(torch.randn(3, 4)) == []


@pytest.mark.parametrize("activation,c_hidden", [("relu", 2.0), ("tanh", 1.0)])
def test_mlp_init_std_matches_formula(activation, c_hidden):
    torch.manual_seed(1)
    d_in, width, scale = 100, 400, 0.7
    net = MLP(d_in, 10, width=width, depth=2, activation=activation, init_scale=scale)
    fans = [d_in, width, width]
    cs = [c_hidden, c_hidden, 1.0]
    assert net.init_constants == cs
    for layer, fan_in, c in zip(net.layers, fans, cs):
        expected = scale * math.sqrt(c / fan_in)
        w = layer.weight.detach()
        # std of the sample std of n iid normals is about sigma / sqrt(2 n)
        tol = 5 * expected / math.sqrt(2 * w.numel())
        assert abs(float(w.std()) - expected) < tol
        assert abs(float(w.mean())) < 5 * expected / math.sqrt(w.numel())
        assert torch.count_nonzero(layer.bias) == 0


def test_mlp_deterministic_under_manual_seed():
    torch.manual_seed(3)
    a = MLP(5, 2, width=8)
    torch.manual_seed(3)
    b = MLP(5, 2, width=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


# --------------------------------------------------------------------------- DeepLinear
@pytest.mark.parametrize("init", ["gaussian", "balanced"])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_deep_linear_end_to_end(init, depth):
    torch.manual_seed(0)
    net = DeepLinear(d_in=5, d_out=3, width=7, depth=depth, init_scale=0.5, init=init)
    w = net.end_to_end()
    assert w.shape == (3, 5) and len(net.layers) == depth
    assert all(layer.bias is None for layer in net.layers)
    x = torch.randn(9, 5)
    out = net(x)
    assert out.shape == (9, 3)
    torch.testing.assert_close(out, x @ w.T, atol=1e-6, rtol=1e-5)
    _finite_grads(net, out)


def test_deep_linear_inits():
    torch.manual_seed(0)
    g = DeepLinear(50, 40, width=60, depth=3, init_scale=1e-3)
    for w in g.weights():
        assert abs(float(w.detach().std()) - 1e-3) < 1e-4
    net = DeepLinear(5, 3, width=7, depth=4, init_scale=0.5, init="balanced")
    ws = net.weights()
    for a, b in zip(ws[:-1], ws[1:]):
        torch.testing.assert_close(b.T @ b, a @ a.T, atol=1e-6, rtol=0)
    sv = torch.linalg.svdvals(net.end_to_end())
    torch.testing.assert_close(sv, torch.full((3,), 0.5**4), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        DeepLinear(3, 3, 3, depth=0)


# --------------------------------------------------------------------------- Transformer
def test_transformer_shapes_and_param_count():
    torch.manual_seed(0)
    net = Transformer(vocab_size=99, seq_len=4, n_out=97)
    n = sum(p.numel() for p in net.parameters())
    assert n == transformer_num_params(99, 4, 97) == 422_497
    tokens = torch.randint(0, 99, (6, 4))
    assert net(tokens).shape == (6, 97)
    net_all = Transformer(99, 4, 97, output="all", n_layers=1, d_model=32, d_mlp=64)
    assert net_all(tokens).shape == (6, 4, 97)
    assert net_all(tokens[:, :3]).shape == (6, 3, 97)
    feats = net.features(tokens)
    assert len(feats) == 3 and all(f.shape == (6, 4, 128) for f in feats)
    nolnt = Transformer(20, 5, 7, d_model=16, n_heads=2, n_layers=1, d_mlp=32, layer_norm=False)
    assert sum(p.numel() for p in nolnt.parameters()) == transformer_num_params(
        20, 5, 7, d_model=16, n_layers=1, d_mlp=32, layer_norm=False
    )
    with pytest.raises(ValueError):
        net(torch.randint(0, 99, (2, 5)))


@pytest.mark.parametrize("layer_norm", [True, False])
def test_transformer_causal(layer_norm):
    torch.manual_seed(0)
    net = Transformer(11, 6, 5, d_model=16, n_heads=2, n_layers=2, d_mlp=32,
                      layer_norm=layer_norm, output="all").eval()
    tokens = torch.randint(0, 11, (3, 6))
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 11
    a, b = net(tokens), net(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-6, rtol=0)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-6


def test_transformer_grads_and_determinism():
    torch.manual_seed(5)
    a = Transformer(13, 4, 11, d_model=16, n_heads=4, n_layers=2, d_mlp=32, dropout=0.1)
    torch.manual_seed(5)
    b = Transformer(13, 4, 11, d_model=16, n_heads=4, n_layers=2, d_mlp=32, dropout=0.1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    tokens = torch.randint(0, 13, (8, 4))
    out = a(tokens)
    loss = torch.nn.functional.cross_entropy(out, torch.randint(0, 11, (8,)))
    a.zero_grad()
    loss.backward()
    for name, p in a.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------- CNN1D
def test_cnn1d_shapes_grads():
    torch.manual_seed(0)
    net = CNN1D(in_len=40, n_classes=10, channels=8)
    x = torch.randn(4, 40)
    out = net(x)
    assert out.shape == (4, 10)
    torch.testing.assert_close(net(x.unsqueeze(1)), out)
    assert [f.shape[-1] for f in net.features(x)] == [19, 10, 5]
    assert sum(p.numel() for p in CNN1D(channels=25).parameters()) == 5210
    _finite_grads(net, out)


# --------------------------------------------------------------------------- registry
def test_build_model_registry():
    assert set(MODELS) == {"mlp", "deep-linear", "transformer", "cnn1d"}
    assert isinstance(build_model("mlp", d_in=3, d_out=2, width=4), MLP)
    assert isinstance(build_model("deep_linear", d_in=3, d_out=2, width=4, depth=2), DeepLinear)
    assert isinstance(build_model("cnn1d"), CNN1D)
    assert isinstance(build_model("transformer", vocab_size=5, seq_len=3, n_out=2, d_model=8,
                                  n_heads=2, d_mlp=16), Transformer)
    with pytest.raises(ValueError, match="valid names:.*mlp"):
        build_model("resnet50")


def test_transformer_last_position_path_equals_the_full_forward():
    # forward() runs the last block at the last position only; the full computation (every block at
    # every position, then the last row) must give the same outputs and the same gradients
    from lmech.models import Transformer

    torch.manual_seed(0)
    net = Transformer(vocab_size=13, seq_len=5, n_out=7, d_model=16, n_heads=4, n_layers=3).double()
    tokens = torch.randint(0, 13, (9, 5))

    def full(m):
        return m.unembed(m.ln_f(m.features(tokens)[-1][:, -1]))

    fast = net(tokens)
    torch.testing.assert_close(fast, full(net), rtol=1e-12, atol=1e-13)
    grads = [torch.autograd.grad(f.pow(2).sum(), list(net.parameters())) for f in (net(tokens), full(net))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
