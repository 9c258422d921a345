r"""Edge of stochastic stability: under minibatch SGD the *batch sharpness* rises to
:math:`2/\eta` and hovers there, while the full-batch sharpness stays at or below it, the lower the
smaller the batch (Andreyev & Beneventano, arXiv 2412.20553).

Batch sharpness (:mod:`lmech.probes.batch_sharpness`):
:math:`\mathrm{BS} = \mathbb E_B[g_B^\top H_B g_B / \lVert g_B\rVert^2]`, the curvature of a
minibatch loss along its own gradient, averaged over minibatches of the training batch size
(``num_batches`` random batches per measurement). Full-batch sharpness:
:math:`\lambda_1(\nabla^2 L)` on the whole training set by Lanczos
(:func:`lmech.probes.sharpness.sharpness`).

Setting (defaults). The edge-of-stability entry's data and model at width 100: a tanh MLP with two
hidden layers on the first ``n_train = 500`` examples of MNIST-1D, MSE
:math:`\frac12\,\mathrm{mean}_i\lVert f(x_i) - e_{y_i}\rVert^2` (threshold :math:`2/\eta`), plain
SGD (no momentum) with batches drawn by reshuffling every epoch, one arm per (learning rate,
batch size) in ``lrs`` x ``batch_sizes``, every arm from the same initialization, ``steps`` steps,
both sharpnesses every ``eval_every`` steps.

Checks (tolerances fixed before the runs), per arm:

* the mean batch sharpness over the last ``last_fraction`` of the measurements is within 15% of
  :math:`2/\eta` (the paper's plots show it hovering at, slightly below or above, the threshold);
* the mean full-batch sharpness over the same window is at most 1.1 x :math:`2/\eta` (with large
  batches SGD approaches GD, whose sharpness hovers just *above* :math:`2/\eta`; the paper's
  claim is that it does not settle higher),

and per learning rate: the full-batch sharpness is lower for the smaller batch (ordering over
``batch_sizes``: "smaller batches favor flatter minima").

Measured while choosing the defaults (seed 0, width 100, 3,000 steps): at lr 0.2 batch 32 the batch
sharpness ended at 9.2-10.8 against 10, the full-batch sharpness at 9.2; at lr 0.2 batch 128 at
10.2-10.9 and 10.4; at lr 0.1 batch 8 batch sharpness had only reached 13.5 of 20 by step 3,000
(small learning rates sharpen slowly), so the defaults use lr 0.2 and 0.3. Results:
docs/results/verify.md. ``quick``: lr 0.2 only, 2,000 steps.

Each arm trains on :class:`lmech.experiments.loop.TrainingLoop` (``probes=economy|full``: a Monitor
per arm every ``eval_every`` steps, columns ``<arm>/probe/...``). An arm is diverged at the first
step whose loss was not finite: the full-batch loss at a measurement, or the minibatch loss of a
step (before the loop, only the next measurement noticed it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmech.core.threads import blas_threads
from lmech.experiments._laws import parse_list
from lmech.errors import DivergedError
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel, TrainingLoop, train
from lmech.models import MLP
from lmech.probes.batch_sharpness import batch_sharpness
from lmech.probes.sharpness import sharpness
from lmech.tasks import mnist1d

BS_TOLERANCE = 0.15        # batch sharpness within 15% of 2/eta over the last half
FULL_BOUND = 1.1           # full-batch sharpness at most 1.1 x 2/eta


@dataclass
class StochasticStabilityConfig:
    n_train: int = 500           # MNIST-1D training examples
    width: int = 100             # hidden units per layer
    depth: int = 2               # hidden layers
    lrs: str = "0.2,0.3"         # SGD learning rates (comma-separated)
    batch_sizes: str = "32,128"  # SGD batch sizes (comma-separated), one arm per (lr, batch size)
    steps: int = 3000            # SGD steps per arm
    eval_every: int = 150        # steps between measurements
    num_batches: int = 32        # minibatches averaged per batch-sharpness measurement
    last_fraction: float = 0.5   # share of the measurements (the last ones) that the checks average
    lanczos_tol: float = 1e-3    # Lanczos tolerance for the full-batch sharpness
    probes: ProbeLevel = "none"  # instruments: none, or a Monitor preset (economy, full) per arm every eval_every

    def validate(self) -> None:
        require(self.n_train >= 16, f"n_train must be >= 16, got {self.n_train}")
        require(self.width > 0 and self.depth > 0, "width and depth must be positive")
        lrs, bss = parse_list(self.lrs, float, "lrs"), parse_list(self.batch_sizes, int, "batch_sizes")
        require(all(lr > 0 for lr in lrs), f"lrs must be positive, got {self.lrs!r}")
        require(all(1 <= b <= self.n_train for b in bss), f"batch_sizes must be in [1, n_train], got {self.batch_sizes!r}")
        require(self.steps > 0 and 0 < self.eval_every <= self.steps, "steps > 0 and eval_every in [1, steps]")
        require(self.steps // self.eval_every >= 4, "need at least 4 measurements: lower eval_every")
        require(self.num_batches >= 2, "num_batches must be >= 2")
        require(0 < self.last_fraction <= 1, f"last_fraction must be in (0, 1], got {self.last_fraction}")
        require(self.lanczos_tol > 0, "lanczos_tol must be positive")


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac12\,\mathrm{mean}_i \lVert f(x_i) - y_i\rVert^2`."""
    return 0.5 * (out - target).pow(2).sum(-1).mean()


def arm_name(lr: float, b: int) -> str:
    return f"lr{lr:g}_b{b}"


def _window_mean(values: list[float], fraction: float) -> float:
    k = max(1, int(round(len(values) * fraction)))
    return float(sum(values[-k:]) / k)


def train_arm(lr: float, b: int, cfg: StochasticStabilityConfig, x, y, seed: int, run) -> dict:
    name = arm_name(lr, b)
    torch.manual_seed(seed)
    model = MLP(x.shape[1], y.shape[1], width=cfg.width, depth=cfg.depth, activation="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    n = x.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    bs_values, lam_values, v0 = [], [], None
    last = {"step": 0}

    def evaluate(step: int) -> dict:
        nonlocal v0
        last["step"] = step
        with torch.no_grad():
            full = float(mse(model(x), y))
        if not math.isfinite(full):
            return {f"{name}/loss": full}          # the loop stops: diverged
        bs = batch_sharpness(model, mse, (x, y), b, cfg.num_batches, seed=seed + step)
        lam = sharpness(model, mse, (x, y), k=1, tol=cfg.lanczos_tol, v0=v0, seed=seed)
        v0 = lam.eigenvectors[:, 0]
        bs_values.append(bs.value)
        lam_values.append(lam.top)
        return {f"{name}/loss": full, f"{name}/batch_sharpness": bs.value,
                f"{name}/batch_sharpness_stderr": bs.stderr, f"{name}/sharpness": lam.top,
                f"{name}/threshold": 2.0 / lr}

    def loss(step: int) -> torch.Tensor:
        nonlocal perm, pos
        last["step"] = step                           # a non-finite minibatch loss stops the loop here
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + b]
        pos += b
        return mse(model(x[idx]), y[idx])

    diverged = None
    try:
        train(run, TrainingLoop(model, opt, cfg.steps, cfg.eval_every, loss, evaluate, watch=f"{name}/loss",
                                eval_at=lambda step: step % cfg.eval_every == 0, probes=cfg.probes,
                                probe_batch=(x, y), probe_loss=mse, probe_prefix=f"{name}/"))
    except DivergedError:
        diverged = last["step"]
    out = {"threshold": 2.0 / lr, "diverged_at": diverged, "measurements": len(bs_values)}
    if bs_values:
        out["batch_sharpness"] = _window_mean(bs_values, cfg.last_fraction)
        out["sharpness"] = _window_mean(lam_values, cfg.last_fraction)
        out["first_batch_sharpness"] = bs_values[0]
    return out


def run(cfg: StochasticStabilityConfig, run, seed: int) -> dict:
    with blas_threads():
        data = mnist1d(n_train=cfg.n_train, n_test=10)
        x = data.x_train[: cfg.n_train]
        y = torch.nn.functional.one_hot(data.y_train[: cfg.n_train], data.num_classes).float()
        lrs, bss = parse_list(cfg.lrs, float, "lrs"), parse_list(cfg.batch_sizes, int, "batch_sizes")
        result: dict = {"lrs": lrs, "batch_sizes": bss, "arms": [], "last_fraction": cfg.last_fraction}
        for lr in lrs:
            for b in bss:
                res = train_arm(lr, b, cfg, x, y, seed, run)
                result["arms"].append(arm_name(lr, b))
                result.update({f"{arm_name(lr, b)}.{k}": v for k, v in res.items()})
        run.save_figure(figure(run.metrics(wide=True), lrs, bss), "stochastic-stability")
    return result


def check(result: dict) -> list[CheckRow]:
    rows = []
    pct = f"last {100 * result.get('last_fraction', 0.5):.0f}%"
    for name in result["arms"]:
        thr = result[f"{name}.threshold"]
        ok = result.get(f"{name}.diverged_at") is None
        bs = result.get(f"{name}.batch_sharpness") if ok else None
        lam = result.get(f"{name}.sharpness") if ok else None
        rows.append(CheckRow.relative(f"{name}: batch sharpness, {pct}, vs 2/eta", thr,
                                      float("nan") if bs is None else bs, BS_TOLERANCE))
        rows.append(CheckRow.at_most(f"{name}: full-batch sharpness / (2/eta), {pct}", FULL_BOUND,
                                     None if lam is None else lam / thr))
    for lr in result["lrs"]:
        bss = sorted(result["batch_sizes"])
        if len(bss) < 2:
            continue
        lams = [result.get(f"{arm_name(lr, b)}.sharpness") for b in bss]
        if any(v is None for v in lams):
            rows.append(CheckRow(f"lr {lr:g}: full-batch sharpness rises with batch size", "increasing", "n/a",
                                 "order", False))
            continue
        increasing = all(a < c for a, c in zip(lams, lams[1:]))
        rows.append(CheckRow(f"lr {lr:g}: full-batch sharpness rises with batch size {bss}", "increasing",
                             ", ".join(f"{v:.3g}" for v in lams), "order", increasing))
    return rows


def figure(df, lrs: list[float], bss: list[int]):
    """One panel per learning rate: batch sharpness (solid) and full-batch sharpness (dotted) per
    batch size, 2/eta dashed."""
    from lmech.plotting import plt

    fig, axes = plt.subplots(1, len(lrs), figsize=(5.0 * len(lrs), 4.0), squeeze=False)
    for j, lr in enumerate(lrs):
        ax = axes[0, j]
        for k, b in enumerate(bss):
            name = arm_name(lr, b)
            col = f"{name}/batch_sharpness"
            if col not in df:
                continue
            d = df[["step", col, f"{name}/sharpness"]].dropna()
            ax.plot(d["step"], d[col], color=f"C{k}", lw=1.5, label=f"batch sharpness, b={b}")
            ax.plot(d["step"], d[f"{name}/sharpness"], color=f"C{k}", lw=1.2, ls=":", label=f"lambda_max, b={b}")
        ax.axhline(2.0 / lr, color="k", ls="--", lw=1, label=f"2/eta = {2.0 / lr:.3g}")
        ax.set(title=f"SGD, lr={lr:g}", xlabel="step", ylabel="curvature")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Edge of stochastic stability: tanh MLP on MNIST-1D, MSE")
    fig.tight_layout()
    return fig


EXPERIMENT = Experiment(
    name="stochastic-stability",
    summary="minibatch SGD: batch sharpness settles at 2/eta, full-batch sharpness below it (lower for smaller batches)",
    config=StochasticStabilityConfig,
    run=run,
    check=check,
    quick={"lrs": "0.2", "steps": 2000, "eval_every": 125},
)
