"""Old name of :mod:`lmech.experiments.signal_runs` (the signal-channel entries' shared pieces); every
name keeps working from here."""

from lmech.experiments.signal_runs import *  # noqa: F401,F403
from lmech.experiments.signal_runs import BinaryData, RecordedRun, build_optimizer  # noqa: F401
