"""The old path of the signal-channel / reservoir figures, kept for code written against it; they live
in :mod:`lmech.experiments.figures.signal_reservoir` beside the entries that draw them.
:func:`markdown_table` (the label-noise sweep table) writes through
:func:`lmech.contract.tables.markdown_table`."""

from __future__ import annotations

import numpy as np

from lmech.contract import tables
from lmech.experiments.figures.signal_reservoir import (CELL_COLORS, coupling_figure, double_descent_figure,
                                                        grokking_channel_figure, label_noise_figure,
                                                        noise_table_figure)


def markdown_table(df, floatfmt: str = ".3f") -> str:
    """A pandas DataFrame as a GitHub markdown table: floats with ``floatfmt``, non-finite as ``nan``."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "nan" if not np.isfinite(v) else format(float(v), floatfmt)
        return str(v)

    return tables.markdown_table(df.columns, df.itertuples(index=False), fmt)


__all__ = ["CELL_COLORS", "coupling_figure", "double_descent_figure", "grokking_channel_figure",
           "label_noise_figure", "markdown_table", "noise_table_figure"]
