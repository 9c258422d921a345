r"""The operators a path recorder accumulates over one window (:class:`GramianPath`).

From a window start :math:`s` (:math:`P_s = I`), with driving kernels :math:`K_k = J_{S,k}\Pi_k
J_{S,k}^\top`, :math:`K_{QS,k} = J_{Q,k}\Pi_kJ_{S,k}^\top`, minibatch weights :math:`E_k` and the
output-space loss Hessian :math:`B_k`:

.. math::

    P_{k+1} = (I - \eta_k B_k K_k E_k)\,P_k,\quad W_S = \textstyle\sum_k \eta_k\,P_k^\top K_k P_k,\quad
    G_Q = \textstyle\sum_k \eta_k\,K_{QS,k} E_k P_k,\quad D = \textstyle\sum_k \eta_k\,K_k E_k P_k.

:func:`_interval_ops` integrates ``steps`` steps exactly with the kernel frozen (closed form through
the eigenvectors of :math:`K` when :math:`B = bI` and full batch); :meth:`GramianPath.advance_general`
carries momentum (a parameter-space buffer) and weight decay (an affine forcing). The module
docstring of :mod:`lmech.probes.gramian` states the setting; docs/gramian-decisions.md the choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmech.probes.optimizer_state import UpdateModel

__all__ = ["GramianPath"]


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
                du_S, du_Q, self.Rh, self.Rc = it.output_step(self.h, self.Rh, self.Rc, sc)
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

    def output_step(self, v: Tensor, buf: Tensor | None, l2_buf: Tensor | None,
                    scale: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        r"""One optimizer step, kernel frozen, driven by the output-space vector ``v`` (a gradient, or
        weight decay's output-gradient offset): the output displacements

        :math:`\Delta U_S = -\eta\,J_S\Pi\,m/s - \text{lr}\,(J_S\Pi\,m_c/s + J_S(\text{decay}\odot w))`
        (and the same with :math:`J_Q`), with the parameter-space momentum buffer
        :math:`m \leftarrow \beta m + c\,J_S^\top E v` (``buf``; without momentum :math:`\Delta U_S =
        -\eta K E v`) and the coupled weight decay's buffer :math:`m_c \leftarrow \beta m_c + c\,
        \text{l2}\odot w` (``l2_buf``). Returns ``(dU_S, dU_Q, buf, l2_buf)``, the buffers advanced.
        The affine forcing of :meth:`GramianPath.advance_general` and the recorder's one-interval
        prediction are both this step."""
        upd = self.upd
        mom = upd.beta != 0.0
        if mom:
            buf = upd.beta * buf + upd.c * self.pull(v)
            d_S, d_Q = self.image(buf / scale)
        else:
            d_S, d_Q = self.KE @ v, self.KQSE @ v
        d_S, d_Q = -self.eta * d_S, -self.eta * d_Q
        if self.l2 is not None:
            l2_buf = upd.beta * l2_buf + upd.c * self.l2 if mom else self.l2
            c_S, c_Q = self.image(l2_buf / scale)
            d_S, d_Q = d_S - self.lr * c_S, d_Q - self.lr * c_Q
        if self.decay is not None:
            d_S, d_Q = d_S - self.lr * self.decay[0], d_Q - self.lr * self.decay[1]
        return d_S, d_Q, buf, l2_buf


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
