r"""The optimizer's step, linearized: what the path recorder needs from an optimizer's state.

A step of an optimizer in the SGD or Adam family is, to first order, :math:`\Delta w_t =
-\text{lr}\;\Pi_t\,\hat m_t` with a diagonal preconditioner :math:`\Pi_t`, a momentum buffer
:math:`m_t = \beta m_{t-1} + c\,\nabla_w L_t` (:math:`\hat m_t = m_t/s_t`) and weight decay, decoupled
(AdamW) or coupled (SGD, Adam). :func:`optimizer_update` reads these from any optimizer **by duck
typing**, never by its class: SGD-like param groups (``momentum``, ``dampening``, no ``betas``),
Adam-like ones (``betas``, ``eps``; the state's ``exp_avg_sq`` and ``step``), decoupled weight decay
where the optimizer or its group says ``decoupled_weight_decay`` (torch's AdamW) or the optimizer is
gated, and a per-parameter gate :math:`q` where the optimizer has a ``gates()`` method (``{param:
q}``, e.g. :class:`lmech.optim.PopRiskAdamW`, whose weight decay is decoupled, and gated with the
group's ``gate_weight_decay``). Used by :mod:`lmech.probes.gramian`; the derivation is in
docs/gramian-decisions.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmech.core.functional import FunctionalModel, ParamSelector, flatten

__all__ = ["UpdateModel", "is_decoupled", "optimizer_gates", "optimizer_preconditioner", "optimizer_update"]


def optimizer_gates(optimizer: torch.optim.Optimizer) -> dict:
    """``{param: gate}`` of a gated optimizer (one with a ``gates()`` method), else ``{}``."""
    gates = getattr(optimizer, "gates", None)
    return gates() if callable(gates) else {}


def is_decoupled(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's weight decay is decoupled (AdamW's ``w -= lr wd w``) rather than added
    to the gradient: the optimizer's or its first group's ``decoupled_weight_decay`` flag (torch's
    Adam/AdamW carry it), else ``True`` for a gated AdamW (a ``gates()`` method: PopRiskAdamW)."""
    flag = getattr(optimizer, "decoupled_weight_decay", None)
    if flag is None:
        flag = optimizer.param_groups[0].get("decoupled_weight_decay")
    if flag is None:
        flag = callable(getattr(optimizer, "gates", None))
    return bool(flag)


def _sgd_like(optimizer: torch.optim.Optimizer) -> bool:
    group = optimizer.param_groups[0]
    return "momentum" in group and "betas" not in group


@dataclass
class UpdateModel:
    r"""How an optimizer step maps gradients to the weight change, linearized (module docstring).

    :math:`\Delta w_t = -\text{lr}\;\Pi_t\,\hat m_t` with the buffer :math:`m_t = \beta m_{t-1} +
    c\,\nabla_w L_t` and :math:`\hat m_t = m_t / s_t` (:math:`s_t = 1-\beta^t` with Adam's bias
    correction, 1 otherwise); :math:`\beta = 0, c = 1` is a plain preconditioned gradient step.

    Attributes:
        pi: the diagonal :math:`\Pi` (flat, ``FunctionalModel`` order) or ``None`` (identity).
        beta: momentum coefficient :math:`\beta` (Adam's :math:`\beta_1`, SGD's ``momentum``).
        c: weight of the new gradient (:math:`1-\beta_1` for Adam, ``1 - dampening`` for SGD).
        step: the optimizer's step count :math:`t` after the last step (``None`` if unknown).
        bias_correction: whether :math:`s_t = 1-\beta^t` (Adam) or 1 (SGD).
        decay: decoupled weight decay (AdamW, PopRiskAdamW): the step adds
            :math:`-\text{lr}\;\text{decay}\odot w` (``decay`` = :math:`\text{lr}_\text{group}
            \lambda_{wd}/\text{lr}`, times the gate with ``gate_weight_decay``); ``None`` if zero.
        l2: coupled weight decay (SGD, Adam): the gradient gets :math:`+\,\text{l2}\odot w` before the
            buffer and the preconditioner; ``None`` if zero.
    """

    pi: Tensor | None = None
    beta: float = 0.0
    c: float = 1.0
    step: int | None = None
    bias_correction: bool = False
    decay: Tensor | None = None
    l2: Tensor | None = None

    def scale(self, t: int) -> float:
        """:math:`s_t`."""
        return 1.0 - self.beta ** t if self.bias_correction else 1.0

    def steady_buffer(self, t: int) -> float:
        r"""Raw buffer per unit gradient after ``t`` steps of a constant gradient (the state a
        window opened mid-run is given): :math:`c(1-\beta^t)/(1-\beta)`."""
        if self.beta == 0.0:
            return self.c
        return self.c * (1.0 - self.beta ** t) / (1.0 - self.beta)


def optimizer_update(optimizer: torch.optim.Optimizer | None, model: nn.Module, params: ParamSelector = None,
                     lr: float | None = None) -> UpdateModel:
    r"""The :class:`UpdateModel` of the last optimizer step.

    * ``None`` (plain gradient descent): identity, no momentum;
    * ``SGD``: :math:`\Pi = \text{lr}_\text{group}/\text{lr}`, momentum :math:`\mu`, :math:`c = 1-`
      dampening (Nesterov is refused);
    * ``Adam``/``AdamW``/``PopRiskAdamW``: :math:`\Pi = \frac{\text{lr}_\text{group}}{\text{lr}}
      \frac{q}{\sqrt{\hat v_t}+\epsilon}`, :math:`\hat v_t = v_t/(1-\beta_2^t)`, with the gate
      :math:`q` of PopRiskAdamW (its ``gates()``; 1 otherwise), :math:`\beta = \beta_1`,
      :math:`c = 1-\beta_1`, bias correction :math:`1-\beta_1^t`. Built from
      :func:`lmech.probes.hessian.adam_preconditioner`, whose diagonal
      :math:`(1-\beta_1^t)(\sqrt{\hat v}+\epsilon)/\text{lr}_\text{group}` is inverted and multiplied
      by :math:`1-\beta_1^t`.

    ``lr`` is the reference learning rate (group 0's by default). Raises ``ValueError`` for
    optimizers whose update is not of this form, or whose groups disagree on the momentum.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> opt = torch.optim.Adam(net.parameters(), lr=0.1)
        >>> net(torch.randn(4, 3)).pow(2).mean().backward(); opt.step()
        >>> u = optimizer_update(opt, net)
        >>> u.pi.shape, u.beta, u.step
        (torch.Size([4]), 0.9, 1)
    """
    if optimizer is None:
        return UpdateModel()
    from lmech.probes.hessian import adam_preconditioner

    fm = FunctionalModel(model, params)
    by_name = dict(model.named_parameters())
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    ref = float(optimizer.param_groups[0]["lr"] if lr is None else lr)
    if ref <= 0:
        raise ValueError(f"the reference learning rate must be positive, got {ref}")
    missing = [n for n in fm.names if id(by_name[n]) not in groups]
    if missing:
        raise ValueError(f"parameters {missing} are not in the optimizer; select the optimized ones with params=")
    if _sgd_like(optimizer):
        mom = {(float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0))) for g in optimizer.param_groups}
        if any(g.get("nesterov", False) for g in optimizer.param_groups):
            raise ValueError("Nesterov SGD is not supported (its step mixes the gradient and the buffer); "
                             "use nesterov=False")
        if len(mom) != 1:
            raise ValueError(f"SGD groups use different momentum/dampening {sorted(mom)}; record one group (params=)")
        (mu, damp), = mom
        diag = {n: torch.full_like(by_name[n], float(groups[id(by_name[n])]["lr"]) / ref) for n in fm.names}
        l2 = _per_param(fm, by_name, lambda n: float(groups[id(by_name[n])].get("weight_decay", 0.0)))
        return UpdateModel(flatten(diag).detach(), beta=mu, c=1.0 - damp if mu else 1.0, l2=l2)
    if "betas" not in optimizer.param_groups[0] or "eps" not in optimizer.param_groups[0]:
        raise ValueError(f"unsupported optimizer {type(optimizer).__name__}: the recorder reads SGD, Adam, AdamW and "
                         "PopRiskAdamW; pass optimizer=None for plain gradient descent")
    inverse, _ = adam_preconditioner(optimizer, model, params)
    gates = optimizer_gates(optimizer)
    decoupled = is_decoupled(optimizer)
    wd = lambda n: float(groups[id(by_name[n])].get("weight_decay", 0.0))  # noqa: E731
    l2 = None if decoupled else _per_param(fm, by_name, wd)
    decay = None
    if decoupled:
        decay_parts = {}
        for n in fm.names:
            group, p = groups[id(by_name[n])], by_name[n]
            d = torch.full_like(p, float(group["lr"]) * wd(n) / ref, dtype=torch.float64)
            if group.get("gate_weight_decay", False) and gates.get(p) is not None:
                d = d * gates[p].double()
            decay_parts[n] = d
        decay = flatten(decay_parts) if any(wd(n) for n in fm.names) else None
    diag, beta1s, steps = {}, set(), set()
    for name in fm.names:
        p = by_name[name]
        group = groups[id(p)]
        t = int(float(optimizer.state[p]["step"]))
        b1 = float(group["betas"][0])
        beta1s.add(b1)
        steps.add(t)
        d = (1.0 - b1 ** t) / inverse[name].double() / ref
        q = gates.get(p)
        if q is not None:
            d = d * q.double()
        diag[name] = d.to(p.dtype)
    if len(beta1s) != 1 or len(steps) != 1:
        raise ValueError(f"parameter groups disagree on beta1 {sorted(beta1s)} or step {sorted(steps)}; "
                         "record one group at a time (params=)")
    (b1,), (t,) = beta1s, steps
    return UpdateModel(flatten(diag).detach(), beta=b1, c=1.0 - b1, step=t, bias_correction=True, decay=decay, l2=l2)


def _per_param(fm: FunctionalModel, by_name: dict, value) -> Tensor | None:
    """Flat float64 vector of a per-group coefficient (``None`` when it is zero everywhere)."""
    vals = {n: value(n) for n in fm.names}
    if not any(vals.values()):
        return None
    return flatten({n: torch.full_like(by_name[n], v, dtype=torch.float64) for n, v in vals.items()})


def optimizer_preconditioner(optimizer: torch.optim.Optimizer | None, model: nn.Module,
                             params: ParamSelector = None, lr: float | None = None) -> Tensor | None:
    r"""The diagonal :math:`\Pi` of :func:`optimizer_update` (``None`` for the identity).

    Example:
        >>> net = nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> optimizer_preconditioner(opt, net, lr=0.05)
        tensor([2., 2., 2., 2.])
    """
    return optimizer_update(optimizer, model, params, lr).pi
