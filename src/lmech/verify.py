"""``lmech verify``: run the catalog's theory-vs-measurement checks and report them in one table.

``verify(names=None, quick=False, out="verify")`` runs the law catalog (:data:`LAW_CATALOG`, the
twelve entries below; or the named entries) into the run store ``out/runs``, collects every :class:`CheckRow`, and writes

* ``out/verify.json``: ``{"checks": [row + entry + run_id], "runs": {entry: run id}, "store": "runs",
  "passed", "quick", "seed", "wall_time_s": {entry: seconds}, "created"}`` — the format
  :func:`lmech.report.build.read_verify` reads;
* ``out/report.html`` (and ``out/figures/``): the self-contained HTML report of that folder made by
  :func:`lmech.report.build.render_verify` (every check row with PASS/FAIL, then each entry's
  figures, embedded as base64 PNG; no network, no script), i.e. what ``lmech report out`` makes.

Which entries run by default. :data:`LAW_CATALOG` holds twelve established results of learning
mechanics (deep linear dynamics, saddle-to-saddle, kernel learning curves, edge of stability,
muP, scaling laws, lazy vs rich, attention particles, quanta, and since issue 16 the edge of
stochastic stability, value-matrix clustering and in-context regression): established theory, each check a
closed form or fit against a measurement, all of which pass, so ``lmech verify`` failing means
something broke. The catalog's other entries with a ``check()`` (grokking, the PopRisk
experiments, the signal-channel/reservoir experiments) test claims of recent papers, and some of
those claims do not reproduce or hold only in part (e.g. ``label-noise``: the leave-one-out
population-risk estimates end within 3-19% of the held-out loss at every noise level, but their
correlation with it over training falls below the 0.9 asked at q = 0.2: docs/results/signal-reservoir.md);
they are research measurements whose failing rows are results, not regressions. They run by name (``lmech verify label-noise``) or with
``--all`` (:func:`checked_names`).

An entry whose run fails, diverges or returns no check rows contributes a failing row ("run finished
with checks", predicted ``done``, measured the state and message), so a broken experiment can never
pass silently. Each
entry runs with ``threads`` torch intra-op threads and the same number of BLAS threads.

Example (the CI configuration):
    >>> result = verify(["deep-linear"], quick=True, out=tmp)          # doctest: +SKIP
    >>> result.passed, len(result.rows)                                 # doctest: +SKIP
    (True, 13)
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmech.contract.checks import CheckRow
from lmech.contract.tables import check_table, format_number, markdown_table
from lmech.errors import ConfigError


@dataclass
class VerifyRow:
    """A check row with the entry it belongs to and the run that produced it."""

    entry: str
    run_id: str | None
    row: CheckRow

    @property
    def passed(self) -> bool:
        return bool(self.row.passed)

    def as_dict(self) -> dict:
        return {"entry": self.entry, "run_id": self.run_id, **self.row.as_dict()}


@dataclass
class VerifyResult:
    """Everything ``verify`` produced; ``passed`` is True iff every row passed."""

    rows: list[VerifyRow]
    runs: dict[str, str]
    wall_time_s: dict[str, float]
    out: Path
    json_path: Path
    html_path: Path | None
    quick: bool
    seed: int
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failed(self) -> list[VerifyRow]:
        return [r for r in self.rows if not r.passed]

    @classmethod
    def read(cls, out: str | Path) -> "VerifyResult":
        """The result of an earlier ``verify`` from its folder's ``verify.json``."""
        out = Path(out)
        path = out / "verify.json"
        if not path.is_file():
            raise ConfigError(f"{out} has no verify.json; run `lmech verify --out {out}` first")
        data = json.loads(path.read_text())
        fields = ("quantity", "predicted", "measured", "tolerance", "passed", "rel_err")
        rows = [VerifyRow(r["entry"], r.get("run_id"), CheckRow(**{k: r.get(k) for k in fields}))
                for r in data["checks"]]
        html_path = out / "report.html"
        return cls(rows, data.get("runs", {}), data.get("wall_time_s", {}), out, path,
                   html_path if html_path.exists() else None, bool(data.get("quick")), int(data.get("seed", 0)),
                   data.get("errors", {}))

    def markdown(self) -> str:
        """The check table as GitHub markdown (for results pages)."""
        columns = ["entry", "quantity", "predicted", "measured", "rel. err", "tolerance", "pass"]
        cells = ([r.entry, c.quantity, format_number(c.predicted), format_number(c.measured),
                  "" if c.rel_err is None else f"{c.rel_err:.3g}", format_number(c.tolerance),
                  "PASS" if c.passed else "**FAIL**"] for r, c in ((r, r.row) for r in self.rows))
        return markdown_table(columns, cells, spaced_rule=True)


LAW_CATALOG = ("deep-linear", "saddle-to-saddle", "kernel-curves", "edge-of-stability", "mup", "scaling-law",
               "lazy-rich", "attention-particles", "quanta", "stochastic-stability", "value-clustering", "in-context")


def default_names() -> list[str]:
    """The entries ``lmech verify`` runs without names: the law catalog (module docstring)."""
    return list(LAW_CATALOG)


def checked_names() -> list[str]:
    """Every catalog entry that has a ``check()``, in catalog order (``lmech verify --all``)."""
    from lmech import experiments

    return [n for n in experiments.names() if experiments.get(n).check is not None]


def resolve_names(names: list[str] | None) -> list[str]:
    """Validate the requested entries (unknown name or no check -> ConfigError), or the default list."""
    from lmech import experiments

    if not names:
        return default_names()
    out = []
    for name in names:
        exp = experiments.get(name)  # ConfigError for an unknown name
        if exp.check is None:
            raise ConfigError(f"experiment {name!r} has no check() to verify; entries with checks: "
                              f"{', '.join(checked_names())}")
        if name not in out:
            out.append(name)
    return out


def verify(names: list[str] | None = None, quick: bool = False, out: str | Path = "verify", seed: int = 0,
           threads: int = 1, html: bool = True,
           on_entry: Callable[[str, str, list[CheckRow], float], None] | None = None) -> VerifyResult:
    """Run the checks of ``names`` (default: the law catalog); see the module docstring.

    ``on_entry(name, state, rows, seconds)`` is called after each entry (the CLI prints progress).
    Bad names raise :class:`ConfigError` before anything runs or is written.
    """
    import torch

    from lmech import experiments
    from lmech.core.threads import blas_threads
    from lmech.contract.spec import validate_seed
    from lmech.experiments import run_experiment

    seed = validate_seed(seed)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    todo = resolve_names(names)
    for name in todo:  # validate every config before running anything
        experiments.get(name).make_config(None, quick=quick)
    out = Path(out)
    store = out / "runs"
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[VerifyRow] = []
    runs: dict[str, str] = {}
    times: dict[str, float] = {}
    errors: dict[str, str] = {}
    try:
        with blas_threads(threads):
            for name in todo:
                start = time.perf_counter()
                started: dict = {}
                try:
                    summary = run_experiment(name, None, seed=seed, out=store, quick=quick,
                                             on_start=lambda run, cfg: started.setdefault("id", run.id))
                    state, message, checks = summary["state"], summary["message"], list(summary["checks"])
                    runs[name] = summary["id"]
                except Exception as err:  # the run folder (if any) records it as failed
                    state, message, checks = "failed", f"{type(err).__name__}: {err}", []
                    if "id" in started:
                        runs[name] = started["id"]
                    errors[name] = message
                if state != "done" or not checks:
                    checks.append(CheckRow("run finished with checks", "done", f"{state} {message}".strip(), "exact",
                                           False))
                times[name] = round(time.perf_counter() - start, 2)
                rows += [VerifyRow(name, runs.get(name), c) for c in checks]
                if on_entry is not None:
                    on_entry(name, state, checks, times[name])
    finally:
        torch.set_num_threads(previous)
    result = VerifyResult(rows, runs, times, out, out / "verify.json", None, quick, seed, errors)
    _write_json(result)
    if html:
        from lmech.report.build import render_verify, write_report

        result.html_path = write_report(render_verify(out), out)
    return result


def _write_json(result: VerifyResult) -> None:
    from lmech.runs.store import atomic_write_json

    result.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result.json_path, {
        "checks": [r.as_dict() for r in result.rows],
        "runs": result.runs,
        "store": "runs",
        "passed": result.passed,
        "n_checks": len(result.rows),
        "n_failed": len(result.failed),
        "quick": result.quick,
        "seed": result.seed,
        "wall_time_s": result.wall_time_s,
        "errors": result.errors,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })


def checks_table(rows: list[VerifyRow], title: str = "lmech verify"):
    """A rich Table of every row, with the entry column and PASS/FAIL (:func:`lmech.contract.tables.check_table`)."""
    return check_table([r.row for r in rows], title=title, entries=[r.entry for r in rows])


__all__ = ["VerifyResult", "VerifyRow", "checks_table", "default_names", "resolve_names", "verify"]
