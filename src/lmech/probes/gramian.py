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

The design decisions (recording between calls, optimizers and momentum, weight decay, minibatches,
cross-entropy, the cutoff, population risk from one run) and the cost and memory measurements are in
``docs/gramian-decisions.md``; each decision is tested in ``tests/test_gramian.py``. The pieces:
:mod:`lmech.probes.optimizer_state` (the optimizer's linearized step, read by duck typing),
:mod:`lmech.probes.gramian_path` (the accumulated operators), :mod:`lmech.probes.channel` (the
readouts); this module holds the recorder and the Monitor probe, and re-exports the rest.

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
from typing import Callable, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmech.core.batch import Output, adapt_input_pair
from lmech.core.functional import DEFAULT_MAX_BYTES, FunctionalModel, ParamSelector, flatten
from lmech.core.linalg import check_memory
from lmech.probes.base import Cost, TrainState
from lmech.probes.channel import (CUT_FRACTION, ChannelSplit, GramianReadout, _corr_relerr, channel_split,
                                  frozen_gramian_eigenvalues)
from lmech.probes.gramian_path import GramianPath, _Interval, _interval_ops, _IntervalOps  # noqa: F401 (old path)
from lmech.probes.ntk import kernel_drift, per_example_jacobian
from lmech.probes.optimizer_state import UpdateModel, _per_param, optimizer_preconditioner, optimizer_update  # noqa: F401
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
    "CUT_FRACTION",
]

LOSSES = ("mse", "cross_entropy")
Loss = Literal["mse", "cross_entropy"]
Inputs = Union[Tensor, tuple]


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
                     "use fewer training/query examples or a parameter subset (params=)")
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
        KK = (st["J"] @ JS_pi.T).double().cpu()              # [J_S; J_Q] Pi J_S^T in one product
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
            step_S, step_Q, self._m_out, self._mc = it.output_step(gk, self._m_out, self._mc, sc)
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
        :func:`lmech.optim.poprisk_exact.leave_one_out_term` on the per-example gradients (tested).
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
