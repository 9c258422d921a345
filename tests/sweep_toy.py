"""A test-only experiment for the sweep tests: it finishes, raises, diverges or kills its process.

Registered by the ``toy`` fixture in tests/test_sweeps.py as catalog entry ``sweep-toy``.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Literal

from lmech.contract.spec import Experiment, require
from lmech.train import check_finite


@dataclass
class ToyConfig:
    mode: Literal["ok", "raise", "nan", "exit", "sigkill"] = "ok"
    x: float = 1.0
    steps: int = 5

    def validate(self) -> None:
        require(self.steps > 0, f"steps must be positive, got {self.steps}")


def run(cfg: ToyConfig, run, seed: int) -> dict:
    for step in range(cfg.steps):
        loss = cfg.x * (seed + 1) / (step + 1)
        if step == 2 and cfg.mode == "raise":
            raise ValueError(f"boom at step {step} (x={cfg.x})")
        if step == 2 and cfg.mode == "nan":
            loss = float("nan")
        if step == 2 and cfg.mode == "exit":
            run.flush()
            os._exit(3)
        if step == 2 and cfg.mode == "sigkill":
            run.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        check_finite(loss, step, step - 1)
        run.log(step, loss=loss)
    return {"final_loss": loss, "pid": os.getpid()}


EXPERIMENT = Experiment(name="sweep-toy", summary="test-only: finishes, raises, diverges or dies", config=ToyConfig,
                        run=run)
