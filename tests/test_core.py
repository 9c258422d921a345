"""lmech.core: every torch.func product against an explicit autograd reference.

The reference path does not use torch.func: it deep-copies the model, removes the selected
Parameters and installs slices of one flat vector theta in their place (every tied alias gets
the same slice), then uses torch.autograd.functional.jacobian / hessian and plain autograd.grad.
"""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmech.core as core
from lmech.core import (
    FunctionalModel,
    flatten,
    hvp,
    jacobian,
    jvp,
    loss_and_grad,
    per_example_grads,
    tree_add,
    tree_dot,
    tree_scale,
    unflatten,
    vjp,
)

# torch's own forward-AD decompositions are loaded through torch.jit.script on first use
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

DT = torch.float64
TOL = dict(rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------


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
        self.out.weight = self.emb.weight  # tied

    def forward(self, x):  # (b, t) long -> (b, t, 7)
        return self.out(torch.tanh(self.hid(self.emb(x))))


def mse(o, y):
    return 0.5 * ((o - y) ** 2).mean()


def ce_seq(o, y):
    return F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1))


def make_case(name):
    """(model in eval mode, inputs, targets, loss_fn), float64, deterministic."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    b = 4
    if name == "mlp":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3))
        x = torch.randn(b, 3, generator=g, dtype=DT)
        y = torch.randint(0, 3, (b,), generator=g)
        loss_fn = F.cross_entropy
    elif name == "embedding":
        model = EmbModel()
        x = torch.randint(0, 7, (b, 3), generator=g)
        x[0, 0] = x[1, 1] = x[1, 2]  # repeated tokens: scatter-add in the backward
        y = torch.randint(0, 4, (b,), generator=g)
        loss_fn = F.cross_entropy
    elif name == "tied":
        model = TiedModel()
        x = torch.randint(0, 7, (b, 3), generator=g)
        y = torch.randint(0, 7, (b, 3), generator=g)
        loss_fn = ce_seq
    elif name == "batchnorm":
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
        bn = model[1]
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(4, generator=g))
            bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(4, generator=g))
        x = torch.randn(b, 3, generator=g, dtype=DT)
        y = torch.randn(b, 2, generator=g, dtype=DT)
        loss_fn = mse
    elif name == "out3d":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        x = torch.randn(b, 3, 3, generator=g, dtype=DT)  # (b, t, c) -> (b, t, 2)
        y = torch.randn(b, 3, 2, generator=g, dtype=DT)
        loss_fn = mse
    else:
        raise KeyError(name)
    model = model.to(DT).eval()
    return model, x, y, loss_fn


CASES = ["mlp", "embedding", "tied", "batchnorm", "out3d"]


@pytest.fixture(params=CASES)
def case(request):
    return make_case(request.param)


# ------------------------------------------------------------------------------------------
# reference path (no torch.func)
# ------------------------------------------------------------------------------------------


def make_ref(model, names):
    """theta -> f(x; theta), by installing slices of theta into a deep copy of the model."""
    canon = dict(model.named_parameters())
    every = list(model.named_parameters(remove_duplicate=False))
    groups = {n: [a for a, p in every if p is canon[n]] for n in names}
    shapes = [canon[n].shape for n in names]
    sizes = [canon[n].numel() for n in names]
    m = copy.deepcopy(model)

    def owner(dotted):
        mod_name, _, attr = dotted.rpartition(".")
        return m.get_submodule(mod_name), attr

    for n in names:
        for a in groups[n]:
            mod, attr = owner(a)
            del mod._parameters[attr]

    def f(theta, *xs):
        for n, piece, shape in zip(names, torch.split(theta, sizes), shapes):
            for a in groups[n]:
                mod, attr = owner(a)
                setattr(mod, attr, piece.view(shape))
        return m(*xs)

    theta0 = torch.cat([canon[n].detach().reshape(-1) for n in names]).clone()
    return f, theta0


def flat_cols(tree, lead_shape):
    """dict of (*lead, *param.shape) -> (*lead, P)."""
    return torch.cat([t.reshape(*lead_shape, -1) for t in tree.values()], dim=-1)


def rand_like_tree(tree, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in tree.items()}


# ------------------------------------------------------------------------------------------
# products vs explicit references, for every model
# ------------------------------------------------------------------------------------------


def test_loss_and_grad(case):
    model, x, y, loss_fn = case
    fm = FunctionalModel(model)
    f, th = make_ref(model, fm.names)
    th = th.requires_grad_()
    ref_loss = loss_fn(f(th, x), y)
    (ref_g,) = torch.autograd.grad(ref_loss, th)
    loss, g = loss_and_grad(model, loss_fn, x, y)
    assert list(g) == fm.names
    torch.testing.assert_close(loss, ref_loss.detach(), **TOL)
    torch.testing.assert_close(flatten(g), ref_g, **TOL)
    assert loss.grad_fn is None and all(t.grad_fn is None for t in g.values())


def test_jacobian_jvp_vjp(case):
    model, x, y, loss_fn = case
    fm = FunctionalModel(model)
    f, th = make_ref(model, fm.names)
    out_ref = f(th, x).detach()
    J_ref = torch.autograd.functional.jacobian(lambda t: f(t, x), th)  # (*out, P)
    out_shape = out_ref.shape
    assert J_ref.shape == (*out_shape, fm.numel)

    J = jacobian(model, x)
    assert list(J) == fm.names
    for n, j in J.items():
        assert j.shape == (*out_shape, *fm.shapes[n])
    torch.testing.assert_close(flat_cols(J, out_shape), J_ref, **TOL)

    v = rand_like_tree(fm.params, 2)
    out, jv = jvp(model, x, v)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(jv, J_ref @ flatten(v), **TOL)

    u = torch.randn(out_shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    g = vjp(model, x, u)
    assert list(g) == fm.names
    ref = (u.reshape(-1) @ J_ref.reshape(-1, fm.numel))
    torch.testing.assert_close(flatten(g), ref, **TOL)
    # adjoint identity <u, J v> = <J^T u, v>
    torch.testing.assert_close((u * jv).sum(), tree_dot(g, v), **TOL)


def test_hvp(case):
    model, x, y, loss_fn = case
    fm = FunctionalModel(model)
    f, th = make_ref(model, fm.names)
    H = torch.autograd.functional.hessian(lambda t: loss_fn(f(t, x), y), th)
    v = rand_like_tree(fm.params, 4)
    hv = hvp(model, loss_fn, x, y, v)
    assert list(hv) == fm.names
    torch.testing.assert_close(flatten(hv), H @ flatten(v), **TOL)


def test_per_example_grads(case):
    model, x, y, loss_fn = case
    fm = FunctionalModel(model)
    f, th = make_ref(model, fm.names)
    th = th.requires_grad_()
    ref = torch.stack(
        [
            torch.autograd.grad(loss_fn(f(th, x[i : i + 1]), y[i : i + 1]), th)[0]
            for i in range(len(x))
        ]
    )
    g = per_example_grads(model, loss_fn, x, y)
    assert list(g) == fm.names
    for n, t in g.items():
        assert t.shape == (len(x), *fm.shapes[n])
    torch.testing.assert_close(flat_cols(g, (len(x),)), ref, **TOL)
    g2 = per_example_grads(model, loss_fn, x, y, chunk_size=3)
    torch.testing.assert_close(flatten(g2), flatten(g), **TOL)


def test_no_side_effects(case):
    """Mode, parameters, buffers and the global RNG are untouched (mlp has an eval Dropout)."""
    model, x, y, loss_fn = case
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    rng = torch.get_rng_state()
    v = rand_like_tree(FunctionalModel(model).params, 5)

    loss_and_grad(model, loss_fn, x, y)
    per_example_grads(model, loss_fn, x, y)
    out, _ = jvp(model, x, v)
    vjp(model, x, torch.ones_like(out))
    hvp(model, loss_fn, x, y, v)
    jacobian(model, x)

    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, t in model.state_dict(keep_vars=True).items():
        assert torch.equal(t, state[k]), k
        assert t.grad is None, k


def test_batchnorm_train_mode_runs_as_is_without_touching_buffers():
    """In train mode BN uses batch statistics (as the module does) and its running stats stay."""
    model, x, y, loss_fn = make_case("batchnorm")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fm = FunctionalModel(model)
    f, th = make_ref(model, fm.names)
    th = th.requires_grad_()
    ref_loss = loss_fn(f(th, x), y)
    (ref_g,) = torch.autograd.grad(ref_loss, th)
    loss, g = loss_and_grad(model, loss_fn, x, y)
    torch.testing.assert_close(flatten(g), ref_g, **TOL)
    H = torch.autograd.functional.hessian(lambda t: loss_fn(f(t, x), y), th.detach())
    v = rand_like_tree(fm.params, 6)
    torch.testing.assert_close(flatten(hvp(model, loss_fn, x, y, v)), H @ flatten(v), **TOL)
    jvp(model, x, v)
    assert model.training and model[1].training
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k


# ------------------------------------------------------------------------------------------
# parameter selection
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selector, expected",
    [
        ("0", ["0.weight", "0.bias"]),
        (["3.bias", "0.weight"], ["0.weight", "3.bias"]),
        ("3.weight", ["3.weight"]),
        (lambda n, p: n.endswith("bias"), ["0.bias", "3.bias"]),
    ],
)
def test_param_subset(selector, expected):
    model, x, y, loss_fn = make_case("mlp")
    fm = FunctionalModel(model, selector)
    assert fm.names == expected
    assert set(fm.frozen) == {n for n, _ in model.named_parameters()} - set(expected)
    assert fm.numel == sum(fm.shapes[n].numel() for n in expected)

    # reference: full-parameter quantities restricted to the subset's coordinates
    full = FunctionalModel(model)
    f, th = make_ref(model, full.names)
    idx_tree = unflatten(torch.arange(full.numel), full.params)
    idx = torch.cat([idx_tree[n].reshape(-1) for n in expected])

    H = torch.autograd.functional.hessian(lambda t: loss_fn(f(t, x), y), th)
    v = rand_like_tree(fm.params, 7)
    hv = hvp(model, loss_fn, x, y, v, params=selector)
    torch.testing.assert_close(flatten(hv), H[idx][:, idx] @ flatten(v), **TOL)

    _, g = loss_and_grad(model, loss_fn, x, y, params=selector)
    _, g_full = loss_and_grad(model, loss_fn, x, y)
    torch.testing.assert_close(flatten(g), flatten(g_full)[idx], **TOL)

    J = jacobian(model, x, params=selector)
    J_full = jacobian(model, x)
    torch.testing.assert_close(flat_cols(J, (4, 3)), flat_cols(J_full, (4, 3))[..., idx], **TOL)

    pe = per_example_grads(model, loss_fn, x, y, params=selector)
    pe_full = per_example_grads(model, loss_fn, x, y)
    torch.testing.assert_close(flat_cols(pe, (4,)), flat_cols(pe_full, (4,))[:, idx], **TOL)


def test_frozen_params_and_tied_aliases():
    model, x, y, loss_fn = make_case("mlp")
    model[0].bias.requires_grad_(False)
    assert FunctionalModel(model).names == ["0.weight", "3.weight", "3.bias"]
    assert FunctionalModel(model, "0.bias").names == ["0.bias"]  # explicit name still selectable

    tied, *_ = make_case("tied")
    fm = FunctionalModel(tied)
    assert fm.names == ["emb.weight", "hid.weight", "hid.bias"]  # tied tensor listed once
    assert FunctionalModel(tied, "out").names == ["emb.weight"]  # alias resolves to canonical


def test_unknown_name_error():
    model, *_ = make_case("mlp")
    with pytest.raises(ValueError) as e:
        FunctionalModel(model, ["0.weight", "layers.0"])
    msg = str(e.value)
    assert "'layers.0'" in msg and "\n" not in msg
    for n, _ in model.named_parameters():
        assert n in msg
    with pytest.raises(ValueError, match="matches nothing"):
        FunctionalModel(model, "0.w")  # prefixes are dotted, not string prefixes
    with pytest.raises(ValueError, match="selected nothing"):
        FunctionalModel(model, lambda n, p: False)
    with pytest.raises(ValueError, match="empty"):
        FunctionalModel(model, [])
    tied, *_ = make_case("tied")
    with pytest.raises(ValueError, match=r"out\.weight->emb\.weight"):
        FunctionalModel(tied, "nope")


def test_key_mismatch_and_functional_model_input():
    model, x, y, loss_fn = make_case("mlp")
    fm = FunctionalModel(model, "3")
    v = rand_like_tree(fm.params, 8)
    with pytest.raises(ValueError, match="missing"):
        jvp(model, x, v)  # v covers only layer 3, params=None selects all
    _, jv = jvp(model, x, v, params="3")
    _, jv2 = jvp(fm, x, v)  # a FunctionalModel carries its own selection
    torch.testing.assert_close(jv, jv2, **TOL)
    with pytest.raises(ValueError, match="only with an nn.Module"):
        jvp(fm, x, v, params="3")
    with pytest.raises(ValueError, match="unknown parameter"):
        fm({"bogus": torch.zeros(1)}, x)


def test_functional_call_semantics():
    """fm(params, x) evaluates at the given params; missing selected names keep current values."""
    model, x, *_ = make_case("tied")
    fm = FunctionalModel(model)
    torch.testing.assert_close(fm(fm.params, x), model(x), **TOL)
    w = fm.params["emb.weight"] * 2.0
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.emb.weight.mul_(2.0)  # tied: the output layer changes too
    torch.testing.assert_close(fm({"emb.weight": w}, x), ref(x), **TOL)
    assert fm.numel == 7 * 4 + 4 * 4 + 4


def test_multiple_inputs():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 3)
            self.b = nn.Linear(1, 3)

        def forward(self, x, z):
            return torch.tanh(self.a(x) * self.b(z))

    torch.manual_seed(0)
    model = TwoIn().to(DT)
    x, z, y = torch.randn(3, 2, dtype=DT), torch.randn(3, 1, dtype=DT), torch.randn(3, 3, dtype=DT)
    g = per_example_grads(model, mse, (x, z), y)
    loop = [
        loss_and_grad(model, mse, (x[i : i + 1], z[i : i + 1]), y[i : i + 1])[1] for i in range(3)
    ]
    torch.testing.assert_close(flat_cols(g, (3,)), torch.stack([flatten(t) for t in loop]), **TOL)
    v = rand_like_tree(FunctionalModel(model).params, 9)
    out, jv = jvp(model, (x, z), v)
    assert out.shape == jv.shape == (3, 3)


def test_memory_budget_refusal():
    model, x, y, loss_fn = make_case("mlp")
    with pytest.raises(MemoryError, match="max_bytes"):
        jacobian(model, x, max_bytes=100)
    with pytest.raises(MemoryError, match="max_bytes"):
        per_example_grads(model, loss_fn, x, y, max_bytes=100)
    J1 = jacobian(model, x, chunk_size=5, max_bytes=None)
    torch.testing.assert_close(flatten(J1), flatten(jacobian(model, x)), **TOL)


# ------------------------------------------------------------------------------------------
# tree helpers and docs
# ------------------------------------------------------------------------------------------


def test_tree_helpers():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, -1.0])}
    b = {"b": torch.tensor([2.0, 3.0]), "w": torch.ones(2, 3)}
    vec = flatten(a)
    assert vec.tolist() == [0, 1, 2, 3, 4, 5, 1, -1]
    back = unflatten(vec, a)
    assert list(back) == ["w", "b"] and all(torch.equal(back[k], a[k]) for k in a)
    assert tree_dot(a, b).item() == 15.0 + 2.0 - 3.0
    s = tree_add(a, b, alpha=2.0)
    assert torch.equal(s["w"], a["w"] + 2) and torch.equal(s["b"], torch.tensor([5.0, 5.0]))
    assert torch.equal(tree_scale(a, -1.0)["b"], -a["b"])
    with pytest.raises(ValueError, match="entries"):
        unflatten(torch.zeros(7), a)
    with pytest.raises(ValueError, match="keys differ"):
        tree_dot(a, {"w": a["w"]})


def test_public_api_and_docstring_examples():
    for name in core.__all__:
        assert hasattr(core, name)
    res = doctest.testmod(core.functional, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 10 and res.failed == 0


def test_fused_attention_products_outside_any_context():
    """A Transformer using F.scaled_dot_product_attention (fused kernel by default): jvp, hvp,
    per-example gradients and the Jacobian work without the caller entering
    differentiable_kernels(), with no vmap fallback, and match the explicit reference path
    (autograd.functional on the math backend)."""
    import warnings

    from lmech.models import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=11, seq_len=4, n_out=5, d_model=8, n_heads=2, n_layers=1,
                        d_mlp=16).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (3, 4), generator=g), torch.randint(0, 5, (3,), generator=g)
    fm = FunctionalModel(model)
    f, th = make_ref(model, fm.names)
    v = rand_like_tree(fm.params, 5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")  # no slow vmap fallback
        hv = hvp(model, F.cross_entropy, x, y, v)
        out, jv = jvp(model, x, v)
        pe = per_example_grads(model, F.cross_entropy, x, y)
        J = jacobian(model, x)
    with core.differentiable_kernels():  # the reference needs the math backend too
        H = torch.autograd.functional.hessian(lambda t: F.cross_entropy(f(t, x), y), th)
        J_ref = torch.autograd.functional.jacobian(lambda t: f(t, x), th)
        pe_ref = torch.stack([torch.autograd.functional.jacobian(
            lambda t, i=i: F.cross_entropy(f(t, x[i:i + 1]), y[i:i + 1]), th) for i in range(3)])
    torch.testing.assert_close(flatten(hv), H @ flatten(v), **TOL)
    torch.testing.assert_close(jv, J_ref @ flatten(v), **TOL)
    torch.testing.assert_close(out, model(x), **TOL)
    torch.testing.assert_close(flat_cols(pe, (3,)), pe_ref, **TOL)
    torch.testing.assert_close(flat_cols(J, out.shape), J_ref, **TOL)
    # the probes' import path still works
    from lmech.probes.base import differentiable_kernels
    assert differentiable_kernels is core.differentiable_kernels
