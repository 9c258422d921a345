"""Run store: one folder per run (config, Parquet metrics, status, figures) and a SQLite index."""

from lmech.runs.provenance import config_hash, provenance
from lmech.runs.store import Run, RunStore, load
from lmech.errors import DivergedError

__all__ = ["DivergedError", "Run", "RunStore", "config_hash", "load", "provenance"]
