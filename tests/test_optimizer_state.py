"""lmech.probes.optimizer_state: the optimizer's linearized step, read by duck typing (no optimizer class)."""

import ast
import inspect

import pytest
import torch
from torch import nn

import lmech.probes.optimizer_state as optimizer_state
from lmech.optim import PopRiskAdamW
from lmech.probes.optimizer_state import is_decoupled, optimizer_gates, optimizer_update


def _stepped(make):
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = make(net.parameters())
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    return net, opt


class _Duck:
    """Exposes only what an optimizer shows the recorder: param_groups, state and gates()."""

    def __init__(self, inner):
        self.param_groups, self.state, self.gates = inner.param_groups, inner.state, inner.gates


def test_the_module_imports_no_optimizer_class():
    tree = ast.parse(inspect.getsource(optimizer_state))
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith("lmech.optim") for m in modules)


def test_decoupling_and_gates_by_duck_typing():
    assert is_decoupled(_stepped(lambda p: torch.optim.AdamW(p, lr=0.1))[1])
    assert not is_decoupled(_stepped(lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1))[1])
    net, opt = _stepped(lambda p: PopRiskAdamW(p, lr=0.1, weight_decay=0.1))
    assert is_decoupled(opt) and is_decoupled(_Duck(opt))
    assert set(optimizer_gates(_Duck(opt))) == set(net.parameters())
    assert optimizer_gates(torch.optim.SGD(net.parameters(), lr=0.1)) == {}


@pytest.mark.parametrize("gate_weight_decay", [False, True])
def test_a_duck_typed_gated_optimizer_reads_as_poprisk(gate_weight_decay):
    net, opt = _stepped(lambda p: PopRiskAdamW(p, lr=0.1, weight_decay=0.1, gate_weight_decay=gate_weight_decay))
    real, duck = optimizer_update(opt, net), optimizer_update(_Duck(opt), net)
    assert torch.equal(real.pi, duck.pi) and torch.equal(real.decay, duck.decay) and real.l2 is duck.l2 is None
    assert (real.beta, real.c, real.step, real.bias_correction) == (duck.beta, duck.c, duck.step, True)


def test_sgd_and_adam_families():
    net, opt = _stepped(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01))
    u = optimizer_update(opt, net)
    assert u.beta == 0.9 and u.c == 1.0 and u.decay is None and float(u.l2[0]) == pytest.approx(0.01)
    net, opt = _stepped(lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.01))
    u = optimizer_update(opt, net)
    assert u.decay is None and u.l2 is not None and u.step == 3
    net, opt = _stepped(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01))
    u = optimizer_update(opt, net)
    assert u.l2 is None and u.decay is not None and float(u.decay[0]) == pytest.approx(0.01)
