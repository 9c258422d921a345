"""lmech.prune: path-Gramian diagonal against the full Gramian, masks against a brute-force sort."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmech.errors import ConfigError
from lmech.models import MLP
from lmech.prune import (PathUsage, apply_masks, magnitude_scores, path_gramian, prunable_names, prune_masks,
                         pruned_copy, random_scores, sparsity_of)


def _flat(model, names):
    by = dict(model.named_parameters())
    return torch.cat([by[n].detach().double().reshape(-1) for n in names])


def _train(opt_name, mode, steps=12):
    torch.manual_seed(0)
    net = MLP(5, 3, width=6, depth=1)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    x[:, 4] = 0.0                                     # a dead input: its first-layer weights get no gradient
    opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.AdamW(net.parameters(), lr=0.02, weight_decay=0.0))
    names = prunable_names(net)
    usage = PathUsage(net, mode=mode)
    dirs, etas = [], []
    for t in range(steps):
        lr = 0.02 * (1 + t % 3)                      # a varying step size exercises the eta weighting
        for g in opt.param_groups:
            g["lr"] = lr
        before = _flat(net, names)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        grad = torch.cat([dict(net.named_parameters())[n].grad.double().reshape(-1) for n in names])
        opt.step()
        dirs.append((_flat(net, names) - before) / lr if mode == "update" else grad)
        etas.append(lr)
        usage.step(lr)
    return net, names, usage, dirs, etas


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_usage_is_the_diagonal_of_the_brute_force_path_gramian(opt_name, mode):
    net, names, usage, dirs, etas = _train(opt_name, mode)
    gamma = path_gramian(dirs, etas)
    fast = torch.cat([usage.scores()[n].reshape(-1) for n in names])
    torch.testing.assert_close(fast, torch.diagonal(gamma), rtol=1e-9, atol=1e-15)
    # the Rayleigh quotient of e_k is the diagonal; a coordinate never used is in ker(Gamma)
    dead = dict(net.named_parameters())["layers.0.weight"].shape[1] * torch.arange(6) + 4   # column 4 of W1
    assert torch.all(fast[dead] == 0)
    assert torch.all(gamma[dead] == 0)               # PSD with zero diagonal -> the whole row is zero
    assert torch.all(fast[fast != 0] > 0)


def test_update_mode_with_plain_sgd_equals_gradient_mode():
    _, names, up, *_ = _train("sgd", "update", steps=1)   # first step: the momentum buffer is the gradient
    _, _, gr, *_ = _train("sgd", "gradient", steps=1)
    for n in names:
        torch.testing.assert_close(up.scores()[n], gr.scores()[n], rtol=1e-3, atol=1e-8)   # float32 rounding of w_new - w_old


def _brute_masks(scores, sparsity, scope):
    items = [(n, i, float(v)) for n, s in scores.items() for i, v in enumerate(s.reshape(-1).tolist())]
    groups = {n: [it for it in items if it[0] == n] for n in scores} if scope == "layer" else {"all": items}
    keep = set()
    for group in groups.values():
        k = round((1 - sparsity) * len(group))
        ranked = sorted(range(len(group)), key=lambda j: (-group[j][2], j))   # high score first, ties: lower index
        keep |= {(group[j][0], group[j][1]) for j in ranked[:k]}
    return {n: torch.tensor([(n, i) in keep for i in range(s.numel())]).reshape(s.shape) for n, s in scores.items()}


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9])
def test_masks_match_a_brute_force_ranking_with_ties(scope, sparsity):
    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.randint(0, 4, (5, 7), generator=gen).double(),      # many ties
              "b": torch.rand(3, 4, generator=gen, dtype=torch.float64)}
    masks = prune_masks(scores, sparsity, scope=scope)
    want = _brute_masks(scores, sparsity, scope)
    for n in scores:
        assert torch.equal(masks[n], want[n])


def test_apply_prune_and_baselines():
    torch.manual_seed(0)
    net = MLP(4, 2, width=8, depth=1)
    assert prunable_names(net) == ["layers.0.weight", "layers.1.weight"]
    mag = magnitude_scores(net)
    masks = prune_masks(mag, 0.75)
    twin = pruned_copy(net, masks)
    assert sparsity_of(masks) == 0.75
    w = twin.layers[0].weight
    kept = w[w != 0].abs()
    dropped = net.layers[0].weight[~masks["layers.0.weight"]].abs()
    assert kept.min() >= dropped.max()               # magnitude pruning keeps the largest weights
    assert torch.equal(twin.layers[0].bias, net.layers[0].bias)       # biases are never pruned
    assert net.layers[0].weight.count_nonzero() == 32                  # the original is untouched
    assert apply_masks(net, masks) == 36           # 75% of 32 + 16 weights
    r0, r1 = random_scores(net, seed=3), random_scores(net, seed=3)
    assert all(torch.equal(r0[n], r1[n]) for n in r0)


def test_bad_input_is_refused():
    net = MLP(4, 2, width=8, depth=1)
    with pytest.raises(ConfigError, match="sparsity"):
        prune_masks(magnitude_scores(net), 1.0)
    with pytest.raises(ConfigError, match="mode"):
        PathUsage(net, mode="fisher")
    with pytest.raises(ConfigError, match="unknown parameter"):
        PathUsage(net, names=["nope"])
    with pytest.raises(ConfigError, match="not finite"):
        prune_masks({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ConfigError, match="lr"):
        PathUsage(net).step(0.0)
