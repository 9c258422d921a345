r"""The empirical neural tangent kernel of any ``nn.Module``, its spectrum and its drift.

For inputs :math:`x_1..x_{n_1}` and :math:`x'_1..x'_{n_2}` and a network with :math:`o` outputs
per example (any output shape ``(n, *s)``, :math:`o = \prod s`), the empirical NTK over the
selected parameters :math:`w` (Jacot, Gabriel & Hongler 2018) is

.. math::
    \Theta_{(i,a),(j,b)} = \sum_{p} \frac{\partial f_a(x_i; w)}{\partial w_p}\, m_p\,
    \frac{\partial f_b(x'_j; w)}{\partial w_p},
    \qquad \Theta = J_1\, M\, J_2^\top \in \mathbb{R}^{n_1 o \times n_2 o},

with rows ordered example-major (row ``i * o + a``) and :math:`M = \operatorname{diag}(m)` an
optional diagonal parameter metric (``weights``; identity by default; with an optimizer's
inverse preconditioner it gives the kernel :math:`J P^{-1} J^\top` that drives adaptive training).
``trace_outputs=True`` returns :math:`\sum_a \Theta_{(i,a),(j,a)}`, an ``(n_1, n_2)`` matrix.

Examples are differentiated one at a time (a batch of one, as in
:func:`lmech.core.per_example_grads`), so the kernel is the per-example one the theory means; it
equals the Jacobian of the batched forward whenever the model treats examples independently,
which every standard layer does in ``eval()`` mode (BatchNorm and dropout in training mode are
refused with a ``ValueError``).

Two algorithms (Novak, Sohl-Dickstein & Schoenholz, *Fast Finite Width Neural Tangent Kernel*,
ICML 2022), chosen with ``implementation``:

* ``"jacobian"`` — Jacobian contraction. Per-example Jacobians ``vmap(jacrev)`` (``n o`` VJPs of one
  example), then :math:`\Theta \mathrel{+}= J_{1,p} M_p J_{2,p}^\top` parameter tensor by tensor
  (one GEMM each, accumulated into one buffer). Cost: :math:`(n_1+n_2)\,o\,C_{vjp}` plus
  :math:`2 n_1 n_2 o^2 P` FLOPs for the contraction (:math:`2 n_1 n_2 o P` traced). Memory: the
  Jacobians, :math:`(n_1+n_2)\,o\,P` numbers (once for :math:`x_2 = x_1`). Above the budget the
  examples are processed in blocks and block Jacobians recomputed.
* ``"products"`` — NTK-vector products. For a block of columns, the VJPs :math:`J_2^\top e_{(j,b)}`
  give tangents, and one JVP per tangent through the whole first batch gives
  :math:`\Theta_{:, (j,b)} = J_1 (M J_2^\top e_{(j,b)})`. Cost: :math:`n_2 o\,C_{vjp} + n_1 n_2 o\,
  C_{jvp}`; never holds :math:`J_1`. Memory: one block of tangents, ``block * o * P`` numbers.
* ``"auto"`` — estimates both costs in FLOPs with :math:`C_{vjp} \approx 3F` and
  :math:`C_{jvp} \approx 2F`, where :math:`F` is the forward FLOPs of one example *measured* with
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; :math:`2P` if the counter
  sees none). The contraction term :math:`2 n_1 n_2 o^2 P` against :math:`2 n_1 n_2 o F` means
  ``jacobian`` wins for few outputs or weight sharing (:math:`F \gg P`: convolutions, sequences)
  and ``products`` for many outputs of a dense net; a method whose Jacobians do not fit the
  budget is charged its recomputation. The choice is returned by :func:`ntk_cost`.

Memory: the kernel itself, :math:`n_1 o \times n_2 o`, must fit ``max_bytes``; otherwise
:class:`lmech.core.MemoryBudgetError` says what to shrink (fewer examples, ``trace_outputs``, a
parameter subset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap
from torch.func import jvp as _func_jvp
from torch.func import vjp as _func_vjp

from lmech.core.functional import DEFAULT_MAX_BYTES, FunctionalModel, ParamSelector, as_functional, per_example_map, unflatten
from lmech.core.linalg import check_memory
from lmech.core.batch import Output, adapt_input_pair, split_batch, tensor_output
from lmech.probes.base import Cost, TrainState, differentiable_kernels, layer_groups
from lmech.probes.precision import full_precision

__all__ = [
    "ntk",
    "ntk_cost",
    "NTKCost",
    "per_example_jacobian",
    "kernel_spectrum",
    "kernel_alignment",
    "KernelDrift",
    "kernel_drift",
    "kernel_target_alignment",
    "NTKProbe",
]

Implementation = Literal["jacobian", "products", "auto"]
Inputs = Union[Tensor, tuple]


def _as_tuple(x: Inputs) -> tuple:
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not xs or not all(isinstance(t, Tensor) for t in xs):
        raise ValueError("inputs must be a tensor or a non-empty tuple of tensors (batch first)")
    n = xs[0].shape[0]
    if any(t.shape[0] != n for t in xs):
        raise ValueError(f"all inputs must share the batch size; got {[t.shape[0] for t in xs]}")
    return xs


def _prepare(model, params, x, x2=None, output: Output = None):
    """``(fm, xs1, xs2)``: dict/nested inputs and ``output=`` through :mod:`lmech.core.batch`."""
    model, xs1, xs2 = adapt_input_pair(model, x, x2, output)
    return as_functional(model, params), _as_tuple(xs1), None if xs2 is None else _as_tuple(xs2)


def _check_eval_mode(fm: FunctionalModel) -> None:
    for m in fm._modules:
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"{type(m).__name__} is in training mode: its output depends on the "
                             "whole batch, so a per-example NTK is undefined; call model.eval() first")
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ValueError(f"{type(m).__name__} is in training mode: the network is random, so "
                             "its NTK is undefined; call model.eval() first")


def _single(fm: FunctionalModel):
    """(params, *one-example inputs) -> output of that example (batch of one, squeezed)."""
    def f(p, *xs_i):
        return tensor_output(fm(p, *(x.unsqueeze(0) for x in xs_i)), "the NTK").squeeze(0)
    return f


def _itemsize(fm: FunctionalModel) -> int:
    return max(p.element_size() for p in fm.params.values())


def _out_shape(fm: FunctionalModel, xs: tuple) -> torch.Size:
    with torch.no_grad():
        return _single(fm)(fm.params, *(x[0] for x in xs)).shape


def per_example_jacobian(
    model,
    x: Inputs,
    params: ParamSelector = None,
    *,
    flat: bool = True,
    chunk_size: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    output: Output = None,
) -> Tensor | dict[str, Tensor]:
    r"""Per-example Jacobians :math:`J_i = \partial f(x_i; w)/\partial w`.

    ``flat=True`` returns one ``(n, o, P)`` tensor (columns in :func:`lmech.core.flatten` order,
    :math:`o` = the example's output entries); ``flat=False`` a dict ``name -> (n, *out, *shape)``.
    ``vmap(jacrev(...))`` over examples, ``chunk_size`` examples at a time. Refuses above
    ``max_bytes`` (``n * o * P * itemsize``).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> per_example_jacobian(net, torch.randn(5, 3)).shape
        torch.Size([5, 2, 26])
    """
    fm, xs, _ = _prepare(model, params, x, None, output)
    out_shape = _out_shape(fm, xs)
    o = math.prod(out_shape)
    n = xs[0].shape[0]
    check_memory(n * o * fm.numel * _itemsize(fm), max_bytes, f"per-example Jacobians ({n} x {o} x {fm.numel})",
                 "use fewer examples, a parameter subset (params=), or ntk(implementation='products')")
    with differentiable_kernels():
        jac = per_example_map(jacrev(_single(fm)), (None,) + (0,) * len(xs), (fm.params, *xs), chunk_size,
                              "per-example Jacobians", fm.model)
    if not flat:
        return jac
    return torch.cat([jac[nm].reshape(n, o, -1) for nm in fm.names], dim=2)


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


@dataclass
class NTKCost:
    """FLOP and memory estimates behind ``implementation="auto"`` (see :func:`ntk_cost`).

    Attributes:
        forward_flops: :math:`F`, forward FLOPs of one example (measured, or ``2P`` fallback).
        activation_bytes: :math:`A`, bytes autograd saves in one example's forward (measured).
        jacobian_flops, products_flops: estimated totals of the two algorithms.
        jacobian_bytes, products_bytes: their working memory besides the kernel, at the block
            sizes below.
        kernel_bytes: the result.
        jacobian_block, products_block: examples per block that fit the budget (0: none fits).
        example_jacobian_bytes: one example's Jacobian, :math:`o P b`.
        products_column_bytes: one example's block of NTK-vector products, :math:`o (P b + n_1 A)`.
        choice: what ``"auto"`` picks (``"none"`` if neither fits).
    """

    forward_flops: float
    activation_bytes: int
    jacobian_flops: float
    products_flops: float
    jacobian_bytes: int
    products_bytes: int
    kernel_bytes: int
    jacobian_block: int
    products_block: int
    example_jacobian_bytes: int
    products_column_bytes: int
    choice: str


def _measure_forward(fm: FunctionalModel, xs: tuple) -> tuple[float, int]:
    """(forward FLOPs, bytes saved for backward) of one example."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = [0]
    leaves = {n: p.detach().requires_grad_() for n, p in fm.params.items()}
    shared = {p.untyped_storage().data_ptr() for p in (*leaves.values(), *fm.frozen.values(), *fm.buffers.values())}

    def pack(t):  # activations only: parameters and buffers saved for backward are not per example
        if t.untyped_storage().data_ptr() not in shared:
            saved[0] += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    try:
        with torch.enable_grad(), counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _single(fm)(leaves, *(x[0] for x in xs))
        flops = float(counter.get_total_flops())
    except Exception:  # an op the counter cannot trace: fall back to the dense estimate
        flops = 0.0
    return (flops if flops > 0 else 2.0 * fm.numel), saved[0]


def ntk_cost(
    model,
    x: Inputs,
    x2: Inputs | None = None,
    params: ParamSelector = None,
    trace_outputs: bool = False,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    *,
    output: Output = None,
) -> NTKCost:
    r"""The cost model of :func:`ntk`, evaluated for these inputs.

    With :math:`F` the forward FLOPs and :math:`A` the saved activation bytes of one example
    (both measured on ``x[0]``), :math:`o` outputs per example, :math:`P` parameters (``b``
    bytes each), :math:`n_1, n_2` examples (a symmetric kernel computes its Jacobians once):

    * jacobian: FLOPs :math:`r (F + 3 F o) + 2 n_1 n_2 o^{2} P` (:math:`2 n_1 n_2 o P` traced),
      with :math:`r = n_1 + n_2` Jacobian rows (:math:`n_1` symmetric); memory :math:`r\,o\,P\,b`.
      If that exceeds the budget left after the kernel, blocks of :math:`c` examples (two block
      Jacobians in memory) are used and the Jacobian term is paid about :math:`n/c` times.
    * products: FLOPs :math:`n_2 (F + 3 F o) + 2 n_1 n_2 o F`; memory per block of :math:`c`
      columns :math:`c\,o\,(P b + n_1 A)` (tangents and the JVP's activations).

    ``choice`` is the cheaper in FLOPs among the algorithms with a block of at least 1.

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 1))
        >>> ntk_cost(net, torch.randn(32, 10)).choice   # one output: contraction is cheap
        'jacobian'
    """
    fm, xs1, xs2 = _prepare(model, params, x, x2, output)
    o = math.prod(_out_shape(fm, xs1))
    n1 = xs1[0].shape[0]
    n2 = n1 if xs2 is None else xs2[0].shape[0]
    item = _itemsize(fm)
    P = fm.numel
    F, A = _measure_forward(fm, xs1)
    kernel_bytes = (n1 * n2 if trace_outputs else n1 * n2 * o * o) * item
    budget = None if max_bytes is None else max(max_bytes - kernel_bytes, 0)
    per_example = o * P * item

    rows = n1 if xs2 is None else n1 + n2
    jac_term = rows * (F + 3 * F * o)
    contraction = 2.0 * n1 * n2 * o * P * (1 if trace_outputs else o)
    n = max(n1, n2)
    if budget is None or rows * per_example <= budget:
        jac_block, jac_bytes, jac_flops = n, rows * per_example, jac_term + contraction
    else:
        jac_block = max(min(n, int(budget // (2 * per_example))), 0)
        jac_bytes = 2 * jac_block * per_example
        jac_flops = jac_term * math.ceil(n / max(jac_block, 1)) + contraction

    per_column = o * (P * item + n1 * A)
    prod_block = n2 if budget is None else max(min(n2, int(budget // per_column)), 0)
    prod_bytes = max(prod_block, 1) * per_column
    prod_flops = n2 * (F + 3 * F * o) + 2.0 * n1 * n2 * o * F

    if jac_block >= 1 and (prod_block < 1 or jac_flops <= prod_flops):
        choice = "jacobian"
    elif prod_block >= 1:
        choice = "products"
    else:
        choice = "none"
    return NTKCost(F, A, jac_flops, prod_flops, jac_bytes, prod_bytes, kernel_bytes,
                   jac_block, prod_block, per_example, per_column, choice)


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


def _flat_weights(weights, fm: FunctionalModel) -> dict[str, Tensor] | None:
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        if weights.numel() != fm.numel:
            raise ValueError(f"weights has {weights.numel()} entries, expected {fm.numel} (selected parameters)")
        weights = unflatten(weights.reshape(-1), fm.params)
    missing = [n for n in fm.names if n not in weights]
    if missing:
        raise ValueError(f"weights lacks {missing}; give one entry per selected parameter {fm.names}")
    out = {}
    for n in fm.names:
        w = weights[n]
        if w.shape != fm.shapes[n]:
            raise ValueError(f"weights[{n!r}] has shape {tuple(w.shape)}, expected {tuple(fm.shapes[n])}")
        out[n] = w
    return out


@full_precision()
def ntk(
    model,
    x: Inputs,
    implementation: Implementation = "auto",
    params: ParamSelector = None,
    trace_outputs: bool = False,
    *,
    x2: Inputs | None = None,
    weights: dict[str, Tensor] | Tensor | None = None,
    chunk_size: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    output: Output = None,
) -> Tensor:
    r"""Empirical NTK :math:`\Theta(x, x_2) = J(x)\,M\,J(x_2)^\top` (module docstring).

    Args:
        model: ``nn.Module`` (run as is; ``eval()`` it first) or
            :class:`lmech.core.FunctionalModel`.
        x: inputs with the examples along dim 0 (token ids fine): a tensor, a tuple of tensors
            (``model(*x)``) or a dict (``model(**x)``), possibly nested (:mod:`lmech.core.batch`).
        implementation: ``"jacobian"``, ``"products"`` or ``"auto"`` (cost model, :func:`ntk_cost`).
        params: parameter subset (the kernel of those parameters: a per-layer NTK).
        trace_outputs: sum over output entries, returning ``(n1, n2)``.
        x2: second inputs (cross kernel, e.g. test-train); ``None`` means ``x`` (symmetric,
            Jacobians computed once).
        weights: diagonal parameter metric :math:`m` (dict shaped like the parameters, or a flat
            vector); ``None`` is the identity.
        chunk_size: examples (or tangents) vectorized at once inside ``vmap``; lower it to save
            activation memory (``None``: a whole block at once).
        max_bytes: budget for the kernel plus the working memory; above it the computation is
            blocked, and refused (:class:`lmech.core.MemoryBudgetError`) if even one example
            does not fit.
        output: the tensor the kernel is of, for a model that returns a ``ModelOutput``, a dict
            or a tuple: a field name (``"logits"``), an index or a callable.

    Returns:
        ``(n1 * o, n2 * o)`` (example-major) or ``(n1, n2)`` when ``trace_outputs``.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> K = ntk(net, x, trace_outputs=True)   # linear model: o (X X^T + 1), o = 2 outputs
        >>> torch.allclose(K, 2 * (x @ x.T + 1), atol=1e-5)
        True
        >>> ntk(net, x).shape
        torch.Size([8, 8])
    """
    if implementation not in ("jacobian", "products", "auto"):
        raise ValueError(f"implementation must be 'jacobian', 'products' or 'auto', got {implementation!r}")
    fm, xs1, xs2 = _prepare(model, params, x, x2, output)
    _check_eval_mode(fm)
    w = _flat_weights(weights, fm)
    cost = ntk_cost(fm, xs1, xs2, None, trace_outputs, max_bytes)
    check_memory(cost.kernel_bytes, max_bytes,
                 f"the {'traced ' if trace_outputs else ''}NTK ({cost.kernel_bytes // _itemsize(fm)} entries)",
                 "use fewer examples or trace_outputs=True")
    choice = cost.choice if implementation == "auto" else implementation
    # attention on its math backend: batchable under vmap, and forward-mode differentiable
    if choice == "jacobian" and cost.jacobian_block >= 1:
        with differentiable_kernels():
            return _ntk_jacobian(fm, xs1, xs2, w, trace_outputs, chunk_size, cost.jacobian_block)
    if choice == "products" and cost.products_block >= 1:
        with differentiable_kernels():
            return _ntk_products(fm, xs1, xs2, w, trace_outputs, chunk_size, cost.products_block)
    # the chosen algorithm cannot fit even one example next to the kernel: refuse
    algorithm = "jacobian" if choice == "jacobian" else "products"  # "none": the products' need
    smallest = 2 * cost.example_jacobian_bytes if algorithm == "jacobian" else cost.products_column_bytes
    outputs = cost.example_jacobian_bytes // (fm.numel * _itemsize(fm))
    check_memory(cost.kernel_bytes + smallest, max_bytes,
                 f"the NTK ({algorithm}: one example's working memory, {outputs} outputs x {fm.numel} "
                 "parameters, next to the kernel)",
                 "select fewer parameters (params=) or fewer outputs per example (output= a callable)"
                 + ("" if trace_outputs else ", trace_outputs=True"))
    raise AssertionError("unreachable: a block of one example fits the budget")


def _blocks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _slice(xs: tuple, a: int, b: int) -> tuple:
    return tuple(x[a:b] for x in xs)


def _contract(J1: dict, J2: dict, w: dict | None, n1: int, n2: int, o: int, trace: bool) -> Tensor:
    """sum_p J1_p diag(w_p) J2_p^T, parameter tensor by parameter tensor, into one buffer."""
    K = None
    for name, j1 in J1.items():
        j2 = J2[name]
        if w is not None:
            j2 = j2 * w[name]
        if trace:
            a, b = j1.reshape(n1, -1), j2.reshape(n2, -1)  # (n, o * size): sum over outputs too
        else:
            a, b = j1.reshape(n1 * o, -1), j2.reshape(n2 * o, -1)
        K = a @ b.T if K is None else K.addmm_(a, b.T)
    return K


def _ntk_jacobian(fm, xs1, xs2, w, trace, chunk_size, block) -> Tensor:
    def jac_fn(params, *xs):  # vmap over the examples (one at a time if the forward reads values)
        return per_example_map(jacrev(_single(fm)), (None,) + (0,) * len(xs), (params, *xs), chunk_size,
                               "per-example Jacobians", fm.model)

    o = math.prod(_out_shape(fm, xs1))
    n1 = xs1[0].shape[0]
    symmetric = xs2 is None
    n2 = n1 if symmetric else xs2[0].shape[0]
    if block >= max(n1, n2):
        J1 = jac_fn(fm.params, *xs1)
        J2 = J1 if symmetric else jac_fn(fm.params, *xs2)
        return _contract(J1, J2, w, n1, n2, o, trace)
    # blocked: recompute block Jacobians; a symmetric kernel fills the upper triangle and mirrors
    rows = o if not trace else 1
    first = next(iter(fm.params.values()))
    K = torch.empty(n1 * rows, n2 * rows, dtype=first.dtype, device=first.device)
    other = xs1 if symmetric else xs2
    for a0, a1 in _blocks(n1, block):
        Ja = jac_fn(fm.params, *_slice(xs1, a0, a1))
        for b0, b1 in _blocks(n2, block):
            if symmetric and b0 < a0:
                continue
            Jb = Ja if (symmetric and b0 == a0) else jac_fn(fm.params, *_slice(other, b0, b1))
            Kab = _contract(Ja, Jb, w, a1 - a0, b1 - b0, o, trace)
            K[a0 * rows:a1 * rows, b0 * rows:b1 * rows] = Kab
            if symmetric and b0 != a0:
                K[b0 * rows:b1 * rows, a0 * rows:a1 * rows] = Kab.T
    return K


def _ntk_products(fm, xs1, xs2, w, trace, chunk_size, block) -> Tensor:
    single = _single(fm)
    o_shape = _out_shape(fm, xs1)
    o = math.prod(o_shape)
    n1 = xs1[0].shape[0]
    other = xs1 if xs2 is None else xs2
    n2 = other[0].shape[0]
    first = next(iter(fm.params.values()))
    eye = torch.eye(o, dtype=first.dtype, device=first.device).reshape(o, *o_shape)

    def vjps(*xs_j):  # J_j^T e_b for every output entry b of one example: {name: (o, *shape)}
        _, pull = _func_vjp(lambda p: single(p, *xs_j), fm.params)
        return vmap(lambda e: pull(e)[0])(eye)

    def batch_jvp(tangent):  # J_1 t over the whole first batch: (n1, *o_shape)
        return _func_jvp(lambda p: tensor_output(fm(p, *xs1), "the NTK"), (fm.params,), (tangent,))[1]

    cols = []
    for b0, b1 in _blocks(n2, block):
        T = per_example_map(vjps, (0,) * len(other), _slice(other, b0, b1), chunk_size,
                            "per-example VJPs", fm.model)  # {name: (c, o, *shape)}
        c = b1 - b0
        T = {nm: t.reshape(c * o, *fm.shapes[nm]) for nm, t in T.items()}
        if w is not None:
            T = {nm: t * w[nm] for nm, t in T.items()}
        cols_block = vmap(batch_jvp, chunk_size=chunk_size)(T)  # (c * o, n1, *o_shape)
        cols_block = cols_block.reshape(c, o, n1, o)  # [j, b, i, a]
        if trace:
            cols.append(torch.diagonal(cols_block, dim1=1, dim2=3).sum(-1).T)  # (n1, c)
        else:
            cols.append(cols_block.permute(2, 3, 0, 1).reshape(n1 * o, c * o))
    return torch.cat(cols, dim=1)


# --------------------------------------------------------------------------------------------
# Kernel readouts
# --------------------------------------------------------------------------------------------


def _square(K: Tensor, what: str = "K") -> Tensor:
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{what} must be a square matrix, got shape {tuple(K.shape)}")
    return K.to(torch.float64)


def kernel_spectrum(K: Tensor, k: int | None = None) -> Tensor:
    r"""Eigenvalues of a symmetric kernel matrix, descending (float64); the top ``k`` if given.

    Example:
        >>> kernel_spectrum(torch.diag(torch.tensor([1.0, 3.0, 2.0])))
        tensor([3., 2., 1.], dtype=torch.float64)
    """
    K = _square(K)
    ev = torch.linalg.eigvalsh((K + K.T) / 2).flip(0)
    return ev if k is None else ev[:k]


def _center(K: Tensor) -> Tensor:
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def kernel_alignment(K1: Tensor, K2: Tensor, centered: bool = True) -> float:
    r"""Kernel alignment :math:`A(K_1, K_2) = \langle K_1, K_2\rangle_F / (\|K_1\|_F \|K_2\|_F)`
    (Cristianini et al. 2002); ``centered`` replaces each :math:`K` by :math:`HKH`,
    :math:`H = I - \frac1n 11^\top` (Cortes, Mohri & Rostamizadeh 2012; the CKA of two kernels).

    Example:
        >>> K = torch.randn(5, 5); K = K @ K.T
        >>> round(kernel_alignment(K, 3 * K), 6)
        1.0
    """
    K1, K2 = _square(K1, "K1"), _square(K2, "K2")
    if K1.shape != K2.shape:
        raise ValueError(f"kernels differ in shape: {tuple(K1.shape)} vs {tuple(K2.shape)}")
    if centered:
        K1, K2 = _center(K1), _center(K2)
    denom = float(torch.linalg.matrix_norm(K1) * torch.linalg.matrix_norm(K2))
    return float((K1 * K2).sum()) / denom if denom > 0 else float("nan")


@dataclass
class KernelDrift:
    r"""How far a kernel moved from a reference :math:`K_0`.

    Attributes:
        distance: :math:`1 - A(K, K_0)`, the kernel distance of Fort et al. (*Deep learning
            versus kernel learning*, 2020), centered by default (0: same up to scale).
        rel_op_change: :math:`\|K - K_0\|_2 / \|K_0\|_2` (operator norms), the scale-sensitive
            change.
        rel_fro_change: :math:`\|K - K_0\|_F / \|K_0\|_F`.
    """

    distance: float
    rel_op_change: float
    rel_fro_change: float


def kernel_drift(K: Tensor, K_ref: Tensor, centered: bool = True) -> KernelDrift:
    r"""Drift of :math:`K` from :math:`K_\text{ref}` (:class:`KernelDrift`). ``centered=False``
    gives Fort et al.'s uncentered distance. A lazy (NTK-regime) network keeps all three near 0;
    a feature-learning one does not.

    Example:
        >>> K0 = torch.eye(3); d = kernel_drift(2 * K0, K0, centered=False)
        >>> round(d.distance, 6), round(d.rel_op_change, 6)
        (0.0, 1.0)
    """
    K, K0 = _square(K), _square(K_ref, "K_ref")
    if K.shape != K0.shape:
        raise ValueError(f"kernels differ in shape: {tuple(K.shape)} vs {tuple(K0.shape)}")
    diff = K - K0
    return KernelDrift(
        distance=max(1.0 - kernel_alignment(K, K0, centered), 0.0),  # rounding can dip below 0
        rel_op_change=float(torch.linalg.matrix_norm(diff, 2) / torch.linalg.matrix_norm(K0, 2)),
        rel_fro_change=float(torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(K0)),
    )


def kernel_target_alignment(K: Tensor, y: Tensor, centered: bool = True) -> float:
    r"""Alignment of a kernel with the targets, :math:`A(K, Y Y^\top)` (Cristianini et al.
    2002; centered by default, Cortes et al. 2012).

    ``y``: class labels ``(n,)`` (integers, one-hot encoded), or real targets ``(n,)`` / ``(n, c)``.
    For an ``(n, n)`` (traced) kernel :math:`Y` is ``(n, c)``; for an ``(n o, n o)`` kernel the
    targets are flattened to one column of length :math:`n o` (example-major, as the kernel),
    so ``o`` must equal the one-hot width or ``c``.

    Example:
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> K = torch.nn.functional.one_hot(y).float() @ torch.nn.functional.one_hot(y).float().T
        >>> round(kernel_target_alignment(K, y), 6)
        1.0
    """
    K = _square(K)
    m = K.shape[0]
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool):
        n = y.shape[0]
        c = m // n if m != n and m % n == 0 else int(y.max()) + 1
        Y = torch.nn.functional.one_hot(y.long().reshape(-1), c).to(torch.float64)
    else:
        Y = y.to(torch.float64).reshape(y.shape[0], -1)
    if Y.shape[0] == m:
        T = Y @ Y.T
    elif Y.numel() == m:
        v = Y.reshape(-1, 1)
        T = v @ v.T
    else:
        raise ValueError(f"targets of shape {tuple(y.shape)} do not match a kernel of size {m}")
    return kernel_alignment(K, T, centered)


# --------------------------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------------------------


class NTKProbe:
    r"""Monitor probe: the empirical NTK on (a subsample of) the probe batch.

    Metrics: ``trace`` (:math:`\operatorname{tr}\Theta / n`, the mean kernel diagonal),
    ``lambda_1`` .. ``lambda_k`` (top eigenvalues), ``spectrum`` (all eigenvalues, an array),
    ``effective_rank`` (:math:`(\sum\lambda)^2/\sum\lambda^2`), ``target_alignment`` (centered
    :math:`A(\Theta, YY^\top)`), ``drift`` / ``drift_op`` (:class:`KernelDrift` against the kernel
    at the first measurement), ``velocity`` (kernel distance from the previous measurement);
    with ``per_layer=True`` also ``trace/<layer>`` and ``drift/<layer>``.

    ``num_examples`` (default 64) caps the subsample; the output trace is taken by default
    (``trace_outputs=True``), which keeps the kernel ``n x n``.
    """

    name = "ntk"
    cost: Cost = "medium"

    def __init__(self, num_examples: int = 64, *, k: int = 5, trace_outputs: bool = True,
                 per_layer: bool = False, implementation: Implementation = "auto"):
        self.num_examples, self.k, self.trace_outputs = num_examples, k, trace_outputs
        self.per_layer, self.implementation = per_layer, implementation
        self._ref: dict[str, Tensor] = {}
        self._prev: Tensor | None = None

    @full_precision()
    def measure(self, state: TrainState) -> dict[str, float | Tensor]:
        inputs, targets = split_batch(state.batch)
        n = min(self.num_examples, inputs[0].shape[0])
        xs = tuple(x[:n] for x in inputs)
        K = ntk(state.model, xs, self.implementation, state.params, self.trace_outputs,
                max_bytes=state.max_bytes)
        ev = kernel_spectrum(K)
        out: dict[str, float | Tensor] = {"trace": float(ev.sum()) / n, "spectrum": ev}
        for i, v in enumerate(ev[: self.k].tolist()):
            out[f"lambda_{i + 1}"] = v
        out["effective_rank"] = float(ev.sum() ** 2 / (ev**2).sum()) if float((ev**2).sum()) > 0 else 0.0
        if isinstance(targets, Tensor) and targets.shape[0] >= n:
            try:
                out["target_alignment"] = kernel_target_alignment(K, targets[:n])
            except ValueError:  # targets whose shape does not fit the kernel (e.g. per-token labels
                pass            # of a traced kernel): no alignment to report, the rest still is
        if "global" not in self._ref:
            self._ref["global"] = K
        drift = kernel_drift(K, self._ref["global"])
        out["drift"], out["drift_op"] = drift.distance, drift.rel_op_change
        if self._prev is not None:
            out["velocity"] = 1.0 - kernel_alignment(K, self._prev)
        self._prev = K
        if self.per_layer:
            for label, names in layer_groups(state.model, state.params).items():
                Kl = ntk(state.model, xs, self.implementation, names, self.trace_outputs,
                         max_bytes=state.max_bytes)
                out[f"trace/{label}"] = float(torch.trace(Kl)) / n
                self._ref.setdefault(label, Kl)
                out[f"drift/{label}"] = kernel_drift(Kl, self._ref[label]).distance
        return out
