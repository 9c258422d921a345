"""Progress of one run on a console: a bar that fits the terminal, or a line every few seconds.

On a terminal (``console.is_terminal``) a rich progress bar sized to the console's width: the
experiment's name, the bar, ``step/total`` (just ``step`` when the config has no ``steps``), the
elapsed time and two headline metrics. When the output is piped or captured, one plain line every
``every_s`` seconds and one at the end, so a log file shows the run advancing. A run that stops
early (grokked, converged) ends at 100%: its bar is completed when the run finishes.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

# the metrics shown, in order of preference; the first two present are shown
HEADLINE = ("train_loss", "loss", "test_acc", "test_loss", "train_acc")


def headline(values: dict[str, float], limit: int = 2) -> str:
    """``"train_loss 0.769  test_acc 0.0123"``: the first ``limit`` headline metrics present."""
    shown = [f"{k} {values[k]:.3g}" for k in HEADLINE if k in values][:limit]
    return "  ".join(shown)


class RunProgress:
    """Attach to a run with :meth:`start` (from ``run_experiment``'s ``on_start``), end with :meth:`finish`."""

    def __init__(self, console: Console | None = None, every_s: float = 10.0):
        self.console = console or Console()
        self.every_s = float(every_s)
        self._bar = None
        self._task = None
        self._total: int | None = None
        self._name = ""
        self._last_line = -float("inf")
        self._step, self._values = 0, {}

    def start(self, run: Any, cfg: Any, name: str) -> None:
        total = getattr(cfg, "steps", None)
        self._total = int(total) if isinstance(total, int) and total > 0 else None
        self._name = name
        self.console.print(f"run {run.id}: folder {run.path}", highlight=False, markup=False, soft_wrap=True)
        if self.console.is_terminal:
            self._start_bar()
        run.on_log.append(self.update)

    def _start_bar(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        # name + count + elapsed + two metrics take about 62 columns; the bar gets the rest
        width = self.console.width
        count = "{task.completed}/{task.total}" if self._total else "{task.completed}"
        self._bar = Progress(TextColumn(self._name[:16], markup=False),
                             BarColumn(bar_width=max(4, min(40, width - 66))), TextColumn(count, markup=False),
                             TimeElapsedColumn(), TextColumn("{task.fields[info]}", markup=False),
                             console=self.console, transient=False)
        self._task = self._bar.add_task(self._name, total=self._total, info="")
        self._bar.start()

    def update(self, step: int, values: dict[str, float]) -> None:
        self._step, self._values = int(step), {**self._values, **values}
        if self._bar is not None:
            self._bar.update(self._task, completed=self._step, info=headline(self._values))
        elif time.monotonic() - self._last_line >= self.every_s:
            self._line()

    def _line(self) -> None:
        self._last_line = time.monotonic()
        of = f"/{self._total}" if self._total else ""
        self.console.print(f"{self._name}: step {self._step}{of}  {headline(self._values)}".rstrip(),
                           highlight=False, markup=False, soft_wrap=True)

    def finish(self, state: str) -> None:
        """A finished run ends at 100% (its last step may be before the step cap: early stopping)."""
        if self._bar is not None:
            if state == "done" and self._total:
                self._bar.update(self._task, completed=self._total)
            self._bar.stop()
            self._bar = None
        else:
            self._line()
