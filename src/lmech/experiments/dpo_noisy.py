r"""DPO under noisy preferences, AdamW vs PopRiskAdamW (Litman & Guo 2026, fourth experiment, at our
scale; notes ``shared/research/generalization-theory.md`` 3.4 and check 14; issue 14 item 4).

The paper's run (Qwen2.5-0.5B-Instruct on UltraFeedback with 30% of the pairs swapped: reward accuracy
0.566 -> 0.641, 3.05x less drift from the reference) needs hub weights; this entry rebuilds the setting
from scratch on a synthetic token task whose reward is known exactly.

Task. A prompt :math:`x` is ``prompt_len`` tokens from a vocabulary of ``vocab``; a response :math:`y`
is ``response_len`` tokens. The true reward is the fraction of response positions that hit a target
depending on the prompt, :math:`r(x, y) = \frac1{L}\sum_t \mathbf 1\{y_t = (x_{L_p-1-t} + 1) \bmod V\}`
(reverse the prompt and shift each token by one: the policy must attend to the prompt).

Policy and reference. A small causal transformer (:class:`lmech.models.Transformer`, ``output="all"``)
reads ``[x, y_{<L}]`` and predicts each response token. The **reference** is the supervised starting
point: trained by cross-entropy (AdamW, ``sft_steps``) on fresh demonstrations whose every response
token is the target with probability ``demo_accuracy`` and uniform otherwise, so it is a mediocre,
stochastic policy. The DPO policy starts as a copy of it.

Preferences. For each prompt two responses are sampled from the reference, ties in :math:`r` are
dropped (and resampled), the higher-reward one is *chosen*; then exactly ``round(noise * n)`` pairs
(chosen at random) are swapped. ``n_pairs`` training pairs and ``n_heldout`` held-out pairs carry the
same noise (what a practitioner has); a clean copy of the held-out pairs measures reward accuracy.

Training. DPO loss (:func:`lmech.dpo.dpo_loss`, :math:`\beta` = ``beta``, default 0.1, Rafailov et al.'s
common setting) on minibatches of ``batch_size`` pairs for ``steps`` steps, with AdamW and with
PopRiskAdamW (their defaults otherwise: betas (0.9, 0.999), eps 1e-8; PopRisk's default gate ``soft``,
softness 1, ``alpha="fresh"``; weight decay ``weight_decay`` for both). **Equal tuning budgets**: each
arm runs every learning rate of ``lrs``; the rule, fixed before any run, picks per (arm, noise, seed) the
learning rate with the highest preference accuracy on the *noisy* held-out pairs (ties: the smaller lr).

Measured per run: the **win rate against the reference** judged by the true reward
(``n_eval`` fresh prompts, one sample from each policy, win = 1, tie = 1/2), the policy's mean true
reward, reward accuracy (implicit-reward margin > 0) on the clean and the noisy held-out pairs, and the
mean :math:`|\beta\log\pi_\theta/\pi_\text{ref}|` over the held-out responses (the paper's "drift from the
reference", read as the mean absolute implicit reward).

Checks (tolerances fixed before the first full run): the DPO loss at the first step equals
:math:`\log 2` (relative 1e-5: policy = reference); AdamW at 0% noise beats the reference (win rate
>= 0.55: DPO works at this scale); the paper's claims at the largest noise: PopRisk's win rate >= AdamW's
(one-sided, difference >= 0) and AdamW's drift / PopRisk's >= 1.

The three-seed study is ``scripts/dpo_study.py``; results in docs/results/no-validation.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmech.dpo import dpo_loss, sequence_logprob
from lmech.errors import ConfigError
from lmech.experiments.base import CheckRow, Experiment, require
from lmech.models import Transformer
from lmech.optim import PopRiskAdamW

ARMS = ("adamw", "poprisk")


@dataclass
class DPONoisyConfig:
    noises: str = "0,0.1,0.3"                 # fractions of preference pairs swapped
    lrs: str = "3e-4,1e-3,3e-3"               # the learning-rate grid every arm gets
    arms: str = "adamw,poprisk"
    vocab: int = 8
    prompt_len: int = 4
    response_len: int = 4
    d_model: int = 32
    n_layers: int = 1
    demo_accuracy: float = 0.3                # per-token accuracy of the SFT demonstrations
    sft_steps: int = 600
    sft_lr: float = 1e-3
    n_pairs: int = 1000
    n_heldout: int = 500
    n_eval: int = 2000
    steps: int = 200
    batch_size: int = 64
    beta: float = 0.1
    weight_decay: float = 0.0

    def _floats(self, key: str) -> list[float]:
        try:
            return [float(v) for v in str(getattr(self, key)).split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{key} must be comma-separated numbers, got {getattr(self, key)!r}") from None

    def noise_list(self) -> list[float]:
        return self._floats("noises")

    def lr_list(self) -> list[float]:
        return self._floats("lrs")

    def arm_list(self) -> list[str]:
        return [a.strip() for a in str(self.arms).split(",") if a.strip()]

    def validate(self) -> None:
        require(self.noise_list() and all(0 <= q < 0.5 for q in self.noise_list()), "noises must be in [0, 0.5)")
        require(self.lr_list() and all(lr > 0 for lr in self.lr_list()), "lrs must be positive numbers")
        require(self.arm_list() and all(a in ARMS for a in self.arm_list()), f"arms must be a subset of {ARMS}")
        require(self.vocab >= 2 and self.prompt_len >= self.response_len >= 1,
                "need vocab >= 2 and prompt_len >= response_len >= 1")
        require(self.d_model % 4 == 0 and self.d_model >= 4 and self.n_layers >= 1,
                "d_model must be a positive multiple of 4 (4 heads), n_layers >= 1")
        require(0 <= self.demo_accuracy <= 1, "demo_accuracy must be in [0, 1]")
        require(min(self.sft_steps, self.n_pairs, self.n_heldout, self.n_eval, self.steps) >= 1,
                "sizes and steps must be positive")
        require(1 <= self.batch_size <= self.n_pairs, "batch_size must be in [1, n_pairs]")
        require(self.beta > 0 and self.sft_lr > 0 and self.weight_decay >= 0,
                "beta and sft_lr must be > 0, weight_decay >= 0")


# ----------------------------------------------------------------------------------- the task
def targets(x: torch.Tensor, cfg: DPONoisyConfig) -> torch.Tensor:
    """Target response ``(B, L)``: the prompt reversed, each token + 1 mod V."""
    return (x.flip(-1)[:, : cfg.response_len] + 1) % cfg.vocab


def true_reward(x: torch.Tensor, y: torch.Tensor, cfg: DPONoisyConfig) -> torch.Tensor:
    """:math:`r(x, y)` ``(B,)``: fraction of response positions equal to the target."""
    return (y == targets(x, cfg)).double().mean(-1)


def build_policy(cfg: DPONoisyConfig) -> Transformer:
    return Transformer(vocab_size=cfg.vocab, seq_len=cfg.prompt_len + cfg.response_len - 1, n_out=cfg.vocab,
                       d_model=cfg.d_model, n_heads=4, n_layers=cfg.n_layers, d_mlp=4 * cfg.d_model, output="all")


def response_logprob(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\pi(y|x)` ``(B,)``: the model reads ``[x, y_{<L}]``; positions ``L_p-1 ..`` predict ``y``."""
    inp = torch.cat([x, y[:, :-1]], dim=1)
    logits = model(inp)[:, x.shape[1] - 1:]                                     # (B, L, V)
    return sequence_logprob(logits, y)


@torch.no_grad()
def sample(model, x: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
    """Responses ``(B, length)`` sampled token by token at temperature 1."""
    seq = x
    for _ in range(length):
        probs = torch.softmax(model(seq)[:, -1].double(), -1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, x.shape[1]:]


def prompts(n: int, cfg: DPONoisyConfig, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, cfg.vocab, (n, cfg.prompt_len), generator=gen)


def train_reference(cfg: DPONoisyConfig, seed: int) -> Transformer:
    """The supervised starting point: cross-entropy on fresh noisy demonstrations."""
    torch.manual_seed(seed)
    model = build_policy(cfg)
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    for _ in range(cfg.sft_steps):
        x = prompts(128, cfg, gen)
        keep = torch.rand(128, cfg.response_len, generator=gen) < cfg.demo_accuracy
        y = torch.where(keep, targets(x, cfg), torch.randint(0, cfg.vocab, (128, cfg.response_len), generator=gen))
        opt.zero_grad()
        (-response_logprob(model, x, y).mean()).backward()
        opt.step()
    model.eval()
    return model


@dataclass
class Pairs:
    x: torch.Tensor          # (n, Lp)
    chosen: torch.Tensor     # (n, L)
    rejected: torch.Tensor   # (n, L)
    ref_chosen: torch.Tensor    # (n,) log pi_ref
    ref_rejected: torch.Tensor  # (n,)
    swapped: torch.Tensor    # (n,) bool

    def noisy(self, q: float, gen: torch.Generator) -> "Pairs":
        """A copy with exactly ``round(q n)`` pairs (chosen at random) swapped."""
        n = self.x.shape[0]
        flip = torch.zeros(n, dtype=torch.bool)
        flip[torch.randperm(n, generator=gen)[: round(q * n)]] = True
        f = flip[:, None]
        return Pairs(self.x, torch.where(f, self.rejected, self.chosen), torch.where(f, self.chosen, self.rejected),
                     torch.where(flip, self.ref_rejected, self.ref_chosen),
                     torch.where(flip, self.ref_chosen, self.ref_rejected), flip)


@torch.no_grad()
def make_pairs(ref, n: int, cfg: DPONoisyConfig, gen: torch.Generator) -> Pairs:
    """``n`` clean pairs of reference samples with distinct true rewards, the better one chosen."""
    xs, cs, rs = [], [], []
    have = 0
    while have < n:
        x = prompts(2 * n, cfg, gen)
        y1, y2 = sample(ref, x, cfg.response_len, gen), sample(ref, x, cfg.response_len, gen)
        r1, r2 = true_reward(x, y1, cfg), true_reward(x, y2, cfg)
        ok = r1 != r2
        better = (r1 > r2)[:, None]
        xs.append(x[ok]); cs.append(torch.where(better, y1, y2)[ok]); rs.append(torch.where(better, y2, y1)[ok])
        have += int(ok.sum())
    x, c, r = (torch.cat(t)[:n] for t in (xs, cs, rs))
    return Pairs(x, c, r, response_logprob(ref, x, c), response_logprob(ref, x, r), torch.zeros(n, dtype=torch.bool))


# ----------------------------------------------------------------------------------- training
def make_optimizer(arm: str, params, lr: float, cfg: DPONoisyConfig):
    if arm == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return PopRiskAdamW(params, lr=lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(policy, ref, held_noisy: Pairs, held_clean: Pairs, cfg: DPONoisyConfig, seed: int) -> dict:
    def margins(p: Pairs):
        out = dpo_loss(response_logprob(policy, p.x, p.chosen), response_logprob(policy, p.x, p.rejected),
                       p.ref_chosen, p.ref_rejected, beta=cfg.beta)
        return out
    clean, noisy = margins(held_clean), margins(held_noisy)
    acc = lambda m: float(((m > 0).double() + 0.5 * (m == 0).double()).mean())  # noqa: E731
    gen = torch.Generator().manual_seed(seed * 104729 + 17)                    # the same eval prompts for every run
    x = prompts(cfg.n_eval, cfg, gen)
    gen_p, gen_r = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)
    r_pol = true_reward(x, sample(policy, x, cfg.response_len, gen_p), cfg)
    r_ref = true_reward(x, sample(ref, x, cfg.response_len, gen_r), cfg)
    win = float(((r_pol > r_ref).double() + 0.5 * (r_pol == r_ref).double()).mean())
    drift = torch.cat([clean.chosen_reward, clean.rejected_reward]).abs().mean()
    return {"win_rate": win, "policy_reward": float(r_pol.mean()), "reference_reward": float(r_ref.mean()),
            "clean_reward_acc": acc(clean.margin), "heldout_pref_acc": acc(noisy.margin),
            "implicit_reward_abs": float(drift), "heldout_loss": float(noisy.loss)}


def train_dpo(ref, pairs: Pairs, arm: str, lr: float, cfg: DPONoisyConfig, seed: int) -> tuple:
    """DPO from the reference; returns ``(policy, first_step_loss, final_train_loss)``."""
    policy = copy.deepcopy(ref).train()
    opt = make_optimizer(arm, policy.parameters(), lr, cfg)
    gen = torch.Generator().manual_seed(seed * 31 + 5)                          # same batch order for every arm/lr
    n = pairs.x.shape[0]
    first = last = math.nan
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        out = dpo_loss(response_logprob(policy, pairs.x[idx], pairs.chosen[idx]),
                       response_logprob(policy, pairs.x[idx], pairs.rejected[idx]),
                       pairs.ref_chosen[idx], pairs.ref_rejected[idx], beta=cfg.beta)
        if not torch.isfinite(out.loss):
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        last = float(out.loss.detach())
        first = last if step == 0 else first
    return policy.eval(), first, last


def run_seed(cfg: DPONoisyConfig, seed: int, on_run=None) -> list[dict]:
    """Every (noise, arm, lr) at ``seed``; one row per run, ``selected`` marks the rule's lr per (arm, noise)."""
    ref = train_reference(cfg, seed)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 11)
    train_clean = make_pairs(ref, cfg.n_pairs, cfg, gen)
    held_clean = make_pairs(ref, cfg.n_heldout, cfg, gen)
    rows = []
    for q in cfg.noise_list():
        ngen = torch.Generator().manual_seed(seed * 7 + int(round(q * 1000)))
        train, held = train_clean.noisy(q, ngen), held_clean.noisy(q, ngen)
        for arm in cfg.arm_list():
            group = []
            for lr in cfg.lr_list():
                policy, first, last = train_dpo(ref, train, arm, lr, cfg, seed)
                row = {"seed": seed, "noise": q, "arm": arm, "lr": lr, "first_loss": first, "final_train_loss": last,
                       **evaluate(policy, ref, held, held_clean, cfg, seed)}
                group.append(row)
                if on_run is not None:
                    on_run(row)
            best = max(group, key=lambda r: (r["heldout_pref_acc"], -r["lr"]))
            for r in group:
                r["selected"] = r is best
            rows.extend(group)
    return rows


def run(cfg: DPONoisyConfig, run, seed: int) -> dict:
    torch.set_num_threads(1)
    counter = iter(range(10**9))
    rows = run_seed(cfg, seed, on_run=lambda r: run.log(next(counter), **{k: float(v) for k, v in r.items()
                                                                            if isinstance(v, (int, float))}))
    sel = [r for r in rows if r["selected"]]
    from lmech.experiments.figures.prune import dpo_figure

    run.save_figure(dpo_figure(sel, cfg.noise_list()), "dpo_noisy")
    qmax = max(cfg.noise_list())
    pick = lambda arm, q: next((r for r in sel if r["arm"] == arm and r["noise"] == q), None)  # noqa: E731
    result = {"rows": rows, "first_loss": [r["first_loss"] for r in rows], "max_noise": qmax}
    a0 = pick("adamw", min(cfg.noise_list()))
    if a0 is not None and min(cfg.noise_list()) == 0:
        result["adamw_win_rate_clean"] = a0["win_rate"]
    a, p = pick("adamw", qmax), pick("poprisk", qmax)
    if a is not None and p is not None:
        result["win_rate_diff_max_noise"] = p["win_rate"] - a["win_rate"]
        result["drift_ratio_max_noise"] = a["implicit_reward_abs"] / max(p["implicit_reward_abs"], 1e-300)
        result["clean_acc_diff_max_noise"] = p["clean_reward_acc"] - a["clean_reward_acc"]
    return result


def check(result: dict) -> list[CheckRow]:
    first = [v for v in result["first_loss"] if np.isfinite(v)]
    worst = max(first, key=lambda v: abs(v - math.log(2))) if first else float("nan")
    rows = [CheckRow.relative("DPO loss at the first step (policy = reference) = log 2", math.log(2), worst, 1e-5)]
    if "adamw_win_rate_clean" in result:
        rows.append(CheckRow.at_least("AdamW win rate vs reference at 0% swapped (DPO works)", 0.55,
                                      result["adamw_win_rate_clean"]))
    if "win_rate_diff_max_noise" in result:
        q = result["max_noise"]
        rows.append(CheckRow.at_least(f"win rate PopRisk - AdamW at {q:g} swapped (paper: PopRisk better)", 0.0,
                                      result["win_rate_diff_max_noise"]))
        rows.append(CheckRow.at_least(f"drift |implicit reward| AdamW / PopRisk at {q:g} swapped (paper: 3.05)", 1.0,
                                      result["drift_ratio_max_noise"]))
    return rows


EXPERIMENT = Experiment(
    name="dpo-noisy",
    summary="DPO on a synthetic token task with 0/10/30% swapped preferences: AdamW vs PopRiskAdamW, equal lr grids",
    config=DPONoisyConfig,
    run=run,
    check=check,
    quick={"noises": "0,0.3", "lrs": "3e-3", "d_model": 16, "n_layers": 1, "sft_steps": 150, "n_pairs": 200,
           "n_heldout": 200, "n_eval": 500, "steps": 60},
)
