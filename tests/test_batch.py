"""lmech.core.batch: dict and nested batches and output= against the plain-tensor path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmech import Monitor
from lmech.core import loss_and_grad, per_example_grads
from lmech.core.batch import ExampleDict, ExampleTuple, ModelCall, adapt, adapt_inputs
from lmech.probes import grad_noise, ntk, sharpness


class Keyword(nn.Module):
    """forward(x, extra=(a, {"b": b}), scale=1.0, flag=True) -> {"logits": ..., "aux": ...}."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.gain = nn.Parameter(torch.tensor(1.5))  # a root-level parameter

    def forward(self, x, extra=None, scale=1.0, flag=True):
        a, rest = extra
        h = self.lin(x * a + rest["b"]) * self.gain * scale
        return {"logits": h if flag else -h, "aux": h.sum()}


def plain(model):
    """The same function with positional tensors and a tensor output (the reference path)."""
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, a, b):
            return self.inner(x, (a, {"b": b}), scale=0.5)["logits"]
    return Plain()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.randint(0, 2, (6,), generator=g)
    torch.manual_seed(0)
    return Keyword().double(), x, a, b, y


def test_model_call_shares_names_tensors_and_training_flag(data):
    model, x, a, b, y = data
    adapted, xs = adapt_inputs(model, {"x": x, "extra": (a, {"b": b}), "scale": 0.5}, "logits")
    assert isinstance(adapted, ModelCall) and len(xs) == 3
    assert [n for n, _ in adapted.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(p is q for p, q in zip(adapted.parameters(), model.parameters()))
    assert adapted.get_parameter("gain") is model.gain
    model.train(); assert adapted.training
    adapted.eval(); assert not model.training and not model.lin.training
    assert torch.equal(adapted(*xs), plain(model)(x, a, b))


def test_dict_batch_gives_the_same_numbers_as_plain_tensors(data):
    model, x, a, b, y = data
    loss = lambda out, t: F.cross_entropy(out, t["y"] if isinstance(t, dict) else t)  # noqa: E731
    batch = {"x": x, "extra": (a, {"b": b}), "scale": 0.5, "y": y}

    class TakesY(nn.Module):  # model(**batch) passes y along; the model ignores it
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x, extra, scale, y):
            return self.m(x, extra, scale=scale)
    ref = plain(model)
    pm = TakesY()
    # sharpness, grad_noise, per-example gradients, loss gradient, NTK: dict == plain
    s_dict = sharpness(pm, loss, batch, k=2, tol=1e-10, output="logits").eigenvalues
    s_ref = sharpness(ref, loss, ((x, a, b), y), k=2, tol=1e-10).eigenvalues
    assert torch.allclose(s_dict, s_ref, rtol=1e-10)
    g_dict = grad_noise(pm, loss, batch, output="logits")
    g_ref = grad_noise(ref, loss, ((x, a, b), y))
    assert torch.allclose(g_dict.flat_mean, g_ref.flat_mean) and g_dict.total.snr == pytest.approx(g_ref.total.snr)
    pe = per_example_grads(pm, loss, batch, None, output="logits")
    pe_ref = per_example_grads(ref, loss, (x, a, b), y)
    assert torch.allclose(pe["m.lin.weight"], pe_ref["inner.lin.weight"])
    lv, lg = loss_and_grad(pm, loss, batch, None, output="logits")
    assert torch.allclose(lg["m.gain"], pe_ref["inner.gain"].mean(0))
    K = ntk(model, {"x": x, "extra": (a, {"b": b}), "scale": 0.5}, output="logits")
    assert torch.allclose(K, ntk(ref, (x, a, b)))


def test_callable_and_index_outputs(data):
    model, x, a, b, y = data
    inputs = {"x": x, "extra": (a, {"b": b}), "scale": 0.5}
    K1 = ntk(model, inputs, output=lambda out: out["logits"][:, :1])
    K2 = ntk(model, inputs, output="logits")
    assert torch.allclose(K1, K2.reshape(6, 2, 6, 2)[:, 0, :, 0])

    class Tuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *args, **kw):
            out = self.m(*args, **kw)
            return out["aux"], out["logits"]
    assert torch.allclose(ntk(Tuple(), inputs, output=1), K2)
    with pytest.raises(ValueError, match="valid index"):
        ntk(Tuple(), inputs, output=5)


def test_targets_slice_along_dim_0():
    t = ExampleDict({"labels": torch.arange(6), "mask": torch.ones(6, 2), "n": 3})
    assert torch.equal(t[:2]["labels"], torch.arange(2)) and t[:2]["n"] == 3
    assert t.unsqueeze(0)["mask"].shape == (1, 6, 2)
    tt = ExampleTuple((torch.arange(6), torch.zeros(6, 3)))
    assert torch.equal(tt[0], torch.arange(6))  # an int is the entry
    assert tt[1:3][1].shape == (2, 3)            # a slice slices every tensor
    y = torch.func.vmap(lambda d: d["labels"] * d["k"])(ExampleDict({"labels": torch.arange(4), "k": 2}))
    assert torch.equal(y, torch.arange(4) * 2)  # a constant entry is passed through, not mapped


def test_tuple_targets_in_per_example_grads():
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y1, y2 = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    loss = lambda o, t: (t[1][:, None] * (o - t[0]) ** 2).mean()  # noqa: E731
    pe = per_example_grads(net, loss, x, (y1, y2))
    for i in range(5):
        g = torch.autograd.grad(loss(net(x[i:i + 1]), (y1[i:i + 1], y2[i:i + 1])), net.weight)[0]
        assert torch.allclose(pe["weight"][i], g)


def test_monitor_with_a_dict_batch_and_output(data):
    model, x, a, b, y = data
    batch = {"x": x, "extra": (a, {"b": b}), "scale": 0.5}
    mon = Monitor(model, lambda out, t: out.pow(2).mean(), batch, probes="full", output="logits", every=1)
    m = mon.step(0)
    assert "ntk/trace" in m and "sharpness/lambda_1" in m and "gradnoise/snr/lin" in m
    assert m["probe/loss"] == pytest.approx(float(model(x, (a, {"b": b}), scale=0.5)["logits"].pow(2).mean()))


@pytest.mark.parametrize("batch, message", [
    (({"x": torch.zeros(4, 3), "m": torch.zeros(5)}, None), "disagree on the number of examples"),
    (({"x": torch.zeros(4, 3), "s": torch.tensor(2.0)}, None), "0-dimensional"),
    (({1: torch.zeros(4, 3)}, None), "keys must be str"),
    (((), None), "empty tuple"),
    ("text", "pair \\(inputs, targets\\) or a dict"),
])
def test_bad_batches_one_line(batch, message):
    with pytest.raises(ValueError, match=message) as err:
        adapt(nn.Linear(3, 2), batch, "logits" if isinstance(batch, tuple) else None)
    assert "\n" not in str(err.value)


def test_plain_batches_pass_through_unchanged():
    net = nn.Linear(3, 2)
    batch = (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    model, out = adapt(net, batch)
    assert model is net and out is batch
