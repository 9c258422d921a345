"""lmech.mup: the abc tables, init stds and learning rates per layer, Table 3 == Table 8, the coordinate check."""

import doctest
import math

import numpy as np
import pytest
import torch

from lmech import mup
from lmech.models import MLP, Transformer
from lmech.mup import coord_check, from_factory, parameterize, table


def mlp(width, **kw):
    return MLP(d_in=12, d_out=3, width=width, depth=2, **kw)


def test_doctests():
    assert doctest.testmod(mup, raise_on_error=True).attempted > 0


# TP-V Table 3 at width multiplier m = 4 (fan_out multiplier 4 for input weights and biases):
# (init std multiplier, lr multiplier); SP values in the comments where they differ.
TABLE3 = {
    ("input", "mup", "sgd"): (1.0, 4.0),     # SGD lr fan_out (SP: 1)
    ("input", "mup", "adam"): (1.0, 1.0),
    ("hidden", "mup", "sgd"): (0.5, 1.0),    # init var 1/fan_in
    ("hidden", "mup", "adam"): (0.5, 0.25),  # Adam lr 1/fan_in (SP: 1)
    ("output", "mup", "sgd"): (0.25, 0.25),  # init var 1/fan_in^2 (SP: 1/fan_in); SGD lr 1/fan_in (SP: 1)
    ("output", "mup", "adam"): (0.25, 0.25),
    ("input", "sp", "sgd"): (1.0, 1.0),
    ("hidden", "sp", "adam"): (0.5, 1.0),
    ("output", "sp", "sgd"): (0.5, 1.0),
    ("output", "sp", "adam"): (0.5, 1.0),
    ("hidden", "ntk", "sgd"): (0.5, 0.25),   # W = w / sqrt(n): SGD lr / n
    ("output", "ntk", "sgd"): (0.5, 0.25),
    ("input", "ntk", "sgd"): (1.0, 1.0),
}


@pytest.mark.parametrize("key", list(TABLE3))
def test_table_matches_tp5_table3(key):
    kind, par, opt = key
    init, lr, mult = table(kind, par, opt, m_in=1.0 if kind == "input" else 4.0, m_out=4.0 if kind != "output" else 1.0)
    assert (init, lr) == pytest.approx(TABLE3[key])
    assert mult == 1.0


def test_mlp_kinds_and_per_layer_learning_rates():
    torch.manual_seed(0)
    mp = from_factory(mlp, width=256, base_width=64, parameterization="mup", optimizer="sgd")
    info = {i.name: i for i in mp.infos}
    assert {n: i.kind for n, i in info.items()} == {
        "layers.0.weight": "input", "layers.0.bias": "input", "layers.1.weight": "hidden",
        "layers.1.bias": "input", "layers.2.weight": "output", "layers.2.bias": "input"}
    # SGD muP: input weights and biases fan_out (4), hidden 1, readout 1/fan_in, readout bias (finite) 1
    assert {n: i.lr_mult for n, i in info.items()} == {
        "layers.0.weight": 4.0, "layers.0.bias": 4.0, "layers.1.weight": 1.0, "layers.1.bias": 4.0,
        "layers.2.weight": 0.25, "layers.2.bias": 1.0}
    opt = mp.optimizer(lr=0.1)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in mp.model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(0.1 * info[name].lr_mult)


@pytest.mark.parametrize("par", ["sp", "mup", "ntk"])
def test_init_stds_follow_the_table(par):
    """MLP (relu) base init: N(0, 2/fan_in) hidden, N(0, 1/fan_in) readout; at width 1024 vs base 64."""
    torch.manual_seed(0)
    m = 1024 / 64
    mp = from_factory(lambda w: MLP(d_in=64, d_out=32, width=w, depth=2), 1024, 64, par, "adam")
    p = dict(mp.model.named_parameters())
    expected = {
        "layers.0.weight": math.sqrt(2 / 64),                                  # input: unchanged
        "layers.1.weight": math.sqrt(2 / 64) / math.sqrt(m),                    # hidden: 1/sqrt(m)
        "layers.2.weight": math.sqrt(1 / 64) / (m if par == "mup" else math.sqrt(m)),
    }
    for name, std in expected.items():
        w = p[name].detach().double()
        se = std / math.sqrt(2 * w.numel())  # std error of an RMS estimate
        base_se = std / math.sqrt(2 * 64 * min(w.shape))  # base_std was measured on the base model
        assert float(w.pow(2).mean().sqrt()) == pytest.approx(std, abs=5 * (se + base_se)), name
    assert all(float(p[f"layers.{i}.bias"].detach().abs().max()) == 0.0 for i in range(3))  # constant init kept


def test_base_width_reproduces_the_models_own_parameterization():
    for par in ("sp", "mup", "ntk"):
        torch.manual_seed(0)
        mp = from_factory(mlp, 64, 64, par, "adam")
        assert all(i.lr_mult == 1.0 and i.multiplier == 1.0 for i in mp.infos)
        assert [i.kind for i in mp.infos if i.name.endswith("weight")] == ["input", "hidden", "output"]
        for i in mp.infos:
            if i.name.endswith("weight"):
                assert i.init_std == pytest.approx(i.base_std)


def _train(mp, x, y, lr, steps, **kw):
    opt = mp.optimizer(lr, **kw)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(mp.model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return mp.model(x)


@pytest.mark.parametrize("optimizer,tol", [("sgd", 1e-10), ("adam", 1e-10)])
def test_readout_multiplier_form_trains_identically_to_table3(optimizer, tol):
    """TP-V Table 8 (readout multiplier 1/m, Theta(1) init, lr m for SGD / 1 for Adam) == Table 3
    (Adam with a negligible eps: eps is the one term that is not invariant to the gradient scale)."""
    x = torch.randn(32, 12, dtype=torch.float64)
    y = torch.randn(32, 3, dtype=torch.float64)
    factory = lambda w: mlp(w).double()
    outs = []
    for form in (False, True):
        torch.manual_seed(3)
        mp = from_factory(factory, 256, 64, "mup", optimizer, readout_multiplier=form)
        kw = {} if optimizer == "sgd" else {"eps": 1e-30}
        outs.append(_train(mp, x, y, lr=0.05 if optimizer == "sgd" else 1e-3, steps=5, **kw))
    assert torch.allclose(outs[0], outs[1], rtol=tol, atol=tol)
    torch.manual_seed(3)
    mp = from_factory(factory, 256, 64, "mup", optimizer, readout_multiplier=True)
    out_hooked = mp.model(x)
    mp.remove()
    assert not torch.allclose(out_hooked, mp.model(x))  # the multiplier lives in the hook


def test_transformer_kinds_attention_scale_and_zero_query():
    def factory(d):
        return Transformer(vocab_size=11, seq_len=5, n_out=7, d_model=d, n_heads=2, n_layers=1, d_mlp=4 * d)

    torch.manual_seed(0)
    mp = from_factory(factory, 128, 32, "mup", "adam", zero_query=True, zero_readout=True)
    kinds = {i.name: i.kind for i in mp.infos}
    assert kinds["tok_emb.weight"] == kinds["pos_emb.weight"] == "input"
    assert kinds["blocks.0.attn.qkv.weight"] == kinds["blocks.0.fc_in.weight"] == "hidden"
    assert kinds["blocks.0.fc_out.weight"] == kinds["blocks.0.attn.proj.weight"] == "hidden"
    assert kinds["unembed.weight"] == "output" and kinds["blocks.0.ln1.weight"] == "input"
    attn = mp.model.blocks[0].attn
    assert attn.scale == pytest.approx(math.sqrt(16) / 64)  # sqrt(base d_head) / d_head
    qkv = attn.qkv.weight.detach()
    assert float(qkv[:128].abs().max()) == 0.0 and float(qkv[128:].abs().max()) > 0
    assert float(mp.model.unembed.weight.detach().abs().max()) == 0.0
    assert mp.lr_mults()["blocks.0.attn.qkv.weight"] == pytest.approx(0.25)
    assert mp.lr_mults()["tok_emb.weight"] == 1.0
    # SP leaves the standard 1/sqrt(d_head) scale
    assert from_factory(factory, 128, 32, "sp", "adam").model.blocks[0].attn.scale is None


def _slopes(df, step):
    out = {}
    g = df[df.step == step].groupby(["module", "width"])["l1"].mean().reset_index()
    for module, gg in g.groupby("module"):
        out[module] = np.polyfit(np.log2(gg["width"]), np.log2(gg["l1"]), 1)[0]
    return out


def test_coordinate_check_is_flat_under_mup_and_grows_under_sp():
    torch.manual_seed(0)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    common = dict(widths=(64, 256, 1024), batch=(x, y), loss_fn=torch.nn.functional.cross_entropy,
                  base_width=64, optimizer="adam", lr=0.02, steps=3, seeds=(0,))
    df_mup = coord_check(mlp, parameterization="mup", **common)
    df_sp = coord_check(mlp, parameterization="sp", **common)
    assert set(df_mup.columns) == {"width", "seed", "step", "module", "l1", "delta_l1"}
    assert set(df_mup["module"]) == {"layers.0", "layers.1", "layers.2"}
    mup_slopes, sp_slopes = _slopes(df_mup, 3), _slopes(df_sp, 3)
    assert max(abs(s) for s in mup_slopes.values()) < 0.15, mup_slopes
    assert sp_slopes["layers.2"] > 0.4 and sp_slopes["layers.1"] > 0.3, sp_slopes


@pytest.mark.parametrize("call,match", [
    (lambda: table("hidden", "xp", "adam", 2.0), "unknown parameterization"),
    (lambda: table("hidden", "mup", "lion", 2.0), "optimizer"),
    (lambda: table("hidden", "mup", "adam", 0.0), "positive"),
    (lambda: from_factory(mlp, 128, 64, "sp", "adam", readout_multiplier=True), "readout_multiplier"),
    (lambda: parameterize(mlp(128), MLP(12, 3, width=64, depth=1)), "lacks parameters"),
    (lambda: from_factory(mlp, 128, 64).param_groups(-1.0), "lr must be"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
