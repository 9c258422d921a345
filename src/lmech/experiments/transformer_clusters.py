r"""Do a trained transformer's token representations cluster as the particle model predicts
for its own value matrices? (issue 16, item 2; Geshkovski et al. 2023; :mod:`lmech.theory.value_clustering`.)

Model and training (small and short): the grokking entry's decoder-only transformer
(:class:`lmech.models.Transformer`, pre-LN, causal, ``width``, ``heads`` heads, ``layers``
blocks) on :math:`a + b \bmod p` (``p``, ``train_fraction`` of the equations), AdamW (lr 1e-3,
weight decay 1, betas 0.9/0.98, batch 256) for ``steps`` steps, on
:class:`lmech.experiments.loop.TrainingLoop` (``probes=economy|full``: a Monitor every 50 steps on
256 training equations).

Measured, on the held-out equations: the residual stream after the embedding and after every
block (:meth:`Transformer.features`), and per sequence the number of clusters among its 4
normalized token vectors (connected components of cosine > 1 - ``cos_tol``), averaged over
sequences, per layer.

Particle model, per attention layer with *its own* weights held fixed (the theory's
time-independent weights): tokens follow :math:`\dot x = \mathrm{Attn}_\ell(\mathrm{LN}_\ell(x))`
(the block without its MLP, its residual update as a velocity; causal, all heads, the layer's
:math:`W_Q, W_K, W_V, W_O`), from the layer's measured input, integrated by RK4 to :math:`t = 1`
(one layer) and to ``t_long``. Its spectral prediction: :math:`V_{\rm eff} = \sum_h W_O^h W_V^h`;
a simple, positive top eigenvalue (real part) predicts that normalized tokens go to
:math:`\pm\varphi_1`: at most 2 clusters after long times.

Checks (reported whichever way they come out; not among the default laws):

* per layer: particle-model cluster count at :math:`t = 1` against the measured count after the
  block (relative, 25%): does one attention step explain the layer's clustering, MLP aside?
* per layer: the particle model run to ``t_long`` ends with at most 2 clusters, as the spectrum of
  its :math:`V_{\rm eff}` predicts (when the top eigenvalue is simple and positive; the row records
  the spectrum's top eigenvalues).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel, TrainingLoop, log_minibatch_loss, never, no_evaluation, train
from lmech.models import Transformer
from lmech.tasks import modular_arithmetic

COUNT_TOLERANCE = 0.25


@dataclass
class TransformerClustersConfig:
    p: int = 23                  # modulus (prime)
    train_fraction: float = 0.6  # share of the equations used for training
    width: int = 64              # d_model
    heads: int = 4               # attention heads
    layers: int = 2              # blocks
    steps: int = 1500            # AdamW steps
    cos_tol: float = 0.1         # tokens with cosine > 1 - cos_tol are one cluster
    t_long: float = 50.0         # long-time horizon of the particle model
    dt: float = 0.05             # its RK4 step
    eval_sequences: int = 256    # held-out sequences measured
    probes: ProbeLevel = "none"  # instruments: none, or a lmech.Monitor preset (economy, full) every 50 steps

    def validate(self) -> None:
        require(self.p >= 5 and all(self.p % q for q in range(2, int(self.p ** 0.5) + 1)), "p must be a prime >= 5")
        require(0 < self.train_fraction < 1, "train_fraction must be in (0, 1)")
        require(self.width % self.heads == 0, f"width ({self.width}) must be divisible by heads ({self.heads})")
        require(self.layers >= 1 and self.steps >= 1 and self.eval_sequences >= 1, "layers, steps, eval_sequences >= 1")
        require(0 < self.cos_tol < 1 and self.t_long > 1 and 0 < self.dt <= 0.5, "cos_tol in (0,1), t_long > 1, dt in (0, 0.5]")


def cluster_counts(h: torch.Tensor, cos_tol: float) -> torch.Tensor:
    """Clusters per sequence among normalized tokens, ``h (B, T, d) -> (B,)`` (connected components)."""
    u = F.normalize(h, dim=-1)
    adj = (u @ u.transpose(1, 2)) > 1 - cos_tol                # (B, T, T)
    b, t, _ = adj.shape
    reach = adj.clone()
    for _ in range(t):                                           # transitive closure
        reach = (reach.float() @ adj.float() > 0) | reach
    first = torch.stack([reach[:, i, :i].any(-1) if i else torch.zeros(b, dtype=torch.bool) for i in range(t)], 1)
    return (~first).sum(-1).float()                              # tokens with no earlier token in their component


def _attention_velocity(block, x: torch.Tensor) -> torch.Tensor:
    return block.attn(block.ln1(x))


def particle_flow(block, x0: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    """RK4 of :math:`\\dot x = \\mathrm{Attn}(\\mathrm{LN}(x))` for one block, from ``x0 (B, T, d)`` to time ``t``."""
    x = x0.clone()
    n = max(1, int(math.ceil(t / dt)))
    h = t / n
    with torch.no_grad():
        for _ in range(n):
            k1 = _attention_velocity(block, x)
            k2 = _attention_velocity(block, x + 0.5 * h * k1)
            k3 = _attention_velocity(block, x + 0.5 * h * k2)
            k4 = _attention_velocity(block, x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def value_spectrum(block) -> torch.Tensor:
    """Eigenvalues of :math:`V_{\\rm eff} = \\sum_h W_O^h W_V^h = W_O W_V`, sorted by real part (descending)."""
    d = block.attn.proj.weight.shape[0]
    w_v = block.attn.qkv.weight[2 * d:]                          # (d, d): values of all heads, stacked
    v_eff = block.attn.proj.weight @ w_v
    ev = torch.linalg.eigvals(v_eff.detach().double())
    return ev[torch.argsort(ev.real, descending=True)]


def run(cfg: TransformerClustersConfig, run, seed: int) -> dict:
    data = modular_arithmetic(p=cfg.p, op="+", train_fraction=cfg.train_fraction, encoding="tokens", seed=seed)
    torch.manual_seed(seed)
    model = Transformer(vocab_size=data.info["vocab_size"], seq_len=data.info["seq_len"], n_out=cfg.p,
                        d_model=cfg.width, n_heads=cfg.heads, n_layers=cfg.layers, d_mlp=4 * cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)

    def loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, data.n_train, (min(256, data.n_train),), generator=gen)
        return F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])

    train(run, TrainingLoop(model, opt, cfg.steps, 50, loss, no_evaluation, watch="", eval_at=never,
                            on_step=log_minibatch_loss("train_loss", 50, cfg.steps), probes=cfg.probes,
                            probe_batch=(data.x_train[:256], data.y_train[:256]), probe_loss=F.cross_entropy))
    model.eval()
    with torch.no_grad():
        test_acc = float((model(data.x_test).argmax(-1) == data.y_test).float().mean())
        feats = model.features(data.x_test[: cfg.eval_sequences])
    result: dict = {"test_acc": test_acc, "layers": cfg.layers}
    measured = [float(cluster_counts(h, cfg.cos_tol).mean()) for h in feats]
    result["measured_clusters"] = measured
    for ell, block in enumerate(model.blocks):
        x_in = feats[ell]
        one = particle_flow(block, x_in, 1.0, cfg.dt)
        far = particle_flow(block, x_in, cfg.t_long, cfg.dt)
        ev = value_spectrum(block)
        top = ev[0]
        simple_positive = bool(top.real > 0 and abs(top.imag) < 1e-9 and (ev[1].real < top.real - 1e-9))
        result.update({f"layer{ell + 1}.particle_t1": float(cluster_counts(one, cfg.cos_tol).mean()),
                       f"layer{ell + 1}.particle_long": float(cluster_counts(far, cfg.cos_tol).mean()),
                       f"layer{ell + 1}.top_eigenvalues": [[float(e.real), float(e.imag)] for e in ev[:3]],
                       f"layer{ell + 1}.simple_positive_top": simple_positive})
    _save_figure(run, cfg, result)
    return result


def check(result: dict) -> list[CheckRow]:
    rows = []
    for ell in range(1, result["layers"] + 1):
        rows.append(CheckRow.relative(f"layer {ell}: clusters, particle model at t = 1 vs measured after the block",
                                      result[f"layer{ell}.particle_t1"], result["measured_clusters"][ell],
                                      COUNT_TOLERANCE))
        top = result[f"layer{ell}.top_eigenvalues"][0]
        label = "simple positive" if result[f"layer{ell}.simple_positive_top"] else "not simple positive"
        rows.append(CheckRow.at_most(f"layer {ell}: particle model long-time clusters (V_eff top eigenvalue "
                                     f"{top[0]:.3g}{top[1]:+.3g}i, {label})", 2.0, result[f"layer{ell}.particle_long"]))
    return rows


def _save_figure(run, cfg: TransformerClustersConfig, result: dict) -> None:
    from lmech.plotting import plt

    fig, ax = plt.subplots(figsize=(6, 4))
    layers = list(range(cfg.layers + 1))
    ax.plot(layers, result["measured_clusters"], "o-", label="measured (residual stream)")
    ax.plot(layers[1:], [result[f"layer{ell}.particle_t1"] for ell in layers[1:]], "s--",
            label="particle model, t = 1 (layer's own Q, K, V)")
    ax.plot(layers[1:], [result[f"layer{ell}.particle_long"] for ell in layers[1:]], "^:",
            label=f"particle model, t = {cfg.t_long:g}")
    ax.set(xlabel="layer (0 = embedding)", ylabel="clusters per sequence (of 4 tokens)", ylim=(0, 4.5),
           title=f"a+b mod {cfg.p}: held-out acc {result['test_acc']:.2f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    run.save_figure(fig, "transformer-clusters")


EXPERIMENT = Experiment(
    name="transformer-clusters",
    summary="grokking-task transformer: token cluster counts by layer vs the particle model with its own weights",
    config=TransformerClustersConfig,
    run=run,
    check=check,
    quick={"steps": 500, "t_long": 20.0},
)
