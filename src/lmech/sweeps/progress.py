"""Sweep progress on the terminal: one rich progress bar plus one status line per run."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lmech.sweeps.plan import RunSpec

COLORS = {"done": "green", "diverged": "yellow", "failed": "red", "incomplete": "magenta", "running": "cyan"}


class SweepProgress:
    """``with SweepProgress(name, total, console) as p: p.started(spec); p.finished(spec, outcome)``.

    The bar counts finished runs of this invocation out of those it has to run, with the number
    running and failed and rich's ETA; each finished run prints one line (state, id, grid values,
    seed, wall time, key results). ``enabled=False`` prints nothing.
    """

    def __init__(self, name: str, total: int, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.running = self.failed = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("[cyan]{task.fields[running]} running[/] [red]{task.fields[failed]} failed[/]"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not enabled)
        self.task = self.progress.add_task(f"sweep {name}", total=total, running=0, failed=0)

    def __enter__(self) -> "SweepProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def note(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message, highlight=False)

    def started(self, spec: RunSpec) -> None:
        self.running += 1
        self.progress.update(self.task, running=self.running)

    def finished(self, spec: RunSpec, outcome: dict) -> None:
        self.running -= 1
        state = outcome["state"]
        self.failed += state in ("failed", "incomplete")
        self.progress.update(self.task, advance=1, running=self.running, failed=self.failed)
        if not self.enabled:
            return
        color = COLORS.get(state, "white")
        wall = outcome.get("wall_s")
        timing = f" {wall:.1f}s" if wall is not None and math.isfinite(wall) else ""
        numbers = " ".join(f"{k}={v:.4g}" for k, v in key_numbers(outcome.get("result") or {}).items())
        message = f"  {outcome['message']}" if state != "done" and outcome.get("message") else ""
        self.note(f"[{color}]{state:>8}[/] {spec.run_id} {describe(spec)}{timing} {numbers}{message}".rstrip())


def describe(spec: RunSpec) -> str:
    return " ".join([*(f"{k}={v}" for k, v in spec.params.items()), f"seed={spec.seed}"])


def key_numbers(result: dict, limit: int = 4) -> dict:
    """The first few numeric fields of a run's result (wall time and counts of examples left out)."""
    skip = {"wall_time_s", "n_train", "n_test", "n_params"}
    numbers = {k: v for k, v in result.items()
               if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return dict(list(numbers.items())[:limit])
