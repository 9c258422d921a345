r"""Functional view of any ``nn.Module``, built on :mod:`torch.func`.

A network :math:`f(x; w)` is seen as a pure function of a parameter dictionary
:math:`w = \{\text{name} \mapsto w_\text{name}\}` (the *selected* parameters); the other
parameters (``frozen``) and the buffers are held fixed at their current values. All products
below are matrix-free: they never form a Jacobian or Hessian, except :func:`jacobian`, which
exists to materialize :math:`J` on small problems (and refuses above a memory budget).

Notation, for a batch :math:`X = (x_1, \dots, x_b)` with targets :math:`Y`:

* :math:`f(X; w)` — the model output for the whole batch, any shape ``(b, ...)``;
* :math:`L(w) = \ell(f(X; w), Y)` — the loss, exactly as ``loss_fn(outputs, targets)`` defines
  it (``mean`` or ``sum`` reduction, 1/2 factors, ... are the caller's choice);
* :math:`J = \partial f / \partial w` — the output-parameter Jacobian;
* :math:`H = \nabla_w^2 L` — the Hessian of the loss.

Conventions shared by every function here:

* ``model`` may be an ``nn.Module`` (parameters selected with ``params``) or a
  :class:`FunctionalModel` (its own selection and its ``params`` values are used; ``params``
  must then be ``None``).
* ``inputs`` is a tensor, a tuple of tensors passed as positional arguments, or a dict passed
  as keyword arguments (``model(**inputs)``), entries possibly nested; ``targets`` a tensor,
  ``None`` or a tuple/dict of tensors; examples along dim 0 of every tensor. ``output=`` (a field
  name, an index or a callable) picks the tensor of a model that returns a ``ModelOutput``, a
  dict or a tuple. Both are handled by :func:`lmech.core.batch.adapt`.
* The module runs *as it is*: the functions never call ``train()``/``eval()``, never write to
  parameters or buffers (a module in training mode updates running statistics on copies), and
  draw no random numbers themselves. Put the model in ``eval()`` first for deterministic,
  batch-independent results (dropout off, BatchNorm on running statistics).
* Tied weights: ``named_parameters()`` lists a shared tensor once, under its first name; the
  forward uses ``functional_call(..., tie_weights=True)`` so every use sees the same value, and
  the gradient is the sum over uses. A tied alias (e.g. ``"out.weight"``) may be used in a
  selector; it resolves to the canonical name.
* Only floating-point parameters are differentiated; integer inputs (token ids) are fine.
* Attention: :func:`jvp`, :func:`hvp`, :func:`per_example_grads` and :func:`jacobian` run
  ``scaled_dot_product_attention`` on its math backend (:func:`differentiable_kernels`), since
  the fused kernels have no forward-mode, second or ``vmap``-batched derivative.
* Dict order: every returned dict follows ``FunctionalModel.names`` order, so :func:`flatten`
  of the results gives consistent vectors.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jacrev, vmap
from torch.func import jvp as _func_jvp
from torch.func import vjp as _func_vjp

from lmech.core.batch import Output, adapt, tensor_output

__all__ = [
    "ParamSelector",
    "FunctionalModel",
    "as_functional",
    "DEFAULT_MAX_BYTES",
    "differentiable_kernels",
    "loss_and_grad",
    "per_example_grads",
    "jvp",
    "vjp",
    "hvp",
    "jacobian",
    "flatten",
    "unflatten",
    "tree_dot",
    "tree_add",
    "tree_scale",
]

ParamSelector = Union[None, str, Sequence[str], Callable[[str, Tensor], bool]]
"""Which parameters are the variables.

* ``None`` — every floating-point parameter with ``requires_grad=True``;
* a ``str`` or a sequence of ``str`` — exact names or dotted prefixes (``"layers.0"`` selects
  ``"layers.0.weight"`` and ``"layers.0.bias"``, not ``"layers.01.weight"``); each entry must
  match at least one parameter, otherwise ``ValueError`` lists the valid names;
* a callable ``predicate(name, tensor) -> bool`` over ``named_parameters()``.
"""

DEFAULT_MAX_BYTES = 2 * 1024**3
"""Budget (bytes) above which :func:`jacobian` and :func:`per_example_grads` refuse to
materialize their result; pass ``max_bytes=None`` to lift it."""

Inputs = Union[Tensor, tuple]


# --------------------------------------------------------------------------------------------
# FunctionalModel
# --------------------------------------------------------------------------------------------


class FunctionalModel:
    r"""A module seen as a pure function :math:`(w, x) \mapsto f(x; w)`.

    Holds three dictionaries of *detached* tensors that share storage with the module (so
    in-place updates of the module, e.g. by an optimizer step, are seen; replacing a parameter
    object is not):

    * ``params`` — the selected parameters :math:`w` (the variables);
    * ``frozen`` — every other parameter, held fixed;
    * ``buffers`` — the module's buffers (BatchNorm running statistics, masks, ...).

    ``fm(params, *inputs)`` evaluates
    ``functional_call(model, {**frozen, **buffers, **fm.params, **params}, inputs,
    tie_weights=True)``: a selected name missing from ``params`` takes its current value.

    Attributes:
        names: selected parameter names, in ``named_parameters()`` order.
        shapes: ``{name: torch.Size}`` of the selected parameters.
        numel: total number of selected scalars, :math:`P = \sum_\text{name} |w_\text{name}|`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> fm = FunctionalModel(model, params="2")      # only the last layer
        >>> fm.names, fm.numel
        (['2.weight', '2.bias'], 10)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(fm(fm.params, x), model(x))
        True
    """

    def __init__(self, model: nn.Module, params: ParamSelector = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"FunctionalModel expects an nn.Module, got {type(model).__name__}")
        self.model = model
        selected = _resolve_selector(model, params)
        all_params = dict(model.named_parameters())
        self.params: dict[str, Tensor] = {n: all_params[n].detach() for n in selected}
        self.frozen: dict[str, Tensor] = {
            n: p.detach() for n, p in all_params.items() if n not in self.params
        }
        self.buffers: dict[str, Tensor] = {n: b.detach() for n, b in model.named_buffers()}
        self.names: list[str] = list(self.params)
        self.shapes: dict[str, torch.Size] = {n: p.shape for n, p in self.params.items()}
        self.numel: int = sum(p.numel() for p in self.params.values())
        every = model.named_parameters(remove_duplicate=False)
        self._known = set(all_params) | {n for n, _ in every}
        self._modules = list(model.modules())

    def __call__(self, params: dict[str, Tensor], *inputs) -> Tensor:
        unknown = [n for n in params if n not in self._known]
        if unknown:
            raise ValueError(f"unknown parameter name(s) {unknown}; valid: {self.names}")
        buffers = self.buffers
        if buffers and any(m.training for m in self._modules):
            # Training-mode modules (BatchNorm) update buffers in place: do it on copies.
            buffers = {n: b.clone() for n, b in buffers.items()}
        tensors = {**self.frozen, **buffers, **self.params, **params}
        return functional_call(self.model, tensors, inputs, tie_weights=True)

    def __repr__(self) -> str:
        return (
            f"FunctionalModel({type(self.model).__name__}, {len(self.names)} tensors, "
            f"numel={self.numel}, frozen={len(self.frozen)}, buffers={len(self.buffers)})"
        )


def _resolve_selector(model: nn.Module, selector: ParamSelector) -> list[str]:
    """Canonical (de-duplicated) names selected by ``selector``, in ``named_parameters`` order."""
    canon = dict(model.named_parameters())  # de-duplicated: tied tensors once
    by_id = {id(p): n for n, p in canon.items()}
    # every name, tied aliases included -> canonical name
    alias = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}

    def valid() -> str:
        extra = [f"{a}->{c}" for a, c in alias.items() if a != c]
        s = f"valid names: {list(canon)}"
        return s + (f" (tied aliases: {extra})" if extra else "")

    if selector is None:
        chosen = {n for n, p in canon.items() if p.requires_grad and p.is_floating_point()}
        if not chosen:
            raise ValueError(f"model has no trainable floating-point parameters; {valid()}")
    elif callable(selector):
        chosen = {n for n, p in canon.items() if selector(n, p)}
        if not chosen:
            raise ValueError(f"parameter predicate selected nothing; {valid()}")
    else:
        entries = [selector] if isinstance(selector, str) else list(selector)
        if not entries:
            raise ValueError(f"empty parameter selection; {valid()}")
        chosen = set()
        for e in entries:
            if not isinstance(e, str):
                raise TypeError(f"parameter selector entries must be str, got {type(e).__name__}")
            hits = {c for a, c in alias.items() if a == e or a.startswith(e + ".")}
            if not hits:
                raise ValueError(f"parameter name or prefix {e!r} matches nothing; {valid()}")
            chosen |= hits
    bad = [n for n in chosen if not canon[n].is_floating_point()]
    if bad:
        raise ValueError(f"selected parameters are not floating point: {bad}")
    return [n for n in canon if n in chosen]


def as_functional(model: "nn.Module | FunctionalModel", params: ParamSelector = None) -> FunctionalModel:
    """``model`` as a :class:`FunctionalModel`: a module is wrapped (with the ``params`` selection), a
    ``FunctionalModel`` is returned as it is (``params`` must then be ``None``: it has its own).

    Example:
        >>> fm = as_functional(nn.Linear(2, 1))
        >>> as_functional(fm) is fm, fm.numel
        (True, 3)
    """
    if isinstance(model, FunctionalModel):
        if params is not None:
            raise ValueError("pass `params` only with an nn.Module; a FunctionalModel has its own")
        return model
    return FunctionalModel(model, params)


_fmodel = as_functional  # the old private name


def _as_tuple(inputs: Inputs) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _prepare(model, params: ParamSelector, inputs, targets=None, output=None):
    """``(fm, xs, targets)`` in the canonical form of :func:`lmech.core.batch.adapt`: dict and
    nested inputs/targets, and the ``output=`` choice, handled in one place."""
    # a dict with no targets is a dict batch (model(**batch), loss_fn(output, batch)), as in adapt
    batch = inputs if isinstance(inputs, dict) and targets is None else (inputs, targets)
    model, (xs, targets) = adapt(model, batch, output)
    return _fmodel(model, params), _as_tuple(xs), targets


def _match_keys(tree: dict, fm: FunctionalModel, what: str) -> dict:
    if set(tree) != set(fm.names):
        missing = [n for n in fm.names if n not in tree]
        extra = [n for n in tree if n not in fm.shapes]
        raise ValueError(
            f"{what} keys must equal the selected parameters {fm.names}; missing {missing}, "
            f"extra {extra} (select with params=list({what}))"
        )
    return {n: tree[n] for n in fm.names}


def _check_bytes(nbytes: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and nbytes > max_bytes:
        raise MemoryError(
            f"{what} would take {nbytes / 2**20:.1f} MiB > max_bytes={max_bytes / 2**20:.1f} MiB; "
            "use a parameter subset, fewer examples/outputs, a matrix-free product, "
            "or raise max_bytes"
        )


def differentiable_kernels():
    """Context in which ``scaled_dot_product_attention`` uses its composite math backend.

    The fused CPU/GPU attention kernels have a first derivative only: no double backward (needed
    by Hessian-vector products), no forward-mode AD (needed by JVPs), and no ``vmap`` batching
    rule for their backward (per-example gradients and Jacobians fall back to a slow loop). The
    math backend is ordinary differentiable tensor algebra and computes the same function (up
    to rounding), so :func:`jvp`, :func:`hvp`, :func:`per_example_grads` and :func:`jacobian`
    run under this context themselves; :func:`loss_and_grad` and :func:`vjp` (first
    derivatives, no ``vmap``) keep the fused kernels. A model without attention is unaffected.
    Re-exported by :mod:`lmech.probes.base`.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


# --------------------------------------------------------------------------------------------
# Gradients and products
# --------------------------------------------------------------------------------------------


def loss_and_grad(
    model, loss_fn: Callable, inputs: Inputs, targets, params: ParamSelector = None, *,
    output: Output = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Loss and its gradient, :math:`(L(w),\ \nabla_w L(w))`, with
    :math:`L(w) = \texttt{loss\_fn}(f(X; w), Y)`.

    Returns ``(loss, grads)`` with ``grads[name]`` shaped like the parameter (no autograd graph).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> loss, g = loss_and_grad(model, nn.functional.cross_entropy, x, y)
        >>> loss.shape, g["0.weight"].shape
        (torch.Size([]), torch.Size([4, 3]))
    """
    fm, xs, targets = _prepare(model, params, inputs, targets, output)

    def loss(p):
        return loss_fn(fm(p, *xs), targets)

    grads, value = grad_and_value(loss)(fm.params)
    return value, grads


def per_example_grads(
    model,
    loss_fn: Callable,
    inputs: Inputs,
    targets,
    params: ParamSelector = None,
    chunk_size: int | None = None,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    output: Output = None,
) -> dict[str, Tensor]:
    r"""Per-example gradients :math:`g_i = \nabla_w\, \ell(f(x_i; w), y_i)`, :math:`i = 1..b`.

    Each example is evaluated as a batch of one (``x_i.unsqueeze(0)``, ``y_i.unsqueeze(0)``), so
    ``loss_fn`` is the same batch loss used in training and :math:`g_i` is what a batch holding
    only :math:`x_i` would give: with a ``mean`` loss, :math:`\frac1b \sum_i g_i = \nabla L`
    when the model treats examples independently (e.g. BatchNorm in eval mode). Computed as
    ``vmap(grad(...))`` over dim 0 of every input and of ``targets`` (``None`` targets are passed
    through unbatched); ``chunk_size`` bounds how many examples are vectorized at once.

    Returns ``{name: Tensor(b, *param.shape)}``. Refuses (``MemoryError``) if the result would
    exceed ``max_bytes``.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> g = per_example_grads(model, nn.functional.cross_entropy, x, y)
        >>> g["0.weight"].shape
        torch.Size([8, 4, 3])
        >>> _, full = loss_and_grad(model, nn.functional.cross_entropy, x, y)
        >>> torch.allclose(g["0.weight"].mean(0), full["0.weight"], atol=1e-6)
        True
    """
    fm, xs, targets = _prepare(model, params, inputs, targets, output)
    b = xs[0].shape[0]
    itemsize = max((p.element_size() for p in fm.params.values()), default=4)
    _check_bytes(b * fm.numel * itemsize, max_bytes, "per-example gradients")

    def one(p, xs_i, y_i):
        xs1 = tuple(x.unsqueeze(0) for x in xs_i)
        y1 = None if y_i is None else y_i.unsqueeze(0)
        return loss_fn(fm(p, *xs1), y1)

    in_dims = (None, 0, None if targets is None else 0)
    with differentiable_kernels():
        return per_example_map(grad(one), in_dims, (fm.params, xs, targets), chunk_size,
                               "per-example gradients", fm.model)


def _data_dependent(error: Exception) -> bool:
    text = str(error)
    return isinstance(error, RuntimeError) and "vmap" in text and (
        "data-dependent control flow" in text or ".item()" in text)


def per_example_map(fn: Callable, in_dims: tuple, args: tuple, chunk_size: int | None, what: str,
                    model: nn.Module | None = None):
    """``vmap(fn, in_dims)(*args)`` over the examples (dim 0 of the ``0`` entries); when ``vmap``
    cannot batch the model's forward because it reads tensor values (data-dependent control flow,
    e.g. Hugging Face's attention-mask shortcuts check ``attention_mask.all()``), the same
    function one example at a time, stacked: the same numbers, slower, with a one-line warning."""
    try:
        return vmap(fn, in_dims=in_dims, chunk_size=chunk_size, randomness="different")(*args)
    except RuntimeError as e:
        if not _data_dependent(e):
            raise
        import warnings

        name = type(getattr(model, "module", model)).__name__  # the user's module under a ModelCall
        warnings.warn(f"vmap cannot batch {name}'s forward (it reads tensor values, e.g. an attention "
                      f"mask check); {what} are computed one example at a time (slower). For speed "
                      "drop the all-ones attention_mask or use attn_implementation='eager'", stacklevel=3)
    b = pytree.tree_leaves([a for a, d in zip(args, in_dims) if d == 0])[0].shape[0]
    rows = []
    for i in range(b):
        one = tuple(pytree.tree_map(lambda t: t[i], a) if d == 0 else a for a, d in zip(args, in_dims))
        rows.append(fn(*one))
    return pytree.tree_map(lambda *ts: torch.stack(ts), *rows)


def jvp(
    model, inputs: Inputs, tangents: dict[str, Tensor], params: ParamSelector = None, *,
    output: Output = None,
) -> tuple[Tensor, Tensor]:
    r"""Jacobian-vector product (forward mode): :math:`(f(X; w),\ J v)` with
    :math:`J v = \frac{d}{d\epsilon} f(X; w + \epsilon v)\big|_{\epsilon=0}`.

    ``tangents`` is a dict with exactly the selected names (shapes of the parameters); the
    product has the shape of the output, whatever it is (e.g. ``(b, t, c)``).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        >>> out, jv = jvp(model, x, v)
        >>> out.shape == jv.shape == (5, 2)
        True
    """
    fm, xs, _ = _prepare(model, params, inputs, None, output)
    v = _match_keys(tangents, fm, "tangents")
    with differentiable_kernels():
        return _func_jvp(lambda p: tensor_output(fm(p, *xs), "jvp"), (fm.params,), (v,))


def vjp(
    model, inputs: Inputs, cotangent: Tensor, params: ParamSelector = None, *,
    output: Output = None,
) -> dict[str, Tensor]:
    r"""Vector-Jacobian product (reverse mode): :math:`J^\top u`, i.e.
    :math:`\nabla_w \langle u, f(X; w) \rangle` with the sum over every output entry.

    ``cotangent`` :math:`u` has the shape of the output; the result is a parameter dict.
    Adjoint of :func:`jvp`: :math:`\langle u, J v\rangle = \langle J^\top u, v\rangle`.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> g = vjp(model, x, torch.ones(5, 2))  # gradient of the sum of the outputs
        >>> g["2.bias"]
        tensor([5., 5.])
    """
    fm, xs, _ = _prepare(model, params, inputs, None, output)
    _, pullback = _func_vjp(lambda p: tensor_output(fm(p, *xs), "vjp"), fm.params)
    (g,) = pullback(cotangent)
    return g


def hvp(
    model,
    loss_fn: Callable,
    inputs: Inputs,
    targets,
    vectors: dict[str, Tensor],
    params: ParamSelector = None,
    *,
    output: Output = None,
) -> dict[str, Tensor]:
    r"""Hessian-vector product of the loss, :math:`H v = \frac{d}{d\epsilon}
    \nabla_w L(w + \epsilon v)\big|_{\epsilon=0}` with :math:`L(w) = \texttt{loss\_fn}(f(X; w), Y)`.

    The Hessian is that of the loss exactly as ``loss_fn`` defines it (a ``mean`` reduction
    gives the batch-averaged Hessian). Computed forward-over-reverse (``jvp`` of ``grad``), one
    forward and one backward pass with dual numbers; :math:`H` is never formed. ``vectors`` is a
    dict with exactly the selected names; with a parameter subset the result is the diagonal
    block :math:`H_{SS} v_S`.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        >>> hv = hvp(model, nn.functional.cross_entropy, x, y, v)
        >>> vHv = tree_dot(v, hv)   # curvature along v
        >>> vHv.shape
        torch.Size([])
    """
    fm, xs, targets = _prepare(model, params, inputs, targets, output)
    v = _match_keys(vectors, fm, "vectors")

    def loss(p):
        return loss_fn(fm(p, *xs), targets)

    with differentiable_kernels():
        _, hv = _func_jvp(grad(loss), (fm.params,), (v,))
    return {n: hv[n] for n in fm.names}  # jvp returns the dict in key-sorted order


def jacobian(
    model,
    inputs: Inputs,
    params: ParamSelector = None,
    chunk_size: int | None = None,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    output: Output = None,
) -> dict[str, Tensor]:
    r"""Output-parameter Jacobian :math:`J = \partial f(X; w) / \partial w`, materialized.

    Returns ``{name: Tensor(*out.shape, *param.shape)}`` computed with ``jacrev`` (one VJP per
    output entry, ``chunk_size`` of them vectorized at once). Used for NTK Gram matrices on a
    subsample, :math:`\Theta = J J^\top`. Memory is ``out.numel() * numel * itemsize`` bytes:
    checked against ``max_bytes`` first (one extra forward pass), ``MemoryError`` above it.
    Prefer :func:`jvp` / :func:`vjp` when a product suffices.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> J = jacobian(model, x)
        >>> J["0.weight"].shape
        torch.Size([5, 2, 4, 3])
        >>> Jf = torch.cat([j.reshape(10, -1) for j in J.values()], dim=1)  # (outputs, P)
        >>> ntk = Jf @ Jf.T
        >>> ntk.shape
        torch.Size([10, 10])
    """
    fm, xs, _ = _prepare(model, params, inputs, None, output)
    if max_bytes is not None:
        with torch.no_grad():
            out = tensor_output(fm(fm.params, *xs), "jacobian")
        itemsize = max((p.element_size() for p in fm.params.values()), default=4)
        _check_bytes(out.numel() * fm.numel * itemsize, max_bytes, "the Jacobian")
        del out
    with differentiable_kernels():
        return jacrev(lambda p: tensor_output(fm(p, *xs), "jacobian"), chunk_size=chunk_size)(fm.params)


# --------------------------------------------------------------------------------------------
# Parameter-dict ("tree") helpers
# --------------------------------------------------------------------------------------------


def flatten(tree: dict[str, Tensor]) -> Tensor:
    r"""Concatenate a parameter dict into one vector, in the dict's key order.

    Inverse of :func:`unflatten`: ``unflatten(flatten(t), t)`` equals ``t``.

    Example:
        >>> flatten({"a": torch.ones(2, 2), "b": torch.zeros(1)})
        tensor([1., 1., 1., 1., 0.])
    """
    if not tree:
        raise ValueError("cannot flatten an empty dict")
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflatten(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    r"""Split a vector into a dict shaped like ``like`` (same keys, order and shapes).

    The pieces are views of ``vec`` (no copy).

    Example:
        >>> t = unflatten(torch.arange(5.0), {"a": torch.empty(2, 2), "b": torch.empty(1)})
        >>> t["a"], t["b"]
        (tensor([[0., 1.],
                [2., 3.]]), tensor([4.]))
    """
    if vec.dim() != 1:
        raise ValueError(f"unflatten expects a 1-D vector, got shape {tuple(vec.shape)}")
    sizes = [t.numel() for t in like.values()]
    if vec.numel() != sum(sizes):
        raise ValueError(f"vector has {vec.numel()} entries, the dict needs {sum(sizes)}")
    pieces = torch.split(vec, sizes)
    return {n: piece.view(t.shape) for (n, t), piece in zip(like.items(), pieces)}


def tree_dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    r"""Euclidean inner product :math:`\langle a, b\rangle = \sum_\text{name} \sum a_\text{name}
    b_\text{name}` of two dicts with the same keys (a 0-d tensor).

    Example:
        >>> tree_dot({"w": torch.ones(3)}, {"w": torch.arange(3.0)})
        tensor(3.)
    """
    if set(a) != set(b):
        raise ValueError(f"tree_dot: keys differ: {sorted(set(a) ^ set(b))}")
    terms = []
    for n, x in a.items():
        y = b[n]
        dt = torch.promote_types(x.dtype, y.dtype)
        terms.append(torch.dot(x.reshape(-1).to(dt), y.reshape(-1).to(dt)))
    return torch.stack(terms).sum()


def tree_add(a: dict[str, Tensor], b: dict[str, Tensor], alpha: float = 1.0) -> dict[str, Tensor]:
    r""":math:`a + \alpha b`, key by key (keys must match; order of ``a``)."""
    if set(a) != set(b):
        raise ValueError(f"tree_add: keys differ: {sorted(set(a) ^ set(b))}")
    return {n: torch.add(x, b[n], alpha=alpha) for n, x in a.items()}


def tree_scale(a: dict[str, Tensor], s: float | Tensor) -> dict[str, Tensor]:
    r""":math:`s\,a`, key by key."""
    return {n: x * s for n, x in a.items()}
