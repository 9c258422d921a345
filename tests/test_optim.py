"""lmech.optim: PopRiskAdamW (against AdamW, hand-computed gates and a plain reference), the exact
leave-one-out mode, Grokfast, and the build_optimizer registry."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from lmech.optim import OPTIMIZERS, Grokfast, PopRiskAdamW, build_optimizer
from lmech.optim.poprisk import (HARD_TIE_EPS, REDUCTIONS, batch_noise, compare_noise_proxy, leave_one_out_term,
                                 resolve_alpha)


# --------------------------------------------------------------------------------------------
# A plain per-parameter reference implementation of Algorithm 1, in bias-corrected ("hat") units
# --------------------------------------------------------------------------------------------


def reference_gate(m_hat, s_hat, gate, softness, alpha, gate_eps, reduction):
    if reduction == "tensor":
        m2, s = (m_hat * m_hat).sum(), s_hat.sum()
    else:
        m2, s = m_hat * m_hat, s_hat
    if gate == "none":
        return torch.ones_like(m2)
    if gate == "hard":  # ties within rounding count as closed
        tau = HARD_TIE_EPS * torch.finfo(m_hat.dtype).eps
        return (m2 - alpha * s > tau * (m2 + alpha * s)).to(m_hat.dtype)
    if gate == "soft":
        d = (m2 - alpha * s).clamp_min(0)
        return d / (d + softness * s + gate_eps)
    return m2 / (m2 + softness * alpha * s + gate_eps)  # snr


class ReferencePopRisk:
    """Algorithm 1 written out per parameter with every temporary (only for tests)."""

    def __init__(self, groups):
        self.groups = groups  # list of dicts: params + every hyperparameter (full, no defaults)
        self.state = {}
        self.last_q = {}

    @torch.no_grad()
    def step(self):
        for gr in self.groups:
            b1, b2 = gr["betas"]
            rho = gr["rho"]
            alpha = resolve_alpha(gr["alpha"], gr.get("batch_size"), gr.get("dataset_size"))
            for p in gr["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state.setdefault(p, dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                                                   s=torch.zeros_like(p)))
                st["t"] += 1
                t = st["t"]
                st["s"] = rho * st["s"] + (1 - rho) * (g - st["m"]) ** 2
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                m_hat = st["m"] / (1 - b1 ** t)
                v_hat = st["v"] / (1 - b2 ** t)
                s_hat = st["s"] / (1 - rho ** t)
                if t <= gr["gate_warmup"]:
                    q = torch.ones_like(m_hat) if gr["reduction"] == "element" else m_hat.new_ones(())
                else:
                    q = reference_gate(m_hat, s_hat, gr["gate"], gr["softness"], alpha, gr["gate_eps"],
                                       gr["reduction"])
                self.last_q[p] = q
                decay = gr["lr"] * gr["weight_decay"] * (q if gr["gate_weight_decay"] else 1.0)
                p.copy_(p * (1 - decay) - gr["lr"] * q * m_hat / (v_hat.sqrt() + gr["eps"]))


DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, rho=0.99, gate="soft", softness=1.0,
                alpha="fresh", batch_size=None, dataset_size=None, reduction="element", gate_eps=1e-12,
                gate_warmup=0, gate_weight_decay=False)


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def make_data(seed=1, n=256, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=dtype)
    y = (x[:, :3] + 0.8 * torch.randn(n, 3, generator=gen, dtype=dtype)).argmax(1)  # signal + label noise
    return x, y


def train(model, step_fn, zero_fn, steps, batch=32, seed=2, data=None):
    x, y = data if data is not None else make_data(dtype=next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        zero_fn()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        step_fn()


def two_groups(model, first=None, second=None):
    """Two param groups with different hyperparameters (lr, wd and the extra settings given)."""
    params = list(model.parameters())
    return [dict(params=params[:2], lr=3e-3, weight_decay=0.1, **(first or {})),
            dict(params=params[2:], lr=1e-2, weight_decay=0.0, **(second or {}))]


# --------------------------------------------------------------------------------------------
# gate="none" is AdamW
# --------------------------------------------------------------------------------------------


def test_gate_none_matches_adamw_for_200_steps_with_param_groups():
    ma, mb = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    opt_a = torch.optim.AdamW(two_groups(ma), betas=(0.9, 0.98), foreach=True)
    opt_b = PopRiskAdamW(two_groups(mb), betas=(0.9, 0.98), gate="none")
    data = make_data(dtype=torch.float32)
    train(ma, opt_a.step, opt_a.zero_grad, 200, data=data)
    train(mb, opt_b.step, opt_b.zero_grad, 200, data=data)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7)
    moved = sum(float((pa - p0).detach().abs().sum()) for pa, p0 in zip(ma.parameters(), make_model(dtype=torch.float32).parameters()))
    assert moved > 1.0  # the comparison is not vacuous


# --------------------------------------------------------------------------------------------
# Each gate on a hand-computed case
# --------------------------------------------------------------------------------------------
# One scalar, beta1 = beta2 = rho = 1/2, gradients 1 then 3, eps = 0, no weight decay:
#   step 1: s = 1/2, m = 1/2, v = 1/2; bias corrections 1/2  -> m_hat = 1, s_hat = 1, v_hat = 1
#   step 2: s = 1/4 + 1/2 (3 - 1/2)^2 = 27/8, m = 7/4, v = 19/4; corrections 3/4
#           -> m_hat = 7/3, s_hat = 9/2, v_hat = 19/3,  m_hat^2 = 49/9
HAND = dict(betas=(0.5, 0.5), rho=0.5, eps=0.0, weight_decay=0.0, lr=0.1, gate_eps=1e-200)
M2, S2, V2 = 7 / 3, 9 / 2, 19 / 3


@pytest.mark.parametrize("gate, softness, alpha, q1, q2", [
    ("soft", 1.0, 1.0, 0.0, (49 / 9 - 9 / 2) / (49 / 9 - 9 / 2 + 9 / 2)),  # 17/98
    ("soft", 0.0, 1.0, 0.0, 1.0),                                          # softness 0 == hard
    ("soft", 1.0, 2.0, 0.0, 0.0),                                          # 49/9 < 2 * 9/2
    ("hard", 1.0, 1.0, 0.0, 1.0),
    ("hard", 1.0, 0.5, 1.0, 1.0),                                          # alpha < 1 opens step 1
    ("snr", 1.0, 1.0, 0.5, (49 / 9) / (49 / 9 + 9 / 2)),                   # 98/179
    ("snr", 3.0, 0.5, 1 / (1 + 1.5), (49 / 9) / (49 / 9 + 1.5 * 9 / 2)),
    ("none", 1.0, 1.0, 1.0, 1.0),
])
def test_gate_formulas_on_a_hand_computed_case(gate, softness, alpha, q1, q2):
    w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = PopRiskAdamW([w], gate=gate, softness=softness, alpha=alpha, **HAND)
    deltas = []
    for g in (1.0, 3.0):
        before = w.detach().clone()
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        deltas.append(float(w.detach() - before))
        q = float(opt.gates()[w])
        assert q == pytest.approx(q1 if len(deltas) == 1 else q2, abs=1e-12)
    assert deltas[0] == pytest.approx(-0.1 * q1 * 1.0 / 1.0, abs=1e-12)
    assert deltas[1] == pytest.approx(-0.1 * q2 * M2 / math.sqrt(V2), abs=1e-12)
    st = opt.state[w]
    assert float(st["exp_var"]) == pytest.approx(27 / 8) and float(st["exp_avg"]) == pytest.approx(7 / 4)


def test_tensor_reduction_gate_on_a_hand_computed_case():
    # two elements; element 0 sees gradients 1, 3 (as above), element 1 sees 0, 0:
    # sum m_hat^2 = 49/9, sum s_hat = 9/2 -> the soft gate of the tensor is 17/98, applied to both.
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = PopRiskAdamW([w], gate="soft", reduction="tensor", **HAND)
    for g in (1.0, 3.0):
        w.grad = torch.tensor([g, 0.0], dtype=torch.float64)
        opt.step()
    q = opt.gates()[w]
    assert q.dim() == 0 and float(q) == pytest.approx(17 / 98)
    d = opt.diagnostics()
    assert d["gate_mean"] == pytest.approx(17 / 98)
    assert d["gate_closed_fraction"] == 1.0
    assert d["pop_descent"] == pytest.approx(49 / 9 - 9 / 2)
    assert d["signal"] == pytest.approx(49 / 9) and d["noise"] == pytest.approx(9 / 2)


def test_weight_decay_is_ungated_by_default_and_gated_on_request():
    # step 1 with the soft gate: q = 0, so only the decay moves w
    for gated, expected in ((False, 1.0 * (1 - 0.1 * 0.5)), (True, 1.0)):
        w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = PopRiskAdamW([w], gate="soft", lr=0.1, weight_decay=0.5, gate_weight_decay=gated)
        w.grad = torch.tensor([2.0], dtype=torch.float64)
        opt.step()
        assert w.item() == pytest.approx(expected, abs=1e-9)


def test_first_steps_on_a_constant_noiseless_gradient():
    """s is centred on m_0 = 0, so even a noiseless signal is gated for tens of steps (docstring numbers)."""
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    soft = PopRiskAdamW([w], lr=0.0, weight_decay=0.0, gate="soft")
    seen = {}
    for t in range(1, 51):
        w.grad = torch.ones(1, dtype=torch.float64)
        soft.step()
        seen[t] = float(soft.gates()[w])
    assert seen[1] == pytest.approx(0.0, abs=1e-9)
    assert seen[10] == pytest.approx(0.545, abs=1e-3) and seen[50] == pytest.approx(0.915, abs=1e-3)
    assert all(seen[t] < seen[t + 1] for t in range(1, 50))


# --------------------------------------------------------------------------------------------
# The hard gate on ties: at step 1, m_hat^2 = s_hat in exact arithmetic
# --------------------------------------------------------------------------------------------
# With betas and rho that are not exact in binary, m^2 and c s differ by rounding only, and
# 1{d > 0} opened about half of the coordinates at random; ties within rounding count as closed.


def random_params(dtype, seed=0):
    """A few tensors and gradients spanning several orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in ((64, 48), (48,), (7, 5, 3), (1,)):
        p = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        p.grad = (torch.randn(shape, generator=gen, dtype=torch.float64)
                  * torch.exp(2 * torch.randn(shape, generator=gen, dtype=torch.float64))).to(dtype)
        params.append(p)
    return params


def assert_step_one_gate(params, opt, expected):
    """The gate applied at step 1 (seen in the update, lr > 0, no decay) and the one recomputed."""
    before = [p.detach().clone() for p in params]
    opt.step()
    gates = opt.gates()
    for p, p0 in zip(params, before):
        assert bool((gates[p] == expected).all()), f"{float((gates[p] != expected).double().mean()):.0%} differ"
        moved = p.detach() != p0
        assert bool(moved.all()) if expected else not bool(moved.any())
    d = opt.diagnostics()
    assert d["gate_mean"] == expected and d["gate_closed_fraction"] == 1 - expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hard_gate_closes_every_tie_at_step_one(dtype, reduction):
    params = random_params(dtype)
    opt = PopRiskAdamW(params, lr=0.1, betas=(0.9, 0.98), rho=0.99, weight_decay=0.0, gate="hard",
                       reduction=reduction)
    assert_step_one_gate(params, opt, 0.0)


def test_hard_gate_closes_every_tie_at_step_one_fused():
    """The compiled kernel (float32: it used to form 1 - fl(rho) in float32 and open every coordinate)."""
    params = random_params(torch.float32)
    opt = PopRiskAdamW(params, lr=0.1, weight_decay=0.0, gate="hard", fused=True)  # default betas, rho
    assert_step_one_gate(params, opt, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hard_gate_with_alpha_below_one_opens_every_coordinate_at_step_one(dtype, reduction):
    """d = (1 - alpha) m_hat^2 > 0 is no tie."""
    params = random_params(dtype, seed=1)
    opt = PopRiskAdamW(params, lr=0.1, betas=(0.9, 0.98), rho=0.99, weight_decay=0.0, gate="hard",
                       reduction=reduction, alpha=0.25)
    assert_step_one_gate(params, opt, 1.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hard_gate_tolerance_keeps_every_clear_decision(reduction):
    """float32 state after 7 noisy steps: where |d| is far above rounding, the gate is exactly the
    float64 decision 1{m_hat^2 > s_hat}; and the tie band is a few eps wide."""
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.zeros(40)) for _ in range(60)]
    mean = [torch.randn(40, generator=gen) * torch.rand((), generator=gen) for _ in params]
    opt = PopRiskAdamW(params, lr=0.0, weight_decay=0.0, gate="hard", reduction=reduction)
    t = 7
    for _ in range(t):
        for p, mu in zip(params, mean):
            p.grad = mu + 0.5 * torch.randn(40, generator=gen)
        opt.step()
    gates = opt.gates()
    q, exact, far = [], [], []
    for p in params:
        m_hat = opt.state[p]["exp_avg"].double() / (1 - 0.9 ** t)
        s_hat = opt.state[p]["exp_var"].double() / (1 - 0.99 ** t)
        m2, s = (m_hat ** 2, s_hat) if reduction == "element" else ((m_hat ** 2).sum(), s_hat.sum())
        q.append(gates[p].flatten())
        exact.append((m2 > s).flatten().double())
        far.append(((m2 - s).abs() > 1e-4 * (m2 + s)).flatten())
    q, exact, far = torch.cat(q).double(), torch.cat(exact), torch.cat(far)
    assert far.double().mean() > 0.95 and 0.1 < exact[far].mean() < 0.9   # both decisions, few near-ties
    assert torch.equal(q[far], exact[far])

    # the band: a single float32 tensor at a step-1 tie, its m scaled by 1 + delta (d ~ delta (m^2 + c s))
    for delta, expected in ((1e-5, 1.0), (1e-6, 0.0)):   # 84 eps: open; 8 eps: within rounding, closed
        w = nn.Parameter(torch.zeros(1000))
        opt = PopRiskAdamW([w], gate="hard", reduction=reduction)
        w.grad = torch.randn(1000, generator=gen)
        opt.step()
        opt.state[w]["exp_avg"].mul_(1 + delta)
        assert bool((opt.gates()[w] == expected).all())


def test_gate_warmup_holds_the_gate_open_then_gates():
    w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = PopRiskAdamW([w], gate="soft", gate_warmup=1, **HAND)
    w.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    assert w.item() == pytest.approx(-0.1)           # plain Adam step: q = 1
    assert float(opt.gates()[w]) == 1.0
    w.grad = torch.tensor([3.0], dtype=torch.float64)
    opt.step()
    assert float(opt.gates()[w]) == pytest.approx(17 / 98)  # the moments accumulated during warm-up


# --------------------------------------------------------------------------------------------
# foreach (and fused) == reference, across groups, gates, reductions
# --------------------------------------------------------------------------------------------

CASES = [dict(gate=g, reduction=r) for g, r in itertools.product(("soft", "hard", "snr", "none"), ("element", "tensor"))]


def full(group: dict, base: dict) -> dict:
    return {**DEFAULTS, **base, **group}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['gate']}-{c['reduction']}")
def test_foreach_equals_reference_across_param_groups(case):
    over = (dict(case, alpha=0.5, softness=3.0, gate_warmup=3, gate_weight_decay=True),
            dict(case, alpha="finite", batch_size=32, dataset_size=256, rho=0.9))
    ma, mb = make_model(), make_model()
    opt = PopRiskAdamW(two_groups(ma, *over), betas=(0.9, 0.98))
    ref = ReferencePopRisk([full(g, dict(betas=(0.9, 0.98))) for g in two_groups(mb, *over)])
    train(ma, opt.step, lambda: opt.zero_grad(), 60)
    train(mb, ref.step, lambda: mb.zero_grad(), 60)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-11)
    gates = opt.gates()
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(gates[pa], ref.last_q[pb], rtol=1e-8, atol=1e-10)


def test_diagnostics_match_the_reference_gates():
    ma, mb = make_model(), make_model()
    opt = PopRiskAdamW(ma.parameters(), gate="snr", softness=0.5, lr=1e-2)
    ref = ReferencePopRisk([full(dict(params=list(mb.parameters())), dict(gate="snr", softness=0.5, lr=1e-2))])
    assert opt.diagnostics() == dict(gate_mean=0.0, gate_closed_fraction=0.0, pop_descent=0.0, signal=0.0,
                                     noise=0.0, step=0)
    train(ma, opt.step, opt.zero_grad, 40)
    train(mb, ref.step, mb.zero_grad, 40)
    q = torch.cat([x.flatten() for x in ref.last_q.values()])
    pop, signal = 0.0, 0.0
    for p in mb.parameters():
        st = ref.state[p]
        m_hat, s_hat = st["m"] / (1 - 0.9 ** 40), st["s"] / (1 - 0.99 ** 40)
        pop += float((m_hat ** 2 - s_hat).clamp_min(0).sum())
        signal += float((m_hat ** 2).sum())
    d = opt.diagnostics()
    assert d["gate_mean"] == pytest.approx(float(q.mean()), rel=1e-9)
    assert d["gate_closed_fraction"] == pytest.approx(float((q < 0.5).double().mean()), rel=1e-9)
    assert d["pop_descent"] == pytest.approx(pop, rel=1e-8) and d["pop_descent"] > 0
    assert d["signal"] == pytest.approx(signal, rel=1e-9)
    assert d["step"] == 40


def test_fused_kernel_equals_foreach():
    """torch.compile path (one compile per gate/reduction variant: a few seconds each on CPU)."""
    for case in (dict(gate="soft", reduction="element", gate_weight_decay=True),
                 dict(gate="snr", reduction="tensor", gate_warmup=5)):
        ma, mb = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
        oa = PopRiskAdamW(ma.parameters(), lr=1e-2, weight_decay=0.1, **case)
        ob = PopRiskAdamW(mb.parameters(), lr=1e-2, weight_decay=0.1, fused=True, **case)
        data = make_data(dtype=torch.float32)
        train(ma, oa.step, oa.zero_grad, 30, data=data)
        train(mb, ob.step, ob.zero_grad, 30, data=data)
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            torch.testing.assert_close(pb, pa, rtol=2e-4, atol=2e-5)
        for key in ("exp_avg", "exp_avg_sq", "exp_var"):
            for pa, pb in zip(ma.parameters(), mb.parameters()):
                torch.testing.assert_close(ob.state[pb][key], oa.state[pa][key], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_identically():
    kw = dict(gate="soft", alpha="finite", batch_size=32, dataset_size=256, gate_warmup=2)
    model = make_model()
    opt = PopRiskAdamW(two_groups(model, dict(reduction="tensor")), **kw)
    train(model, opt.step, opt.zero_grad, 15)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt.step, opt.zero_grad, 15, seed=9)

    resumed = make_model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = PopRiskAdamW(two_groups(resumed), **kw)  # groups' settings come back from the state_dict
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["reduction"] == "tensor"
    train(resumed, opt2.step, opt2.zero_grad, 15, seed=9)
    for pa, pb in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    assert opt2.diagnostics() == opt.diagnostics()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_sparse_gradients_are_refused_with_a_clear_message():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = PopRiskAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_complex_and_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="complex parameters"):
        PopRiskAdamW([nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    w = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="gate must be one of"):
        PopRiskAdamW(w, gate="cautious")
    with pytest.raises(ValueError, match="reduction must be one of"):
        PopRiskAdamW(w, reduction="per_tensor")
    with pytest.raises(ValueError, match='needs batch_size and dataset_size'):
        PopRiskAdamW(w, alpha="finite")
    with pytest.raises(ValueError, match="0 < batch_size < dataset_size"):
        PopRiskAdamW(w, alpha="finite", batch_size=512, dataset_size=512)
    with pytest.raises(ValueError, match="alpha must be"):
        PopRiskAdamW(w, alpha=-1.0)
    with pytest.raises(ValueError, match="rho must be in"):
        PopRiskAdamW(w, rho=1.0)
    with pytest.raises(ValueError, match="gate_eps must be > 0"):
        PopRiskAdamW(w, gate_eps=0.0)
    with pytest.raises(ValueError, match="gate_warmup"):
        PopRiskAdamW(w, gate_warmup=-1)


def test_alpha_values():
    assert resolve_alpha("fresh") == 1.0
    assert resolve_alpha("finite", batch_size=512, dataset_size=2328) == pytest.approx(512 / 1816)
    assert resolve_alpha(0.25) == 0.25


# --------------------------------------------------------------------------------------------
# Exact leave-one-out mode
# --------------------------------------------------------------------------------------------


def test_leave_one_out_u_statistic_identity_on_synthetic_gradients():
    gen = torch.Generator().manual_seed(0)
    b, d = 8, 5
    mu = torch.tensor([0.0, 0.3, -1.0, 2.0, 0.05], dtype=torch.float64)
    sigma = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    # exact algebra on one batch: g_bar^2 - Sigma_B/(b-1) = sum_{i != j} g_i g_j / (b (b-1))
    g = mu + sigma * torch.randn(b, d, generator=gen, dtype=torch.float64)
    mean, loo = leave_one_out_term({"w": g})
    pairs = (g.sum(0) ** 2 - (g ** 2).sum(0)) / (b * (b - 1))
    torch.testing.assert_close(mean["w"] ** 2 - loo["w"], pairs)
    # unbiasedness over many batches: mean(g_bar^2 - Sigma_B/(b-1)) == mu^2, E[Sigma_B/(b-1)] == Var(g_bar)
    n_batches = 40_000
    g = mu + sigma * torch.randn(n_batches, b, d, generator=gen, dtype=torch.float64)
    g_bar = g.mean(1)
    loo = (g - g_bar[:, None]).square().mean(1) / (b - 1)
    est = g_bar ** 2 - loo
    se = est.std(0) / math.sqrt(n_batches)
    assert torch.all((est.mean(0) - mu ** 2).abs() < 4 * se)
    torch.testing.assert_close(loo.mean(0), sigma ** 2 / b, rtol=0.02, atol=0)
    # the plug-in g_bar^2 is biased by exactly Var(g_bar)
    assert torch.all(g_bar.square().mean(0) - mu ** 2 > 0.5 * sigma ** 2 / b)


def test_batch_noise_uses_per_example_gradients():
    model = make_model()
    x, y = make_data()
    mean, loo = batch_noise(model, nn.functional.cross_entropy, x[:16], y[:16])
    model.zero_grad()
    nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(mean[name], p.grad)
        assert loo[name].shape == p.shape and bool((loo[name] >= 0).all())
    with pytest.raises(ValueError, match="at least 2 examples"):
        leave_one_out_term({"w": torch.zeros(1, 3)})


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_ema_proxy_tracks_the_leave_one_out_term_with_the_predicted_bias(beta1):
    """With the weights frozen (lr = 0) the gradient is stationary and E[s] = Var(g_bar) * 2/(1+beta1)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 4, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]], dtype=torch.float64) + torch.randn(4096, 1, generator=gen, dtype=torch.float64)
    loss = nn.functional.mse_loss
    opt = PopRiskAdamW(model.parameters(), lr=0.0, betas=(beta1, 0.999), rho=0.999, weight_decay=0.0)
    for _ in range(3000):
        idx = torch.randint(0, 4096, (16,), generator=gen)
        opt.zero_grad()
        loss(model(x[idx]), y[idx]).backward()
        opt.step()
    ratios = [compare_noise_proxy(opt, model, loss, x[i:i + 16], y[i:i + 16]) for i in range(0, 4096, 16)]
    exact = sum(r["noise_ratio"] ** -1 for r in ratios) / len(ratios)  # mean of exact / s_hat
    assert 1 / exact == pytest.approx(2 / (1 + beta1), rel=0.12)
    assert ratios[0]["n_coords"] == 5


def test_compare_noise_proxy_needs_state():
    model = make_model()
    opt = PopRiskAdamW(model.parameters())
    x, y = make_data()
    with pytest.raises(ValueError, match="take at least one optimizer step"):
        compare_noise_proxy(opt, model, nn.functional.cross_entropy, x[:8], y[:8])


# --------------------------------------------------------------------------------------------
# Grokfast
# --------------------------------------------------------------------------------------------


def reference_grokfast(model, grads, alpha, lamb):
    """ironjr/grokfast ``gradfilter_ema``, verbatim in substance."""
    if grads is None:
        grads = {n: p.grad.data.detach() for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            grads[n] = grads[n] * alpha + p.grad.data.detach() * (1 - alpha)
            p.grad.data = p.grad.data + grads[n] * lamb
    return grads


def test_grokfast_matches_the_reference_filter_then_adamw():
    ma, mb = make_model(), make_model()
    oa = Grokfast(torch.optim.AdamW(ma.parameters(), lr=1e-2, weight_decay=0.5), alpha=0.9, lamb=3.0)
    ob = torch.optim.AdamW(mb.parameters(), lr=1e-2, weight_decay=0.5)
    ema = {}

    def ref_step():
        nonlocal ema
        ema = reference_grokfast(mb, ema or None, 0.9, 3.0)
        ob.step()

    train(ma, oa.step, oa.zero_grad, 25)
    train(mb, ref_step, ob.zero_grad, 25)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_grokfast_with_lamb_zero_is_the_wrapped_optimizer_and_works_with_schedulers():
    ma, mb = make_model(), make_model()
    oa = Grokfast(torch.optim.AdamW(ma.parameters(), lr=1e-2), lamb=0.0)
    ob = torch.optim.AdamW(mb.parameters(), lr=1e-2)
    sa = torch.optim.lr_scheduler.LambdaLR(oa, lambda s: 1 / (1 + s))
    sb = torch.optim.lr_scheduler.LambdaLR(ob, lambda s: 1 / (1 + s))
    train(ma, lambda: (oa.step(), sa.step()), oa.zero_grad, 10)
    train(mb, lambda: (ob.step(), sb.step()), ob.zero_grad, 10)
    assert oa.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 11)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)


def test_grokfast_state_dict_round_trip():
    model = make_model()
    opt = Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(model, opt.step, opt.zero_grad, 5)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt.step, opt.zero_grad, 5, seed=4)
    other = make_model(seed=7)
    other.load_state_dict(saved_model)
    opt2 = Grokfast(torch.optim.AdamW(other.parameters(), lr=1e-2))
    opt2.load_state_dict(saved)
    train(other, opt2.step, opt2.zero_grad, 5, seed=4)
    for pa, pb in zip(model.parameters(), other.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="not a Grokfast state_dict"):
        opt2.load_state_dict(saved["optimizer"])


def test_grokfast_refuses_bad_arguments():
    w = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        Grokfast(w)
    with pytest.raises(ValueError, match="alpha must be in"):
        Grokfast(torch.optim.AdamW(w), alpha=1.0)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_build_optimizer_registry():
    assert {"poprisk", "grokfast"} <= set(OPTIMIZERS)
    model = make_model()
    opt = build_optimizer("poprisk", model.parameters(), lr=1e-3, weight_decay=0.1, gate="snr", alpha="finite",
                          batch_size=64, dataset_size=1000)
    assert isinstance(opt, PopRiskAdamW) and opt.param_groups[0]["gate"] == "snr"
    assert opt.param_groups[0]["dataset_size"] == 1000
    gf = build_optimizer("grokfast", model.parameters(), lr=1e-3, grokfast_lamb=5.0)
    assert isinstance(gf, Grokfast) and isinstance(gf.optimizer, torch.optim.AdamW)
    assert gf.param_groups[0]["grokfast_lamb"] == 5.0
    with pytest.raises(ValueError, match="unknown option"):
        build_optimizer("poprisk", model.parameters(), lr=1e-3, grokfast_lamb=5.0)


@pytest.mark.parametrize("name", ["poprisk", "poprisk_exact"])
def test_doctests(name):
    import doctest
    import importlib

    module = importlib.import_module(f"lmech.optim.{name}")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0
