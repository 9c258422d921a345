"""The old path of a run's console progress, kept for code written against it: it lives in
:mod:`lmech.runs.progress` beside :func:`lmech.runs.runner.run_experiment`, which drives it."""

from lmech.runs.progress import HEADLINE, RunProgress, headline

__all__ = ["HEADLINE", "RunProgress", "headline"]
