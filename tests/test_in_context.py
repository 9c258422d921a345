"""in-context / task-diversity: the predictors against per-prompt solves and Monte Carlo, the models'
causality and algebra, tiny runs, bad configs."""

import math

import pytest
import torch

from lmech.experiments import get, run_experiment
from lmech.errors import ConfigError
from lmech.experiments.in_context import InContextConfig, train_lsa
from lmech.experiments.task_diversity import check as td_check
from lmech.models.in_context import InContextTransformer, LinearSelfAttention
from lmech.theory import in_context as ic


def _prompts(n=50, k=7, d=3, noise=0.3, seed=0):
    return ic.sample_prompts(n, k, d, noise, torch.Generator().manual_seed(seed))


def test_ridge_and_least_squares_against_per_prompt_solves():
    x, y, _ = _prompts()
    noise, d = 0.3, 3
    r, ls = ic.ridge_errors(x, y, noise), ic.least_squares_errors(x, y)
    for i in (0, 7):
        for k in (1, 3, 6):
            X, Y = x[i, :k].double(), y[i, :k].double()
            w = torch.linalg.solve(X.T @ X + noise ** 2 * d * torch.eye(d, dtype=torch.float64), X.T @ Y)
            assert float(r[i, k]) == pytest.approx(float((x[i, k].double() @ w - y[i, k]) ** 2), rel=1e-9)
            wl = torch.linalg.lstsq(X, Y.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
            assert float(ls[i, k]) == pytest.approx(float((x[i, k].double() @ wl - y[i, k]) ** 2), rel=1e-6, abs=1e-10)
    assert torch.equal(r[:, 0], y[:, 0].double() ** 2)


def test_dmmse_of_a_one_task_pool_knows_the_task():
    gen = torch.Generator().manual_seed(1)
    pool = ic.sample_tasks(1, 3, gen)
    x, y, _ = ic.sample_prompts(200, 6, 3, 0.2, gen, pool)
    err = ic.dmmse_errors(x, y, pool, 0.2)
    assert torch.allclose(err, (torch.einsum("nkd,d->nk", x.double(), pool[0].double()) - y.double()) ** 2)
    pool2 = ic.sample_tasks(2, 3, gen)                          # posterior concentrates with more context
    x, y, _ = ic.sample_prompts(400, 8, 3, 0.2, gen, pool2)
    e = ic.dmmse_errors(x, y, pool2, 0.2).mean(0)
    assert float(e[-1]) < 0.1 < float(e[0])


def test_one_gd_step_error_against_monte_carlo():
    d, n, noise = 3, 10, 0.25
    eta = ic.gd_step_lr(n, d, noise)
    x, y, _ = ic.sample_prompts(200_000, n + 1, d, noise, torch.Generator().manual_seed(2))
    for step in (eta, 0.5 * eta):
        pred = step * (y[:, :-1, None] * x[:, :-1]).mean(1).mul(x[:, -1]).sum(-1)
        mc = float(((pred - y[:, -1]) ** 2).mean())
        assert mc == pytest.approx(ic.gd_step_error(step, n, d, noise), rel=0.01)
    grid = [ic.gd_step_error(eta * f, n, d, noise) for f in (0.9, 1.0, 1.1)]
    assert grid[1] < min(grid[0], grid[2])


def test_transformer_is_causal_in_the_labels():
    torch.manual_seed(0)
    net = InContextTransformer(d=2, max_pairs=5, width=16, n_layers=2, n_heads=2)
    x, y = torch.randn(3, 5, 2), torch.randn(3, 5)
    out = net(x, y)
    y2 = y.clone()
    y2[:, 3] += 10.0
    out2 = net(x, y2)
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-6) and not torch.allclose(out[:, 4], out2[:, 4])


def test_lsa_algebra_and_training_to_one_gd_step():
    lsa = LinearSelfAttention(2)
    with torch.no_grad():
        lsa.w_kq.zero_(); lsa.w_pv.zero_()                     # noqa: E702
        lsa.w_kq[:2, :2] = 0.5 * torch.eye(2); lsa.w_pv[2, 2] = 1.4   # noqa: E702
    x, y, _ = _prompts(n=20, k=6, d=2)
    gd = 0.7 * (y[:, :-1, None] * x[:, :-1]).mean(1).mul(x[:, -1]).sum(-1)
    assert torch.allclose(lsa(x[:, :-1], y[:, :-1], x[:, -1]), gd, atol=1e-6)
    assert torch.allclose(lsa.effective_lr(), 0.7 * torch.eye(2))
    cfg = InContextConfig(lsa_steps=800)
    torch.manual_seed(0)
    a = train_lsa(cfg, torch.Generator().manual_seed(0)).effective_lr().detach().double()
    eta = ic.gd_step_lr(cfg.lsa_n, cfg.d, cfg.noise)
    assert float(torch.linalg.norm(a - eta * torch.eye(3, dtype=torch.float64))) / (eta * math.sqrt(3)) < 0.05


def test_tiny_in_context_and_task_diversity_runs(tmp_path):
    tiny = {"d": 2, "pairs": 5, "width": 8, "heads": 2, "layers": 1, "steps": 120, "batch": 16, "eval_prompts": 64}
    s = run_experiment("in-context", {**tiny, "lsa_steps": 20, "lsa_eval_prompts": 64}, seed=0, out=tmp_path)
    assert s["state"] == "done", s["message"] and len(s["checks"]) == 6
    assert len(s["result"]["transformer"]) == 5
    s = run_experiment("task-diversity", {**tiny, "pools": "2,64"}, seed=0, out=tmp_path)
    assert s["state"] == "done", s["message"]
    assert [c.quantity.split(":")[0] for c in s["checks"]] == ["M=2 tasks", "M=64 tasks"]
    assert [r.passed for r in td_check({"pools": [4, 1024], "M4.ratio": 0.5, "M1024.ratio": 2.0})] == [True, True]
    assert [r.passed for r in td_check({"pools": [4, 1024], "M4.ratio": 1.5, "M1024.ratio": 0.7})] == [False, False]


@pytest.mark.parametrize("name, sets, message", [("in-context", {"pairs": 3}, "pairs > d"),
                                                 ("in-context", {"width": 30}, "divisible"),
                                                 ("task-diversity", {"pools": "4"}, "pools")])
def test_bad_config(name, sets, message):
    with pytest.raises(ConfigError, match=message):
        get(name).make_config(sets)


def test_probes_economy_adds_monitor_columns_and_changes_no_training_metric(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {"d": 2, "pairs": 5, "width": 8, "heads": 2, "layers": 1, "steps": 120, "batch": 16, "eval_prompts": 64,
            "lsa_steps": 60, "lsa_eval_prompts": 64}
    _, probed = assert_probes_leave_training_unchanged("in-context", tiny, tmp_path)
    assert {"probe/loss", "lsa/probe/loss", "lsa/sharpness/lambda_1"} <= set(probed.columns)


def test_task_diversity_probes_economy_per_pool_changes_no_training_metric(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {"d": 2, "pairs": 5, "width": 8, "heads": 2, "layers": 1, "steps": 120, "batch": 16, "eval_prompts": 64,
            "pools": "2,64"}
    _, probed = assert_probes_leave_training_unchanged("task-diversity", tiny, tmp_path, "probe/loss")
    assert {"M2/probe/loss", "M64/probe/loss"} <= set(probed.columns)
