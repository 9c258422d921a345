"""One line of a theory-vs-measurement table: :class:`CheckRow` (what ``check()`` returns and
``lmech verify`` prints)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class CheckRow:
    """One line of a theory-vs-measurement table.

    ``passed`` is decided by the experiment (relative error within tolerance, or a one-sided bound);
    ``rel_err`` is ``|measured - predicted| / |predicted|`` when both are numbers.
    """

    quantity: str
    predicted: float | str
    measured: float | str
    tolerance: float | str
    passed: bool
    rel_err: float | None = None

    @classmethod
    def relative(cls, quantity: str, predicted: float, measured: float, tolerance: float) -> "CheckRow":
        rel = abs(measured - predicted) / max(abs(predicted), 1e-300)
        ok = math.isfinite(rel) and rel <= tolerance
        return cls(quantity, predicted, measured, tolerance, ok, rel)

    @classmethod
    def at_least(cls, quantity: str, bound: float, measured: float | None) -> "CheckRow":
        ok = measured is not None and math.isfinite(measured) and measured >= bound
        return cls(quantity, f">= {bound:g}", "n/a" if measured is None else measured, "one-sided", ok)

    @classmethod
    def at_most(cls, quantity: str, bound: float, measured: float | None) -> "CheckRow":
        ok = measured is not None and math.isfinite(measured) and measured <= bound
        return cls(quantity, f"<= {bound:g}", "n/a" if measured is None else measured, "one-sided", ok)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


__all__ = ["CheckRow"]
