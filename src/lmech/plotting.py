"""matplotlib for every lmech figure: ``pyplot`` on the non-interactive Agg backend.

The catalog entries, the reports and the comparisons all draw headless (no display is needed and
none is opened), so they take pyplot from here rather than importing it themselves. matplotlib is
imported on first use, :func:`pyplot` or the module attribute ``plt``, never at ``import lmech``::

    from lmech.plotting import plt           # matplotlib.pyplot, backend Agg
    fig, ax = plt.subplots()

This module imports nothing of lmech, so any floor may use it.
"""

from __future__ import annotations

import functools


@functools.cache
def pyplot():
    """``matplotlib.pyplot`` with the Agg backend selected (once per process, before the first figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def __getattr__(name: str):
    # `from lmech.plotting import plt` imports matplotlib only when a figure is about to be drawn
    if name == "plt":
        return pyplot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["plt", "pyplot"]
