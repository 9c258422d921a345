"""Figures of the catalog entries: plain numbers (metric frames, per-readout dicts, arrays) in, a
matplotlib figure out (Agg backend, :mod:`lmech.plotting`); none reads the run store.

One module per family of entries: :mod:`.grokking` (the grokking curves), :mod:`.signal_reservoir`
(coupling, label noise, double descent, the grokking channel), :mod:`.prune` (pruning by reservoir,
noisy DPO). An entry imports its figure module when it saves its figure, so importing the catalog
imports no matplotlib. The old paths ``lmech.report.figures``, ``lmech.report.signal_reservoir``
and ``lmech.report.prune`` re-export these.
"""
