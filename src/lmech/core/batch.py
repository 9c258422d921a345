r"""How a batch meets a model: dict and nested batches, and the ``output=`` option.

Every probe, :mod:`lmech.core.functional` and the :class:`lmech.Monitor` go through
:func:`adapt` (or :func:`adapt_inputs` for functions without targets), so one set of rules holds
everywhere:

**Batches.** A batch is ``(inputs, targets)`` or a dict:

* ``inputs`` a tensor: ``model(x)``; a tuple (or list): ``model(*inputs)``; a dict:
  ``model(**inputs)``. Entries may themselves be nested tuples/dicts of tensors
  (``model(x, {"mask": m})``); entries that are not tensors (``use_cache=False``, ``None``) are
  passed through unchanged.
* a dict batch, the way Hugging Face data collators hand it over (``{"input_ids": ...,
  "attention_mask": ..., "labels": ...}``): ``model(**batch)``, and ``loss_fn(output, batch)``
  receives the whole dict as its targets (so it can read ``batch["labels"]`` and the masks).
* ``targets`` a tensor, ``None``, or a tuple/dict of tensors.

Every tensor holds the examples along dim 0, all with the same count :math:`b`. Probes slice
examples (a batch of one for per-example quantities, the first :math:`n` for a subsample) by
slicing every tensor along dim 0.

**Outputs.** ``output=`` picks the tensor the probes see from what the model returns:

* ``None`` (default) — the model's output as it is (a tensor for most modules);
* a field name, ``"logits"`` — ``out["logits"]`` for a dict or ``ModelOutput``,
  ``getattr(out, "logits")`` otherwise;
* an int, ``0`` — ``out[0]`` (a model returning a tuple);
* a callable, ``lambda out: out.logits[:, -1]`` — any function of the output.

``loss_fn`` receives the picked output; with ``output="loss"`` on a Hugging Face model given
``labels`` the model's own loss is the probed loss (``loss_fn=lambda loss, batch: loss``).

**Implementation.** :func:`adapt` turns any of these forms into the canonical one the probes
are written for: a model that takes a flat tuple of tensors (the tensor leaves of the inputs,
in a fixed order, each ``(b, ...)``) positionally and returns the picked output, and targets
whose structure slices along dim 0 (:class:`ExampleDict`, :class:`ExampleTuple`). The model is
wrapped by :class:`ModelCall`, which *shares* the wrapped module's parameter, buffer and
submodule dictionaries, so parameter names, tied weights, hooks and ``torch.func.functional_call``
are exactly those of the user's module (no ``"model."`` prefix). A plain ``(tensor, tensor)``
batch with ``output=None`` is returned unchanged (no wrapper).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.lin = nn.Linear(3, 2)
    ...     def forward(self, x, scale=None):
    ...         return {"logits": self.lin(x) * scale}
    >>> net = Net()
    >>> batch = {"x": torch.randn(5, 3), "scale": torch.ones(5, 1)}
    >>> model, (xs, ys) = adapt(net, batch, output="logits")
    >>> [n for n, _ in model.named_parameters()], len(xs), model(*xs).shape
    (['lin.weight', 'lin.bias'], 2, torch.Size([5, 2]))
    >>> ys[:2]["x"].shape       # targets (here the whole dict) slice along dim 0
    torch.Size([2, 3])
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = [
    "Output",
    "ModelCall",
    "ExampleDict",
    "ExampleTuple",
    "adapt",
    "adapt_inputs",
    "adapt_input_pair",
    "pick_output",
    "tensor_output",
    "describe_output",
    "split_batch",
    "subsample",
]

Output = Union[None, str, int, Callable[[Any], Any]]
"""What the probes see of a model's output (module docstring): ``None``, a field name, an index
or a callable."""


# --------------------------------------------------------------------------------------------
# Targets whose structure slices along dim 0
# --------------------------------------------------------------------------------------------


def _map(value, fn):
    """``fn`` on every tensor inside ``value`` (nested tuples, lists, dicts); others unchanged."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, ExampleDict):
        return _with_constants(ExampleDict({k: _map(v, fn) for k, v in value.items()}),
                               getattr(value, "_constants", ()))
    if isinstance(value, ExampleTuple):
        return _with_constants(ExampleTuple(_map(v, fn) for v in value), getattr(value, "_constants", ()))
    if isinstance(value, dict):
        return type(value)({k: _map(v, fn) for k, v in value.items()}) if type(value) is not dict \
            else {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    return value


class _Examples:
    """Shared methods: slicing and ``unsqueeze`` act on every tensor along dim 0."""

    def unsqueeze(self, dim: int):
        return _map(self, lambda t: t.unsqueeze(dim))

    def to(self, *args, **kwargs):
        return _map(self, lambda t: t.to(*args, **kwargs))

    def _slice(self, index):
        return _map(self, lambda t: t[index])

    @property
    def num_examples(self) -> int:
        return _count(self)


class ExampleDict(_Examples, dict):
    """A dict of (nested) tensors, examples along dim 0: ``d["labels"]`` is the entry, ``d[:n]``
    and ``d[i:j]`` (a slice or index tensor) slice every tensor. A ``torch.func`` pytree, so
    ``vmap`` maps over its tensors."""

    def __getitem__(self, key):
        if isinstance(key, (slice, Tensor)):
            return self._slice(key)
        return dict.__getitem__(self, key)


class ExampleTuple(_Examples, tuple):
    """A tuple of (nested) tensors, examples along dim 0: ``t[0]`` is the first entry (tuple
    indexing), ``t[:n]`` slices every tensor along dim 0 (not the tuple). A ``torch.func``
    pytree."""

    def __getitem__(self, key):
        if isinstance(key, (slice, Tensor)):
            return self._slice(key)
        return tuple.__getitem__(self, key)


def _is_data(v) -> bool:
    """Tensors and containers are pytree children; other values (ints, strings) are constants."""
    return isinstance(v, (Tensor, dict, tuple, list)) or v is None


def _with_constants(obj, constants):
    obj._constants = frozenset(constants)  # fixed when built: flattening must not look at values
    return obj


def _dict_flatten(d):
    keys = tuple(d.keys())
    consts = getattr(d, "_constants", None)
    if consts is None:  # built directly: its non-tensor entries are the constants
        consts = {k for k in keys if not _is_data(dict.__getitem__(d, k))}
    data = tuple(k for k in keys if k not in consts)
    constants = tuple((k, dict.__getitem__(d, k)) for k in keys if k in consts)
    return [dict.__getitem__(d, k) for k in data], (keys, data, constants)


def _dict_unflatten(values, context):
    keys, data, constants = context
    found = {**dict(zip(data, values)), **dict(constants)}
    return _with_constants(ExampleDict((k, found[k]) for k in keys), (k for k, _ in constants))


def _tuple_flatten(t):
    n = len(t)
    consts = getattr(t, "_constants", None)
    if consts is None:
        consts = {i for i in range(n) if not _is_data(tuple.__getitem__(t, i))}
    data = tuple(i for i in range(n) if i not in consts)
    constants = tuple((i, tuple.__getitem__(t, i)) for i in range(n) if i in consts)
    return [tuple.__getitem__(t, i) for i in data], (n, data, constants)


def _tuple_unflatten(values, context):
    n, data, constants = context
    found = {**dict(zip(data, values)), **dict(constants)}
    return _with_constants(ExampleTuple(found[i] for i in range(n)), (i for i, _ in constants))


pytree.register_pytree_node(ExampleDict, _dict_flatten, _dict_unflatten,
                            serialized_type_name="lmech.core.batch.ExampleDict")
pytree.register_pytree_node(ExampleTuple, _tuple_flatten, _tuple_unflatten,
                            serialized_type_name="lmech.core.batch.ExampleTuple")


def _as_examples(value):
    """Targets in the canonical form: tensors and ``None`` unchanged, tuples/dicts wrapped (their
    non-tensor entries kept as constants, not mapped over)."""
    if value is None or isinstance(value, (Tensor, _Examples)):
        return value
    if isinstance(value, dict):
        d = ExampleDict({k: _as_examples(v) if isinstance(v, (dict, tuple, list)) else v for k, v in value.items()})
        return _with_constants(d, (k for k, v in d.items() if not _is_data(v)))
    if isinstance(value, (tuple, list)):
        t = ExampleTuple(_as_examples(v) if isinstance(v, (dict, tuple, list)) else v for v in value)
        return _with_constants(t, (i for i, v in enumerate(t) if not _is_data(v)))
    return value


def _tensor_leaves(value, path: str = "") -> list[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        return [(path or "input", value)]
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _tensor_leaves(v, f"{path}[{k!r}]")]
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in _tensor_leaves(v, f"{path}[{i}]")]
    return []


def _count(*values) -> int:
    """The common dim-0 size of every tensor in ``values``; one-line ``ValueError`` otherwise."""
    leaves = [leaf for v in values for leaf in _tensor_leaves(v)]
    if not leaves:
        raise ValueError("the batch holds no tensor; give (inputs, targets) with inputs a tensor, "
                         "a tuple or a dict of tensors (examples along dim 0)")
    scalars = [p for p, t in leaves if t.dim() == 0]
    if scalars:
        raise ValueError(f"batch tensor {scalars[0]} is 0-dimensional; every tensor needs the "
                         "examples along dim 0 (pass per-batch constants as Python values)")
    sizes = {p: int(t.shape[0]) for p, t in leaves}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{p}: {n}" for p, n in list(sizes.items())[:6])
        raise ValueError(f"batch tensors disagree on the number of examples (dim 0): {shown}; "
                         "every tensor needs the examples along dim 0")
    return next(iter(sizes.values()))


# --------------------------------------------------------------------------------------------
# The model seen through a flat tuple of tensors
# --------------------------------------------------------------------------------------------


class _Call:
    """How to rebuild ``(args, kwargs)`` from the flat tensor leaves, and which output to pick."""

    def __init__(self, args: tuple, kwargs: dict, output: Output):
        flat, self.spec = pytree.tree_flatten((args, kwargs))
        self.is_tensor = [isinstance(v, Tensor) for v in flat]
        self.constants = [None if t else v for v, t in zip(flat, self.is_tensor)]
        self.leaves = tuple(v for v, t in zip(flat, self.is_tensor) if t)
        self.output = output

    def rebuild(self, leaves: tuple) -> tuple[tuple, dict]:
        it = iter(leaves)
        flat = [next(it) if t else c for t, c in zip(self.is_tensor, self.constants)]
        return pytree.tree_unflatten(flat, self.spec)


def pick_output(out, output: Output):
    """The part of ``out`` that ``output`` names (module docstring); one-line error if absent."""
    if output is None:
        return out
    if callable(output):
        return output(out)
    if isinstance(output, str):
        if hasattr(out, "keys"):
            if output in out.keys():
                return out[output]
        elif hasattr(out, output):
            return getattr(out, output)
        raise ValueError(f"output={output!r}: the model returned {describe_output(out)}, which has no "
                         f"field {output!r}; pass one of its fields, an index or a callable")
    if isinstance(output, int) and not isinstance(output, bool):
        if isinstance(out, (tuple, list)) and -len(out) <= output < len(out):
            return out[output]
        raise ValueError(f"output={output}: the model returned {describe_output(out)}; pass a valid "
                         "index, a field name or a callable")
    raise TypeError(f"output must be None, a field name, an index or a callable, got {type(output).__name__}")


def describe_output(out) -> str:
    """``"CausalLMOutputWithCrossAttentions (fields: logits, past_key_values)"``, for messages."""
    name = type(out).__name__
    if hasattr(out, "keys"):
        return f"{name} (fields: {', '.join(map(str, out.keys()))})"
    if isinstance(out, (tuple, list)):
        return f"a {name} of {len(out)} ({', '.join(type(v).__name__ for v in out[:4])}{', ...' if len(out) > 4 else ''})"
    return name


def tensor_output(out, where: str) -> Tensor:
    """``out`` if it is a tensor; otherwise a one-line ``TypeError`` naming ``output=`` as the fix."""
    if isinstance(out, Tensor):
        return out
    hint = "output='logits'" if hasattr(out, "keys") and "logits" in out.keys() else \
        "output=0" if isinstance(out, (tuple, list)) else "output=<a field name>"
    raise TypeError(f"{where} needs a tensor output, but the model returned {describe_output(out)}; "
                    f"pass {hint} (a field name, an index or a callable) to pick it")


class ModelCall(nn.Module):
    r"""``module`` as a function of a flat tuple of tensors that returns the picked output.

    ``ModelCall(module, call)(*leaves)`` rebuilds ``(args, kwargs)`` from the tensor leaves
    (constants kept from the batch it was made for), runs ``module(*args, **kwargs)`` and
    returns :func:`pick_output` of the result. The wrapper shares ``module``'s ``_parameters``,
    ``_buffers`` and ``_modules`` dictionaries, so ``named_parameters()``, ``get_parameter``,
    ``modules()`` (below the root) and ``torch.func.functional_call`` see the module's own names
    and tensors; its ``training`` flag *is* the module's. Built by :func:`adapt`.
    """

    def __init__(self, module: nn.Module, call: _Call):
        super().__init__()
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "call", call)
        # share the containers: functional_call swaps tensors in these dicts by name
        self.__dict__["_parameters"] = module._parameters
        self.__dict__["_buffers"] = module._buffers
        self.__dict__["_modules"] = module._modules
        self.__dict__["_non_persistent_buffers_set"] = module._non_persistent_buffers_set

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self.__dict__["module"].training if "module" in self.__dict__ else True

    @training.setter
    def training(self, mode: bool) -> None:
        if "module" in self.__dict__:
            self.__dict__["module"].training = mode

    def forward(self, *leaves: Tensor):
        args, kwargs = self.call.rebuild(leaves)
        return pick_output(self.module(*args, **kwargs), self.call.output)

    def __repr__(self) -> str:
        return f"ModelCall({type(self.module).__name__}, output={self.call.output!r})"


def _split_inputs(inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise ValueError(f"dict inputs are keyword arguments: keys must be str, got {bad[:3]}")
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        if not inputs:
            raise ValueError("batch inputs are an empty tuple; give a tensor, a tuple or a dict of tensors")
        return tuple(inputs), {}
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    raise ValueError(f"batch inputs must be a tensor, a tuple or a dict of tensors, got {type(inputs).__name__}")


def _plain(inputs) -> bool:
    """Inputs already canonical: a tensor or a flat tuple of tensors."""
    if isinstance(inputs, Tensor):
        return True
    return isinstance(inputs, tuple) and bool(inputs) and all(isinstance(x, Tensor) for x in inputs)


def _wrap(model, call: _Call):
    from lmech.core.functional import FunctionalModel  # (functional imports this module)

    if isinstance(model, FunctionalModel):
        return FunctionalModel(ModelCall(model.model, call), model.names)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a FunctionalModel, got {type(model).__name__}")
    return ModelCall(model, call)


def adapt_inputs(model, inputs, output: Output = None):
    """``(model, inputs)`` in the canonical form (module docstring): inputs a tensor or a flat
    tuple of tensors and a model taking them positionally. ``model`` may be an ``nn.Module`` or
    a :class:`lmech.core.FunctionalModel` (then one with the same selection is returned)."""
    if output is None and _plain(inputs):
        return model, inputs
    args, kwargs = _split_inputs(inputs)
    _count(args, kwargs)
    call = _Call(args, kwargs, output)
    return _wrap(model, call), call.leaves


def adapt(model, batch, output: Output = None):
    """``(model, batch)`` in the canonical form (module docstring): ``batch`` becomes
    ``(inputs, targets)`` with inputs a tensor or a flat tuple of tensors and tuple/dict targets
    as :class:`ExampleTuple`/:class:`ExampleDict`; the model takes the inputs positionally and
    returns the picked output. A canonical batch with ``output=None`` is returned as it is."""
    if isinstance(batch, dict):
        inputs, targets = batch, batch
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    else:
        raise ValueError(
            "batch must be a pair (inputs, targets) or a dict of tensors (model(**batch)); got "
            + type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    if output is None and _plain(inputs) and (targets is None or isinstance(targets, (Tensor, _Examples))):
        return model, batch  # canonical already (checks as before: none on sizes)
    model, xs = adapt_inputs(model, inputs, output)
    return model, (xs if isinstance(xs, tuple) else (xs,), _as_examples(targets))


def adapt_input_pair(model, x1, x2=None, output: Output = None):
    """:func:`adapt_inputs` for two sets of inputs of the same structure (NTK rows and columns,
    training and query sets): ``(model, xs1, xs2)`` with ``xs1``/``xs2`` flat tuples of tensors
    (``xs2`` ``None`` when ``x2`` is). The model rebuilds the call from either set's leaves."""
    adapted, xs1 = adapt_inputs(model, x1, output)
    xs1 = xs1 if isinstance(xs1, tuple) else (xs1,)
    if x2 is None:
        return adapted, xs1, None
    _, xs2 = adapt_inputs(model, x2, output)
    xs2 = xs2 if isinstance(xs2, tuple) else (xs2,)
    call1, call2 = getattr(_inner(adapted), "call", None), None
    if call1 is not None:
        call2 = _Call(*_split_inputs(x2), output)
        if call2.spec != call1.spec or call2.constants != call1.constants:
            raise ValueError("the two sets of inputs must have the same structure (the same tuple/dict "
                             "layout and the same non-tensor entries)")
    elif not _plain(x2) or len(xs2) != len(xs1):
        raise ValueError("the two sets of inputs must have the same structure (a tensor each, or tuples of equal length)")
    return adapted, xs1, xs2


def _inner(model):
    from lmech.core.functional import FunctionalModel

    return model.model if isinstance(model, FunctionalModel) else model


# --------------------------------------------------------------------------------------------
# Canonical batches: inputs and targets, the first examples
# --------------------------------------------------------------------------------------------


def split_batch(batch) -> tuple[tuple, Any]:
    """``(inputs, targets)`` -> ``(inputs as a tuple, targets)``, with a clear error otherwise."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            "batch must be a pair (inputs, targets); inputs a tensor or a tuple of tensors, "
            f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    inputs, targets = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("batch inputs must be a tensor or a non-empty tuple of tensors here; dict and "
                         "nested batches go through lmech.core.batch.adapt first (as every lmech probe does)")
    return inputs, targets


def subsample(batch, n: int | None) -> tuple:
    """The first ``n`` examples of ``(inputs, targets)`` (all of them when ``n`` is ``None``).
    Several processes: :meth:`lmech.core.distributed.Distributed.first_examples`."""
    inputs, targets = split_batch(batch)
    if n is None or n >= inputs[0].shape[0]:
        return batch
    xs = tuple(x[:n] for x in inputs)
    ys = targets[:n] if isinstance(targets, (Tensor, _Examples)) else targets
    return (xs if len(xs) > 1 else xs[0], ys)
