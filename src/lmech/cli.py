"""The ``lmech`` command line: a thin layer over :mod:`lmech.experiments` and :mod:`lmech.runs`.

Bad input (unknown experiment, key, type or value) prints one line on stderr and exits with code 2
before anything is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lmech: learning mechanics - measure, predict and steer neural-network training.")
console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command("list")
def list_experiments() -> None:
    """List the experiments in the catalog, one line each."""
    from lmech import experiments

    width = max(len(n) for n in experiments.names())
    for name in experiments.names():
        console.print(f"{name:<{width}}  {experiments.get(name).summary}", highlight=False)


@app.command("run")
def run(
    experiment: str = typer.Argument(..., help="experiment name (see `lmech list`)"),
    set_: List[str] = typer.Option([], "--set", help="override a config key: --set key=value (repeatable)"),
    seed: int = typer.Option(0, "--seed", help="random seed (data split, init, batches)"),
    out: Path = typer.Option(Path("runs"), "--out", help="run store folder"),
    quick: bool = typer.Option(False, "--quick", help="the experiment's small, real configuration"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads"),
) -> None:
    """Run one experiment and store its config, metrics, status and figures."""
    from lmech import experiments
    from lmech.experiments.base import ConfigError

    try:
        exp = experiments.get(experiment)
        exp.make_config(set_, quick=quick)  # validate before anything touches the disk
    except ConfigError as err:
        _fail(str(err))
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=console, transient=False)

    def on_start(run_obj, cfg) -> None:
        total = getattr(cfg, "steps", None)
        task = progress.add_task(f"{experiment} {run_obj.id}", total=total, info="")

        def update(step: int, values: dict) -> None:
            shown = [f"{k}={values[k]:.4g}" for k in ("train_loss", "loss", "test_loss", "test_acc") if k in values]
            progress.update(task, completed=step, info=" ".join(shown))

        run_obj.on_log.append(update)

    try:
        with progress:
            summary = experiments.run_experiment(experiment, set_, seed=seed, out=out, quick=quick, on_start=on_start)
    except KeyboardInterrupt:
        _fail("interrupted; the run folder is kept and marked incomplete", code=130)
    except Exception as err:  # the run folder already records it as failed
        _fail(f"run failed: {type(err).__name__}: {err} (run folder kept, status 'failed')", code=1)
    _print_summary(summary)
    if summary["state"] != "done":
        raise typer.Exit(1)


def _print_summary(summary: dict) -> None:
    console.print(f"run [bold]{summary['id']}[/]: {summary['state']} {summary['message']}".rstrip(), highlight=False)
    console.print(f"folder: {summary['path']}", highlight=False)
    shown = {k: v for k, v in summary["result"].items() if k != "checks"}
    if shown:
        console.print(json.dumps(shown, indent=None, default=str), highlight=False, soft_wrap=True)
    if summary["checks"]:
        console.print(checks_table(summary["checks"]))
    figures = sorted(Path(summary["path"], "figures").glob("*.png"))
    for fig in figures:
        console.print(f"figure: {fig}", highlight=False)


def checks_table(rows) -> Table:
    table = Table("quantity", "predicted", "measured", "rel. err", "tolerance", "pass", title="checks")
    for r in rows:
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        table.add_row(r.quantity, fmt(r.predicted), fmt(r.measured), "" if r.rel_err is None else f"{r.rel_err:.3g}",
                      fmt(r.tolerance), "[green]PASS[/]" if r.passed else "[red]FAIL[/]")
    return table


@app.command("runs")
def runs(
    out: Path = typer.Option(Path("runs"), "--out", help="run store folder"),
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="only this experiment"),
    reindex: bool = typer.Option(False, "--reindex", help="rebuild the index from the run folders first"),
) -> None:
    """List stored runs with their state."""
    from lmech.runs import RunStore

    store = RunStore(out)
    if reindex:
        store.reindex()
    df = store.runs(experiment=experiment)
    if df.empty:
        console.print(f"no runs in {out}")
        return
    table = Table("id", "experiment", "seed", "state", "last step", "message")
    colors = {"done": "green", "running": "cyan", "diverged": "yellow", "failed": "red", "incomplete": "magenta"}
    for row in df.itertuples():
        color = colors.get(row.state, "white")
        table.add_row(row.id, row.experiment, str(row.seed), f"[{color}]{row.state}[/]", str(row.last_step),
                      (row.message or "")[:60])
    console.print(table)


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `lmech runs | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
