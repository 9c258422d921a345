r"""Signal channel and reservoir: the path-integrated NTK operators of a real training run.

Source: Litman & Guo, *A Theory of Generalization in Deep Learning* (arXiv 2605.01172, 2026),
Sec. 3, 5, 6 and App. E/H, as reconstructed in ``shared/research/generalization-theory.md``
sections 1 and 4 (notation follows the notes).

Setting
-------
A training set :math:`S` of :math:`n` examples with :math:`o` outputs each, stacked example-major
into :math:`u = U_S(w) \in \mathbb R^{N}`, :math:`N = n o`; a query (test) set :math:`Q` of
:math:`m` examples, :math:`U_Q(w) \in \mathbb R^{M}`. The output-space loss is

* ``"mse"``: :math:`\Phi_S(u) = \frac1{2n}\|u - y\|^2` (half the squared error summed over the
  outputs, averaged over examples), so :math:`g = \nabla_u\Phi_S = (u - y)/n` and
  :math:`B = \nabla_u^2\Phi_S = I/n`;
* ``"cross_entropy"``: :math:`\Phi_S = \frac1n\sum_i \mathrm{CE}(u_i, y_i)`, so
  :math:`g_i = (\pi_i - e_{y_i})/n` and :math:`B = \mathrm{blockdiag}_i(\mathrm{diag}\,\pi_i -
  \pi_i\pi_i^\top)/n` with :math:`\pi_i = \mathrm{softmax}(u_i)`.

If the training loop minimizes ``loss_scale`` :math:`\times\,\Phi_S` (e.g. ``F.mse_loss`` with
mean reduction is :math:`\frac2o\Phi_S`), pass that ``loss_scale``: the time step becomes
:math:`\eta = \text{lr}\times\text{loss\_scale}`.

A step of the optimizer is, to first order in the step, :math:`\Delta w_k = -\eta_k\,
\Pi_k J_{S,k}^\top E_k g_k`, with :math:`\Pi_k` the optimizer's diagonal preconditioner
(identity for plain gradient descent) and :math:`E_k` the minibatch weighting
(:math:`(n/b)\,\mathrm{diag}(\mathbf 1_{\text{batch}})`; identity for full batch). The driving
kernels are :math:`K_k = J_{S,k}\Pi_kJ_{S,k}^\top` and :math:`K_{QS,k} = J_{Q,k}\Pi_kJ_{S,k}^\top`.
The recorder accumulates, from the window start :math:`s` (:math:`P_s = I`):

.. math::

    P_{k+1} &= (I - \eta_k B_k K_k E_k)\,P_k            &&\text{propagator: } g_k \approx P_k g_s\\
    W_S &= \textstyle\sum_k \eta_k\,P_k^\top K_k P_k     &&\text{cumulative dissipation Gramian}\\
    G_Q &= \textstyle\sum_k \eta_k\,K_{QS,k} E_k P_k      &&U_Q(T) - U_Q(s) \approx -G_Q\,g_s\\
    D   &= \textstyle\sum_k \eta_k\,K_k E_k P_k           &&U_S(T) - U_S(s) \approx -D\,g_s\\
    A   &= G_Q D^{+}                                     &&U_Q(T)-U_Q(s) \approx A\,(U_S(T)-U_S(s))

and the readouts of :meth:`PathRecorder.readout`: the spectrum of :math:`W_S`, the split of
output-gradient space into the **signal channel** (eigenvectors of :math:`W_S` above a cutoff:
directions where training dissipated loss) and the **reservoir** (below: directions training did
not touch), the energies of the residual, of its clean-label part and of its label-noise part in
each, the dissipation identity :math:`\Phi_S(s) - \Phi_S(T) \approx g_s^\top W_S g_s`, predicted
vs actual test displacement, reservoir invisibility :math:`\|G_Q\psi\| / \|G_Q\|` on the
near-null space of :math:`W_S` (Prop. 3.2: :math:`\ker W_S \subseteq \ker G_Q`) and kernel drift.

Decisions (the notes leave these open; each is tested in ``tests/test_gramian.py``)
------------------------------------------------------------------------------------
* **Recording between calls.** Call :meth:`PathRecorder.step` *after* each optimizer step (or
  after every ``k``-th, passing ``steps=k``). The Jacobians are taken at the weights of the
  previous call (the left end of the interval) and the preconditioner is read from the optimizer
  state *after* the step, i.e. the one that step used. With ``steps=k > 1`` the kernel is frozen
  on the interval and the ``k`` steps are integrated exactly for that frozen kernel:
  :math:`(I - \eta BK)^k` and the matching geometric sums (closed form through the eigenvectors
  of :math:`K` for ``"mse"``; ``k`` sub-steps for cross-entropy). The error is that of freezing
  the kernel over ``k`` steps, :math:`O(k\,\eta\,\|\dot K\|)`; ``steps=1`` is the exact discrete
  recursion above. The preconditioner read at the end of the interval is used for all ``k``.
* **Optimizers** (:func:`optimizer_update`). Plain gradient descent (``optimizer=None``),
  ``torch.optim.SGD`` (with or without momentum; not Nesterov), ``Adam``/``AdamW`` and
  :class:`lmech.optim.PopRiskAdamW`. For the Adam family :math:`\Pi =
  \mathrm{diag}(\text{lr}_\text{group}/\text{lr}\,/(\sqrt{\hat v}+\epsilon))`, times the gate
  :math:`q` for PopRiskAdamW (its ``gates()``), read after each step. **Momentum** (Adam's
  :math:`\beta_1`, SGD's ``momentum``): the buffer is carried in parameter space as its
  sensitivity to :math:`g_s`, :math:`M_k = \beta M_{k-1} + c\,J_{S,k}^\top E_kP_k` (a
  :math:`P\times N` matrix), and the step is :math:`\Delta U_S = -\eta J_{S,k}\Pi_k M_k/s_k\,g_s`
  (:math:`c = 1-\beta_1`, :math:`s_k = 1-\beta_1^k` for Adam; :math:`c = 1-` dampening, :math:`s = 1`
  for SGD), so :math:`P_{k+1} = P_k - \eta B J_S\Pi M_k/s_k`, :math:`D`, :math:`G_Q` accumulate the
  same with :math:`J_S`, :math:`J_Q`, and :math:`W_S \mathrel{+}= \eta\,\mathrm{sym}(P_k^\top
  J_S\Pi M_k/s_k)` (what the dissipation identity needs; it reduces to :math:`\eta P_k^\top K_kP_k`
  without momentum, and may have small negative eigenvalues from momentum overshoot, which count
  as reservoir). This is exact to first order in the step. (Carrying the buffer in output space
  instead, :math:`K_k\sum_j c\beta^{k-j}g_j`, lags the Jacobian and was measured to fail: 170-460%
  one-step error on a ReLU net under AdamW, against 6-16% for the parameter-space buffer. And with
  no momentum at all the linearized Adam propagator diverges as soon as the preconditioned
  sharpness passes :math:`2/\eta`, while Adam is stable up to :math:`(2+2\beta_1)/((1-\beta_1)\eta)`.)
  It costs a :math:`P\times N` float64 matrix per window and two more :math:`NP`-sized products
  per step. A window opened after training
  started gets the buffer of a constant gradient. **Weight decay** is not of the form
  :math:`\Pi J^\top g`: it is carried as an affine forcing independent of :math:`g_s` (decoupled,
  AdamW/PopRiskAdamW: :math:`\Delta U \mathrel{+}= -\text{lr}\,J(\text{decay}\odot w)`; coupled,
  SGD/Adam: :math:`\text{l2}\odot w` joins the gradient buffer), so :math:`U_S(T)-U_S(s) = -Dg_s +
  F_S` and :math:`U_Q(T)-U_Q(s) = -G_Qg_s + F_Q`, and the coupling predicts
  :math:`A(\Delta U_S - F_S) + F_Q` (the dissipation readout is then ``nan``: weight decay changes
  the loss too). All of this is exact for a linear model (tested); on a network the per-step
  ``lin_error`` measures the relative difference between the realized :math:`\Delta U_S` and the
  one-interval prediction. Grokfast and Nesterov are refused.
* **Minibatches.** Pass ``batch`` (indices into :math:`S`) to :meth:`PathRecorder.step`:
  :math:`P`, :math:`G_Q`, :math:`D` use the realized :math:`E_k`; :math:`W_S` keeps the drift
  kernel :math:`K_k` (so it stays positive semi-definite and :math:`E[E_k] = I` makes the
  dissipation identity hold in expectation over the batch order, not per run). The data outside
  :math:`S` must not drive training: the theory is closed on :math:`S` only.
* **Cross-entropy** (approximate where the theory is). :math:`B_k` is the softmax Hessian at the
  interval start, so the propagator is exact to first order per step (``steps=k`` sub-steps keep
  :math:`B` frozen too). The coupling theorem (Thm 5.1) is stated for the squared loss only:
  :math:`A = G_QD^+` is still computed, but its exactness is not a claim of the theory; the
  frozen cutoff uses the mean nonzero eigenvalue of :math:`B` (below), and confident directions
  never saturate, so the cut is a heuristic there.
* **Cutoff of the signal channel** (``cutoff="frozen"``, the default): an eigenvector of
  :math:`W_S` with eigenvalue :math:`\omega` is in the channel iff
  :math:`\omega \ge \frac{1-e^{-2}}{2\bar b}`, with :math:`\bar b = 1/n` for ``"mse"``: the
  frozen-kernel formula :math:`\omega = \frac n2(1 - e^{-2\lambda T/n})` puts the cut at
  :math:`\lambda T/n = 1`, a mode whose residual amplitude decayed by at least :math:`e` (86.5% of
  its loss dissipated). For cross-entropy, :math:`\bar b` is the mean nonzero eigenvalue of
  :math:`B` at the window start (approximate: :math:`B` changes along the path and confident
  directions never saturate). ``cutoff="relative"`` uses ``rel_cutoff`` :math:`\times
  \omega_{\max}`; a float is an absolute cut. The readout reports the gap around the cut
  (``gap_ratio`` = smallest channel over largest reservoir eigenvalue, and the fraction of
  eigenvalues within a factor 2 of the cut) and, cutoff-free, the *soft* channel energy
  :math:`\sum_j \phi_j c_j^2` with :math:`\phi_j = \min(2\bar b\,\omega_j, 1)` the dissipated
  fraction of mode :math:`j`.
* **Population risk from one run (Sec. 6, notes 1.6).** Two readings, both logged per step and
  neither using the query labels. (1) **Leave-one-out along the path** (``poprisk_loo``,
  ``poprisk_gcv``; :mod:`lmech.probes.path_loo`): :math:`D/n = \partial U_S(T)/\partial y` is the
  run's hat matrix, and the path-leverage estimate :math:`\frac1n\sum_i\ell(u_i + (I -
  H_{ii}B_i)^{-1}H_{ii}d_i)` and the path GCV follow from it; these are the estimates the catalog
  checks. (2) **The instantaneous U-statistic** (``poprisk_ustat*``, our earlier reconstruction,
  kept for comparison): with per-example gradients :math:`g_i = J_i^\top\nabla_{u_i}\ell_i`, the
  first-order population-risk change of a step is estimated by :math:`\widehat{\Delta R} =
  -\eta\sum_k\pi_k(\bar g_k^2 - \alpha\,\Sigma_{S,k}/(n-1)) = -\frac{\eta}{n(n-1)}\sum_{i\ne j}
  g_i^\top\Pi g_j` (for :math:`\alpha = 1`), computed from the kernel blocks :math:`K_{ij}` (equal to
  :func:`lmech.optim.poprisk.leave_one_out_term`, tested); ``poprisk_ustat_path`` :math:`=
  \Phi_S(0) + \sum\widehat{\Delta R}` and ``poprisk_ustat`` :math:`= \Phi_S(t) + \text{gap}_t`,
  :math:`\text{gap}_t = \sum\eta\,(\bar g^\top\Pi\bar g + \widehat{\Delta R}/\eta)`. Its
  increments are evaluated at weights trained on the same examples and carry no propagator, so the
  gap can only grow, by :math:`\eta\,\mathrm{tr}(\Pi\Sigma_S)/(n-1) \ge 0` per step
  (docs/results/signal-reservoir.md: it does not track the held-out loss, the leave-one-out
  estimates do).

Cost and memory (measured by ``benchmarks/gramian_cost.py``; see docs/results/signal-reservoir.md)
---------------------------------------------------------------------------------------------
Per recorded interval: per-example Jacobians of :math:`n + m` examples (``vmap(jacrev)``,
:func:`lmech.probes.ntk.per_example_jacobian`), the contraction :math:`[J_S; J_Q]\,\Pi J_S^\top`
(:math:`2(N + M)NP` FLOPs) and :math:`O(N^3 + MN^2)` for the propagator (with momentum, two more
:math:`NP`-sized products per step). Memory: the Jacobians, :math:`(N+M)P` numbers, twice while
they are measured (per-tensor pieces and their concatenation; the previous ones are released
first), one scaled copy (:math:`\max(N, M)P`), :math:`O(N^2 + MN)` float64 state and, with
momentum, a :math:`P\times N` float64 buffer per window. :meth:`PathRecorder.memory_estimate`
computes the bytes before anything is allocated and the constructor raises
:class:`lmech.core.MemoryBudgetError` above ``max_bytes``. Measured for a 103k-parameter MLP,
:math:`|S| = |Q| = 256`, one output, float32, one thread: one recorded step costs about two
:math:`(N+M)\times P\times N` GEMMs (0.7 s for the Jacobians + 1.7 s for the rest on the shared
2-core machine, where that GEMM ran at 22 GFLOP/s; about 160x a training step), a readout 0.13 s;
see ``docs/results/signal-reservoir.md`` for the memory numbers.

Example:
    >>> import torch
    >>> from lmech.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> net = MLP(4, 1, width=32, depth=1)
    >>> x, y, xq = torch.randn(16, 4), torch.randn(16, 1), torch.randn(8, 4)
    >>> rec = PathRecorder(net, x, y, xq)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.01)
    >>> rec.start()                       # at the initial weights
    >>> for _ in range(20):
    ...     opt.zero_grad(); rec.loss_fn(net(x), y).backward(); opt.step()
    ...     scalars = rec.step(lr=0.01)
    >>> r = rec.readout()
    >>> r.dissipation_rel_err < 0.1, r.eigenvalues.shape
    (True, (16,))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmech.core.batch import Output, adapt_input_pair
from lmech.core.functional import DEFAULT_MAX_BYTES, FunctionalModel, ParamSelector, flatten
from lmech.core.linalg import check_memory
from lmech.probes.base import Cost, TrainState
from lmech.probes.ntk import kernel_drift, per_example_jacobian
from lmech.probes.path_loo import PathLOO, path_loo
from lmech.probes.precision import full_precision

__all__ = [
    "PathRecorder",
    "GramianPath",
    "GramianReadout",
    "ChannelSplit",
    "GramianProbe",
    "half_mse",
    "channel_split",
    "frozen_gramian_eigenvalues",
    "optimizer_preconditioner",
    "optimizer_update",
    "UpdateModel",
    "LOSSES",
]

LOSSES = ("mse", "cross_entropy")
Loss = Literal["mse", "cross_entropy"]
Inputs = Union[Tensor, tuple]
CUT_FRACTION = 1.0 - math.exp(-2.0)
"""Dissipated fraction of a mode at :math:`\\lambda T / n = 1` (frozen kernel): :math:`1 - e^{-2}`."""


def half_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    r""":math:`\Phi = \frac1{2n}\sum_i \|u_i - y_i\|^2`: the squared loss of the theory (half the
    squared error summed over the output entries of an example, averaged over the ``n`` examples).

    ``F.mse_loss(outputs, targets)`` (mean over all ``n o`` entries) equals :math:`\frac 2o\Phi`.

    Example:
        >>> half_mse(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2))
        tensor(2.5000)
    """
    n = outputs.shape[0]
    return 0.5 * (outputs - targets).pow(2).reshape(n, -1).sum(1).mean()


def frozen_gramian_eigenvalues(kernel_eigenvalues, time: float, n: int):
    r"""Frozen-kernel (gradient-flow, squared loss) eigenvalues of :math:`W_S(0, T)`:
    :math:`\frac n2\,(1 - e^{-2\lambda T/n})` for each eigenvalue :math:`\lambda` of :math:`K`.

    Example:
        >>> float(frozen_gramian_eigenvalues(np.array([1e9]), 1.0, 10)[0])
        5.0
    """
    lam = np.asarray(kernel_eigenvalues, dtype=np.float64)
    return 0.5 * n * -np.expm1(-2.0 * np.clip(lam, 0, None) * time / n)


# --------------------------------------------------------------------------------------------
# The optimizer's preconditioner
# --------------------------------------------------------------------------------------------


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
      :func:`lmech.probes.sharpness.adam_preconditioner`, whose diagonal
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
    from lmech.optim.poprisk import PopRiskAdamW
    from lmech.probes.sharpness import adam_preconditioner

    fm = FunctionalModel(model, params)
    by_name = dict(model.named_parameters())
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    ref = float(optimizer.param_groups[0]["lr"] if lr is None else lr)
    if ref <= 0:
        raise ValueError(f"the reference learning rate must be positive, got {ref}")
    missing = [n for n in fm.names if id(by_name[n]) not in groups]
    if missing:
        raise ValueError(f"parameters {missing} are not in the optimizer; select the optimized ones with params=")
    if isinstance(optimizer, torch.optim.SGD):
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
    gates = optimizer.gates() if isinstance(optimizer, PopRiskAdamW) else {}
    decoupled = isinstance(optimizer, (torch.optim.AdamW, PopRiskAdamW))
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


# --------------------------------------------------------------------------------------------
# Accumulated operators of one window
# --------------------------------------------------------------------------------------------


@dataclass
class GramianPath:
    r"""The operators accumulated from a window start :math:`s` (module docstring).

    Attributes (float64): ``P`` (:math:`N\times N` propagator), ``W`` (:math:`W_S`), ``D``,
    ``G`` (:math:`M\times N`, :math:`G_Q`), ``time`` (:math:`\sum\eta`), ``steps``, ``c_Q``
    (:math:`\sum_k\eta_k\,\mathrm{tr}\,K_{QQ,k}`, the constant of the invisibility bound
    :math:`\|G_Q\xi\|^2 \le c_Q\,\xi^\top W_S\xi`), and the outputs, loss and output gradient at
    the start: ``u_S0``, ``u_Q0``, ``phi0``, ``g0``, ``b0`` (the output-Hessian scale
    :math:`\bar b` used by the cutoff); ``u_S_end``/``u_Q_end``: the outputs when a window closed
    (``None`` while it is open: readouts then use the current outputs). With momentum, ``R`` is the
    parameter-space buffer per unit :math:`g_s` (:math:`P\times N`); with weight decay, ``F_S``/``F_Q`` are the output displacements
    it caused (the affine part: :math:`U_S(T)-U_S(s) = -Dg_s + F_S`, :math:`U_Q(T)-U_Q(s) = -G_Qg_s
    + F_Q`), ``h`` the output-gradient offset it left and ``Rh``, ``Rc`` its buffers.
    """

    P: Tensor
    W: Tensor
    D: Tensor
    G: Tensor
    u_S0: Tensor
    u_Q0: Tensor
    phi0: float
    g0: Tensor
    b0: float
    start_step: int
    time: float = 0.0
    steps: int = 0
    c_Q: float = 0.0
    u_S_end: Tensor | None = None
    u_Q_end: Tensor | None = None
    fresh: bool = True
    R: Tensor | None = None
    momentum: bool = False
    h: Tensor | None = None
    Rh: Tensor | None = None
    Rc: Tensor | None = None
    F_S: Tensor | None = None
    F_Q: Tensor | None = None

    @classmethod
    def start(cls, N: int, M: int, u_S: Tensor, u_Q: Tensor, phi: float, g: Tensor, b: float,
              step: int, fresh: bool = True) -> "GramianPath":
        z = dict(dtype=torch.float64)
        return cls(P=torch.eye(N, **z), W=torch.zeros(N, N, **z), D=torch.zeros(N, N, **z),
                   G=torch.zeros(M, N, **z), u_S0=u_S.clone(), u_Q0=u_Q.clone(), phi0=phi, g0=g.clone(),
                   b0=b, start_step=step, fresh=fresh)

    def advance(self, ops: "_IntervalOps") -> None:
        """Compose with one interval's operators (no momentum, no weight decay)."""
        P = self.P
        self.W += P.T @ ops.FW @ P
        self.D += ops.FD @ P
        self.G += ops.FG @ P
        self.P = ops.FP @ P
        self.time += ops.dt
        self.steps += ops.steps
        self.c_Q += ops.dt * ops.trace_QQ

    def advance_general(self, it: "_Interval") -> None:
        r"""One interval with momentum and/or weight decay (module docstring).

        Linear part (per unit :math:`g_s`), each of the interval's steps with the kernel frozen:
        without momentum :math:`A_S = KE P`, :math:`A_Q = K_{QS}EP`; with momentum the buffer is kept
        in parameter space, :math:`M \leftarrow \beta M + c\,J_S^\top E P` (:math:`P`-by-:math:`N`),
        :math:`A_S = J_S\Pi M/s_t`, :math:`A_Q = J_Q\Pi M/s_t` (exact to first order: no lag of the
        Jacobian); then :math:`W_S \mathrel{+}= \eta\,\mathrm{sym}(P^\top A_S)`, :math:`D \mathrel{+}=
        \eta A_S`, :math:`G_Q \mathrel{+}= \eta A_Q`, :math:`P \leftarrow P - \eta BA_S`. Affine part
        (weight decay, independent of :math:`g_s`): the output-gradient offset :math:`h` (with its own
        parameter-space buffer), the coupled term :math:`\text{l2}\odot w` in a parameter-space buffer,
        the decoupled term added to the step; displacements accumulated into ``F_S``, ``F_Q``."""
        upd = it.upd
        mom = upd.beta != 0.0
        init = 0.0 if self.fresh else upd.steady_buffer(it.t_first - 1 if it.t_first else 10**9)
        if mom and self.R is None:          # parameter-space buffer at the window start, per unit g_s
            self.R = init * it.pull(torch.eye(it.N, dtype=torch.float64))
        forcing = it.decay is not None or it.l2 is not None
        if forcing and self.h is None:
            self.h = torch.zeros(it.N, dtype=torch.float64)
            self.F_S = torch.zeros(it.N, dtype=torch.float64)
            self.F_Q = torch.zeros(it.M, dtype=torch.float64)
            self.Rh = torch.zeros(it.n_params, dtype=torch.float64, device=it.J.device) if mom else None
        if it.l2 is not None and self.Rc is None:
            self.Rc = init * it.l2
        for j in range(it.steps):
            sc = upd.scale(it.t_first + j) if it.t_first else 1.0
            if mom:
                self.R = upd.beta * self.R + upd.c * it.pull(self.P)
                A_S, A_Q = it.image(self.R / sc)
            else:
                A_S, A_Q = it.KE @ self.P, it.KQSE @ self.P
            X = self.P.T @ A_S
            self.W += (0.5 * it.eta) * (X + X.T)
            self.D += it.eta * A_S
            self.G += it.eta * A_Q
            if forcing:
                if mom:
                    self.Rh = upd.beta * self.Rh + upd.c * it.pull(self.h)
                    du_S, du_Q = it.image(self.Rh / sc)
                else:
                    du_S, du_Q = it.KE @ self.h, it.KQSE @ self.h
                du_S, du_Q = -it.eta * du_S, -it.eta * du_Q
                if it.l2 is not None:
                    self.Rc = upd.beta * self.Rc + upd.c * it.l2 if mom else it.l2
                    c_S, c_Q = it.image(self.Rc / sc)
                    du_S, du_Q = du_S - it.lr * c_S, du_Q - it.lr * c_Q
                if it.decay is not None:
                    du_S, du_Q = du_S - it.lr * it.decay[0], du_Q - it.lr * it.decay[1]
                self.F_S += du_S
                self.F_Q += du_Q
                self.h = self.h + it.bmul(du_S)
            self.P = self.P - it.eta * it.bmul(A_S)
        self.time += it.eta * it.steps
        self.steps += it.steps
        self.c_Q += it.eta * it.steps * it.trace_QQ
        self.momentum = self.momentum or mom


@dataclass
class _Interval:
    r"""Everything one recorded interval needs: kernels, the stacked Jacobian
    :math:`[J_S; J_Q]` (``J``), the preconditioner, the minibatch weights ``E``, the step sizes, the
    output Hessian ``B`` and the weight-decay terms (``decay`` = :math:`(J_S(\text{decay}\odot w),
    J_Q(\ldots))`, ``l2`` = :math:`\text{l2}\odot w`, parameter space)."""

    K: Tensor
    KQS: Tensor
    J: Tensor
    pi: Tensor | None
    E: Tensor | None
    eta: float
    lr: float
    steps: int
    B: float | Tensor
    upd: UpdateModel
    t_first: int | None
    trace_QQ: float
    decay: tuple[Tensor, Tensor] | None
    l2: Tensor | None
    N: int

    def __post_init__(self):
        self.M = self.J.shape[0] - self.N
        self.n_params = self.J.shape[1]
        self.KE = self.K if self.E is None else self.K * self.E
        self.KQSE = self.KQS if self.E is None else self.KQS * self.E
        self._pi = None if self.pi is None else self.pi.to(self.J.dtype)

    def bmul(self, v: Tensor) -> Tensor:
        return self.B * v if isinstance(self.B, float) else self.B @ v

    def pull(self, V: Tensor) -> Tensor:
        r""":math:`J_S^\top E V` (parameter space, float64)."""
        V = V if self.E is None else (V * self.E if V.dim() == 1 else V * self.E[:, None])
        return (self.J[:self.N].T @ V.to(self.J)).double()      # parameter space: on J's device

    def image(self, V: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`([J_S; J_Q]\,\Pi V)` split into the S and Q rows (float64)."""
        V = V.to(self.J.dtype)
        if self._pi is not None:
            V = V * (self._pi if V.dim() == 1 else self._pi[:, None])
        out = (self.J @ V.to(self.J)).double().cpu()            # output space: float64 on the CPU
        return out[:self.N], out[self.N:]


@dataclass
class _IntervalOps:
    r"""Operators of one interval, from its start (:math:`P = I`): :math:`F_P = \prod (I-\eta BKE)`,
    :math:`F_W = \sum \eta F^\top K F`, :math:`F_D = \sum\eta KEF`, :math:`F_G = \sum\eta K_{QS}EF`."""

    FP: Tensor
    FW: Tensor
    FD: Tensor
    FG: Tensor
    dt: float
    steps: int
    trace_QQ: float


def _interval_ops(K: Tensor, KQS: Tensor, eta: float, steps: int, B: float | Tensor,
                  E: Tensor | None, trace_QQ: float) -> _IntervalOps:
    """Exact discrete integration of ``steps`` steps with the kernel frozen (module docstring)."""
    N = K.shape[0]
    if isinstance(B, float) and E is None and steps == 1:
        # one step: F_P = I - eta b K, F_W = F_D = eta K, F_G = eta K_QS (what the closed form gives)
        FP = torch.eye(N, dtype=torch.float64) - (eta * B) * K
        return _IntervalOps(FP, eta * K, eta * K, eta * KQS, eta, 1, trace_QQ)
    if isinstance(B, float) and E is None:
        # B = b I: closed form through K = V diag(lam) V^T; a = 1 - eta b lam per step
        lam, V = torch.linalg.eigh((K + K.T) / 2)
        lam = lam.clamp_min(0.0)
        x = eta * B * lam
        a = 1 - x
        k = float(steps)
        # a^k, 1 - a^k, 1 - a^2k: through log1p/expm1 where a > 0 (no cancellation for small x)
        log_a = torch.log1p(-x.clamp(max=1 - 1e-16))
        pos = x < 1
        pw = torch.where(pos, torch.exp(k * log_a), a ** steps)
        om1 = torch.where(pos, -torch.expm1(k * log_a), 1 - a ** steps)
        om2 = torch.where(pos, -torch.expm1(2 * k * log_a), 1 - a ** (2 * steps))
        one_minus_a2 = x * (2 - x)
        s1 = torch.where(x.abs() < 1e-13, torch.full_like(x, k), om1 / torch.where(x == 0, 1.0, x))
        s2 = torch.where(one_minus_a2.abs() < 1e-13, torch.full_like(x, k),
                         om2 / torch.where(one_minus_a2 == 0, 1.0, one_minus_a2))
        FP = (V * pw) @ V.T
        FW = (V * (eta * lam * s2)) @ V.T
        FD = (V * (eta * lam * s1)) @ V.T
        FG = ((KQS @ V) * (eta * s1)) @ V.T
        return _IntervalOps(FP, FW, FD, FG, eta * steps, steps, trace_QQ)
    if E is not None and steps != 1:
        raise ValueError("a minibatch interval must be a single step (steps=1 with batch=...)")
    Bm = B * torch.eye(N, dtype=torch.float64) if isinstance(B, float) else B
    KE = K if E is None else K * E            # K diag(E): scale columns
    KQSE = KQS if E is None else KQS * E
    step_map = torch.eye(N, dtype=torch.float64) - eta * (Bm @ KE)
    FP = torch.eye(N, dtype=torch.float64)
    FW = torch.zeros(N, N, dtype=torch.float64)
    FD = torch.zeros(N, N, dtype=torch.float64)
    FG = torch.zeros(KQS.shape[0], N, dtype=torch.float64)
    for _ in range(steps):
        FW += eta * (FP.T @ K @ FP)
        FD += eta * (KE @ FP)
        FG += eta * (KQSE @ FP)
        FP = step_map @ FP
    return _IntervalOps(FP, FW, FD, FG, eta * steps, steps, trace_QQ)


# --------------------------------------------------------------------------------------------
# Readouts
# --------------------------------------------------------------------------------------------


@dataclass
class ChannelSplit:
    r"""Eigen-decomposition of :math:`W_S` and its split into signal channel and reservoir.

    Attributes:
        eigenvalues: descending, float64 numpy array (:math:`\omega_j`).
        eigenvectors: ``(N, N)`` tensor, column ``j`` belongs to ``eigenvalues[j]``.
        cutoff: the cut :math:`c`; ``channel = eigenvalues >= c``.
        rule: how the cut was chosen (``"frozen"``, ``"relative"``, ``"absolute"``).
        n_channel: number of channel directions.
        gap_ratio: smallest channel eigenvalue / largest reservoir eigenvalue (``inf`` if either
            side is empty): how clean the cut is (1 = no gap).
        near_cut_fraction: fraction of eigenvalues within a factor 2 of the cut.
        saturation: :math:`1/(2\bar b)`, the frozen-kernel saturation value (``n/2`` for MSE),
            used for the dissipated fractions ``phi`` :math:`=\min(\omega_j/\text{saturation}, 1)`.
    """

    eigenvalues: np.ndarray
    eigenvectors: Tensor
    cutoff: float
    rule: str
    n_channel: int
    gap_ratio: float
    near_cut_fraction: float
    saturation: float

    @property
    def channel(self) -> np.ndarray:
        return self.eigenvalues >= self.cutoff

    @property
    def phi(self) -> np.ndarray:
        return np.clip(self.eigenvalues / self.saturation, 0.0, 1.0)

    def energies(self, v: Tensor) -> dict[str, float]:
        r"""Energy of a vector :math:`v` (length :math:`N`) in the channel and the reservoir.

        ``total`` :math:`=\|v\|^2`, ``channel`` :math:`=\|\Pi_C v\|^2`, ``reservoir``
        :math:`=\|\Pi_R v\|^2`, ``channel_soft`` :math:`=\sum_j\phi_j c_j^2` (cutoff-free) and
        ``reservoir_fraction`` :math:`=\|\Pi_R v\|^2/\|v\|^2`.
        """
        c2 = (self.eigenvectors.T @ v.double().reshape(-1)).pow(2).numpy()
        total = float(c2.sum())
        ch = float(c2[self.channel].sum())
        res = total - ch
        return dict(total=total, channel=ch, reservoir=res, channel_soft=float((self.phi * c2).sum()),
                    reservoir_fraction=res / total if total > 0 else float("nan"))

    def projections(self, v: Tensor) -> np.ndarray:
        """Squared coefficients :math:`c_j^2 = \\langle\\psi_j, v\\rangle^2` in eigenvalue order."""
        return (self.eigenvectors.T @ v.double().reshape(-1)).pow(2).numpy()


def channel_split(W: Tensor, cutoff: float | str = "frozen", *, saturation: float,
                  rel_cutoff: float = 1e-2) -> ChannelSplit:
    r"""Split output-gradient space by the eigenvalues of :math:`W_S` (module docstring).

    ``cutoff``: ``"frozen"`` (:math:`c = (1-e^{-2})\,\text{saturation}`), ``"relative"``
    (:math:`c = \text{rel\_cutoff}\cdot\omega_{\max}`) or a number (absolute).

    Example:
        >>> s = channel_split(torch.diag(torch.tensor([5.0, 4.0, 0.1], dtype=torch.float64)), saturation=5.0)
        >>> s.n_channel, round(s.cutoff, 4)
        (1, 4.3233)
    """
    Ws = (W + W.T) / 2
    vals, vecs = torch.linalg.eigh(Ws.double())
    vals, vecs = vals.flip(0), vecs.flip(1)
    ev = vals.numpy().copy()
    if isinstance(cutoff, str):
        if cutoff == "frozen":
            cut, rule = CUT_FRACTION * saturation, "frozen"
        elif cutoff == "relative":
            if not 0 < rel_cutoff < 1:
                raise ValueError(f"rel_cutoff must be in (0, 1), got {rel_cutoff}")
            cut, rule = rel_cutoff * float(max(ev[0], 0.0)), "relative"
        else:
            raise ValueError(f"cutoff must be 'frozen', 'relative' or a number, got {cutoff!r}")
    else:
        cut, rule = float(cutoff), "absolute"
        if not cut > 0:
            raise ValueError(f"an absolute cutoff must be positive, got {cutoff}")
    channel = ev >= cut
    n_ch = int(channel.sum())
    if 0 < n_ch < len(ev):
        gap = float(ev[n_ch - 1] / ev[n_ch]) if ev[n_ch] > 0 else float("inf")
    else:
        gap = float("inf")
    near = float(np.mean((ev >= cut / 2) & (ev <= 2 * cut))) if len(ev) else 0.0
    return ChannelSplit(ev, vecs, float(cut), rule, n_ch, gap, near, float(saturation))


@dataclass
class GramianReadout:
    r"""Everything :meth:`PathRecorder.readout` measures on one window (module docstring).

    Scalars (``nan`` when not applicable): ``time`` (:math:`T = \sum\eta`), ``steps``,
    ``dissipation_predicted`` (:math:`g_s^\top W_S g_s`), ``dissipation_actual``
    (:math:`\Phi_S(s)-\Phi_S(T)`), ``dissipation_rel_err``; ``coupling_corr`` /
    ``coupling_rel_err`` (:math:`A\,\Delta U_S` vs the actual :math:`\Delta U_Q`, Pearson
    correlation over all entries and :math:`\|\text{pred}-\text{actual}\|/\|\text{actual}\|`);
    ``response_corr`` / ``response_rel_err`` (:math:`-G_Q g_s` vs :math:`\Delta U_Q`);
    ``invisibility`` (:math:`\max_\psi \|G_Q\psi\|/\|G_Q\|_2` over eigenvectors with
    :math:`|\omega| \le` ``null_tol`` :math:`\omega_{\max}`), ``n_null`` (their number),
    ``invisibility_bound_ok`` (every :math:`\|G_Q\psi_j\|^2 \le c_Q\,\omega_j` up to rounding: the
    Cauchy-Schwarz form of Prop. 3.2, exact for the discrete sums; ``None`` with momentum, where
    :math:`G_Q` and :math:`W_S` no longer share the factor :math:`J_S^\top P_k`);
    ``drift_op`` / ``drift_fro`` / ``drift_distance`` (:class:`lmech.probes.ntk.KernelDrift` of the
    last driving kernel against the first), ``kernel_norm_ratio`` (:math:`\|K_t\|_2/\|K_0\|_2`).

    ``split``: the :class:`ChannelSplit`; ``energies``: ``{"residual" | "clean" | "noise":
    ChannelSplit.energies(...)}`` of :math:`n\,g_s` (the residual for MSE) and of its clean-label
    and label-noise parts (when clean targets were given); ``noise_transfer``: :math:`\|G_Q
    g_\text{noise}\|^2/m`, the test-output displacement the label noise caused, per query example.
    ``extras``: ``G_psi_over_G`` (:math:`\|G_Q\psi_j\|/\|G_Q\|_2` per eigenvector) and ``projections``
    (:meth:`ChannelSplit.projections` of each energy part).
    """

    time: float
    steps: int
    split: ChannelSplit
    energies: dict[str, dict[str, float]]
    dissipation_predicted: float
    dissipation_actual: float
    dissipation_rel_err: float
    coupling_corr: float
    coupling_rel_err: float
    response_corr: float
    response_rel_err: float
    invisibility: float
    n_null: int
    invisibility_bound_ok: bool | None
    drift_op: float
    drift_fro: float
    drift_distance: float
    kernel_norm_ratio: float
    noise_transfer: float
    extras: dict = field(default_factory=dict)

    @property
    def eigenvalues(self) -> np.ndarray:
        return self.split.eigenvalues

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Flat dict of the scalar readouts (energies as ``<part>_<cell>``), ready for ``run.log``."""
        out = {k: float(getattr(self, k)) for k in (
            "time", "dissipation_predicted", "dissipation_actual", "dissipation_rel_err", "coupling_corr",
            "coupling_rel_err", "response_corr", "response_rel_err", "invisibility", "drift_op", "drift_fro",
            "drift_distance", "kernel_norm_ratio", "noise_transfer")}
        out["n_null"] = float(self.n_null)
        out["n_channel"] = float(self.split.n_channel)
        out["cutoff"] = self.split.cutoff
        out["gap_ratio"] = self.split.gap_ratio
        out["near_cut_fraction"] = self.split.near_cut_fraction
        for part, e in self.energies.items():
            for cell, v in e.items():
                out[f"{part}_{cell}"] = v
        return {prefix + k: v for k, v in out.items()}


def _corr_relerr(pred: Tensor, actual: Tensor) -> tuple[float, float]:
    a, p = actual.reshape(-1).double(), pred.reshape(-1).double()
    na = float(a.norm())
    rel = float((p - a).norm()) / na if na > 0 else float("nan")
    if a.numel() < 2 or float(a.std()) == 0 or float(p.std()) == 0:
        return float("nan"), rel
    return float(torch.corrcoef(torch.stack([p, a]))[0, 1]), rel


# --------------------------------------------------------------------------------------------
# The recorder
# --------------------------------------------------------------------------------------------


class PathRecorder:
    r"""Record the signal-channel / reservoir operators along a real training run.

    Math, decisions and costs: see the module docstring. The loop::

        rec = PathRecorder(model, x_S, y_S, x_Q, y_Q, loss="mse", optimizer=opt, y_clean=y_S_clean)
        rec.start()                             # at the initial weights
        for step in range(steps):
            opt.zero_grad(); rec.loss_fn(model(x_S), y_S).backward(); opt.step()
            scalars = rec.step(lr)             # after the optimizer step; every step, or steps=k
        r = rec.readout()                       # W_S spectrum, channel/reservoir, coupling, ...

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to ``(n, *out)`` outputs; it must treat
            examples independently (it is evaluated in ``eval()`` mode during recording).
        x_train, y_train: the training set :math:`S` (the examples whose loss drives training);
            MSE targets shaped like the outputs, cross-entropy targets class indices ``(n,)``.
        x_query, y_query: the query set :math:`Q` (``y_query`` optional: used only to log the
            held-out loss that the population-risk estimate is compared with afterwards).
        loss: ``"mse"`` (:func:`half_mse`) or ``"cross_entropy"`` (mean cross-entropy of logits).
        optimizer: the training optimizer (``None`` = plain gradient descent), read after each step.
        params: parameter selector (the trained ones; default all).
        y_clean: clean training targets, for the signal / label-noise decomposition.
        loss_scale: the training loss is ``loss_scale`` times :math:`\Phi_S`.
        alpha: leave-one-out coefficient of the U-statistic estimate (1: the U-statistic).
        max_bytes: memory budget; the constructor refuses above it.
        window: if set, a second window restarts every ``window`` recorded steps
            (:attr:`window_path`), for the operators of the recent past (grokking).
        chunk_size: examples vectorized at once in the Jacobian (``None``: all).
        output: the tensor the recorder sees of a model returning a ``ModelOutput``/dict/tuple (a
            field name, an index or a callable); inputs may be dicts (:mod:`lmech.core.batch`).

    Devices: the Jacobians and parameter-space buffers stay on the model's device; the output-space
    operators (:math:`N\times N`, float64) and the readouts live on the CPU.

    Attributes: ``path`` (the :class:`GramianPath` from :meth:`start`), ``window_path`` (the open
    window) and :attr:`last_window`; ``K0``/``KQS0`` and ``K_last`` (first and last driving
    kernels); ``history`` (the scalars of every :meth:`step`, with their step count).
    """

    def __init__(self, model: nn.Module, x_train: Inputs, y_train: Tensor, x_query: Inputs,
                 y_query: Tensor | None = None, *, loss: Loss = "mse",
                 optimizer: torch.optim.Optimizer | None = None, params: ParamSelector = None,
                 y_clean: Tensor | None = None, loss_scale: float = 1.0, alpha: float = 1.0,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, window: int | None = None,
                 chunk_size: int | None = None, output: Output = None):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if not (loss_scale > 0 and math.isfinite(loss_scale)):
            raise ValueError(f"loss_scale must be a positive number, got {loss_scale}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive number of steps, got {window}")
        self.model, self.loss, self.optimizer, self.params = model, loss, optimizer, params
        self.loss_scale, self.alpha, self.max_bytes = float(loss_scale), float(alpha), max_bytes
        self.window, self.chunk_size = window, chunk_size
        # dict/nested inputs and output= (lmech.core.batch): the model takes flat tensor tuples
        model, self.xs_S, self.xs_Q = adapt_input_pair(model, x_train, x_query, output)
        self.model = model
        self.xs_all = tuple(torch.cat([a, b]) for a, b in zip(self.xs_S, self.xs_Q))
        self.fm = FunctionalModel(model, params)
        self.n = int(self.xs_S[0].shape[0])
        self.m = int(self.xs_Q[0].shape[0])
        if self.n < 2:
            raise ValueError(f"the training set S needs at least 2 examples, got {self.n}")

        with torch.no_grad(), _eval(model):
            out = model(*(x[:1] for x in self.xs_S))
        self.out_shape = tuple(out.shape[1:])
        self.o = int(math.prod(self.out_shape))
        self.N, self.M = self.n * self.o, self.m * self.o
        self.y = self._check_targets(y_train, "y_train", self.n)
        self.y_clean = None if y_clean is None else self._check_targets(y_clean, "y_clean", self.n)
        self.y_query = None if y_query is None else self._check_targets(y_query, "y_query", self.m)
        self.itemsize = max(p.element_size() for p in self.fm.params.values())
        check_memory(self.memory_estimate(), max_bytes,
                     f"the path recorder (|S|={self.n}, |Q|={self.m}, {self.o} outputs, {self.fm.numel} parameters)",
                     "use fewer training/query examples, a parameter subset (params=), or raise max_bytes")
        self._state: dict | None = None
        self.path: GramianPath | None = None
        self.window_path: GramianPath | None = None
        self.K0: Tensor | None = None
        self.KQS0: Tensor | None = None
        self.K_last: Tensor | None = None
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        self._phi_init = float("nan")
        self._gap = 0.0
        self._pop_path = 0.0
        self._closed_window: GramianPath | None = None
        self._m_out: Tensor | None = None
        self._mc: Tensor | None = None
        self._fresh = True

    # -- configuration -------------------------------------------------------------------------
    def _check_targets(self, y: Tensor, what: str, n: int) -> Tensor:
        if not isinstance(y, Tensor) or y.shape[0] != n:
            raise ValueError(f"{what} must be a tensor with {n} rows (one per example), got "
                             f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
        if self.loss == "mse":
            if tuple(y.shape[1:]) != self.out_shape and not (self.o == 1 and y.dim() == 1):
                raise ValueError(f"{what} has shape {tuple(y.shape)}; MSE targets must match the model "
                                 f"outputs (n, {', '.join(map(str, self.out_shape))})")
            return y.detach().double().cpu().reshape(n, self.o)
        if y.dtype.is_floating_point or y.dim() != 1 or len(self.out_shape) != 1:
            raise ValueError(f"cross-entropy needs integer class targets of shape ({n},) and logits (n, C); got "
                             f"{what} {tuple(y.shape)} {y.dtype}, outputs (n, {', '.join(map(str, self.out_shape))})")
        return y.detach().long().cpu()

    @property
    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        r"""The loss :math:`\Phi` the recorder assumes (train with it, or pass ``loss_scale``)."""
        return half_mse if self.loss == "mse" else F.cross_entropy

    def memory_estimate(self) -> int:
        """Peak bytes of one recorded step (module docstring), computed before any allocation."""
        P, N, M = self.fm.numel, self.N, self.M
        jac = 2 * self.itemsize * P * (N + M)        # Jacobians of S and Q: per-tensor pieces + their concatenation
        scaled = self.itemsize * P * max(N, M)       # J_S Pi
        state = 8 * (10 * N * N + 4 * M * N)         # P, W, D, K, K0, interval maps, eigenvectors; G, K_QS
        windows = 1 if self.window is None else 2
        if self.window is not None:
            state += 8 * (3 * N * N + M * N)
        if self._momentum():                         # parameter-space buffer per window, and its products
            state += 8 * P * N * (windows + 1) + 8 * (N + M) * N
        return int(jac + scaled + state)

    def _momentum(self) -> bool:
        opt = self.optimizer
        if opt is None:
            return False
        return any(float(g.get("momentum", 0.0)) or ("betas" in g and float(g["betas"][0])) for g in opt.param_groups)

    # -- measurement at the current weights --------------------------------------------------------
    @full_precision()                              # autocast off: lmech.probes.precision
    def _measure(self) -> dict:
        model = self.model
        with _eval(model):
            with torch.no_grad():
                u_S = model(*self.xs_S).detach().double().cpu().reshape(self.n, self.o)
                u_Q = model(*self.xs_Q).detach().double().cpu().reshape(self.m, self.o)
            # one call for S and Q: rows 0..N-1 are J_S, the rest J_Q (views, no copy)
            J = per_example_jacobian(self.fm, self.xs_all, chunk_size=self.chunk_size, max_bytes=self.max_bytes)
        J = J.reshape(self.N + self.M, -1).detach()
        dl = self._loss_grad(u_S)                    # (n, o): d ell_i / d u_i, Phi = mean_i ell_i
        return dict(u_S=u_S, u_Q=u_Q, J=J, J_S=J[:self.N], J_Q=J[self.N:], dl=dl, phi=self._phi(u_S, self.y),
                    g=(dl / self.n).reshape(-1), w=flatten(self.fm.params).detach().double().clone())

    def _loss_grad(self, u: Tensor, y: Tensor | None = None) -> Tensor:
        y = self.y if y is None else y
        if self.loss == "mse":
            return u - y
        return torch.softmax(u, dim=1) - F.one_hot(y, self.o).double()

    def _phi(self, u: Tensor, y: Tensor) -> float:
        if self.loss == "mse":
            return float(0.5 * (u - y).pow(2).sum(1).mean())
        return float(F.cross_entropy(u, y))

    def _hessian(self, u_S: Tensor) -> float | Tensor:
        if self.loss == "mse":
            return 1.0 / self.n
        pi = torch.softmax(u_S, dim=1)
        blocks = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
        return torch.block_diag(*blocks) / self.n

    def _b_scale(self, u_S: Tensor) -> float:
        if self.loss == "mse":
            return 1.0 / self.n
        ev = torch.linalg.eigvalsh(self._hessian(u_S))
        nz = ev[ev > 1e-12 * float(ev.max())]
        return float(nz.mean())

    def _new_path(self, st: dict, fresh: bool = False) -> GramianPath:
        return GramianPath.start(self.N, self.M, st["u_S"].reshape(-1), st["u_Q"].reshape(-1), st["phi"],
                                 st["g"], self._b_scale(st["u_S"]), self.step_count, fresh=fresh)

    def start(self) -> None:
        """Take the first measurement (done automatically by the first :meth:`step`; call it
        before training starts so the window begins at the initial weights)."""
        st = self._measure()
        self._state = st
        # a momentum buffer is empty only if the optimizer has not stepped yet
        self._fresh = self.optimizer is None or len(self.optimizer.state) == 0
        self.path = self._new_path(st, fresh=self._fresh)
        if self.window is not None:
            self.window_path = self._new_path(st, fresh=self._fresh)
        self._phi_init = st["phi"]

    # -- one interval ------------------------------------------------------------------------------
    def step(self, lr: float | None = None, steps: int = 1, batch: Tensor | None = None) -> dict[str, float]:
        r"""Account for the ``steps`` optimizer steps taken since the last call, at learning rate
        ``lr`` (the reference one; default: the optimizer's group-0 ``lr``, read now, so call this
        before a scheduler changes it). ``batch``: indices into :math:`S` of the step's minibatch.

        Returns cheap per-step scalars: ``loss`` (:math:`\Phi_S` after the step), ``query_loss``
        (if ``y_query``), the population-risk estimates ``poprisk_loo`` (path-leverage leave-one-out)
        and ``poprisk_gcv`` (path GCV) with the mean self-leverage ``leverage``
        (:mod:`lmech.probes.path_loo`), the instantaneous U-statistic reconstruction
        ``poprisk_ustat``, ``poprisk_ustat_path`` and ``poprisk_ustat_gap`` (module docstring),
        ``lin_error`` (relative error of the one-interval linear prediction of
        :math:`\Delta U_S`), ``lin_error_query``, ``kernel_trace`` (:math:`\mathrm{tr}K/n`),
        ``drift_fro`` (:math:`\|K-K_0\|_F/\|K_0\|_F`), ``time``; the first-order descent rates at the
        interval start, ``rate_train`` (:math:`\bar g^\top\Pi\bar g`), ``rate_pop`` (its leave-one-out
        version) and, with ``y_query``, ``rate_query`` (:math:`g_Q^\top K_{QS}g_S`, the held-out rate,
        for validation only).
        """
        if self._state is None:
            raise RuntimeError("call recorder.start() before the first optimizer step (the window must begin "
                               "at the weights the first step starts from)")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if lr is None:
            if self.optimizer is None:
                raise ValueError("pass lr= (there is no optimizer to read it from)")
            lr = float(self.optimizer.param_groups[0]["lr"])
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr}")
        eta = float(lr) * self.loss_scale
        E = self._batch_weights(batch)
        st = self._state
        upd = optimizer_update(self.optimizer, self.model, self.params, lr=float(lr))
        pi = upd.pi
        if pi is not None and bool((pi == 1).all()):
            pi = None                                   # plain SGD: skip the scaled copy
        J_S, J_Q = st["J_S"], st["J_Q"]
        JS_pi = J_S if pi is None else J_S * pi.to(J_S.dtype)
        KK = (st["J"] @ JS_pi.T).double().cpu()            # [J_S; J_Q] Pi J_S^T in one product
        del JS_pi
        K, KQS = KK[:self.N], KK[self.N:]
        K = (K + K.T) / 2
        col_sq = torch.einsum("mp,mp->p", J_Q, J_Q).double()
        trace_QQ = float(col_sq.sum() if pi is None else (col_sq * pi.double()).sum())
        # leave-one-out population-risk rate at the interval start (per-example gradients on all of S)
        pop_rate, train_rate = self._loo_rates(K, st["dl"])
        B = self._hessian(st["u_S"])
        paths = [p for p in (self.path, self.window_path) if p is not None]
        decay = l2 = None
        if upd.decay is not None:                     # decoupled weight decay: J (decay * w)
            v = (upd.decay * st["w"]).to(st["J"].dtype)
            dd = (st["J"] @ v).double().cpu()
            decay = (dd[:self.N], dd[self.N:])
        if upd.l2 is not None:                        # coupled weight decay: l2 * w joins the gradient buffer
            l2 = upd.l2 * st["w"]
        if upd.beta == 0.0 and decay is None and l2 is None:
            ops = _interval_ops(K, KQS, eta, steps, B, E, trace_QQ)
            for path in paths:
                path.advance(ops)
            pred_S, pred_Q = -(ops.FD @ st["g"]), -(ops.FG @ st["g"])
        else:
            t_first = None if upd.step is None else upd.step - steps + 1
            if E is not None and steps != 1:
                raise ValueError("a minibatch interval must be a single step (steps=1 with batch=...)")
            it = _Interval(K, KQS, st["J"], pi, E, eta, float(lr), steps, B, upd, t_first, trace_QQ, decay, l2, self.N)
            for path in paths:
                path.advance_general(it)
            pred_S, pred_Q = self._interval_prediction(it, st["g"])
        if self.K0 is None:
            self.K0, self.KQS0 = K, KQS
        self.K_last = K
        self.step_count += steps
        self._pop_path -= eta * steps * pop_rate
        self._gap += eta * steps * (train_rate - pop_rate)
        # new measurement (the old Jacobians are released first); the realized displacement
        # against the one-interval prediction
        for key in ("J", "J_S", "J_Q"):
            st.pop(key)
        del J_S, J_Q
        it = None
        new = self._measure()
        du_S = new["u_S"].reshape(-1) - st["u_S"].reshape(-1)
        du_Q = new["u_Q"].reshape(-1) - st["u_Q"].reshape(-1)
        lin_S = float((du_S - pred_S).norm() / du_S.norm().clamp_min(1e-300))
        lin_Q = float((du_Q - pred_Q).norm() / du_Q.norm().clamp_min(1e-300))
        self._state = new
        loo = self._path_loo(new["u_S"])
        out = dict(loss=new["phi"], poprisk_loo=loo.loo, poprisk_gcv=loo.gcv, leverage=loo.leverage,
                   poprisk_ustat=new["phi"] + self._gap, poprisk_ustat_path=self._phi_init + self._pop_path,
                   poprisk_ustat_gap=self._gap, lin_error=lin_S, lin_error_query=lin_Q,
                   kernel_trace=float(torch.trace(K)) / self.n,
                   drift_fro=float(torch.linalg.matrix_norm(K - self.K0) / torch.linalg.matrix_norm(self.K0)),
                   time=self.path.time)
        out["rate_train"], out["rate_pop"] = train_rate, pop_rate
        if self.y_query is not None:
            out["query_loss"] = self._phi(new["u_Q"], self.y_query)
            # first-order held-out descent rate of this interval, g_Q^T K_QS g_S (validation only)
            d_Q = self._loss_grad(st["u_Q"], self.y_query).reshape(-1) / self.m
            out["rate_query"] = float(d_Q @ KQS @ st["g"])
        if self.window_path is not None and self.window_path.steps >= self.window:
            self.window_path.u_S_end = new["u_S"].reshape(-1).clone()
            self.window_path.u_Q_end = new["u_Q"].reshape(-1).clone()
            self._closed_window = self.window_path
            self.window_path = self._new_path(new)
        self.history.append({"step": float(self.step_count), **out})
        return out

    def _path_loo(self, u_S: Tensor) -> PathLOO:
        """Leave-one-out estimates from the cumulative path (:mod:`lmech.probes.path_loo`); ``nan``
        with weight decay, whose label dependence the path operator ``D`` does not carry."""
        if self.path.F_S is not None:
            nan = float("nan")
            return PathLOO(loo=nan, gcv=nan, leverage=nan, df=nan)
        return path_loo(self.path.D, u_S, self.y, self.loss)

    def _interval_prediction(self, it: _Interval, g: Tensor) -> tuple[Tensor, Tensor]:
        """One-interval prediction of (dU_S, dU_Q) with the realized buffers (parameter space; the
        gradient starts at its measured value and follows the frozen-kernel dynamics inside)."""
        upd = it.upd
        mom = upd.beta != 0.0
        fresh = self.optimizer is None or self._fresh
        init = 0.0 if fresh else upd.steady_buffer(it.t_first - 1 if it.t_first else 10**9)
        if mom and self._m_out is None:
            self._m_out = init * it.pull(g)
        if it.l2 is not None and self._mc is None:
            self._mc = init * it.l2
        d_S = torch.zeros(it.N, dtype=torch.float64)
        d_Q = torch.zeros(it.M, dtype=torch.float64)
        gk = g.clone()
        for j in range(it.steps):
            sc = upd.scale(it.t_first + j) if it.t_first else 1.0
            if mom:
                self._m_out = upd.beta * self._m_out + upd.c * it.pull(gk)
                step_S, step_Q = it.image(self._m_out / sc)
            else:
                step_S, step_Q = it.KE @ gk, it.KQSE @ gk
            step_S, step_Q = -it.eta * step_S, -it.eta * step_Q
            if it.l2 is not None:
                self._mc = upd.beta * self._mc + upd.c * it.l2 if mom else it.l2
                c_S, c_Q = it.image(self._mc / sc)
                step_S, step_Q = step_S - it.lr * c_S, step_Q - it.lr * c_Q
            if it.decay is not None:
                step_S, step_Q = step_S - it.lr * it.decay[0], step_Q - it.lr * it.decay[1]
            d_S += step_S
            d_Q += step_Q
            gk = gk + it.bmul(step_S)
        return d_S, d_Q

    def _batch_weights(self, batch: Tensor | None) -> Tensor | None:
        if batch is None:
            return None
        idx = torch.as_tensor(batch).long().cpu().reshape(-1)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.n:
            raise ValueError(f"batch must hold indices into the training set S (0..{self.n - 1})")
        if idx.unique().numel() != idx.numel():
            raise ValueError("batch indices must be distinct")
        w = torch.zeros(self.n, dtype=torch.float64)
        w[idx] = self.n / idx.numel()
        return w.repeat_interleave(self.o)

    def _loo_rates(self, K: Tensor, dl: Tensor) -> tuple[float, float]:
        r"""Leave-one-out population and training descent rates at the interval start, from the kernel.

        With per-example gradients :math:`g_i = J_i^\top d_i` (:math:`d_i = \nabla_{u_i}\ell_i`) and
        :math:`\Pi`, :math:`\sum_k\pi_k\bar g_k^2 = \frac1{n^2}\sum_{ij} d_i^\top K_{ij} d_j` (training rate)
        and :math:`\sum_k\pi_k\Sigma_{S,k} = \frac1n\sum_i d_i^\top K_{ii} d_i - \text{train}`, so the
        population rate :math:`\sum_k\pi_k(\bar g_k^2 - \alpha\Sigma_{S,k}/(n-1))` needs only :math:`K`
        (:math:`O(N^2)`, no per-example gradients). Equal to
        :func:`lmech.optim.poprisk.leave_one_out_term` on the per-example gradients (tested).
        """
        n, o = self.n, self.o
        d = dl.reshape(-1)
        train = float(d @ K @ d) / n**2
        blocks = K.reshape(n, o, n, o).diagonal(dim1=0, dim2=2)         # (o, o, n): K_ii
        self_sum = float(torch.einsum("an,abn,bn->", dl.T, blocks, dl.T)) / n
        loo = (self_sum - train) / (n - 1)
        return train - self.alpha * loo, train

    # -- readouts ---------------------------------------------------------------------------------
    @property
    def last_window(self) -> GramianPath | None:
        """The most recently completed window (``window`` steps long), or ``None``."""
        return self._closed_window

    def readout(self, path: GramianPath | None = None, *, cutoff: float | str = "frozen",
                rel_cutoff: float = 1e-2, null_tol: float = 1e-6, rcond: float = 1e-8,
                u_S: Tensor | None = None, u_Q: Tensor | None = None) -> GramianReadout:
        r"""All readouts of ``path`` (default: the cumulative window from :meth:`start`) at the
        current weights (or at ``u_S``/``u_Q``, the outputs at the path's end, for a closed window).

        ``cutoff``/``rel_cutoff``: :func:`channel_split`; ``null_tol``: the near-null space of
        :math:`W_S` is :math:`\omega \le` ``null_tol`` :math:`\cdot\,\omega_{\max}` (notes section 5,
        check 2); ``rcond``: relative cutoff of the pseudo-inverse :math:`D^+`
        (singular values below ``rcond`` :math:`\sigma_{\max}` are dropped).
        """
        path = self.path if path is None else path
        if path is None or path.steps == 0:
            raise RuntimeError("nothing recorded yet: call start() and step() first")
        st = self._state
        if u_S is None:
            u_S = st["u_S"].reshape(-1) if path.u_S_end is None else path.u_S_end
        if u_Q is None:
            u_Q = st["u_Q"].reshape(-1) if path.u_Q_end is None else path.u_Q_end
        u_S, u_Q = u_S.double().reshape(-1), u_Q.double().reshape(-1)
        split = channel_split(path.W, cutoff, saturation=1.0 / (2.0 * path.b0), rel_cutoff=rel_cutoff)
        # energies of n g_s (the residual for MSE) and its clean / noise parts
        parts = {"residual": self.n * path.g0}
        noise = None
        if self.y_clean is not None:
            u0 = path.u_S0.reshape(self.n, self.o)
            clean = self._loss_grad(u0, self.y_clean).reshape(-1)
            noise = self.n * path.g0 - clean
            parts.update(clean=clean, noise=noise)
        energies = {k: split.energies(v) for k, v in parts.items()}
        # dissipation identity
        pred = float(path.g0 @ ((path.W + path.W.T) / 2) @ path.g0)
        actual = path.phi0 - self._phi(u_S.reshape(self.n, self.o), self.y)
        diss_rel = abs(pred - actual) / abs(actual) if actual != 0 else float("nan")
        if path.F_S is not None:       # weight decay also changed the loss: the identity is not comparable
            diss_rel = float("nan")
        # coupling A = G D^+ applied to the realized training displacement
        dU_S, dU_Q = u_S - path.u_S0, u_Q - path.u_Q0
        c_corr, c_rel = _corr_relerr(self._couple(path, dU_S, rcond), dU_Q)
        r_corr, r_rel = _corr_relerr(-path.G @ path.g0 + (0.0 if path.F_Q is None else path.F_Q), dU_Q)
        # invisibility on the near-null space, and the Cauchy-Schwarz bound on every direction
        G_norm = float(torch.linalg.matrix_norm(path.G, 2))
        Gpsi = (path.G @ split.eigenvectors).norm(dim=0)
        ev = torch.from_numpy(split.eigenvalues)
        null = ev.abs() <= null_tol * max(float(ev[0]), 0.0)
        inv = float(Gpsi[null].max() / G_norm) if bool(null.any()) and G_norm > 0 else float("nan")
        slack = 1e-9 * float(Gpsi.max() ** 2) + 1e-300
        bound_ok = None if path.momentum else bool((Gpsi.pow(2) <= path.c_Q * ev.clamp_min(0) + slack).all())
        drift = kernel_drift(self.K_last, self.K0)
        ratio = float(torch.linalg.matrix_norm(self.K_last, 2) / torch.linalg.matrix_norm(self.K0, 2))
        transfer = float((path.G @ (noise / self.n)).pow(2).sum() / self.m) if noise is not None else float("nan")
        return GramianReadout(
            time=path.time, steps=path.steps, split=split, energies=energies, dissipation_predicted=pred,
            dissipation_actual=actual, dissipation_rel_err=diss_rel, coupling_corr=c_corr, coupling_rel_err=c_rel,
            response_corr=r_corr, response_rel_err=r_rel, invisibility=inv, n_null=int(null.sum()),
            invisibility_bound_ok=bound_ok, drift_op=drift.rel_op_change, drift_fro=drift.rel_fro_change,
            drift_distance=drift.distance, kernel_norm_ratio=ratio, noise_transfer=transfer,
            extras={"G_psi_over_G": (Gpsi / G_norm).numpy() if G_norm > 0 else None,
                    "projections": {k: split.projections(v) for k, v in parts.items()}})

    def predicted_test_displacement(self, path: GramianPath | None = None, rcond: float = 1e-8) -> tuple[Tensor, Tensor]:
        r"""``(A ΔU_S, ΔU_Q)``: the coupling prediction and the realized test displacement, flat
        (with weight decay, :math:`A(\Delta U_S - F_S) + F_Q`)."""
        path = self.path if path is None else path
        st = self._state
        dU_S = (st["u_S"].reshape(-1) if path.u_S_end is None else path.u_S_end) - path.u_S0
        dU_Q = (st["u_Q"].reshape(-1) if path.u_Q_end is None else path.u_Q_end) - path.u_Q0
        return self._couple(path, dU_S, rcond), dU_Q

    @staticmethod
    def _couple(path: GramianPath, dU_S: Tensor, rcond: float) -> Tensor:
        r""":math:`A\,(\Delta U_S - F_S) + F_Q` (weight decay's own displacements, if any, taken out and put back)."""
        if path.F_S is not None:
            dU_S = dU_S - path.F_S
        x = torch.linalg.lstsq(path.D, dU_S.unsqueeze(1), rcond=rcond, driver="gelsd").solution.squeeze(1)
        out = path.G @ x
        return out if path.F_Q is None else out + path.F_Q

    def kernel(self) -> Tensor:
        r"""The plain NTK :math:`J_S J_S^\top` (float64, :math:`N\times N`) at the last measurement."""
        if self._state is None:
            raise RuntimeError("nothing measured yet: call start() first")
        J = self._state["J_S"]
        return (J @ J.T).double().cpu()

    def kernel_regression_operator(self, rcond: float = 1e-8) -> Tensor:
        r""":math:`K_{QS}(0)\,K_{SS}(0)^+` with the first recorded driving kernels: what :math:`A = G_Q D^+`
        reduces to in the frozen-kernel limit (kernel regression; notes 1.4, App. H)."""
        if self.K0 is None:
            raise RuntimeError("nothing recorded yet: call start() and step() first")
        return self.KQS0 @ torch.linalg.pinv(self.K0, rtol=rcond, hermitian=True)

    def coupling_operator(self, path: GramianPath | None = None, rcond: float = 1e-8) -> Tensor:
        r""":math:`A = G_Q D^+` (singular values of :math:`D` below ``rcond`` :math:`\sigma_{\max}` dropped)."""
        path = self.path if path is None else path
        return path.G @ torch.linalg.pinv(path.D, rtol=rcond)

    def outputs(self) -> tuple[Tensor, Tensor]:
        """Current ``(U_S, U_Q)`` (float64, flat, example-major) as of the last measurement."""
        if self._state is None:
            raise RuntimeError("nothing measured yet: call start() first")
        return self._state["u_S"].reshape(-1), self._state["u_Q"].reshape(-1)


class _eval:
    """Context manager: module in eval mode inside, its previous mode restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [m.training for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.model.modules(), self.modes):
            m.training = mode
        return False


class GramianProbe:
    r"""Monitor probe around a :class:`PathRecorder` (``name = "gramian"``, ``cost = "high"``).

    ``measure(state)`` accounts for the steps since the previous measurement
    (``state.step`` minus the last one, at the optimizer's current group-0 learning rate, with the
    frozen-kernel interval integration of the module docstring) and returns the recorder's
    per-step scalars; every ``readout_every`` measurements it adds the readout scalars
    (``readout/...``). The first measurement starts the window. The recorder's own sets ``S`` and
    ``Q`` are used, not the Monitor's probe batch; the recorder reads the Monitor's optimizer if
    it was built without one (``lr`` fixes the learning rate for plain gradient descent). Schedule
    it every step for the exact discrete recursion; every ``k`` steps freezes the kernel over ``k``
    steps (error :math:`O(k\eta)`).
    """

    name = "gramian"
    cost: Cost = "high"

    def __init__(self, recorder: PathRecorder, readout_every: int = 10, lr: float | None = None, **readout_kwargs):
        if readout_every < 1:
            raise ValueError(f"readout_every must be >= 1, got {readout_every}")
        self.recorder, self.readout_every, self.lr, self.readout_kwargs = recorder, readout_every, lr, readout_kwargs
        self._last_step: int | None = None
        self._count = 0

    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        rec = self.recorder
        if self._last_step is None:
            if rec.optimizer is None and state.optimizer is not None:
                rec.optimizer = state.optimizer
            rec.start()
            self._last_step = state.step
            return {}
        steps = state.step - self._last_step
        if steps < 1:
            return {}
        self._last_step = state.step
        opt = rec.optimizer if rec.optimizer is not None else state.optimizer
        if self.lr is None and opt is None:
            raise ValueError("GramianProbe needs the optimizer (monitor.step(step, optimizer=...)) or lr= to know "
                             "the learning rate")
        lr = self.lr if self.lr is not None else float(opt.param_groups[0]["lr"])
        out: dict[str, float | Tensor] = dict(rec.step(lr, steps=steps))
        self._count += 1
        if self._count % self.readout_every == 0:
            r = rec.readout(**self.readout_kwargs)
            out.update(r.scalars("readout/"))
            out["spectrum"] = torch.from_numpy(r.eigenvalues.copy())
        return out
