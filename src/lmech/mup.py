r"""Width parameterizations (SP, NTK, muP) for any ``nn.Module``, and the muP coordinate check.

An *abc-parameterization* (Yang & Hu, *Feature Learning in Infinite-Width Neural Networks*,
Tensor Programs IV, 2021) writes each weight as :math:`W = n^{-a} w`, draws
:math:`w \sim \mathcal N(0, n^{-2b})` and trains with learning rate :math:`\eta n^{-c}`. muP is
the unique one in which every layer's features move by :math:`\Theta(1)` per step as the width
:math:`n \to \infty` (maximal feature learning); the optimal hyperparameters of a small model
then transfer to wide ones (Yang et al., *Tensor Programs V: Tuning Large Neural Networks via
Zero-Shot Hyperparameter Transfer*, 2022).

This module implements TP-V's Table 3 (no multipliers), every factor taken *relative to a base
model* (the ``mup`` package's convention): with :math:`m_\text{in} = \text{fan\_in} /
\text{base\_fan\_in}` and :math:`m_\text{out} = \text{fan\_out}/\text{base\_fan\_out}` (1 for a
dimension that does not grow with width), each parameter's init std is
``base_std * init_mult`` and its learning rate ``lr * lr_mult``:

::

    kind                      init_mult               SGD lr_mult                 Adam lr_mult
    input (and every vector)  1                       muP: m_out, else 1          1
    hidden                    m_in^-1/2               NTK: 1/m_in, else 1         muP: 1/m_in, NTK: m_in^-1/2, SP: 1
    output (readout)          muP: 1/m_in,            muP, NTK: 1/m_in, SP: 1     muP: 1/m_in, NTK: m_in^-1/2, SP: 1
                              else m_in^-1/2

*Kinds*: a parameter whose fan_in grows with width and fan_out does
not is ``output`` (the readout); both grow: ``hidden``; otherwise ``input`` (embeddings, the
first layer, every bias and LayerNorm vector, whose fan_in is 1, and parameters that do not grow
at all, for which every factor is 1). Fan-in/fan-out are dims 1/0 of a weight
(``nn.Linear``, convolutions) except for ``nn.Embedding`` (a lookup: fan_in = the vocabulary,
dim 0). A dimension grows with width if its size differs between the model, ``base`` and
``delta`` (an optional third model at another width, needed when the model *is* at the base
width; :func:`from_factory` builds both).

* ``parameterization="sp"`` is the standard parameterization (init variance :math:`1/\text{fan\_in}`,
  one learning rate); ``"ntk"`` the NTK parameterization (:math:`W = w/\sqrt{\text{fan\_in}}`,
  written as SP init with learning rates divided by :math:`m_\text{in}` for SGD, by
  :math:`\sqrt{m_\text{in}}` for Adam): lazy as :math:`n \to \infty`; ``"mup"``: muP.
* At the base width all three coincide with the model's own initialization: ``base_std`` is the
  root mean square of the *base model's* parameter as its constructor drew it (the "1"s of the
  tables are constants tuned at the base width). Parameters the base model initialized to a
  constant (biases at 0, LayerNorm at 1) are left as the model drew them.
* ``readout_multiplier=True`` (muP only) uses the equivalent TP-V Table 8 form for the readout:
  the forward pass multiplies the readout's *input* by :math:`1/m_\text{in}` (a forward
  pre-hook, as ``mup.MuReadout`` does, so the bias is not scaled), its init is ``base_std``
  (``init_mult`` 1) and its learning rate ``lr_mult`` is :math:`m_\text{in}` for SGD, 1 for Adam.
  Training is then identical to the Table 3 form (exactly for SGD; for Adam up to the role of
  :math:`\epsilon`).
* ``zero_readout`` / ``zero_query`` zero-initialize the readout and the attention query (TP-V's
  recommendation: it removes the :math:`n^{-1/2}` transient of the output and the attention logits
  at the first step).
* Attention (muP only): every :class:`lmech.models.transformer.CausalSelfAttention` gets the logit
  scale :math:`\sqrt{d_\text{base}}/d` instead of :math:`1/\sqrt d` (TP-V: :math:`q^\top k/d`;
  equal to the standard scale at the base head dimension).
* Weight decay is not rescaled (use none, or decoupled weight decay scaled by hand).

Source of the table: TP-V Table 3 (verified against the ``microsoft/mup`` package, whose
``MuAdam`` divides the learning rate of matrix-like parameters by ``width_mult`` and ``MuSGD``
multiplies vector-like ones by it; shared/research/learning-mechanics.md section 4.2).

The coordinate check (:func:`coord_check`; TP-V section 4 / the ``mup`` README): train models of
several widths for a few steps with a large learning rate and record, after each step, the mean
absolute coordinate of every layer's output (``l1``) and of its change since initialization
(``delta_l1``). Under muP both are flat in width; under SP they grow with width.

Example:
    >>> import torch
    >>> from lmech.models import MLP
    >>> mp = from_factory(lambda w: MLP(8, 2, width=w, depth=2), width=256, base_width=64,
    ...                   parameterization="mup", optimizer="adam")
    >>> [(i.name, i.kind, i.lr_mult) for i in mp.infos if i.name.endswith("weight")]
    [('layers.0.weight', 'input', 1.0), ('layers.1.weight', 'hidden', 0.25), ('layers.2.weight', 'output', 0.25)]
    >>> opt = mp.optimizer(lr=1e-2)           # torch.optim.Adam with one group per learning rate
    >>> sorted(g["lr"] for g in opt.param_groups)
    [0.0025, 0.01]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "PARAMETERIZATIONS",
    "ParamInfo",
    "Parameterized",
    "parameterize",
    "from_factory",
    "table",
    "coord_check",
]

Parameterization = Literal["sp", "ntk", "mup"]
OptimizerName = Literal["adam", "sgd"]
Kind = Literal["input", "hidden", "output"]
PARAMETERIZATIONS: tuple[str, ...] = ("sp", "ntk", "mup")


def table(kind: Kind, parameterization: Parameterization, optimizer: OptimizerName, m_in: float,
          m_out: float = 1.0, readout_multiplier: bool = False) -> tuple[float, float, float]:
    r"""``(init_mult, lr_mult, multiplier)`` of one parameter (module docstring's table).

    Example:
        >>> table("output", "mup", "sgd", m_in=4.0)
        (0.25, 0.25, 1.0)
        >>> table("output", "mup", "sgd", m_in=4.0, readout_multiplier=True)   # TP-V Table 8
        (1.0, 4.0, 0.25)
        >>> table("hidden", "ntk", "adam", m_in=4.0)
        (0.5, 0.5, 1.0)
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; known: {', '.join(PARAMETERIZATIONS)}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if kind not in ("input", "hidden", "output"):
        raise ValueError(f"kind must be 'input', 'hidden' or 'output', got {kind!r}")
    if not (m_in > 0 and m_out > 0):
        raise ValueError(f"width multipliers must be positive, got m_in={m_in}, m_out={m_out}")
    isq = 1.0 / math.sqrt(m_in)
    sgd = optimizer == "sgd"
    if kind == "input":
        return 1.0, (m_out if sgd and parameterization == "mup" else 1.0), 1.0
    if kind == "hidden":
        if parameterization == "sp":
            return isq, 1.0, 1.0
        if parameterization == "ntk":
            return isq, (1.0 / m_in if sgd else isq), 1.0
        return isq, (1.0 if sgd else 1.0 / m_in), 1.0
    # output
    if parameterization == "sp":
        return isq, 1.0, 1.0
    if parameterization == "ntk":
        return isq, (1.0 / m_in if sgd else isq), 1.0
    if readout_multiplier:
        return 1.0, (m_in if sgd else 1.0), 1.0 / m_in
    return 1.0 / m_in, 1.0 / m_in, 1.0


@dataclass
class ParamInfo:
    """One parameter's place in the parameterization."""

    name: str
    kind: Kind
    m_in: float          # fan_in / base fan_in
    m_out: float         # fan_out / base fan_out
    base_std: float      # RMS of the base model's parameter at its own init (0: constant init)
    init_std: float      # std drawn here (base_std * init_mult); nan: left as the model drew it
    lr_mult: float
    multiplier: float    # forward multiplier on the readout's input (1 elsewhere)


def _fans(module: nn.Module, pname: str, shape: torch.Size) -> tuple[int, int]:
    """(fan_in, fan_out) dims of a parameter's shape: sizes, with Embedding's lookup convention."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    if isinstance(module, nn.Embedding) and pname == "weight":
        return shape[0], shape[1]
    return shape[1], shape[0]


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    out = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            out[f"{mname}.{pname}" if mname else pname] = (mod, pname)
    return out


class Parameterized:
    r"""A model re-initialized under a width parameterization, with its per-parameter learning rates.

    Built by :func:`parameterize` / :func:`from_factory`. Attributes: ``model``, ``infos`` (one
    :class:`ParamInfo` per parameter), ``parameterization``, ``optimizer_name``.
    :meth:`param_groups` gives ``torch.optim`` groups (one per distinct learning-rate factor),
    :meth:`optimizer` builds ``torch.optim.Adam`` or ``SGD`` with them, :meth:`remove` undoes the
    forward hooks.
    """

    def __init__(self, model: nn.Module, infos: list[ParamInfo], parameterization: str, optimizer: str,
                 hooks: list) -> None:
        self.model, self.infos = model, infos
        self.parameterization, self.optimizer_name = parameterization, optimizer
        self._hooks = hooks

    def lr_mults(self) -> dict[str, float]:
        return {i.name: i.lr_mult for i in self.infos}

    def param_groups(self, lr: float) -> list[dict]:
        """``[{"params": [...], "lr": lr * lr_mult, "lr_mult": lr_mult}, ...]`` grouped by ``lr_mult``."""
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr}")
        by_name = dict(self.model.named_parameters())
        groups: dict[float, list] = {}
        for info in self.infos:
            groups.setdefault(info.lr_mult, []).append(by_name[info.name])
        return [{"params": ps, "lr": lr * mult, "lr_mult": mult} for mult, ps in groups.items()]

    def optimizer(self, lr: float, **kwargs) -> torch.optim.Optimizer:
        """``torch.optim.Adam`` (or ``SGD``, as the parameterization was built for) over :meth:`param_groups`."""
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.param_groups(lr), lr=lr, **kwargs)
        return torch.optim.SGD(self.param_groups(lr), lr=lr, **kwargs)

    def remove(self) -> None:
        """Remove the readout-multiplier hooks (the model then computes without the multiplier)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return (f"Parameterized({self.parameterization}, {self.optimizer_name}, "
                f"{len(self.infos)} parameters)")


def parameterize(
    model: nn.Module,
    base: nn.Module,
    parameterization: Parameterization = "mup",
    optimizer: OptimizerName = "adam",
    *,
    delta: nn.Module | None = None,
    readout_multiplier: bool = False,
    zero_readout: bool = False,
    zero_query: bool = False,
    generator: torch.Generator | None = None,
) -> Parameterized:
    r"""Re-initialize ``model`` in place under ``parameterization`` relative to ``base`` (same
    architecture at the base width) and return its :class:`Parameterized` (learning rates).

    A dimension grows with width if its size differs among ``model``, ``base`` and ``delta``
    (same architecture at a third width; needed only when ``model`` has the base shapes). Draws
    use ``generator`` (or the global RNG), in ``named_parameters`` order. See the module
    docstring for the table.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; known: {', '.join(PARAMETERIZATIONS)}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if readout_multiplier and parameterization != "mup":
        raise ValueError("readout_multiplier is the Table-8 form of muP: use it with parameterization='mup'")
    owners, base_params = _owners(model), dict(base.named_parameters())
    ref_params = dict((delta if delta is not None else base).named_parameters())
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in base_params or n not in ref_params]
    if missing:
        raise ValueError(f"base/delta model lacks parameters {missing[:3]}: build it with the same architecture")
    infos, hooks = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            mod, pname = owners[name]
            bp, rp = base_params[name], ref_params[name]
            if p.dim() != bp.dim() or p.dim() != rp.dim():
                raise ValueError(f"parameter {name} has {p.dim()} dims here and {bp.dim()} in the base model")
            fi, fo = _fans(mod, pname, p.shape)
            bfi, bfo = _fans(mod, pname, bp.shape)
            rfi, rfo = _fans(mod, pname, rp.shape)
            grows_in, grows_out = len({fi, bfi, rfi}) > 1, len({fo, bfo, rfo}) > 1
            kind: Kind = "hidden" if grows_in and grows_out else "output" if grows_in else "input"
            m_in, m_out = fi / bfi, fo / bfo
            init_mult, lr_mult, mult = table(kind, parameterization, optimizer, m_in, m_out, readout_multiplier)
            base_std = float(bp.detach().double().pow(2).mean().sqrt()) if bp.numel() > 1 and bool(
                (bp != bp.reshape(-1)[0]).any()) else 0.0
            init_std = float("nan")
            if kind == "output" and zero_readout:
                p.zero_()
                init_std = 0.0
            elif base_std > 0:
                init_std = base_std * init_mult
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device) * init_std)
            infos.append(ParamInfo(name, kind, m_in, m_out, base_std, init_std, lr_mult, mult))
            if mult != 1.0:  # only a readout weight has one: scale its module's input
                hooks.append(mod.register_forward_pre_hook(_scale_input(mult)))
        _attention(model, base, parameterization, zero_query)
    return Parameterized(model, infos, parameterization, optimizer, hooks)


def _scale_input(mult: float):
    def hook(module, args):
        return (args[0] * mult,) + tuple(args[1:])
    return hook


def _attention(model: nn.Module, base: nn.Module, parameterization: str, zero_query: bool) -> None:
    """muP attention scale sqrt(d_base)/d on every CausalSelfAttention; zero the query rows."""
    from lmech.models.transformer import CausalSelfAttention

    base_mods = dict(base.named_modules())
    for name, mod in model.named_modules():
        if not isinstance(mod, CausalSelfAttention):
            continue
        if parameterization == "mup":
            d, d0 = mod.d_head, base_mods[name].d_head
            mod.scale = math.sqrt(d0) / d
        if zero_query:
            d_model = mod.qkv.weight.shape[1]
            mod.qkv.weight[:d_model].zero_()
            if mod.qkv.bias is not None:
                mod.qkv.bias[:d_model].zero_()


def from_factory(
    factory: Callable[[int], nn.Module],
    width: int,
    base_width: int,
    parameterization: Parameterization = "mup",
    optimizer: OptimizerName = "adam",
    **kwargs,
) -> Parameterized:
    """``parameterize(factory(width), base=factory(base_width), delta=factory(2 * base_width))``.

    The factory is called under the current global RNG for the base and delta models (their
    draws only set ``base_std``); ``model`` is drawn last. Keyword arguments go to
    :func:`parameterize`.
    """
    if width < 1 or base_width < 1:
        raise ValueError(f"width and base_width must be positive, got {width}, {base_width}")
    base, delta = factory(base_width), factory(2 * base_width)
    return parameterize(factory(width), base, parameterization, optimizer, delta=delta, **kwargs)


def _leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))}


def coord_check(
    factory: Callable[[int], nn.Module],
    widths: Iterable[int],
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    base_width: int,
    parameterization: Parameterization = "mup",
    optimizer: OptimizerName = "adam",
    lr: float = 1e-2,
    steps: int = 4,
    seeds: Iterable[int] = (0, 1, 2),
    **kwargs,
):
    r"""The coordinate check: activation sizes against width over the first ``steps`` steps.

    For each width and seed: build ``factory(width)`` under the parameterization
    (:func:`from_factory`, seeded), then for ``t = 0..steps`` run the forward pass on the fixed
    ``batch``, record for every module that owns parameters (and the network output as module
    ``"output"`` when no such module produced it) ``l1`` = mean :math:`|h_t|` and ``delta_l1`` =
    mean :math:`|h_t - h_0|` of its output, and take one optimizer step on ``loss_fn(model(x), y)``.

    Returns a ``pandas.DataFrame`` with columns ``width, seed, step, module, l1, delta_l1``
    (``step`` = number of updates taken before the measurement). Under muP the columns are flat
    in width at every step; under SP they grow (TP-V section 4, "coordinate check").
    """
    import pandas as pd

    x, y = batch
    rows = []
    for width in widths:
        for seed in seeds:
            torch.manual_seed(seed)
            mp = from_factory(factory, width, base_width, parameterization, optimizer, **kwargs)
            model = mp.model
            opt = mp.optimizer(lr)
            outs: dict[str, Tensor] = {}
            leaves = _leaf_modules(model)
            handles = [m.register_forward_hook(_recorder(outs, n)) for n, m in leaves.items()]
            first: dict[str, Tensor] = {}
            try:
                for t in range(steps + 1):
                    outs.clear()
                    out = model(x)
                    if not any(h.data_ptr() == out.data_ptr() for h in outs.values()):
                        outs["output"] = out.detach()  # the output is not some module's output
                    for name, h in outs.items():
                        first.setdefault(name, h)
                        rows.append((width, seed, t, name, float(h.abs().mean()),
                                     float((h - first[name]).abs().mean())))
                    if t == steps:
                        break
                    opt.zero_grad(set_to_none=True)
                    loss_fn(out, y).backward()
                    opt.step()
            finally:
                for h in handles:
                    h.remove()
                mp.remove()
    return pd.DataFrame(rows, columns=["width", "seed", "step", "module", "l1", "delta_l1"])


def _recorder(store: dict, name: str):
    def hook(module, args, output):
        if isinstance(output, Tensor):
            store[name] = output.detach()
    return hook
