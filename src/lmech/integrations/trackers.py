"""The old path of the experiment-tracker sinks, kept for code written against it: :class:`WandbSink`
and :class:`MLflowSink` live in :mod:`lmech.monitor.trackers` (the Monitor's floor), reached as
``lmech.monitor.WandbSink`` / ``lmech.monitor.MLflowSink``."""

from lmech.monitor.trackers import MLflowSink, WandbSink

__all__ = ["MLflowSink", "WandbSink"]
