"""lmech: learning mechanics for PyTorch.

Instruments that attach to any training loop, solvable reference models with closed-form
predictions, and a catalog of experiments where theory is checked against measurement.
"""

__version__ = "0.1.0"

from lmech.errors import ConfigError, DivergedError, LmechError, MemoryBudgetError  # noqa: E402  (light)

__all__ = ["ConfigError", "DivergedError", "LmechError", "MemoryBudgetError", "Monitor"]


def __getattr__(name: str):
    # lazy: `import lmech` stays light; `lmech.Monitor` imports the probes on first use
    if name == "Monitor":
        from lmech.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'lmech' has no attribute {name!r}")
