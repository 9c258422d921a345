r"""muP: the coordinate check and learning-rate transfer across widths (Yang et al., *Tensor
Programs V*, 2022), standard parameterization (SP) against muP (:mod:`lmech.mup`, TP-V Table 3
relative to a base width of 64).

1. **Coordinate check** (TP-V section 4; shared/research/learning-mechanics.md section 4.3). MLPs
   (``40 -> w -> w -> 10``, ReLU, no biases) at widths ``coord_widths`` (default 64..2048), Adam
   at a deliberately large learning rate ``coord_lr`` for ``coord_steps`` steps on one fixed
   batch of ``coord_batch`` MNIST-1D examples, ``coord_seeds`` seeds. After the last step the
   mean absolute coordinate of each layer's output (``l1``, seed-averaged) is fitted against
   width on log-log axes: the slope is per doubling of width (0 = flat). Prediction: flat under
   muP; growing under SP (an Adam step changes a hidden pre-activation by
   :math:`\Theta(\eta\, n)`, so the slope tends to 1). With ``coord_transformer=True`` the same
   check runs on the :class:`lmech.models.Transformer` (d_model = width, 4 heads, one block) on
   modular-addition tokens, widths up to 512, at ``coord_transformer_lr`` (0.003).
2. **Learning-rate transfer** (TP-V; Fig. 5 of the learning-mechanics paper; notes section
   4.4). The same MLP at widths ``transfer_widths`` (64..1024), Adam for ``transfer_steps``
   steps of batch ``transfer_batch`` on ``n_train`` MNIST-1D examples (same data order and seed
   everywhere; ``transfer_seeds`` seeds averaged), on the grid :math:`\eta = 2^k`,
   ``k = lr_min_log2 .. lr_max_log2``; the metric is the final training loss (cross-entropy,
   full training set; a diverged run counts as the worst loss on the grid). The optimum of each
   width is the grid point with the lowest loss (the issue's "grid steps"); the vertex of a
   parabola through it and its two neighbours refines it and is reported beside it
   (``transfer.<par>.vertex_log2_lr``, ``vertex_shift``).

The muP arm uses TP-V's recommended zero initialization of the readout (and of the attention
query in the transformer), ``mup_zero_init``; SP keeps the models' standard initialization.
Measured (docs/results/verify.md): without the zero initializations and at learning
rate 0.01 the transformer's muP coordinate check was *not* flat (largest slope 0.34 per
doubling, the MLP block's output projection; 0.22 for the readout; SP: 2.6); with them, at 0.01
a two-seed probe gave largest slopes of 0.08-0.17 depending on the step, and the default
(0.003, three seeds) 0.075. Under muP the refined optimum drifts up by about 0.1-0.2 grid steps
per width doubling (0.51 steps from width 64 to 1024; the grid argmin did not move), a
finite-width effect.

Checks:

* coordinate check, muP: the largest :math:`|\text{slope}|` over layers is at most 0.1 per
  doubling (flat);
* coordinate check, SP: the largest slope is at least 0.5 per doubling (activations blow up);
* learning-rate transfer, muP: the optimum moves at most 1 grid step (factor 2) over the widths;
* learning-rate transfer, SP: it moves at least 2 grid steps (the issue's target);
* muP, wider is better: the best loss at the widest width is below the best at the narrowest.

The thresholds are the issue's (transfer) and the notes' "flat vs growing" made numeric.
``quick``: MLP coordinate check at widths 64, 256, 1024 with 2 seeds; transfer at widths 64,
256, 1024 on 8 learning rates, 100 steps.

The transfer runs train on :class:`lmech.experiments.loop.TrainingLoop` (``probes=economy|full``: a
Monitor on every run, columns ``transfer/<par>/w<width>/lr2^<k>/s<seed>/probe/...``); the
coordinate check stays :func:`lmech.mup.coord_check`'s own few steps, a library measurement of
activation sizes rather than a training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lmech.errors import ConfigError, DivergedError
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel, TrainingLoop, never, no_evaluation, train
from lmech.models import MLP, Transformer
from lmech.mup import coord_check, from_factory
from lmech.tasks import mnist1d, modular_arithmetic

BASE_WIDTH = 64
MUP_FLAT = 0.1         # |slope| per doubling at most (muP coordinate check)
SP_GROWTH = 0.5        # slope per doubling at least (SP coordinate check)
MUP_SHIFT = 1.0        # grid steps at most (issue 6)
SP_SHIFT = 2.0         # grid steps at least (issue 6)


@dataclass
class MupConfig:
    optimizer: Literal["adam", "sgd"] = "adam"
    coord_widths: str = "64,128,256,512,1024,2048"
    coord_steps: int = 4
    coord_seeds: int = 3
    coord_lr: float = 0.01
    coord_batch: int = 64
    coord_transformer: bool = True
    coord_transformer_lr: float = 0.003
    transfer_widths: str = "64,128,256,512,1024"
    transfer_steps: int = 200
    transfer_batch: int = 64
    transfer_seeds: int = 1
    lr_min_log2: int = -11
    lr_max_log2: int = -3
    mup_zero_init: bool = True      # muP: zero readout (and query), TP-V's recommendation; SP keeps its init
    n_train: int = 4000
    # instruments on the transfer runs: none, or a lmech.Monitor preset (economy, full) every transfer_steps // 10
    probes: ProbeLevel = "none"

    def validate(self) -> None:
        for key in ("coord_widths", "transfer_widths"):
            widths = parse_widths(getattr(self, key))
            require(len(widths) >= 2 and all(w >= 4 for w in widths),
                    f"{key} needs at least two widths >= 4, got {getattr(self, key)!r}")
        require(self.coord_steps >= 1 and self.coord_seeds >= 1, "coord_steps and coord_seeds must be >= 1")
        require(self.coord_lr > 0 and self.coord_transformer_lr > 0,
                "coord_lr and coord_transformer_lr must be positive")
        require(self.coord_batch >= 1 and self.transfer_batch >= 1, "batch sizes must be positive")
        require(self.transfer_steps >= 1 and self.transfer_seeds >= 1, "transfer_steps and transfer_seeds must be >= 1")
        require(self.lr_max_log2 - self.lr_min_log2 >= 2, "the learning-rate grid needs at least 3 points")
        require(self.n_train >= self.transfer_batch and self.n_train >= self.coord_batch,
                "n_train must be at least the batch sizes")


def parse_widths(text: str) -> list[int]:
    try:
        return sorted({int(t) for t in text.replace(" ", "").split(",") if t})
    except ValueError:
        raise ConfigError(f"widths must be comma-separated integers like 64,256,1024, got {text!r}") from None


def mlp_factory(width: int) -> MLP:
    """The MLP of both parts: 40 -> width -> width -> 10, ReLU, no biases (TP-V's MLP setup)."""
    return MLP(40, 10, width=width, depth=2, activation="relu", bias=False)


def transformer_factory(vocab: int, seq_len: int, n_out: int):
    def factory(width: int) -> Transformer:
        return Transformer(vocab, seq_len, n_out, d_model=width, n_heads=4, n_layers=1, d_mlp=4 * width)
    return factory


def slopes(df, step: int) -> dict[str, float]:
    """Per module: slope of log2(mean l1) against log2(width) at ``step`` (seed-averaged)."""
    out = {}
    g = df[df["step"] == step].groupby(["module", "width"])["l1"].mean().reset_index()
    for module, gg in g.groupby("module"):
        out[module] = float(np.polyfit(np.log2(gg["width"]), np.log2(gg["l1"]), 1)[0])
    return out


def _worst_for_diverged(losses: list[float]) -> np.ndarray:
    y = np.asarray(losses, dtype=float)
    finite = np.isfinite(y)
    return np.where(finite, y, y[finite].max() if finite.any() else 1.0)


def grid_optimum(log2_lrs: list[int], losses: list[float]) -> int:
    """The grid point with the lowest loss (a diverged run counts as the worst finite loss)."""
    return int(log2_lrs[int(np.argmin(_worst_for_diverged(losses)))])


def vertex_optimum(log2_lrs: list[int], losses: list[float]) -> float:
    """Refined optimal log2 learning rate: the vertex of the parabola through the best grid point
    and its two neighbours (the grid point itself at the edge of the grid)."""
    y = _worst_for_diverged(losses)
    k = int(np.argmin(y))
    if k == 0 or k == len(y) - 1:
        return float(log2_lrs[k])
    curv = y[k - 1] - 2 * y[k] + y[k + 1]
    shift = 0.5 * (y[k - 1] - y[k + 1]) / curv if curv > 0 else 0.0
    return float(log2_lrs[k] + np.clip(shift, -0.5, 0.5))


def zero_init(cfg: MupConfig, parameterization: str, transformer: bool) -> dict:
    """The :func:`lmech.mup.parameterize` keywords of the zero-initializations (muP arm only)."""
    if not (cfg.mup_zero_init and parameterization == "mup"):
        return {}
    return {"zero_readout": True, "zero_query": True} if transformer else {"zero_readout": True}


def train_once(width: int, parameterization: str, cfg: MupConfig, lr: float, data, seed: int,
               run=None, prefix: str = "") -> float:
    """Final full-training-set loss of one (width, lr) run; ``nan`` if it diverged (a minibatch loss
    not finite: training stops before that step's update). With ``cfg.probes`` a Monitor writes
    into ``run`` under ``prefix`` every ``transfer_steps // 10`` steps."""
    torch.manual_seed(seed)
    mp = from_factory(mlp_factory, width, BASE_WIDTH, parameterization, cfg.optimizer,
                      **zero_init(cfg, parameterization, transformer=False))
    model, opt = mp.model, mp.optimizer(lr)
    x, y = data.x_train[: cfg.n_train], data.y_train[: cfg.n_train]
    gen = torch.Generator().manual_seed(seed)

    def step_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, x.shape[0], (cfg.transfer_batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if torch.isfinite(loss):         # a non-finite loss is not stepped on; the loop stops at it
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    try:
        train(run, TrainingLoop(model, opt, cfg.transfer_steps, max(1, cfg.transfer_steps // 10), None,
                                no_evaluation, watch="", eval_at=never, step_fn=step_fn, probes=cfg.probes,
                                probe_batch=(x[:256], y[:256]), probe_loss=F.cross_entropy, probe_prefix=prefix))
    except DivergedError:
        return float("nan")
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _coordinate_checks(run, cfg: MupConfig, family: str, factory, widths: list[int], batch, lr: float,
                       seeds: list[int], coord: dict, result: dict) -> None:
    """The SP and muP coordinate checks of one model family: logged under ``coord/<family>/<par>``,
    the frames kept in ``coord[(family, par)]``, slopes per doubling in ``result``."""
    for par in ("sp", "mup"):
        df = coord_check(factory, widths, batch, F.cross_entropy, base_width=BASE_WIDTH, parameterization=par,
                         optimizer=cfg.optimizer, lr=lr, steps=cfg.coord_steps, seeds=seeds,
                         **zero_init(cfg, par, transformer=family == "transformer"))
        coord[(family, par)] = df
        _log_coord(run, df, f"coord/{family}/{par}")
        s = slopes(df, cfg.coord_steps)
        result[f"coord.{family}.{par}.slopes"] = s
        result[f"coord.{family}.{par}.max_slope"] = max(s.values())
        result[f"coord.{family}.{par}.max_abs_slope"] = max(abs(v) for v in s.values())


def run(cfg: MupConfig, run, seed: int) -> dict:
    data = mnist1d(n_train=cfg.n_train, n_test=10)
    result: dict = {"base_width": BASE_WIDTH, "optimizer": cfg.optimizer}
    coord = {}
    # 1. coordinate check
    xb, yb = data.x_train[: cfg.coord_batch], data.y_train[: cfg.coord_batch]
    widths = parse_widths(cfg.coord_widths)
    seeds = [seed + i for i in range(cfg.coord_seeds)]
    _coordinate_checks(run, cfg, "mlp", mlp_factory, widths, (xb, yb), cfg.coord_lr, seeds, coord, result)
    if cfg.coord_transformer:
        tok = modular_arithmetic(p=23, op="+", train_fraction=0.5, encoding="tokens", seed=seed)
        factory = transformer_factory(tok.info["vocab_size"], tok.info["seq_len"], 23)
        xt, yt = tok.x_train[: cfg.coord_batch], tok.y_train[: cfg.coord_batch]
        _coordinate_checks(run, cfg, "transformer", factory, [w for w in widths if w <= 512], (xt, yt),
                           cfg.coord_transformer_lr, seeds, coord, result)
    # 2. learning-rate transfer
    log2_lrs = list(range(cfg.lr_min_log2, cfg.lr_max_log2 + 1))
    t_widths = parse_widths(cfg.transfer_widths)
    transfer = {}
    run.log_array(0, "transfer/log2_lr", log2_lrs)
    for par in ("sp", "mup"):
        optima, vertices, best = [], [], []
        for w in t_widths:
            per_seed = [[train_once(w, par, cfg, 2.0 ** k, data, seed + s, run, f"transfer/{par}/w{w}/lr2^{k}/s{s}/")
                         for k in log2_lrs] for s in range(cfg.transfer_seeds)]
            losses = np.mean(per_seed, axis=0).tolist()   # a diverged seed makes the mean nan
            transfer[(par, w)] = losses
            run.log_array(w, f"transfer/{par}/loss", losses)
            optima.append(grid_optimum(log2_lrs, losses))
            vertices.append(vertex_optimum(log2_lrs, losses))
            best.append(float(np.nanmin(losses)))
            run.log(w, **{f"transfer/{par}/optimal_log2_lr": optima[-1],
                          f"transfer/{par}/vertex_log2_lr": vertices[-1], f"transfer/{par}/best_loss": best[-1]})
        result[f"transfer.{par}.optimal_log2_lr"] = dict(zip(map(str, t_widths), optima))
        result[f"transfer.{par}.vertex_log2_lr"] = dict(zip(map(str, t_widths), vertices))
        result[f"transfer.{par}.best_loss"] = dict(zip(map(str, t_widths), best))
        result[f"transfer.{par}.shift"] = max(optima) - min(optima)
        result[f"transfer.{par}.vertex_shift"] = max(vertices) - min(vertices)
    result["transfer.mup.wide_over_narrow_loss"] = (result["transfer.mup.best_loss"][str(t_widths[-1])]
                                                    / result["transfer.mup.best_loss"][str(t_widths[0])])
    result["coord_transformer"] = cfg.coord_transformer
    run.save_figure(figure(coord, transfer, log2_lrs, t_widths, cfg.coord_steps, result), "mup")
    return result


def _log_coord(run, df, prefix: str) -> None:
    g = df.groupby(["step", "module", "width"])["l1"].mean().reset_index()
    for (step, module), gg in g.groupby(["step", "module"]):
        run.log_array(int(step), f"{prefix}/{module}/l1", gg.sort_values("width")["l1"].to_numpy())


def check(result: dict) -> list[CheckRow]:
    rows = []
    models = ["mlp"] + (["transformer"] if result.get("coord_transformer") else [])
    for model in models:
        rows.append(CheckRow.at_most(f"muP coordinate check ({model}): max |slope|", MUP_FLAT,
                                     result[f"coord.{model}.mup.max_abs_slope"]))
        rows.append(CheckRow.at_least(f"SP coordinate check ({model}): max slope", SP_GROWTH,
                                      result[f"coord.{model}.sp.max_slope"]))
    rows.append(CheckRow.at_most("muP LR transfer: optimum shift (grid steps)", MUP_SHIFT,
                                 result["transfer.mup.shift"]))
    rows.append(CheckRow.at_least("SP LR transfer: optimum shift (grid steps)", SP_SHIFT,
                                  result["transfer.sp.shift"]))
    rows.append(CheckRow.at_most("muP: best loss widest / narrowest width", 1.0,
                                 result["transfer.mup.wide_over_narrow_loss"]))
    return rows


def figure(coord: dict, transfer: dict, log2_lrs: list[int], t_widths: list[int], step: int, result: dict):
    """Top row: coordinate checks (SP and muP side by side, same y scale); bottom: LR transfer."""
    from lmech.plotting import plt

    models = sorted({m for m, _ in coord}, key=lambda m: m != "mlp")
    ncol = 2 * len(models)
    fig = plt.figure(figsize=(4.2 * ncol, 7.6))
    grid = fig.add_gridspec(2, ncol)
    label = {"sp": "SP", "mup": "muP"}
    for j, (model, par) in enumerate((m, p) for m in models for p in ("sp", "mup")):
        ax = fig.add_subplot(grid[0, j], sharey=fig.axes[-1] if par == "mup" else None)
        df = coord[(model, par)]
        g = df[df["step"] == step].groupby(["module", "width"])["l1"].mean().reset_index()
        for module, gg in g.groupby("module"):
            ax.plot(gg["width"], gg["l1"], marker="o", ms=3, label=module)
        widths = sorted(g["width"].unique())
        ax.set(xscale="log", yscale="log", xlabel="width", ylabel=f"mean |h| after {step} steps",
               title=f"coordinate check, {model}, {label[par]}")
        ax.set_xticks(widths, [str(w) for w in widths], minor=False)
        ax.minorticks_off()
        ax.legend(fontsize=6)
    cmap = plt.get_cmap("viridis")
    half = ncol // 2
    for j, par in enumerate(("sp", "mup")):
        ax = fig.add_subplot(grid[1, j * half:(j + 1) * half])
        for i, w in enumerate(t_widths):
            losses = np.asarray(transfer[(par, w)], dtype=float)
            c = cmap(i / max(len(t_widths) - 1, 1))
            ax.plot(log2_lrs, losses, marker="o", ms=3, color=c, label=f"width {w}")
            ax.axvline(result[f"transfer.{par}.vertex_log2_lr"][str(w)], color=c, ls=":", lw=1)
        ax.set(xlabel="log2 learning rate", ylabel="final train loss", yscale="log",
               title=f"LR transfer, {label[par]}: grid optimum moves {result[f'transfer.{par}.shift']:g} steps "
                     f"(vertex, dotted: {result[f'transfer.{par}.vertex_shift']:.2f})")
        finite = [v for losses in transfer.values() for v in losses if math.isfinite(v)]
        if finite:
            ax.set_ylim(min(finite) * 0.8, min(max(finite), 3.0) * 1.1)
        ax.legend(fontsize=7)
    for a in fig.axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


EXPERIMENT = Experiment(
    name="mup",
    summary="muP vs SP: coordinate check flat across widths, optimal learning rate transfers (MLP, transformer)",
    config=MupConfig,
    run=run,
    check=check,
    quick={"coord_widths": "64,256,1024", "coord_seeds": 2, "coord_transformer": False,
           "transfer_widths": "64,256,1024", "transfer_steps": 100, "lr_min_log2": -11, "lr_max_log2": -4},
)
