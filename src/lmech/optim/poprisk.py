r"""PopRiskAdamW: AdamW with the per-parameter signal-to-noise gate of the generalization theory.

Source: Litman & Guo, *A Theory of Generalization in Deep Learning* (arXiv 2605.01172, 2026),
Sec. 6 and Algorithm 1 (App. F), as reconstructed in ``shared/research/generalization-theory.md``
sections 1.6 and 2 (the paper body could not be read first-hand; three independent ports agree
line for line on the update below).

Why a gate
----------
For a minibatch of ``b`` per-example gradients :math:`g_1..g_b` with mean :math:`\bar g`, the
per-coordinate quantity

.. math:: \bar g_k^2 - \frac{\Sigma_{B,k}}{b-1}, \qquad
          \Sigma_{B,k} = \frac1b \sum_{i\in B} (g_{ik} - \bar g_k)^2

equals :math:`\frac{1}{b(b-1)}\sum_{i\ne j} g_{ik} g_{jk}`, the unbiased (leave-one-out)
U-statistic for :math:`\mu_k^2`, the squared *population* mean gradient. A step
:math:`\Delta w = -\eta\,\mathrm{diag}(q)\,\bar g` therefore changes the population risk, to first
order, by :math:`-\eta \sum_k q_k (\bar g_k^2 - \alpha\,\Sigma_{B,k}/(b-1))`, while the training
loss change :math:`-\eta\sum_k q_k \bar g_k^2` also contains the self-terms (memorization).
Maximizing the estimated population descent over :math:`q_k \in [0, 1]` gives the gate
:math:`q_k = \mathbf 1\{\bar g_k^2 > \alpha\,\Sigma_{B,k}/(b-1)\}`. Algorithm 1 replaces the
per-example statistics by streaming ones: Adam's first moment for :math:`\bar g` and an EMA ``s``
of the centered squared gradient, :math:`\mathbb E[\Sigma_B/(b-1)] = \mathrm{Var}(\bar g)`.
:func:`leave_one_out_term` and :func:`compare_noise_proxy` compute the exact term from
per-example gradients to check how well the proxy tracks it.

The update (per element :math:`k`, step :math:`t`; ``g`` is the minibatch-mean gradient)
--------------------------------------------------------------------------------------

.. math::

    s_t &= \rho\, s_{t-1} + (1-\rho)\,(g_t - m_{t-1})^2 \quad\text{(centred on the previous } m)\\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
    \hat m &= m_t/(1-\beta_1^t),\quad \hat v = v_t/(1-\beta_2^t),\quad \hat s = s_t/(1-\rho^t)\\
    w_t &= w_{t-1} - \eta\,\lambda_{wd}\,w_{t-1}\,[q \text{ if gate\_weight\_decay}]
           - \eta\, q \odot \hat m / (\sqrt{\hat v} + \epsilon)

with the gate :math:`q \in [0, 1]` (``softness`` :math:`=\lambda`, gate stabilizer
:math:`\varepsilon_q` = ``gate_eps``, :math:`d = \hat m^2 - \alpha \hat s`):

========  ==========================================================================  ============
``gate``  :math:`q`                                                                   source
========  ==========================================================================  ============
soft      :math:`d_+ / (d_+ + \lambda \hat s + \varepsilon_q)`                         eq. 242, Alg. 1
hard      :math:`\mathbf 1\{d > \tau\,(\hat m^2 + \alpha \hat s)\}`                    eq. 241, ties closed
snr       :math:`\hat m^2 / (\hat m^2 + \lambda\,\alpha\,\hat s + \varepsilon_q)`      eq. 243
none      :math:`1` (exactly ``torch.optim.AdamW``)                                    control arm
========  ==========================================================================  ============

``softness=0`` makes ``soft`` equal to ``hard`` (up to ``gate_eps``, and except on ties, below).
In ``snr`` we multiply :math:`\lambda` by :math:`\alpha` (one port does, eq. 243 as transcribed
has no :math:`\alpha`; with the default :math:`\alpha = 1` both agree), so that
``alpha="finite"`` affects every gate. ``reduction="tensor"`` gates a whole tensor with one
:math:`q` computed from :math:`\sum_k \hat m_k^2` and :math:`\sum_k \hat s_k` over the tensor
(the official code's ``per_tensor``).

``hard`` is eq. 241's :math:`\mathbf 1\{d > 0\}` with ties counted as closed, :math:`\tau =
16\,\epsilon_{\rm mach}` of the state's dtype. :math:`d` is the difference of two rounded
quantities; where :math:`|d| \le \tau(\hat m^2 + \alpha\hat s)` it may be 0 in exact arithmetic
and its computed sign is noise, so the gate stays shut, as it does for :math:`d = 0` (the bound is
derived at ``HARD_TIE_EPS`` in the source). Decisions with :math:`|d|` above the bound are those of
eq. 241. ``reduction="tensor"`` applies the same rule to the sums, :math:`\hat m^2 \to \sum_k \hat
m_k^2` and :math:`\hat s \to \sum_k \hat s_k`, summing :math:`\hat m_k^2 - \alpha\hat s_k`
elementwise so that the independent rounding of two large sums cannot decide a tie. The
continuous gates are left as they are: at a tie ``soft`` sees the rounded :math:`d_+`, so its
:math:`q` is :math:`O(\epsilon_{\rm mach})` for :math:`\lambda > 0`, but with
:math:`\lambda = 0` it is :math:`d_+/(d_+ + \varepsilon_q)`, which ``gate_eps`` does not keep shut.

``alpha``: a number; ``"fresh"`` = 1 (fresh batches, the paper's boundary); ``"finite"`` =
:math:`b/(n-b)` (App. F.4, eq. 245: batches drawn from a fixed set of ``dataset_size`` = n
examples, ``batch_size`` = b; with :math:`n \gg b` the gate is nearly the identity).

Decisions on the open points (research notes §2.4), settled by experiment
----------------------------------------------------------------------------
Measured with ``python scripts/poprisk_study.py ablations`` (tables in ``docs/results/poprisk.md``).

* **First step gating.** At :math:`t = 1`, :math:`\hat m = g` and :math:`\hat s = g^2`, so
  :math:`\hat m^2/\hat s = 1` exactly: ``hard``/``soft`` with :math:`\alpha \ge 1` block every
  parameter on step 1 and, because :math:`s` was centred on :math:`m_0 = 0`, stay partly shut for
  tens of steps even for a noiseless gradient. In floating point the two sides are equal only up to
  rounding (``m``, ``s`` and ``c`` carry a few rounding errors each), so the sign of :math:`d` is
  noise: with the default betas and rho, which are not exact in binary, ``hard`` as :math:`\mathbf
  1\{d > 0\}` opened 51% (float64) to 58% (float32) of the coordinates on step 1 (the fused path
  100% in float32: its :math:`1 - \mathrm{fl}(\rho)` biased ``s``; it now takes the complements
  computed in double, like the foreach path). Ties within rounding count as closed (the gate
  table), so at step 1 with :math:`\alpha \ge 1` the hard gate closes every coordinate, as exact
  arithmetic says; with :math:`\alpha < 1`, :math:`d = (1-\alpha)\hat m^2 > 0` opens every
  coordinate (unless :math:`\alpha` is within about :math:`2\tau` of 1). For a constant gradient
  the soft gate (:math:`\alpha = \lambda = 1`, default betas and rho) is 0 at step 1, 0.55 at step
  10 and 0.92 at step 50 (``snr``: 0.5, 0.69, 0.92). We keep Algorithm 1 literally (the moments are
  updated from step 1) and add ``gate_warmup`` (default 0): for the first ``gate_warmup`` steps the
  gate is held open (:math:`q = 1`) while ``m, v, s`` accumulate. **Default 0**, by experiment (lr
  1e-3, seeds 0-2): on ``inr-noise`` 100 open steps let the network fit the noise before the gate
  engages and the final error to the clean signal rises from 0.04-0.08 to 0.10-0.16 (soft gate; snr
  0.18-0.25 either way); on ``pinn-advection`` the warm-up changes the steps to target little (soft
  800-1,400 -> 725-1,100; snr 500-575 either way). The first-step closure costs little, the warm-up
  can cost a lot, and 0 is the algorithm as published.
* **Weight decay.** ``gate_weight_decay=False`` (default, Algorithm 1: decoupled, ungated) or
  ``True`` (the decay of element :math:`k` is multiplied by :math:`q_k`). With ungated decay, a
  closed gate leaves decay acting alone and shrinks the parameter geometrically,
  :math:`w \to (1-\eta\lambda_{wd})^t w`. **Default ungated**, by experiment (grokking MLP, a+b
  mod 97, 30%, lr 3e-3, weight decay 1, seed 0, both gates and both alphas): neither form groks
  within 20,000 steps. Ungated, the soft gate lets decay shrink the weight norm from 25 to 5 in
  700 steps and the net never fits its training set; gated, the net memorizes (snr: 100% train
  accuracy) but held-out accuracy stays at chance, because a mostly closed gate also removes the
  decay pressure that makes AdamW grok. Gating was not better in any variant, so the published
  form stays the default.
* **Normalization.** :math:`\hat s` estimates :math:`\Sigma_B/(b-1)` itself; it is *not* divided
  by :math:`b-1` again (one port does, which double-counts :math:`1/b`).
* **Stationary bias.** With stationary gradients :math:`\mathbb E[s] \approx
  \mathrm{Var}(\bar g) \cdot 2/(1+\beta_1)` (about 1.05x) and :math:`s` also counts drift of the
  mean as noise; :func:`compare_noise_proxy` measures the ratio on a real run.

Diagnostics (:meth:`PopRiskAdamW.diagnostics`) are computed on demand from the optimizer state
(``m``, ``s``, ``step`` after the last step determine the gate that step used), so ``step()``
pays nothing for them and nothing is synchronized until they are read.

Implementations: ``step()`` uses ``torch._foreach_*`` ops on the parameters grouped by device,
dtype and step count (bias corrections are folded into the scalar arguments). On CPU, with
``reduction="element"``, the same ops run *cache-blocked*: every tensor is cut into flat views of at
most :data:`CPU_BLOCK_ELEMENTS` elements, packed into blocks of at most that many, and the whole
update runs block by block, so the ~18 elementwise passes of one block (state and temporaries,
about 10 streams of 2 MiB in float32) stay in the last-level cache and main memory sees each
tensor about once; temporaries are block-sized instead of parameter-sized. Each element goes
through exactly the same operations with the same scalars, so the result is that of the unblocked
ops (bitwise, in the benchmark). ``reduction="tensor"`` (its gate needs whole-tensor sums) and
other devices (a GPU's multi-tensor kernels already amortize launches and its allocator caches
temporaries) run the ops unblocked. ``fused=True`` runs one ``torch.compile``-d elementwise kernel
per tensor instead (bias corrections passed as tensor data, so the kernel compiles once; about 20
s of compilation on CPU; see ``benchmarks/optimizer_step.py``).

No host synchronisation in ``step()``: the step counters live on the CPU (also after
``load_state_dict``, which would move them to a ``fused`` group's device), every scalar is a
Python float computed from them, and the fused kernel's scalar vector is copied to the device
without blocking.

Example:
    >>> import torch
    >>> from lmech.optim import PopRiskAdamW
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = PopRiskAdamW(model.parameters(), lr=1e-2, gate="snr", alpha="finite",
    ...                    batch_size=32, dataset_size=1024)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     model(torch.randn(32, 4)).pow(2).mean().backward()
    ...     opt.step()
    >>> sorted(opt.diagnostics())
    ['gate_closed_fraction', 'gate_mean', 'noise', 'pop_descent', 'signal', 'step']
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from lmech.optim.poprisk_exact import batch_noise, compare_noise_proxy, leave_one_out_term
from lmech.optim.poprisk_gate import (  # noqa: F401  (HARD_TIE_EPS, _hard_tie_factor: re-exported)
    GATES,
    HARD_TIE_EPS,
    REDUCTIONS,
    AlphaSpec,
    _foreach_gate,
    _hard_tie_factor,
    _Scalars,
    _state_gates,
    resolve_alpha,
)
from lmech.optim.poprisk_kernels import (  # noqa: F401  (_fused_update: re-exported)
    CPU_BLOCK_ELEMENTS,
    _cache_blocks,
    _compiled_update,
    _fused_update,
)

__all__ = ["PopRiskAdamW", "GATES", "REDUCTIONS", "CPU_BLOCK_ELEMENTS", "resolve_alpha", "leave_one_out_term",
           "batch_noise", "compare_noise_proxy"]


def _check_group(group: dict) -> None:
    lr, eps, wd, rho = group["lr"], group["eps"], group["weight_decay"], group["rho"]
    b1, b2 = group["betas"]
    if isinstance(lr, Tensor):
        raise ValueError("PopRiskAdamW takes lr as a float, not a Tensor")
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not wd >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {wd}")
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"betas must be in [0, 1), got {group['betas']}")
    if not 0 <= rho < 1:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    if group["gate"] not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}, got {group['gate']!r}")
    if group["reduction"] not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {group['reduction']!r}")
    if not group["softness"] >= 0:
        raise ValueError(f"softness must be >= 0, got {group['softness']}")
    if not group["gate_eps"] > 0:
        raise ValueError(f"gate_eps must be > 0 (it defines the gate where m_hat = s_hat = 0), got {group['gate_eps']}")
    if not (isinstance(group["gate_warmup"], int) and group["gate_warmup"] >= 0):
        raise ValueError(f"gate_warmup must be an integer >= 0, got {group['gate_warmup']!r}")
    resolve_alpha(group["alpha"], group["batch_size"], group["dataset_size"])


class PopRiskAdamW(torch.optim.Optimizer):
    r"""AdamW whose update is gated per parameter by the population-risk (leave-one-out) test.

    See the module docstring for the formulas, sources and the decisions on the open points.

    Args:
        params: parameters or param groups (every argument below may be set per group).
        lr: learning rate :math:`\eta`.
        betas: Adam's :math:`(\beta_1, \beta_2)`.
        eps: Adam's :math:`\epsilon`.
        weight_decay: decoupled weight decay :math:`\lambda_{wd}` (AdamW convention: the step
            multiplies :math:`w` by :math:`1 - \eta\lambda_{wd}`).
        rho: EMA rate of the centred variance ``s`` (0.99).
        gate: ``"soft"`` (Algorithm 1), ``"hard"``, ``"snr"`` or ``"none"`` (== AdamW).
        softness: :math:`\lambda` of the soft and snr gates.
        alpha: a number, ``"fresh"`` (1) or ``"finite"`` (``batch_size / (dataset_size -
            batch_size)``).
        batch_size, dataset_size: needed by ``alpha="finite"``.
        reduction: ``"element"`` (one gate per scalar) or ``"tensor"`` (one per tensor).
        gate_eps: :math:`\varepsilon_q`, keeps the gate defined where :math:`\hat s = 0`.
        gate_warmup: number of initial steps with the gate held open (moments still updated).
        gate_weight_decay: multiply each element's weight decay by its gate.
        fused: run a ``torch.compile``-d per-tensor kernel instead of the foreach ops.

    Attributes:
        block_elements: cache-block size of the CPU foreach path (default
            :data:`CPU_BLOCK_ELEMENTS`; ``None`` or 0 runs the foreach ops on whole tensors).

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = PopRiskAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, gate="soft")
        >>> model(torch.randn(8, 3)).sum().backward()
        >>> opt.step()
        >>> round(opt.diagnostics()["gate_mean"], 6)     # step 1: m_hat^2 == s_hat, the soft gate is shut
        0.0
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, rho: float = 0.99, gate: str = "soft",
                 softness: float = 1.0, alpha: AlphaSpec = "fresh", batch_size: int | None = None,
                 dataset_size: int | None = None, reduction: str = "element", gate_eps: float = 1e-12,
                 gate_warmup: int = 0, gate_weight_decay: bool = False, fused: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rho=rho, gate=gate,
                        softness=softness, alpha=alpha, batch_size=batch_size, dataset_size=dataset_size,
                        reduction=reduction, gate_eps=gate_eps, gate_warmup=gate_warmup,
                        gate_weight_decay=bool(gate_weight_decay), fused=bool(fused))
        super().__init__(params, defaults)
        # Cache-block size of the CPU foreach path (an attribute, not a group setting, so that
        # state_dicts saved before it existed load unchanged); 0 or None runs the ops unblocked.
        self.block_elements: int | None = CPU_BLOCK_ELEMENTS

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError("PopRiskAdamW does not support complex parameters; optimize "
                                 "torch.view_as_real(p) as a real parameter instead")
            if not p.is_floating_point():
                raise ValueError(f"PopRiskAdamW needs floating-point parameters, got dtype {p.dtype}")
        _check_group(group)

    # ---------------------------------------------------------------------------------------
    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_var"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _subgroups(self, group: dict, with_grad: bool = True) -> dict:
        """(device, dtype, step) -> lists of params, grads, m, v, s (after incrementing step if with_grad)."""
        out: dict = {}
        for p in group["params"]:
            if with_grad:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PopRiskAdamW does not support sparse gradients; use dense gradients "
                                       "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam")
                state = self._init_state(p)
                state["step"] += 1
            else:
                state = self.state.get(p)
                if not state:
                    continue
            t = int(state["step"].item())
            lists = out.setdefault((p.device, p.dtype, t), ([], [], [], [], []))
            for lst, x in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["exp_var"])):
                lst.append(x)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step (``closure`` re-evaluates the loss, as in ``torch.optim``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for (device, _, t), (ps, gs, ms, vs, ss) in self._subgroups(group).items():
                sc = _Scalars(group, t)
                if group["fused"]:
                    self._fused_step(group, sc, device, ps, gs, ms, vs, ss)
                elif self._blocked(device, group, sc):
                    block = getattr(self, "block_elements", CPU_BLOCK_ELEMENTS)
                    for lists in _cache_blocks((ps, gs, ms, vs, ss), block):
                        self._foreach_step(group, sc, *lists)
                else:
                    self._foreach_step(group, sc, ps, gs, ms, vs, ss)
        return loss

    def _blocked(self, device: torch.device, group: dict, sc: _Scalars) -> bool:
        """Cache-block this subgroup? CPU, a block size, and a gate that needs no whole-tensor sum."""
        block = getattr(self, "block_elements", CPU_BLOCK_ELEMENTS)   # optimizers pickled before it existed
        return device.type == "cpu" and bool(block) and (group["reduction"] == "element" or sc.open)

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, then the step counters back on the CPU.

        torch moves ``step`` to the parameter's device for a group with ``fused=True``; reading it
        there (``step()`` needs it as a Python int) would synchronise with the device every step.
        """
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if isinstance(state.get("step"), Tensor) and state["step"].device.type != "cpu":
                state["step"] = state["step"].to("cpu")

    @staticmethod
    def _foreach_step(group: dict, sc: _Scalars, ps, gs, ms, vs, ss) -> None:
        b1, b2 = group["betas"]
        rho, lr, wd = group["rho"], group["lr"], group["weight_decay"]
        diff = torch._foreach_sub(gs, ms)                      # g - m_{t-1}
        torch._foreach_mul_(ss, rho)
        torch._foreach_addcmul_(ss, diff, diff, 1 - rho)
        del diff
        if wd != 0 and (sc.open or not group["gate_weight_decay"]):
            torch._foreach_mul_(ps, 1 - lr * wd)               # AdamW's order: decay, then the moments
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, sc.bc2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        if sc.open:
            torch._foreach_addcdiv_(ps, ms, denom, -sc.step_size)
            return
        q = _foreach_gate(ms, ss, group["gate"], group["reduction"], sc)
        if wd != 0 and group["gate_weight_decay"]:
            decay = torch._foreach_mul(q, -lr * wd)
            torch._foreach_add_(decay, 1.0)
            torch._foreach_mul_(ps, decay)                     # w <- w (1 - lr wd q)
            del decay
        if group["reduction"] == "tensor":
            q = torch._foreach_mul(ms, q)                      # m times a 0-d gate per tensor
        else:
            torch._foreach_mul_(q, ms)                         # q * m, in place
        torch._foreach_addcdiv_(ps, q, denom, -sc.step_size)

    @staticmethod
    def _fused_step(group: dict, sc: _Scalars, device, ps, gs, ms, vs, ss) -> None:
        b1, b2 = group["betas"]
        rho, dtype = group["rho"], ps[0].dtype
        scalars = torch.tensor([rho, 1 - rho, 1 - b1, b2, 1 - b2, group["lr"] * group["weight_decay"],
                                sc.step_size, sc.bc2_sqrt, group["eps"], sc.c, sc.c_hard(dtype), sc.lam_soft,
                                sc.lam_snr, sc.eps_q, float(sc.open)], dtype=dtype)
        # Built on the CPU and copied without blocking: torch.tensor(..., device="cuda") would
        # synchronise the host with the device (a blocking copy from pageable memory).
        scalars = scalars.to(device, non_blocking=True)
        kernel = _compiled_update()
        for p, g, m, v, s in zip(ps, gs, ms, vs, ss):
            if p.is_contiguous() and g.is_contiguous() and m.is_contiguous():
                p, g, m, v, s = (x.view(-1) for x in (p, g, m, v, s))
            kernel(p, g, m, v, s, scalars, group["gate"], group["reduction"], group["gate_weight_decay"])

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def gates(self) -> dict[Tensor, Tensor]:
        """The gate ``q`` each parameter received in the last step (``{param: q}``; 0-d per tensor
        with ``reduction="tensor"``; ones while the gate is held open)."""
        out: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for (_, _, t), (ps, _, ms, _, ss) in self._subgroups(group, with_grad=False).items():
                out.update(zip(ps, _state_gates(group, _Scalars(group, t), ms, ss)))
        return out

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        r"""Statistics of the last step, computed from the state on demand (one sync, here).

        * ``gate_mean``: mean of :math:`q` over all scalars (a tensor's gate counts once per scalar);
        * ``gate_closed_fraction``: fraction of scalars with :math:`q < 1/2`;
        * ``pop_descent``: :math:`\sum_u (\hat M_u - \alpha \hat S_u)_+` over gating units
          :math:`u` (scalars, or tensors with ``reduction="tensor"``, :math:`\hat M_u = \sum_{k\in u}
          \hat m_k^2`, :math:`\hat S_u = \sum_{k\in u} \hat s_k`): the validation-free estimate of
          the population-risk descent rate;
        * ``signal`` :math:`= \sum_k \hat m_k^2`, ``noise`` :math:`= \sum_k \alpha \hat s_k`;
        * ``step``: the largest step count.

        All are 0 before the first step.
        """
        totals = []
        n_total, step = 0, 0
        for group in self.param_groups:
            for (_, _, t), (ps, _, ms, _, ss) in self._subgroups(group, with_grad=False).items():
                sc = _Scalars(group, t)
                step = max(step, t)
                scale = 1.0 / sc.bc1 ** 2                     # raw (m^2 - c s) -> hat units
                q = _state_gates(group, sc, ms, ss)
                norms = torch._foreach_norm(ms, 2)
                signal = torch._foreach_mul(norms, norms)
                s_sums = torch._foreach_norm(ss, 1)
                for m, s, qi, sig, s_sum in zip(ms, ss, q, signal, s_sums):
                    n = m.numel()
                    n_total += n
                    if group["reduction"] == "tensor":         # one gate for the whole tensor
                        units = (sig - sc.c * s_sum).clamp_min(0) * scale
                        gate_sum, closed = qi * n, (qi < 0.5).to(m.dtype) * n
                    else:
                        units = (m * m - sc.c * s).clamp_min_(0).sum() * scale
                        gate_sum, closed = qi.sum(), (qi < 0.5).sum().to(m.dtype)
                    totals.append(torch.stack([gate_sum.double(), closed.double(), units.double(),
                                               (sig * scale).double(), (s_sum * sc.alpha / sc.bcs).double()]))
        if not totals:
            return dict(gate_mean=0.0, gate_closed_fraction=0.0, pop_descent=0.0, signal=0.0, noise=0.0, step=0)
        g, c, d, sig, noise = torch.stack(totals).sum(0).tolist()
        return dict(gate_mean=g / n_total, gate_closed_fraction=c / n_total, pop_descent=d, signal=sig,
                    noise=noise, step=step)
