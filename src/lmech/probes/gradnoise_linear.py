r"""The ``method="linear"`` pass of :func:`lmech.probes.gradnoise.grad_noise`: a rank's
sufficient statistics of the per-example gradients of ``nn.Linear`` layers from their outer-product
structure :math:`g_i = \delta_i a_i^\top`, without writing the :math:`b \times P` per-example
gradients (the sums-of-squares trick of BackPACK, Dangel et al., ICLR 2020; formulas in the
docstring of :mod:`lmech.probes.gradnoise`), and the per-example loss gradients at the model
output it needs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from lmech.core.functional import FunctionalModel, differentiable_kernels

__all__ = ["GUARD_RTOL"]

# method="linear" falls back unless |sum_i g_i - autograd gradient| <= GUARD_RTOL * (b sum_i |g_i|^2)^(1/2),
# a bound on |sum_i g_i|: float rounding passes, a use of a weight outside its layer does not
GUARD_RTOL = 1e-4


# Losses whose value on a batch is the mean (or sum) of their values on batches of one, so the
# per-example output gradients are b (or 1) times the gradient of the batch loss: one autograd
# call instead of a vmap over the examples (about 1 ms of torch.func overhead on a small batch).
_MEAN_OF_EXAMPLES = (F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
                     F.binary_cross_entropy_with_logits)
_LOSS_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss,
                 nn.BCEWithLogitsLoss)


def _batch_scale(loss_fn: Callable, out: Tensor, targets) -> int | None:
    """``b`` (mean reduction) or ``1`` (sum) when ``loss_fn`` is a known loss whose batch value
    on ``out`` is the mean (sum) of its values on each example alone; ``None`` when that is not
    known. Class weights, ``pos_weight``, ignored targets (weighted means, 0/0 on a batch of one)
    and elementwise targets not shaped like the outputs (broadcasting) break it: ``None``."""
    if loss_fn in _MEAN_OF_EXAMPLES:
        reduction = "mean"
        classes = loss_fn in (F.cross_entropy, F.nll_loss)
        ignore = -100 if classes else None
    elif type(loss_fn) in _LOSS_MODULES:
        if getattr(loss_fn, "weight", None) is not None or getattr(loss_fn, "pos_weight", None) is not None:
            return None
        reduction = loss_fn.reduction
        classes = isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss))
        ignore = getattr(loss_fn, "ignore_index", None)
    else:
        return None
    if not classes and (not isinstance(targets, Tensor) or targets.shape != out.shape):
        return None  # elementwise losses: targets shaped like the outputs (a broadcast mixes examples)
    if ignore is not None and isinstance(targets, Tensor) and not targets.is_floating_point() \
            and bool((targets == ignore).any()):
        return None
    return {"mean": out.shape[0], "sum": 1}.get(reduction)


def _output_grads(loss_fn: Callable, out: Tensor, targets) -> Tensor:
    r"""Per-example loss gradients at the model output, :math:`e_i = \partial\,
    \texttt{loss\_fn}(o_i^{[1]}, y_i^{[1]}) / \partial o_i` with each example a batch of one:
    ``vmap`` over the examples, or for a known mean/sum loss (:func:`_batch_scale`) ``b`` (1)
    times the gradient of the batch loss, the same numbers (tested)."""
    scale = _batch_scale(loss_fn, out, targets)
    if scale is not None:
        o = out.detach().requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn(o, targets), o)
        return g.mul_(scale)

    def one(o_i, y_i):
        return loss_fn(o_i.unsqueeze(0), None if y_i is None else y_i.unsqueeze(0))

    return vmap(grad(one), in_dims=(0, None if targets is None else 0))(out, targets)


def _linear_layers(fm: FunctionalModel) -> dict[nn.Linear, dict[str, str]] | None:
    """``{module: {"weight" | "bias": selected name}}`` when every selected parameter is the weight
    or bias of a plain ``nn.Linear`` (its own ``forward``) under one name only (not tied); else
    ``None``."""
    owner = {}
    for module in fm.model.modules():
        if type(module).forward is nn.Linear.forward:
            for attr in ("weight", "bias"):
                param = getattr(module, attr, None)
                if param is not None:
                    owner[id(param)] = (module, attr)
    names_of: dict[int, int] = {}
    for _, param in fm.model.named_parameters(remove_duplicate=False):
        names_of[id(param)] = names_of.get(id(param), 0) + 1
    layers: dict[nn.Linear, dict[str, str]] = {}
    for name in fm.names:
        param = fm.model.get_parameter(name)
        if id(param) not in owner or names_of[id(param)] != 1:
            return None
        module, attr = owner[id(param)]
        layers.setdefault(module, {})[attr] = name
    return layers


class _LinearPass:
    r"""Local sufficient statistics by the outer-product structure of ``nn.Linear`` gradients
    (``method="linear"``, module docstring), on this rank's examples.

    Per layer with inputs :math:`A` (``n x in``) and output loss gradients :math:`\Delta`
    (``n x out``): the weight sums :math:`S = \Delta^\top A` come from the same backward pass
    that gives :math:`\Delta` (autograd's parameter gradients of :math:`\langle f, e\rangle`, in
    the model's dtype); the sums of squares :math:`(\Delta^{\odot2})^\top A^{\odot2}` in the
    model's dtype (one matrix product per layer, as BackPACK's ``Variance``), combined in float64
    as :math:`\sum_i g_{ik}^2 - S_k^2/n`; the cancellation costs a relative error of about
    :math:`\epsilon\,(1 + \mathrm{GSNR}_k)` in :math:`\hat\sigma^2_k` (:math:`\epsilon` the
    dtype's rounding, times the usual growth of a length-:math:`n` sum), far below 1 where the
    noise matters (:math:`\mathrm{GSNR}_k \ll 1/\epsilon`);
    :math:`|g_i|^2 = |a_i|^2|\delta_i|^2` in float64; :math:`g_i\cdot S =
    \sum_j (\Delta S)_{ij} A_{ij}` (:meth:`dots`, only for standard errors). ``ok`` is ``False``
    when the model is not of that form (checked before and during the pass).

    Guard: autograd's :math:`S` includes every use of a weight; the outer-product sum only the
    use in its layer. They are compared along one random direction :math:`u` per weight,
    :math:`|S u - \Delta^\top (A u)| \le \texttt{GUARD\_RTOL}\,(n \sum_i |\delta_i|^2 (a_i\cdot
    u)^2)^{1/2}` (a bound on :math:`|\sum_i \delta_i (a_i\cdot u)|` by Cauchy-Schwarz), which
    fails almost surely for a weight also used outside its layer (tied, read in ``forward``) or
    a layer output rewritten in place, at :math:`O(n(\text{in}+\text{out}))` instead of a second
    matrix product.
    """

    def __init__(self, fm: FunctionalModel, loss_fn: Callable, inputs: tuple, targets, stderr: bool,
                 exact: bool = True):
        self.fm, self.ok = fm, False
        layers = _linear_layers(fm)
        if not layers:
            return
        n = inputs[0].shape[0]
        seen: dict[nn.Linear, list] = {m: [] for m in layers}

        def record(module, args, output):
            seen[module].append((args[0], output))

        hooks = [m.register_forward_hook(record) for m in layers]
        try:
            with torch.enable_grad(), differentiable_kernels():
                out = fm.model(*inputs)
        finally:
            for h in hooks:
                h.remove()
        if not isinstance(out, Tensor) or out.shape[:1] != (n,) or not out.requires_grad:
            return
        calls = {m: c[0] for m, c in seen.items() if len(c) == 1}
        if len(calls) != len(layers) or any(a.dim() != 2 or a.shape[0] != n or o.dim() != 2
                                            for a, o in calls.values()):
            return
        e = _output_grads(loss_fn, out.detach(), targets)
        modules = list(layers)
        params = [fm.model.get_parameter(name) for name in fm.names]
        found = torch.autograd.grad(out, [calls[m][1] for m in modules] + params, grad_outputs=e,
                                    allow_unused=True)
        deltas = dict(zip(modules, found[:len(modules)]))
        batch_grad = dict(zip(fm.names, found[len(modules):]))

        f64, device = torch.float64, out.device
        dt = f64 if exact else out.dtype  # dtype of the per-coordinate statistics
        names = fm.names
        sizes = [fm.shapes[name].numel() for name in names]
        self.sums, self.squares = (torch.empty(fm.numel, dtype=dt, device=device) for _ in range(2))
        views = dict(zip(names, zip(self.sums.split(sizes), self.squares.split(sizes))))
        index = {name: t for t, name in enumerate(names)}
        self.sq = torch.empty(len(names), n, dtype=f64, device=device) if stderr else None
        self._factors = []  # (tensor index, attr, a, d) for the dots
        gen = torch.Generator(device=device).manual_seed(0)
        mismatch = bound = 0.0
        for module, attrs in layers.items():
            a_raw, d_raw = calls[module][0].detach(), deltas[module]  # (n, in), (n, out), model dtype
            a, d = a_raw.to(dt), d_raw.to(dt)
            d2 = d * d
            d2_rows = d2.sum(1).to(f64)
            for attr, name in attrs.items():
                t = index[name]
                sums, squares = views[name]
                g = batch_grad[name]
                if g is None:
                    return
                if attr == "weight":
                    if a_raw.dtype == dt:  # autograd's batch gradient is the sum of the outer products
                        sums.view_as(g).copy_(g)
                    else:  # float64 from float32 factors: exact products
                        torch.mm(d.T, a, out=sums.view_as(g))
                    a2 = a * a
                    torch.mm(d2.T, a2, out=squares.view_as(g))
                    if stderr:
                        self.sq[t] = a2.sum(1).to(f64) * d2_rows
                    u = torch.randn(a.shape[1], generator=gen, dtype=f64, device=device).to(dt)
                    au = a @ u  # (n,)
                    mismatch += float((g.to(dt) @ u - d.T @ au).to(f64).square().sum())
                    bound += float((d2_rows * au.to(f64).square()).sum()) * n
                else:
                    if a_raw.dtype == dt:
                        sums.copy_(g)
                    else:
                        torch.sum(d, 0, out=sums)
                    torch.sum(d2, 0, out=squares)
                    if stderr:
                        self.sq[t] = d2_rows
                    mismatch += float((g.to(dt) - d.sum(0)).to(f64).square().sum())
                    bound += float(d2_rows.sum()) * n
                self._factors.append((t, attr, a_raw, d_raw))
        self.ok = mismatch <= GUARD_RTOL**2 * bound

    def dots(self, S: Tensor) -> Tensor:
        r""":math:`g_i\cdot S` per tensor, ``(T, n)`` float64, for the global column sums ``S``."""
        sizes = [self.fm.shapes[name].numel() for name in self.fm.names]
        parts = S.split(sizes)
        n = self._factors[0][2].shape[0]
        dot = torch.empty(len(sizes), n, dtype=torch.float64, device=S.device)
        for t, attr, a_raw, d_raw in self._factors:
            if attr == "weight":
                St = parts[t].view(d_raw.shape[1], a_raw.shape[1]).to(d_raw.dtype)
                # in the gradients' dtype, as the "vmap" path computes it (no cancellation)
                dot[t] = ((d_raw @ St) * a_raw).sum(1)
            else:
                dot[t] = d_raw.to(torch.float64) @ parts[t].to(torch.float64)
        return dot

    def uncentered(self) -> Tensor:
        """:math:`\\sum_i g_{ik}^2` over this rank's examples (before :meth:`centered`)."""
        return self.squares

    def centered(self) -> Tensor:
        """Centered sums of squares of this rank's examples, :math:`\\sum_i g_{ik}^2 - S_k^2/n`
        (float64; the products are exact); their column means are ``sums / n``."""
        n = self._factors[0][2].shape[0]
        return self.squares.addcmul_(self.sums, self.sums, value=-1.0 / n).clamp_(min=0.0)
