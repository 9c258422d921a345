r"""Exact learning dynamics of deep linear networks (Saxe, McClelland & Ganguli 2014).

Setting and conventions (shared/research/learning-mechanics.md, section 1.1)
----------------------------------------------------------------------------
A depth-:math:`L` linear network :math:`f(x) = W_L \cdots W_1 x` (``W_l`` of shape
``(n_l, n_{l-1})``) trained on the squared loss

.. math::  \mathcal L = \tfrac12\,\mathbb E\,\lVert y - W_L\cdots W_1 x\rVert^2

(mean over samples, factor 1/2). Only two data statistics enter:
:math:`\Sigma_{xx} = \mathbb E[xx^\top]` and :math:`\Sigma_{yx} = \mathbb E[yx^\top]`.
Time is gradient-flow time :math:`t = \eta \times \text{steps}` (Saxe's :math:`\tau = 1`).

Mode dynamics. With whitened inputs (:math:`\Sigma_{xx}=I`) and
:math:`\Sigma_{yx} = U S V^\top` (singular values :math:`s_\mu`), a balanced, aligned
initialization keeps every layer diagonal in the singular basis, and each mode's end-to-end
strength :math:`u_\mu = u_\mu^\top W_L\cdots W_1 v_\mu` obeys

.. math::  \dot u = L\,u^{2-2/L}\,(s-u).

* :math:`L = 2`: the logistic equation, :math:`u(t) = s e^{2st}/(e^{2st} - 1 + s/u_0)`, and the
  time from :math:`u_0` to :math:`u` is :math:`t = \frac1{2s}\ln\frac{u(s-u_0)}{u_0(s-u)}`.
* :math:`L \ne 2`: separating variables with :math:`u = a^L` and expanding
  :math:`1/(s-a^L)` as a geometric series gives the closed form
  :math:`t(u) = F(u) - F(u_0)` with

  .. math::  F(u) = \frac{u^{2/L-1}}{s\,(2-L)}\;{}_2F_1\!\left(1, \tfrac2L - 1; \tfrac2L;
             \tfrac us\right),

  (Gauss hypergeometric function, ``scipy.special.hyp2f1``; derivation in
  :func:`mode_time`). For :math:`L=1` (linear regression, no saddle) this is
  :math:`t = \ln\frac{s-u_0}{s-u}`.

Conservation law. Under gradient flow every
:math:`D_l = W_{l+1}^\top W_{l+1} - W_l W_l^\top` is constant (balancedness). Under gradient
descent with step :math:`\eta` the first-order terms still cancel and each step changes it by
exactly :math:`\eta^2 (G_{l+1}^\top G_{l+1} - G_l G_l^\top)` with
:math:`G_l = \partial\mathcal L/\partial W_l`; at fixed time :math:`t` the drift is therefore
:math:`\eta\,C_l(t) + O(\eta^2)`, with
:math:`C_l(t) = \int_0^t (G_{l+1}^\top G_{l+1} - G_l G_l^\top)\,dt'` along the flow
(:func:`gradient_flow` integrates it).

Random small initialization (depth 2). In the early, linear phase the hidden vectors
:math:`p = W_1 v_\mu`, :math:`q = W_2^\top u_\mu` obey :math:`\dot p = s q`,
:math:`\dot q = s p`, so :math:`u_\mu = q^\top p \to \tfrac14\lVert p_0 + q_0\rVert^2 e^{2st}`.
The mode then follows the logistic curve started from the *effective* initial strength
:math:`\tfrac14\lVert p_0+q_0\rVert^2` (:func:`effective_u0`), which replaces the "O(1)
alignment transient" of the notes with a formula. This ignores the coupling between modes
through shared hidden directions, which is small when the width is much larger than the rank.

Example:
    >>> import numpy as np
    >>> t = np.array([0.0, 1.0, 2.0])
    >>> [round(float(u), 4) for u in mode_trajectory(t, s=2.0, u0=1e-3)]
    [0.001, 0.0532, 1.1972]
    >>> round(half_time(s=2.0, u0=1e-3), 4)      # (1/(2s)) ln((s - u0)/u0)
    1.9001
    >>> round(float(mode_time(1.0, s=2.0, u0=1e-3, depth=3)), 4)
    4.6613
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import brentq
from scipy.special import hyp2f1

__all__ = [
    "mode_rhs",
    "mode_time",
    "half_time",
    "mode_trajectory",
    "effective_u0",
    "aligned_init",
    "layer_gradients",
    "balancedness",
    "GradientFlow",
    "gradient_flow",
]


def _check_mode(s: float, u0: float, depth: int) -> None:
    if depth < 1 or int(depth) != depth:
        raise ValueError(f"depth must be a positive integer, got {depth}")
    if not s > 0:
        raise ValueError(f"singular value s must be positive, got {s}")
    if not 0 < u0 < s:
        raise ValueError(f"initial strength u0 must be in (0, s) = (0, {s}), got {u0}")


def mode_rhs(u: np.ndarray | float, s: float, depth: int = 2) -> np.ndarray | float:
    r"""The mode ODE right-hand side :math:`\dot u = L u^{2-2/L} (s - u)` (effective time)."""
    u = np.asarray(u, dtype=np.float64)
    return depth * np.abs(u) ** (2.0 - 2.0 / depth) * (s - u)


def _antiderivative(u: float | np.ndarray, s: float, depth: int) -> np.ndarray:
    """F(u) with dF/du = 1 / (L u^{2-2/L} (s-u)), for 0 < u < s."""
    u = np.asarray(u, dtype=np.float64)
    if depth == 2:
        return np.log(u / (s - u)) / (2.0 * s)
    if depth == 1:
        return -np.log(s - u)
    b = 2.0 / depth - 1.0
    return u ** b * hyp2f1(1.0, b, b + 1.0, u / s) / (s * (2.0 - depth))


def mode_time(u: float | np.ndarray, s: float, u0: float, depth: int = 2) -> np.ndarray:
    r"""Gradient-flow time for a mode to grow from :math:`u_0` to :math:`u` (:math:`0<u_0\le u<s`).

    Closed form :math:`t = F(u) - F(u_0)`. Derivation for depth :math:`L`: with :math:`u=a^L`,
    :math:`\dot a = a^{L-1}(s-a^L)`, so :math:`t = \int a^{1-L}/(s-a^L)\,da
    = \frac1s\sum_k a^{2-L+kL}/(s^k(2-L+kL))`, which is
    :math:`\frac{a^{2-L}}{s(2-L)}\,{}_2F_1(1, b; b+1; a^L/s)` with :math:`b = (2-L)/L`, because
    :math:`{}_2F_1(1,b;b+1;z) = \sum_k \frac{b}{b+k} z^k`. Depth 2 is the logistic time
    :math:`\frac1{2s}\ln\frac{u(s-u_0)}{u_0(s-u)}`; depth 1 is :math:`\ln\frac{s-u_0}{s-u}`.
    """
    _check_mode(s, u0, depth)
    u = np.asarray(u, dtype=np.float64)
    if np.any(u < u0) or np.any(u >= s):
        raise ValueError(f"target strength must be in [u0, s) = [{u0}, {s}), got {u}")
    return _antiderivative(u, s, depth) - _antiderivative(u0, s, depth)


def half_time(s: float, u0: float, depth: int = 2) -> float:
    r"""Time to reach half the target strength, :math:`u = s/2`.

    Depth 2: :math:`t_{1/2} = \frac1{2s}\ln\frac{s-u_0}{u_0} \approx \frac1{2s}\ln\frac s{u_0}`.
    """
    return float(mode_time(s / 2.0, s, u0, depth))


def mode_trajectory(t: np.ndarray | float, s: float, u0: float, depth: int = 2) -> np.ndarray:
    r"""Mode strength :math:`u(t)` from :math:`u(0)=u_0` under :math:`\dot u = L u^{2-2/L}(s-u)`.

    Depth 2 is the explicit logistic :math:`u = s e^{2st}/(e^{2st}-1+s/u_0)`; other depths invert
    the closed-form time :func:`mode_time` with Brent's method in the logit variable
    :math:`w = \ln(u/(s-u))` (one root per time point). ``t`` must be >= 0.
    """
    _check_mode(s, u0, depth)
    t = np.asarray(t, dtype=np.float64)
    if np.any(t < 0):
        raise ValueError("times must be >= 0")
    if depth == 2:
        with np.errstate(over="ignore"):
            decay = np.exp(-2.0 * s * t)  # u = s / (1 + (s/u0 - 1) e^{-2st}), overflow-safe form
        return s / (1.0 + (s / u0 - 1.0) * decay)
    f0 = float(_antiderivative(u0, s, depth))
    w0 = float(np.log(u0 / (s - u0)))
    out = np.empty(t.shape)
    with np.errstate(divide="ignore"):  # F(u) -> inf as u -> s marks "not reached yet"
        for idx, ti in np.ndenumerate(t):
            out[idx] = _invert_time(float(ti), s, u0, depth, f0, w0)
    return out


def _invert_time(ti: float, s: float, u0: float, depth: int, f0: float, w0: float) -> float:
    """The u with F(u) - F(u0) = ti, by bracketing and Brent's method in the logit of u/s."""

    def u_of(w: float) -> float:
        return s / (1.0 + np.exp(-w))

    if ti == 0:
        return u0
    hi = w0 + 1.0
    while _antiderivative(u_of(hi), s, depth) - f0 < ti:
        hi = w0 + 2.0 * (hi - w0)
        if hi > 700:  # u indistinguishable from s in float64
            return s
    w = brentq(lambda v: float(_antiderivative(u_of(v), s, depth) - f0 - ti), w0, hi, xtol=1e-13, rtol=1e-14)
    return u_of(w)


def effective_u0(w1: np.ndarray, w2: np.ndarray, u_vec: np.ndarray, v_vec: np.ndarray) -> float:
    r"""Effective initial strength of a mode for a *random* depth-2 initialization.

    :math:`\tfrac14\lVert W_1 v + W_2^\top u\rVert^2` with ``v`` the input and ``u`` the output
    singular vector of :math:`\Sigma_{yx}` (whitened inputs). See the module docstring: the
    early linear phase amplifies :math:`p+q` as :math:`e^{st}` and damps :math:`p-q`.
    """
    p = np.asarray(w1) @ np.asarray(v_vec)
    q = np.asarray(w2).T @ np.asarray(u_vec)
    return float(np.sum((p + q) ** 2) / 4.0)


def aligned_init(u_mat: np.ndarray, v_mat: np.ndarray, u0: np.ndarray, depth: int, width: int,
                 rotations: list[np.ndarray] | None = None) -> list[np.ndarray]:
    r"""Balanced, aligned weights whose end-to-end map is :math:`U\,\mathrm{diag}(u_0)\,V^\top`.

    Each layer carries :math:`a_\mu = u_{0,\mu}^{1/L}` on mode :math:`\mu`:
    :math:`W_1 = R_1 [\mathrm{diag}(a)\;0]^\top V^\top`, :math:`W_l = R_l\,\mathrm{diag}(a)\,R_{l-1}^\top`
    (restricted to the first ``r`` hidden directions), :math:`W_L = U\,\mathrm{diag}(a) R_{L-1}^\top`,
    with orthogonal :math:`R_l` (``rotations``, identity by default). ``u_mat`` is
    ``(d_out, r)``, ``v_mat`` ``(d_in, r)``, ``u0`` has ``r`` positive entries, ``width >= r``.
    Returns ``[W_1, ..., W_L]`` (float64); for ``depth=1`` the single map
    :math:`U\,\mathrm{diag}(u_0)V^\top`.
    """
    u0 = np.asarray(u0, dtype=np.float64)
    r = len(u0)
    if u_mat.shape[1] != r or v_mat.shape[1] != r:
        raise ValueError(f"U and V must have {r} columns (one per mode), got {u_mat.shape}, {v_mat.shape}")
    if width < r:
        raise ValueError(f"width ({width}) must be at least the number of modes ({r})")
    if np.any(u0 <= 0):
        raise ValueError("initial strengths must be positive")
    if depth == 1:
        return [u_mat @ np.diag(u0) @ v_mat.T]
    a = u0 ** (1.0 / depth)
    rots = rotations or [np.eye(width) for _ in range(depth - 1)]
    if len(rots) != depth - 1:
        raise ValueError(f"need {depth - 1} rotations, got {len(rots)}")
    emb = [rot[:, :r] for rot in rots]  # width x r orthonormal frames
    weights = [emb[0] @ np.diag(a) @ v_mat.T]
    for l in range(1, depth - 1):
        weights.append(emb[l] @ np.diag(a) @ emb[l - 1].T)
    weights.append(u_mat @ np.diag(a) @ emb[-1].T)
    return weights


def _products(weights: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Left products A_l = W_L..W_{l+1} and right products B_l = W_{l-1}..W_1 (identity ends)."""
    depth = len(weights)
    right = [np.eye(weights[0].shape[1])]
    for w in weights[:-1]:
        right.append(w @ right[-1])
    left = [np.eye(weights[-1].shape[0])]
    for w in reversed(weights[1:]):
        left.append(left[-1] @ w)
    left = left[::-1]
    assert len(left) == len(right) == depth
    return left, right


def layer_gradients(weights: list[np.ndarray], sigma_xx: np.ndarray, sigma_yx: np.ndarray) -> list[np.ndarray]:
    r"""Population gradients :math:`G_l = A_l^\top (W\Sigma_{xx} - \Sigma_{yx}) B_l^\top`.

    :math:`W = W_L\cdots W_1`, :math:`A_l = W_L\cdots W_{l+1}`, :math:`B_l = W_{l-1}\cdots W_1`;
    the loss is :math:`\tfrac12\mathbb E\lVert y - Wx\rVert^2`.
    """
    left, right = _products(weights)
    end_to_end = left[0] @ weights[0]
    err = end_to_end @ sigma_xx - sigma_yx
    return [a.T @ err @ b.T for a, b in zip(left, right)]


def balancedness(weights: list[np.ndarray]) -> list[np.ndarray]:
    r""":math:`D_l = W_{l+1}^\top W_{l+1} - W_l W_l^\top` for :math:`l = 1..L-1` (conserved by the flow)."""
    return [weights[l + 1].T @ weights[l + 1] - weights[l] @ weights[l].T for l in range(len(weights) - 1)]


@dataclass
class GradientFlow:
    """Solution of the matrix gradient flow at the requested times.

    ``weights[k]`` is the list of layer matrices at ``t[k]``; ``drift_rate[k]`` is the list of
    :math:`C_l(t_k) = \\int_0^{t_k} (G_{l+1}^\\top G_{l+1} - G_l G_l^\\top) dt`, so gradient descent
    with step ``eta`` has balancedness drift ``eta * C_l(t) + O(eta^2)``.
    """

    t: np.ndarray
    weights: list[list[np.ndarray]]
    drift_rate: list[list[np.ndarray]]

    def end_to_end(self, k: int) -> np.ndarray:
        w = self.weights[k][0]
        for m in self.weights[k][1:]:
            w = m @ w
        return w


def gradient_flow(weights: list[np.ndarray], sigma_xx: np.ndarray, sigma_yx: np.ndarray, t_eval: np.ndarray,
                  rtol: float = 1e-10, atol: float = 1e-12) -> GradientFlow:
    r"""Integrate :math:`\dot W_l = -G_l` (and :math:`\dot C_l = G_{l+1}^\top G_{l+1} - G_lG_l^\top`).

    Uses ``scipy.integrate.solve_ivp`` (DOP853) on the flattened matrices; ``t_eval`` must be
    sorted and start at or after 0. This is the reference the closed forms are tested against,
    and the source of the first-order GD drift prediction.
    """
    shapes = [w.shape for w in weights]
    sizes = [int(np.prod(s)) for s in shapes]
    d_shapes = [(s[0], s[0]) for s in shapes[:-1]]
    d_sizes = [int(np.prod(s)) for s in d_shapes]

    def unpack(z: np.ndarray):
        ws, pos = [], 0
        for shape, size in zip(shapes, sizes):
            ws.append(z[pos:pos + size].reshape(shape))
            pos += size
        return ws

    def rhs(_t: float, z: np.ndarray) -> np.ndarray:
        ws = unpack(z)
        grads = layer_gradients(ws, sigma_xx, sigma_yx)
        dc = [grads[l + 1].T @ grads[l + 1] - grads[l] @ grads[l].T for l in range(len(ws) - 1)]
        return np.concatenate([-g.ravel() for g in grads] + [c.ravel() for c in dc])

    z0 = np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in weights] + [np.zeros(sum(d_sizes))])
    t_eval = np.asarray(t_eval, dtype=np.float64)
    sol = solve_ivp(rhs, (0.0, float(t_eval[-1])), z0, method="DOP853", t_eval=t_eval, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"gradient-flow integration failed: {sol.message}")
    out_w, out_c = [], []
    n_w = sum(sizes)
    for k in range(sol.y.shape[1]):
        z = sol.y[:, k]
        out_w.append(unpack(z))
        cs, pos = [], n_w
        for shape, size in zip(d_shapes, d_sizes):
            cs.append(z[pos:pos + size].reshape(shape))
            pos += size
        out_c.append(cs)
    return GradientFlow(t=sol.t, weights=out_w, drift_rate=out_c)
