"""The old path of the grokking figure and of the Agg pyplot handle, kept for code written against it.

The figure lives beside the catalog that draws it, :mod:`lmech.experiments.figures.grokking`, and
pyplot in :mod:`lmech.plotting`, so that no entry imports the report (issue 15: the catalog sits
below the readers).
"""

from lmech.experiments.figures.grokking import grokking_figure
from lmech.plotting import plt

__all__ = ["grokking_figure", "plt"]
