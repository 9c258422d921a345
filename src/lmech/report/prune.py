"""The old path of the pruning and noisy-DPO figures, kept for code written against it; they live in
:mod:`lmech.experiments.figures.prune` beside the entries that draw them."""

from lmech.experiments.figures.prune import DPO_STYLE, PRUNE_STYLE, dpo_figure, prune_figure

__all__ = ["DPO_STYLE", "PRUNE_STYLE", "dpo_figure", "prune_figure"]
