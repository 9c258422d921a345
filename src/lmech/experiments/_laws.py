"""Old name of :mod:`lmech.experiments.laws` (the law-catalog entries' small helpers); every name keeps
working from here."""

from lmech.experiments.laws import *  # noqa: F401,F403
