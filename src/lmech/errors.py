"""The errors every layer of lmech may raise, at the bottom of the house.

Each carries a one-line message that says what is wrong and what to do. The command line turns a
:class:`ConfigError` into a usage error (exit code 2, nothing written).

- :class:`LmechError`: the root; ``except lmech.LmechError`` catches every error lmech raises on
  purpose (not bugs).
- :class:`ConfigError`: a bad experiment name, key or value.
- :class:`MemoryBudgetError`: a computation would allocate more than its memory budget.
- :class:`DivergedError`: a training loop's loss stopped being finite.
"""

from __future__ import annotations


class LmechError(Exception):
    """Root of the errors lmech raises on purpose; the message is one line saying what to do."""


class ConfigError(LmechError, ValueError):
    """A bad experiment name, key or value. Its message is one line saying what to do."""


class MemoryBudgetError(LmechError, MemoryError):
    """A computation would allocate more than its memory budget; the message says what to shrink."""


class DivergedError(LmechError, RuntimeError):
    """Raised by a training loop when the loss stops being finite; the run is marked diverged.

    ``last_good`` (optional) is the last step whose loss was finite: the run's status records it as
    its last step when that is later than the last logged one.
    """

    def __init__(self, message: str = "", last_good: int | None = None):
        super().__init__(message)
        self.last_good = last_good
