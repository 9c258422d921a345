"""Grokking on modular arithmetic (Power et al. 2022): memorize first, generalize much later.

Setting (defaults): c = a / b mod 97 (a * b^-1), 25% of the 9,312 equations for training, a 2-layer
decoder-only transformer (width 128, 4 heads) reading the tokens ``[a, op, b, =]`` and predicting c
at the last position; AdamW with lr 1e-3, betas (0.9, 0.98), weight decay 1.0, batch 512, a 10-step
linear warm-up. The MLP variant (``model=mlp``) reads one-hot(a) ++ one-hot(b).

Logged every ``eval_every`` steps: train and held-out loss and accuracy (on the full splits, eval
mode), the weight norm ||w||_2 and the learning rate. Result: the first evaluated step at which
held-out accuracy reaches 95% and 99% (``None`` if never). Training stops early once held-out
accuracy has stayed at or above 99% for ``patience`` steps.

Every ``checkpoint_every`` steps (0: never) the training state (model, optimizer, schedule, batch
order, RNG, the marks above) is saved in the run folder; a run interrupted and started again under
the same id (``lmech sweep`` re-runs an incomplete run) continues from its last checkpoint and logs
exactly what an uninterrupted run would have.

Loss is the mean cross-entropy over the batch (computed in float64 from float32 logits: the
grokking literature notes float32 softmax underflow slows late-phase learning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lmech.experiments.base import CheckRow, Experiment, require
from lmech.experiments.loop import ProbeLevel
from lmech.experiments.optimizer_keys import (OptimizerKeys, optimizer_diagnostics, optimizer_options,
                                              validate_optimizer_keys)
from lmech.models import MLP, Transformer
from lmech.monitor import Monitor
from lmech.optim import build_optimizer
from lmech.tasks import modular_arithmetic
from lmech.train import check_finite, evaluate, minibatches, weight_norm


@dataclass
class GrokkingConfig(OptimizerKeys):
    # optimizer, and PopRiskAdamW / Grokfast-EMA keys: lmech.experiments.optimizer_keys.OptimizerKeys
    model: Literal["transformer", "mlp"] = "transformer"  # 2-layer transformer on tokens, or MLP on one-hots
    op: Literal["+", "-", "*", "/"] = "/"                 # c = a op b mod p
    p: int = 97                                            # the modulus (a prime)
    train_fraction: float = 0.25                           # share of the equations used for training
    steps: int = 50_000                                    # step cap (stops earlier once grokked, see patience)
    lr: float = 1e-3                                       # peak learning rate
    weight_decay: float = 1.0                              # decoupled weight decay
    beta1: float = 0.9                                     # optimizer betas
    beta2: float = 0.98
    warmup: int = 10                                       # linear learning-rate warm-up, steps
    batch_size: int = 512                                  # minibatch size (>= n_train: full batch)
    width: int = 128                                       # model width (d_model or hidden units)
    depth: int = 2                                         # layers
    heads: int = 4                                         # attention heads (transformer)
    eval_every: int = 50                                   # steps between evaluations on the full splits
    patience: int = 1000                                   # stop once held-out accuracy stayed >= 99% this long
    checkpoint_every: int = 2000                           # steps between checkpoints (0: never)
    probes: ProbeLevel = "none"                            # a lmech.Monitor preset every eval_every steps, or none

    def validate(self) -> None:
        require(self.p >= 3, f"p must be a prime >= 3, got {self.p}")
        require(all(self.p % d for d in range(2, int(self.p ** 0.5) + 1)), f"p must be prime, got {self.p}")
        require(0 < self.train_fraction < 1, f"train_fraction must be in (0, 1), got {self.train_fraction}")
        require(self.steps > 0, f"steps must be positive, got {self.steps}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        require(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        require(self.width > 0 and self.depth > 0, "width and depth must be positive")
        require(self.model != "transformer" or self.width % self.heads == 0,
                f"width ({self.width}) must be divisible by heads ({self.heads})")
        require(self.eval_every > 0 and self.patience >= 0, "eval_every must be positive, patience >= 0")
        require(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0: never), got {self.checkpoint_every}")
        n_train = round(self.train_fraction * (self.p * self.p if self.op != "/" else self.p * (self.p - 1)))
        validate_optimizer_keys(self, self.batch_size, n_train)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.double(), target)


def build(cfg: GrokkingConfig, seed: int):
    encoding = "tokens" if cfg.model == "transformer" else "onehot"
    data = modular_arithmetic(p=cfg.p, op=cfg.op, train_fraction=cfg.train_fraction, encoding=encoding, seed=seed)
    torch.manual_seed(seed)
    if cfg.model == "transformer":
        model = Transformer(vocab_size=data.info["vocab_size"], seq_len=data.info["seq_len"], n_out=cfg.p,
                            d_model=cfg.width, n_heads=cfg.heads, n_layers=cfg.depth, d_mlp=4 * cfg.width)
    else:
        model = MLP(d_in=2 * cfg.p, d_out=cfg.p, width=cfg.width, depth=cfg.depth)
    return data, model


def memory_bytes(cfg: GrokkingConfig) -> int:
    """Peak bytes of a run, estimated from the config without allocating (the model is built on
    torch's ``meta`` device to count parameters): float32 parameters times 6 (weights, gradients,
    two Adam moments, PopRisk's or Grokfast's extra state, a checkpoint copy) plus the activations
    of a training batch (kept for the backward pass, with their gradients) or of an evaluation chunk
    of 8,192 examples, whichever is larger: per example and layer about 2 numbers per unit for the
    MLP, 60 per model dimension for the transformer (4 positions: q, k, v, attention, 4x-wide MLP)."""
    with torch.device("meta"):
        if cfg.model == "transformer":
            model = Transformer(vocab_size=cfg.p + 2, seq_len=4, n_out=cfg.p, d_model=cfg.width, n_heads=cfg.heads,
                                n_layers=cfg.depth, d_mlp=4 * cfg.width)
        else:
            model = MLP(d_in=2 * cfg.p, d_out=cfg.p, width=cfg.width, depth=cfg.depth)
    params = sum(p.numel() for p in model.parameters())
    per_example = (60 if cfg.model == "transformer" else 2) * cfg.width * cfg.depth + 2 * cfg.p
    return 4 * (6 * params + max(2 * cfg.batch_size, 8192) * per_example)


def run(cfg: GrokkingConfig, run, seed: int) -> dict:
    data, model = build(cfg, seed)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2),
                                **optimizer_options(cfg, min(cfg.batch_size, data.n_train), data.n_train))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
    gen = torch.Generator().manual_seed(seed)
    batches = minibatches(data.n_train, cfg.batch_size, gen)

    step_95 = step_99 = above_99_since = None
    start = 0
    resumed = run.resume()
    if resumed is not None:
        start, state = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        step_95, step_99, above_99_since = state["marks"]
    last_good, step = start, start
    # the Monitor restores every random generator after measuring: training is the same with or without it
    monitor = None if cfg.probes == "none" else Monitor(
        model, cross_entropy, (data.x_train[:256], data.y_train[:256]), probes=cfg.probes, every=cfg.eval_every,
        sinks=[run])
    model.train()
    for step in range(start, cfg.steps + 1):
        evaluated_before = resumed is not None and step == start  # logged by the attempt that saved it
        if (step % cfg.eval_every == 0 or step == cfg.steps) and not evaluated_before:
            train = evaluate(model, data.x_train, data.y_train, cross_entropy)
            test = evaluate(model, data.x_test, data.y_test, cross_entropy)
            check_finite(train["loss"], step, last_good)
            run.log(step, train_loss=train["loss"], train_acc=train["acc"], test_loss=test["loss"],
                    test_acc=test["acc"], weight_norm=weight_norm(model), lr=optimizer.param_groups[0]["lr"],
                    **optimizer_diagnostics(optimizer))
            if step_95 is None and test["acc"] >= 0.95:
                step_95 = step
            if step_99 is None and test["acc"] >= 0.99:
                step_99 = step
            above_99_since = (above_99_since if above_99_since is not None else step) if test["acc"] >= 0.99 else None
            if above_99_since is not None and step - above_99_since >= cfg.patience:
                break
        if step == cfg.steps:
            break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step > start:
            run.save_checkpoint(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "schedule": schedule.state_dict(), "batches": batches.state_dict(),
                                       "torch_rng": torch.get_rng_state(),
                                       "marks": [step_95, step_99, above_99_since]})
        idx = next(batches)
        loss = cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        check_finite(value, step + 1, last_good)
        last_good = step + 1
        if monitor is not None:
            monitor.step(step + 1, optimizer=optimizer)
    if monitor is not None:
        monitor.close()

    final_test = evaluate(model, data.x_test, data.y_test, cross_entropy)
    _save_figure(run, cfg, step_95, step_99)
    return {"step_to_95": step_95, "step_to_99": step_99, "steps_run": step,
            "final_test_acc": final_test["acc"], "n_train": data.n_train, "n_test": data.n_test,
            "n_params": sum(p.numel() for p in model.parameters())}


def check(result: dict) -> list[CheckRow]:
    """Grokking happened: held-out accuracy reached 95% within the step budget."""
    return [CheckRow.at_least("final held-out accuracy", 0.95, result.get("final_test_acc"))]


def _save_figure(run, cfg: GrokkingConfig, step_95, step_99) -> None:
    from lmech.experiments.figures.grokking import grokking_figure

    df = run.metrics(wide=True)
    title = f"{cfg.model}: a {cfg.op} b mod {cfg.p}, {cfg.train_fraction:.0%} train, {cfg.optimizer}"
    if cfg.optimizer == "poprisk":
        title += f" (gate {cfg.gate}, alpha {cfg.alpha}, softness {cfg.softness})"
    fig = grokking_figure(df, title=title, marks={"95%": step_95, "99%": step_99})
    run.save_figure(fig, "grokking")


EXPERIMENT = Experiment(
    name="grokking",
    summary="modular arithmetic: memorization, then a late jump in held-out accuracy (transformer or MLP)",
    config=GrokkingConfig,
    run=run,
    check=check,
    memory=memory_bytes,
    # the README main job: groks (held-out 95%) at about step 10,500, ~40 s on 2 cores
    quick={"model": "mlp", "op": "+", "train_fraction": 0.4, "steps": 20_000},
)
