r"""Saddle-to-saddle dynamics at small initialization: one component at a time, in staircases.

Sources: Saxe, McClelland & Ganguli (2014); Jacot, Ged, Simsek, Hongler & Gabriel, *Saddle-to-saddle
dynamics in deep linear networks and small initialization training* (2021); Kunin et al.,
*Alternating Gradient Flows* (NeurIPS 2025) for the modular-addition part (research notes 1.2-1.3).
Full-batch gradient descent, loss :math:`\tfrac12\,\mathrm{mean}_i\lVert f(x_i)-y_i\rVert^2`, time
:math:`t = \eta\cdot` step.

Part 1: linear staircases
-------------------------
A depth-2 linear network (``width`` hidden units) learns a rank-``r`` teacher
:math:`T = U\,\mathrm{diag}(s)\,V^\top` from exactly whitened inputs, starting from
:math:`\sigma G` with one fixed Gaussian draw :math:`G` and ``init_scales`` :math:`\sigma` (so the
runs differ only by scale). Each mode's strength :math:`u_k = u_k^\top W_2W_1 v_k` is a step; a
step's *window* is the time from 10% to 90% of :math:`s_k`; steps whose windows overlap (in a
chain) form one visible drop. Predictions:

* **plateau count**: at small init the :math:`r` steps are separated, so the loss visits
  :math:`r` saddles (plateaus at :math:`\tfrac12\sum_{j\ge k}s_j^2`), one rank at a time;
* **log(1/init) law**: the step time of mode :math:`k` is
  :math:`t_k = \frac1{2s_k}\ln\frac{s_k-u_{\rm eff}}{u_{\rm eff}}` with :math:`u_{\rm eff}\propto\sigma^2`,
  so :math:`dt_k/d\ln(1/\sigma) = 1/s_k` (fitted over ``init_scales``);
* **rank-one updates**: during each step the update of the end-to-end map
  :math:`\Delta W = W(t_k+\delta)-W(t_k-\delta)` is rank one: :math:`\sigma_1(\Delta W)/\lVert\Delta W\rVert_F\approx1`;
* **merging**: at ``merge_init_scale`` (large) the windows overlap and fewer than :math:`r` drops
  remain.

Part 2: modular addition, one Fourier frequency at a time
---------------------------------------------------------
Inputs are cyclic shifts of a template :math:`e\in\mathbb R^p`: :math:`x = (\mathrm{roll}(e,a),
\mathrm{roll}(e,b))`, target :math:`\mathrm{roll}(e, a+b \bmod p)`, all :math:`p^2` pairs. The
template's DFT magnitudes :math:`|\hat e_k|` (``magnitudes``, distinct, random phases,
:math:`\hat e_0 = 0`) set the strength of frequency :math:`k` in the target. A two-layer network with
quadratic activation, :math:`f(x) = A\,(Wx)^{2}` (:class:`lmech.models.MLP`, ``activation="quadratic"``,
no biases, scale ``mod_init_scale``), is trained by GD. The learned fraction of frequency
:math:`k` is :math:`1 - \sum_{ab}|\hat f_k - \hat y_k|^2/\sum_{ab}|\hat y_k|^2` (DFT along the
output). AGF predicts that the frequencies are acquired **one at a time, in decreasing order of
**:math:`|\hat e_k|`, each in its own loss drop. *Decision:* the input is a template rather
than one-hot so that the frequencies have distinct strengths (with one-hot inputs every
frequency has the same magnitude and the order is degenerate). AGF's activation-time formula is
not asserted (research notes: re-derive before asserting timings); order and separation are.

Checks: plateau count = r at every small init scale (exact); fewer than r drops at
``merge_init_scale``; slope :math:`dt_k/d\ln(1/\sigma)` within ``tolerance`` (5%) of
:math:`1/s_k` for every mode; :math:`\sigma_1/\lVert\cdot\rVert_F \ge 0.95` of the update at every step
of the smallest init; frequency emergence order (exact); the number of separated frequency steps
= number of frequencies (exact).

``quick``: two small init scales, p = 9 with four frequencies, fewer steps.

Part 2 trains on :class:`lmech.experiments.loop.TrainingLoop` (``probes=economy|full``: a Monitor
every ``mod_eval_every`` steps on all :math:`p^2` pairs); part 1 keeps its own NumPy loop: it is the
closed-form gradient of the population loss (:func:`lmech.theory.deep_linear.layer_gradients`),
iterated, not a network trained on data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmech.core.threads import blas_threads
from lmech.experiments.laws import first_crossing, log_series, order_row, parse_list
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import OncePerStep, ProbeLevel, TrainingLoop, train
from lmech.models import MLP
from lmech.theory import deep_linear as dl

RANK_ONE_FLOOR = 0.95


@dataclass
class SaddleToSaddleConfig:
    d: int = 8
    singular_values: str = "3,1.5,0.75"
    width: int = 32
    eta: float = 5e-3
    init_scales: str = "1e-3,1e-4,1e-5"
    merge_init_scale: float = 0.1
    p: int = 11
    magnitudes: str = "1,0.8,0.64,0.51,0.41"
    mod_width: int = 48
    mod_init_scale: float = 0.05
    mod_lr: float = 0.1
    mod_steps: int = 16000
    mod_eval_every: int = 25
    tolerance: float = 0.05
    # instruments on part 2: none, or a lmech.Monitor preset (economy, full) every mod_eval_every steps
    probes: ProbeLevel = "none"

    def validate(self) -> None:
        s = parse_list(self.singular_values, float, "singular_values")
        scales = parse_list(self.init_scales, float, "init_scales")
        mags = parse_list(self.magnitudes, float, "magnitudes")
        require(all(v > 0 for v in s) and len(set(s)) == len(s), "singular_values must be positive and distinct")
        require(len(s) <= self.d and self.width >= len(s), "need len(singular_values) <= d and <= width")
        require(len(scales) >= 2 and all(0 < v < 0.05 for v in scales),
                "init_scales needs >= 2 small scales in (0, 0.05) to fit the log(1/init) law")
        require(self.merge_init_scale > 0, "merge_init_scale must be positive")
        require(self.eta > 0 and self.mod_lr > 0, "eta and mod_lr must be positive")
        require(self.p >= 5, f"p must be >= 5, got {self.p}")
        require(1 <= len(mags) <= (self.p - 1) // 2, f"magnitudes: between 1 and (p-1)/2 = {(self.p - 1) // 2} values")
        require(all(m > 0 for m in mags) and len(set(mags)) == len(mags), "magnitudes must be positive and distinct")
        require(self.mod_steps > 0 and 0 < self.mod_eval_every <= self.mod_steps, "mod_steps, mod_eval_every")
        require(self.mod_width > 0 and self.mod_init_scale > 0 and self.tolerance > 0,
                "mod_width, mod_init_scale and tolerance must be positive")


# -- part 1 ---------------------------------------------------------------------------------------
def _linear_problem(cfg: SaddleToSaddleConfig, seed: int):
    rng = np.random.default_rng(seed)
    s = np.sort(np.array(parse_list(cfg.singular_values, float)))[::-1]
    r = len(s)
    u_mat = np.linalg.qr(rng.standard_normal((cfg.d, cfg.d)))[0][:, :r]
    v_mat = np.linalg.qr(rng.standard_normal((cfg.d, cfg.d)))[0][:, :r]
    teacher = u_mat @ np.diag(s) @ v_mat.T
    g1, g2 = rng.standard_normal((cfg.width, cfg.d)), rng.standard_normal((cfg.d, cfg.width))
    return s, u_mat, v_mat, teacher, g1, g2


def linear_run(sigma: float, g1, g2, teacher, u_mat, v_mat, eta: float, t_max: float):
    """GD on the population loss of a depth-2 linear net from sigma * (G1, G2).

    Returns times, losses, mode strengths (steps+1, r) and end-to-end maps (steps+1, d, d).
    With whitened inputs the training loss equals the population loss, so the gradients are
    those of :func:`lmech.theory.deep_linear.layer_gradients` with Sigma_xx = I.
    """
    w = [sigma * g1.copy(), sigma * g2.copy()]
    eye = np.eye(teacher.shape[1])
    steps = int(np.ceil(t_max / eta))
    losses, modes, maps = np.empty(steps + 1), np.empty((steps + 1, u_mat.shape[1])), np.empty((steps + 1, *teacher.shape))
    for k in range(steps + 1):
        end = w[1] @ w[0]
        maps[k] = end
        losses[k] = 0.5 * np.sum((end - teacher) ** 2)
        modes[k] = np.diag(u_mat.T @ end @ v_mat)
        if k < steps:
            grads = dl.layer_gradients(w, eye, teacher)
            w = [wi - eta * gi for wi, gi in zip(w, grads)]
    return eta * np.arange(steps + 1), losses, modes, maps


def step_windows(t: np.ndarray, modes: np.ndarray, s: np.ndarray) -> list[tuple]:
    """(t at 10%, t at 50%, t at 90% of s_k) for every mode (None where not reached)."""
    return [tuple(first_crossing(t, modes[:, k], f * s[k]) for f in (0.1, 0.5, 0.9)) for k in range(len(s))]


def count_steps(windows: list[tuple]) -> int | None:
    """Visible drops: steps whose [10%, 90%] windows overlap in a chain count once (None if a step is missing)."""
    if any(w[0] is None or w[2] is None for w in windows):
        return None
    order = sorted(windows, key=lambda w: w[0])
    groups, end = 1, order[0][2]
    for lo, _, hi in order[1:]:
        if lo > end:
            groups += 1
        end = max(end, hi)
    return groups


# -- part 2 ---------------------------------------------------------------------------------------
def modular_problem(p: int, magnitudes: list[float], seed: int):
    """Template-shift modular addition: inputs (p^2, 2p), targets (p^2, p), the template and its DFT."""
    rng = np.random.default_rng(seed)
    k_max = len(magnitudes)
    spectrum = np.zeros(p, dtype=complex)
    spectrum[1:k_max + 1] = np.asarray(magnitudes) * np.exp(2j * np.pi * rng.uniform(size=k_max))
    spectrum[p - k_max:] = np.conj(spectrum[1:k_max + 1][::-1])
    template = np.fft.ifft(spectrum).real * np.sqrt(p)  # |DFT_k| = sqrt(p) * magnitude_k
    a, b = np.divmod(np.arange(p * p), p)
    x = np.stack([np.concatenate([np.roll(template, i), np.roll(template, j)]) for i, j in zip(a, b)])
    y = np.stack([np.roll(template, (i + j) % p) for i, j in zip(a, b)])
    return torch.tensor(x), torch.tensor(y), template


def learned_fractions(out: torch.Tensor, y_hat: torch.Tensor, k_max: int) -> np.ndarray:
    """1 - ||F_k - Y_k||^2 / ||Y_k||^2 for k = 1..k_max (DFT along the output dimension)."""
    f_hat = torch.fft.fft(out, dim=1)
    err = (f_hat[:, 1:k_max + 1] - y_hat[:, 1:k_max + 1]).abs().pow(2).sum(0)
    return (1.0 - err / y_hat[:, 1:k_max + 1].abs().pow(2).sum(0)).numpy()


def run(cfg: SaddleToSaddleConfig, run, seed: int) -> dict:
    with blas_threads():
        return _run(cfg, run, seed)


def _run(cfg: SaddleToSaddleConfig, run, seed: int) -> dict:
    result: dict = {"tolerance": cfg.tolerance, "curves": {}}
    s, u_mat, v_mat, teacher, g1, g2 = _linear_problem(cfg, seed)
    r = len(s)
    scales = sorted(parse_list(cfg.init_scales, float), reverse=True)
    result.update(singular_values=s.tolist(), init_scales=scales, merge_init_scale=cfg.merge_init_scale)
    half_times = []
    for sigma in [*scales, cfg.merge_init_scale]:
        # predicted last step time (effective u0 ~ sigma^2) plus margin sets the horizon
        u_eff = [dl.effective_u0(sigma * g1, sigma * g2, u_mat[:, k], v_mat[:, k]) for k in range(r)]
        t_pred = max(dl.half_time(float(s[k]), min(u_eff[k], 0.25 * s[k])) for k in range(r))
        t_max = max(1.6 * t_pred, 4.0 / s[-1])
        t, losses, modes, maps = linear_run(sigma, g1, g2, teacher, u_mat, v_mat, cfg.eta, t_max)
        windows = step_windows(t, modes, s)
        tag = f"sigma{sigma:g}"
        result[f"linear.{tag}.steps_visible"] = count_steps(windows)
        result[f"linear.{tag}.t_half"] = [w[1] for w in windows]
        log_series(run, np.arange(len(t)), {f"linear_{tag}/loss": losses}, every=max(1, len(t) // 400))
        result["curves"][tag] = (t, losses, modes / s)
        if sigma in scales:
            half_times.append([w[1] for w in windows])
            if sigma == min(scales):
                ratios = []
                half = max(1, int(round(0.1 / s[0] / cfg.eta)))
                for w in windows:
                    if w[1] is None:
                        ratios.append(None)
                        continue
                    i = int(round(w[1] / cfg.eta))
                    delta = maps[min(i + half, len(t) - 1)] - maps[max(i - half, 0)]
                    sv = np.linalg.svd(delta, compute_uv=False)
                    ratios.append(float(sv[0] / np.linalg.norm(sv)))
                result["linear.rank_one_ratio"] = ratios
    half_times = np.array(half_times, dtype=float)  # (scales, r)
    for k in range(r):
        ok = np.isfinite(half_times[:, k])
        slope = np.polyfit(np.log(1.0 / np.array(scales))[ok], half_times[ok, k], 1)[0] if ok.sum() >= 2 else None
        result[f"linear.mode{k + 1}.slope_vs_log_inv_init"] = None if slope is None else float(slope)
        result[f"linear.mode{k + 1}.slope_predicted"] = float(1.0 / s[k])

    # part 2: modular addition with a quadratic network
    mags = parse_list(cfg.magnitudes, float)
    x, y, _ = modular_problem(cfg.p, mags, seed)
    y_hat = torch.fft.fft(y, dim=1)
    torch.manual_seed(seed)
    model = MLP(2 * cfg.p, cfg.p, width=cfg.mod_width, depth=1, activation="quadratic",
                init_scale=cfg.mod_init_scale, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.mod_lr)
    steps, losses, fracs = [], [], []

    def half_sse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out - target).pow(2).sum(1).mean()

    def outputs_and_loss(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        return out, half_sse(out, y)

    forward = OncePerStep(outputs_and_loss)   # full batch: one forward for the evaluation and the update

    def evaluate(step: int) -> dict:
        out, loss = forward(step)
        frac = learned_fractions(out.detach(), y_hat, len(mags))
        steps.append(step)
        losses.append(loss.item())
        fracs.append(frac)
        return {"modular/loss": losses[-1], **{f"modular/freq{k + 1}": float(f) for k, f in enumerate(frac)}}

    train(run, TrainingLoop(model, opt, cfg.mod_steps, cfg.mod_eval_every, lambda step: forward(step)[1], evaluate,
                            watch="modular/loss", probes=cfg.probes, probe_batch=(x, y), probe_loss=half_sse))
    steps, fracs = np.array(steps), np.array(fracs)
    order_by_magnitude = [int(k) + 1 for k in np.argsort(-np.array(mags))]
    windows = [tuple(first_crossing(steps, fracs[:, k], f) for f in (0.1, 0.5, 0.9)) for k in range(len(mags))]
    emerge = [w[1] if w[1] is not None else np.inf for w in windows]
    result["modular.magnitudes"] = mags
    result["modular.emergence_step"] = [w[1] for w in windows]
    result["modular.emergence_order"] = [int(k) + 1 for k in np.argsort(emerge) if np.isfinite(emerge[k])]
    result["modular.expected_order"] = order_by_magnitude
    result["modular.steps_visible"] = count_steps(windows)
    result["modular.final_loss"] = losses[-1]
    result["curves"]["modular"] = (steps, np.array(losses), fracs)
    _save_figure(run, cfg, result)
    result.pop("curves")
    return result


def check(result: dict) -> list[CheckRow]:
    tol = result["tolerance"]
    r = len(result["singular_values"])
    rows = []
    for sigma in result["init_scales"]:
        got = result[f"linear.sigma{sigma:g}.steps_visible"]
        rows.append(CheckRow(f"plateaus (separated steps), init {sigma:g}", r, "n/a" if got is None else got, "exact",
                             got == r))
    merged = result[f"linear.sigma{result['merge_init_scale']:g}.steps_visible"]
    rows.append(CheckRow.at_most(f"steps merge at large init {result['merge_init_scale']:g}", r - 1, merged))
    for k in range(r):
        pred = result[f"linear.mode{k + 1}.slope_predicted"]
        got = result[f"linear.mode{k + 1}.slope_vs_log_inv_init"]
        quantity = f"dt_step/dln(1/init), mode s={result['singular_values'][k]:g} (=1/s)"
        rows.append(CheckRow(quantity, pred, "n/a", tol, False) if got is None else
                    CheckRow.relative(quantity, pred, got, tol))
    ratios = [v for v in result["linear.rank_one_ratio"] if v is not None]
    rows.append(CheckRow.at_least("rank-one updates: min sigma_1/||dW||_F over steps", RANK_ONE_FLOOR,
                                  min(ratios) if len(ratios) == r else None))
    rows.append(order_row("modular addition: Fourier frequencies learned by decreasing |e_k|",
                          result["modular.expected_order"], result["modular.emergence_order"]))
    got = result["modular.steps_visible"]
    n_freq = len(result["modular.magnitudes"])
    rows.append(CheckRow("modular addition: one step per frequency", n_freq, "n/a" if got is None else got, "exact",
                         got == n_freq))
    return rows


def _save_figure(run, cfg: SaddleToSaddleConfig, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    tags = [f"sigma{s:g}" for s in result["init_scales"]] + [f"sigma{result['merge_init_scale']:g}"]
    colors = plt.cm.plasma(np.linspace(0, 0.8, len(tags)))
    for tag, color in zip(tags, colors):
        t, losses, _ = result["curves"][tag]
        axes[0].plot(t, losses, color=color, label=tag.replace("sigma", "init "))
    levels = 0.5 * np.cumsum(np.array(result["singular_values"])[::-1] ** 2)[::-1]
    for level in levels:
        axes[0].axhline(level, color="gray", ls=":", lw=0.8)
    axes[0].set(yscale="log", xlabel="t = eta * step", ylabel="loss", title="linear net: staircases (dotted: saddles)")
    axes[0].legend(fontsize=7)
    s = np.array(result["singular_values"])
    inv = np.log(1.0 / np.array(result["init_scales"]))
    for k in range(len(s)):
        th = [result[f"linear.sigma{sig:g}.t_half"][k] for sig in result["init_scales"]]
        axes[1].plot(inv, th, "o", color=f"C{k}", label=f"s={s[k]:g}")
        th = np.array(th, dtype=float)
        if np.isfinite(th).all():
            axes[1].plot(inv, th.mean() + (inv - inv.mean()) / s[k], "-", color=f"C{k}", lw=0.8)
    axes[1].set(xlabel="ln(1/init)", ylabel="step time t_1/2", title="step times (line: slope 1/s)")
    axes[1].legend(fontsize=8)
    steps, losses, fracs = result["curves"]["modular"]
    axes[2].plot(steps, losses, color="k")
    axes[2].set(yscale="log", xlabel="step", ylabel="loss", title=f"quadratic net, template addition mod {cfg.p}")
    for k in range(fracs.shape[1]):
        axes[3].plot(steps, fracs[:, k], label=f"k={k + 1}, |e_k|={result['modular.magnitudes'][k]:g}")
    axes[3].set(xlabel="step", ylabel="learned fraction", ylim=(-0.05, 1.05), title="Fourier frequencies, one at a time")
    axes[3].legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    run.save_figure(fig, "saddle-to-saddle")
    plt.close(fig)


EXPERIMENT = Experiment(
    name="saddle-to-saddle",
    summary="small-init staircases: one rank at a time, step times ~ log(1/init); modular addition one frequency at a time",
    config=SaddleToSaddleConfig,
    run=run,
    check=check,
    quick={"init_scales": "1e-3,1e-5", "p": 9, "magnitudes": "1,0.8,0.6,0.45", "mod_width": 32, "mod_steps": 6000},
)
