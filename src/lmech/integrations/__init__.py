"""Adapters that attach :class:`lmech.Monitor` to training frameworks.

Each lives in its own module and imports its framework only when that module is imported:
:mod:`lmech.integrations.lightning` (extra ``lmech[lightning]``) and
:mod:`lmech.integrations.hf` (extra ``lmech[hf]``).
"""
