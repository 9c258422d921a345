r"""An implicit neural representation fitting a signal from noisy samples: does it memorize the noise?

Setting. A coordinate network :math:`f(x)` (random Fourier features, Tancik et al. 2020, *Fourier
Features Let Networks Learn High Frequency Functions in Low Dimensional Domains*, then an MLP)
is fitted by minibatch mean squared error to noisy samples :math:`y_i = u(x_i) + \sigma\,\xi_i`
of a fixed signal :math:`u` on a uniform grid of ``resolution`` points in :math:`[0, 1)^d`
(``dim`` = 1 or 2; in 2-D ``resolution`` points per side), :math:`\xi_i \sim N(0, 1)` drawn once
per seed. Signals (amplitude about 1, several frequencies):

* 1-D: :math:`u(x) = \sin 4\pi x + \tfrac12 \sin(10\pi x + 1) + \tfrac14 \sin(26\pi x + 2)`;
* 2-D: :math:`u(x, y) = \sin(2\pi(2x + y))\cos(6\pi y) + \tfrac12\,\mathbf 1\{(x-\tfrac12)^2 +
  (y-\tfrac12)^2 < 0.1\}`.

Fourier features: :math:`\gamma(x) = [\sin 2\pi Bx, \cos 2\pi Bx]` with
:math:`B_{jk} \sim N(0, \text{ff\_scale}^2)` (``n_features`` rows, fixed, drawn from the seed).

Logged every ``eval_every`` steps (all MSEs are plain means of squared errors):
``train_mse`` (against the noisy targets), ``clean_mse`` (the fit at the training coordinates
against the clean signal: the denoising error), ``interp_mse`` (at the grid shifted by half a
cell, against the clean signal), the weight norm and the PopRiskAdamW gate statistics.
A network that memorizes drives ``train_mse`` below the noise variance :math:`\sigma^2` while
``clean_mse`` rises back towards :math:`\sigma^2`.

Result: ``min_clean_mse`` and its step, ``final_clean_mse``, ``final_train_mse``,
``final_interp_mse``, ``noise_var`` and ``overfit_ratio`` = final / min clean MSE.
Check: at its best point the network denoises, ``min_clean_mse < noise_var``.

Early stopping (``stopping``, :mod:`lmech.experiments.stopping_keys`): the gradient rules (``gate``,
``evidence``, ``train_loss``) read :func:`lmech.stopping.gradient_signals` on the training points
(every k-th for more than 1,024), the path rules a :class:`lmech.probes.gramian.PathRecorder` on all
of them that follows every minibatch step (at most 1,024 points; not with Grokfast). Training ends
at the evaluation where the rule fires; the result adds ``stop/rule``, ``stop/step`` and
``stop/best_step``, and the ``final_*`` metrics are those of the stopping step.

The claim tested (generalization paper, abstract): PopRiskAdamW "suppresses memorization" in
implicit neural representations; the paper's own INR setup was not recoverable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel, TrainingLoop, train
from lmech.experiments.optimizer_keys import (OptimizerKeys, optimizer_diagnostics, optimizer_options,
                                              validate_optimizer_keys)
from lmech.experiments.stopping_keys import STOPPING_RULES, StoppingKeys, stopping_driver, validate_stopping_keys
from lmech.models import MLP
from lmech.optim import build_optimizer
from lmech.train import minibatches, weight_norm


MAX_STOP_BATCH = 1024  # gradient signals: per-example gradients of at most this many training points
MAX_PATH_POINTS = 1024  # path rules: the recorder's n x n operators (80 n^2 bytes and more)


@dataclass
class INRNoiseConfig(StoppingKeys, OptimizerKeys):
    dim: Literal[1, 2] = 1
    resolution: int = 256
    noise_std: float = 0.5
    n_features: int = 64
    ff_scale: float = 10.0
    width: int = 128
    depth: int = 3
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eval_every: int = 25
    # instruments: none, or a lmech.Monitor preset (economy, full) measured every eval_every steps
    probes: ProbeLevel = "none"

    def validate(self) -> None:
        require(self.resolution >= 4, f"resolution must be >= 4, got {self.resolution}")
        require(self.dim == 1 or self.resolution <= 128,
                f"dim=2 uses resolution**2 pixels; resolution must be <= 128, got {self.resolution}")
        require(self.noise_std >= 0, f"noise_std must be >= 0, got {self.noise_std}")
        require(self.n_features > 0 and self.ff_scale > 0, "n_features and ff_scale must be positive")
        require(self.width > 0 and self.depth > 0, "width and depth must be positive")
        require(self.steps > 0 and self.batch_size > 0 and self.eval_every > 0,
                "steps, batch_size and eval_every must be positive")
        require(self.lr > 0 and self.weight_decay >= 0, "lr must be positive and weight_decay >= 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        n = self.resolution ** self.dim
        validate_optimizer_keys(self, min(self.batch_size, n), n)
        path_ok = n <= MAX_PATH_POINTS and self.optimizer != "grokfast"
        why = (f"the path rules record n x n operators over the {n} training points (at most {MAX_PATH_POINTS})"
               if n > MAX_PATH_POINTS else "the path recorder models SGD, Adam, AdamW and PopRiskAdamW steps, not Grokfast")
        validate_stopping_keys(self, STOPPING_RULES if path_ok else ("none", "gate", "evidence", "train_loss"),
                               len(stop_indices(n)), why)


class FourierFeatureMLP(nn.Module):
    r""":math:`x \mapsto \mathrm{MLP}([\sin 2\pi Bx, \cos 2\pi Bx])` with a fixed Gaussian ``B``.

    Example:
        >>> net = FourierFeatureMLP(d_in=2, n_features=8, scale=3.0, width=16, depth=2)
        >>> net(torch.rand(5, 2)).shape
        torch.Size([5, 1])
    """

    def __init__(self, d_in: int, n_features: int, scale: float, width: int, depth: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("B", scale * torch.randn(n_features, d_in, generator=generator))
        self.mlp = MLP(d_in=2 * n_features, d_out=1, width=width, depth=depth)

    def forward(self, x: Tensor) -> Tensor:
        z = 2 * math.pi * x @ self.B.T
        return self.mlp(torch.cat([torch.sin(z), torch.cos(z)], dim=-1))


def stop_indices(n: int) -> Tensor:
    """The training points the gradient signals of a stopping rule are measured on: all of them, or
    every k-th one for more than :data:`MAX_STOP_BATCH`."""
    return torch.arange(0, n, max(1, -(-n // MAX_STOP_BATCH)))


def signal(x: Tensor) -> Tensor:
    """The clean signal u at coordinates ``x`` of shape (n, dim), as (n, 1)."""
    if x.shape[1] == 1:
        t = x[:, 0]
        u = torch.sin(4 * math.pi * t) + 0.5 * torch.sin(10 * math.pi * t + 1) + 0.25 * torch.sin(26 * math.pi * t + 2)
    else:
        a, b = x[:, 0], x[:, 1]
        disc = ((a - 0.5) ** 2 + (b - 0.5) ** 2 < 0.1).to(x.dtype)
        u = torch.sin(2 * math.pi * (2 * a + b)) * torch.cos(6 * math.pi * b) + 0.5 * disc
    return u[:, None]


def grid(resolution: int, dim: int, offset: float = 0.0) -> Tensor:
    """The uniform grid ``(i + offset) / resolution`` in [0, 1)^dim, as (resolution**dim, dim)."""
    axis = (torch.arange(resolution, dtype=torch.float32) + offset) / resolution
    if dim == 1:
        return axis[:, None]
    return torch.cartesian_prod(axis, axis)


def run(cfg: INRNoiseConfig, run, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = grid(cfg.resolution, cfg.dim)
    clean = signal(x)
    y = clean + cfg.noise_std * torch.randn(clean.shape, generator=gen)
    x_mid = grid(cfg.resolution, cfg.dim, offset=0.5)
    clean_mid = signal(x_mid)
    torch.manual_seed(seed)
    model = FourierFeatureMLP(cfg.dim, cfg.n_features, cfg.ff_scale, cfg.width, cfg.depth, generator=gen)
    n = len(x)
    batch = min(cfg.batch_size, n)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2), **optimizer_options(cfg, batch, n))
    batches = minibatches(n, cfg.batch_size, gen)

    best = {"mse": math.inf, "step": 0}

    def evaluate(step: int) -> dict:
        with torch.no_grad():
            pred = model(x)
            return dict(train_mse=float((pred - y).square().mean()),
                        clean_mse=float((pred - clean).square().mean()),
                        interp_mse=float((model(x_mid) - clean_mid).square().mean()))

    def on_eval(step: int, evals: dict) -> None:
        if evals["clean_mse"] < best["mse"]:
            best.update(mse=evals["clean_mse"], step=step)

    last_batch: dict = {}

    def loss(step: int) -> Tensor:
        idx = last_batch["idx"] = next(batches)
        return (model(x[idx]) - y[idx]).square().mean()

    def recorder():
        from lmech.probes.gramian import PathRecorder

        # S = the training points; the minibatch loss is 2 x half_mse (one output); no labels beyond S
        return PathRecorder(model, x, y, x_mid[:2], optimizer=optimizer, loss_scale=2.0)

    stop = stop_indices(n)
    loop = TrainingLoop(
        model, optimizer, cfg.steps, cfg.eval_every, loss, evaluate, watch="train_mse",
        extras=lambda: dict(weight_norm=weight_norm(model), **optimizer_diagnostics(optimizer)), on_eval=on_eval,
        probes=cfg.probes, probe_batch=(x[:256], y[:256]), probe_loss=torch.nn.functional.mse_loss,
        stopping=stopping_driver(cfg, model, torch.nn.functional.mse_loss, (x[stop], y[stop]), recorder,
                                 batch_indices=lambda: None if batch >= n else last_batch["idx"]))
    evals = train(run, loop)
    best, best_step = best["mse"], best["step"]

    with torch.no_grad():
        fit = model(x)
    _save_figure(run, cfg, x, clean, y, fit)
    return {"min_clean_mse": best, "step_min_clean": best_step, "final_clean_mse": evals["clean_mse"],
            "final_train_mse": evals["train_mse"], "final_interp_mse": evals["interp_mse"],
            "noise_var": cfg.noise_std ** 2, "overfit_ratio": evals["clean_mse"] / max(best, 1e-300),
            "n_train": n, "n_params": sum(p.numel() for p in model.parameters()), **loop.stop_result()}


def check(result: dict) -> list[CheckRow]:
    """At its best point the fit is closer to the clean signal than the noisy targets are."""
    return [CheckRow.at_most("min clean MSE (noise variance bound)", result["noise_var"], result.get("min_clean_mse"))]


def _save_figure(run, cfg: INRNoiseConfig, x: Tensor, clean: Tensor, y: Tensor, fit: Tensor) -> None:
    from lmech.plotting import plt

    df = run.metrics(wide=True)
    df = df[df["step"] > 0]
    fig, axes = plt.subplots(1, 2 if cfg.dim == 1 else 4, figsize=(12, 3.8) if cfg.dim == 1 else (16, 3.8))
    ax = axes[0]
    for key, color in (("train_mse", "tab:blue"), ("clean_mse", "tab:red"), ("interp_mse", "tab:orange")):
        ax.plot(df["step"], df[key], label=key, color=color)
    ax.axhline(cfg.noise_std ** 2, color="gray", ls=":", label="noise variance")
    ax.set(xscale="log", yscale="log", xlabel="step", ylabel="MSE", title="fit error")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    x, y, clean, fit = (t.detach().cpu().numpy() for t in (x, y, clean, fit))  # matplotlib wants arrays
    if cfg.dim == 1:
        ax = axes[1]
        ax.plot(x[:, 0], y[:, 0], ".", ms=3, color="gray", label="noisy targets")
        ax.plot(x[:, 0], clean[:, 0], color="black", lw=1, label="clean signal")
        ax.plot(x[:, 0], fit[:, 0], color="tab:red", lw=1, label="fit (final)")
        ax.set(xlabel="x", title="signal")
        ax.legend(fontsize=8)
    else:
        side = cfg.resolution
        for ax, img, title in zip(axes[1:], (clean, y, fit), ("clean", "noisy targets", "fit (final)")):
            ax.imshow(img.reshape(side, side).T, origin="lower", cmap="viridis", vmin=-1.5, vmax=1.5)
            ax.set(title=title, xticks=[], yticks=[])
    fig.suptitle(f"INR, {cfg.dim}-D, noise std {cfg.noise_std}, {cfg.optimizer}"
                 + (f" (gate {cfg.gate}, alpha {cfg.alpha})" if cfg.optimizer == "poprisk" else ""))
    fig.tight_layout()
    run.save_figure(fig, "inr")
    plt.close(fig)


EXPERIMENT = Experiment(
    name="inr-noise",
    summary="coordinate MLP (Fourier features) fitting a signal from noisy samples: memorization vs denoising",
    config=INRNoiseConfig,
    run=run,
    check=check,
    quick={"steps": 400, "resolution": 128, "width": 64, "eval_every": 20},
)
