"""The ``lmech`` command line: a thin layer over :mod:`lmech.experiments` and :mod:`lmech.runs`.

Exit codes: 0 done (and every check passed); 1 a run failed, diverged or a check failed; 2 bad input
(unknown experiment, key, type or value, a bad seed or thread count, an ``--out`` that cannot be
written), one line on stderr and nothing written; 130 interrupted. User text (messages, values) is
printed as it is, never read as rich markup.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lmech.contract.spec import parse_grid, parse_point  # noqa: F401  (their old import path)
from lmech.contract.tables import check_table

class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a bad option type, a missing argument) as one ``error:`` line, exit 2, like every
    other bad input, instead of click's multi-line usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        cx = sys.modules[typer.BadParameter.__module__]  # click's exceptions, as typer ships or imports them

        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except getattr(cx, "NoArgsIsHelpError", ()) as err:
            typer.echo(err.ctx.get_help() if err.ctx else err.format_message())
            code = 0
        except cx.ClickException as err:
            where = f" (see `{err.ctx.command_path} --help`)" if getattr(err, "ctx", None) else ""
            text = Text("error: ", style="bold red")
            text.append(" ".join(err.format_message().split()) + where)
            err_console.print(text, highlight=False, soft_wrap=True)
            code = err.exit_code
        except (typer.Abort, getattr(cx, "Abort", typer.Abort)):
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_OneLineErrors,
                  help="lmech: learning mechanics - measure, predict and steer neural-network training.")
console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    text = Text("error: ", style="bold red")
    text.append(" ".join(str(message).split()))  # one line, and never markup
    err_console.print(text, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _check_out(path: Path, what: str = "--out") -> None:
    """Refuse (exit 2) an output folder that is a file or cannot be created or written, before anything runs."""
    import os

    path = Path(path)
    probe = path
    while not probe.exists():  # the nearest existing ancestor must be a writable folder
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        _fail(f"{what} {path} is {'a file' if probe == path else f'inside the file {probe}'}; give a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(f"{what} {path} cannot be written ({probe} is not writable); give a writable folder")


MAX_THREADS = 4096


def _check_threads(threads: Optional[int]) -> None:
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        _fail(f"--threads must be a positive integer (at most {MAX_THREADS}), got {threads}")


@app.command("list")
def list_experiments() -> None:
    """List the experiments in the catalog, one line each."""
    from lmech import experiments

    width = max(len(n) for n in experiments.names())
    for name in experiments.names():  # one line each: cut to the terminal's width, never wrapped
        console.print(f"{name:<{width}}  {experiments.get(name).summary}", highlight=False, markup=False,
                      no_wrap=True, overflow="ellipsis")


@app.command("show")
def show(experiment: str = typer.Argument(..., help="experiment name (see `lmech list`)")) -> None:
    """Show an experiment's config keys: type (or allowed values), default, quick value and what each is."""
    from lmech import experiments
    from lmech.contract.spec import describe_config
    from lmech.errors import ConfigError

    try:
        exp = experiments.get(experiment)
    except ConfigError as err:
        _fail(str(err))
    console.print(f"{exp.name}: {exp.summary}", highlight=False, markup=False)
    table = Table("key", "type", "default", "--quick", "what it is", title=f"lmech run {exp.name} --set key=value")
    for row in describe_config(exp):
        table.add_row(*(escape(row[k]) for k in ("key", "type", "default", "quick", "doc")))
    console.print(table)


@app.command("run")
def run(
    experiment: str = typer.Argument(..., help="experiment name (see `lmech list`)"),
    set_: List[str] = typer.Option([], "--set", help="override a config key: --set key=value (repeatable)"),
    seed: int = typer.Option(0, "--seed", help="random seed (data split, init, batches)"),
    out: Path = typer.Option(Path("runs"), "--out", "--store", help="run store folder"),
    quick: bool = typer.Option(False, "--quick", help="the experiment's small, real configuration"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory",
                                             help="refuse a config estimated above this (e.g. 8G, 512M; "
                                                  "default: the memory available)"),
) -> None:
    """Run one experiment and store its config, metrics, status and figures (`lmech show NAME` lists its keys)."""
    from lmech import experiments
    from lmech.errors import ConfigError

    from lmech.contract.spec import validate_seed

    try:
        exp = experiments.get(experiment)
        cfg = exp.make_config(set_, quick=quick)  # validate before anything touches the disk
        validate_seed(seed)
        limit = None if max_memory is None else parse_bytes(max_memory)
    except ConfigError as err:
        _fail(str(err))
    _check_threads(threads)
    _check_out(out)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    from lmech.runs.progress import RunProgress

    started = []

    def on_start(run_obj, cfg) -> None:
        started.append(run_obj.id)
        if run_obj.taken_up is not None:
            step = run_obj.taken_up["step"]
            how = (f"continuing it from its checkpoint at step {step}" if step is not None
                   else "it left no checkpoint, so it starts over under the same id")
            console.print(f"found incomplete run {run_obj.id} with this config and seed: {how} "
                          f"(the interrupted attempt is kept in {out}/.attempts/{run_obj.id})",
                          highlight=False, markup=False, soft_wrap=True)

    try:
        summary = experiments.run_experiment(experiment, config=cfg, seed=seed, out=out, on_start=on_start,
                                             progress=RunProgress(console), max_memory=limit)
    except KeyboardInterrupt:
        _fail("interrupted; the run folder is kept and marked incomplete", code=130)
    except ConfigError as err:
        _fail(str(err))
    except Exception as err:  # the run folder, if it was made, records it as failed
        kept = " (run folder kept, status 'failed')" if started else " (no run folder was written)"
        _fail(f"run failed: {type(err).__name__}: {err}{kept}", code=1)
    _print_summary(summary)
    if summary["state"] != "done" or not all(c.passed for c in summary["checks"]):
        raise typer.Exit(1)  # like `lmech verify`: a failing check is a failing exit code


def _rounded(value):
    """Floats to 4 significant digits for printing (the stored result keeps full precision)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _print_summary(summary: dict) -> None:
    console.print(f"run [bold]{escape(summary['id'])}[/]: {summary['state']} {escape(summary['message'])}".rstrip(),
                  highlight=False)
    shown = {k: _rounded(v) for k, v in summary["result"].items() if k != "checks"}
    if shown:
        console.print(json.dumps(shown, indent=None, default=str), highlight=False, soft_wrap=True, markup=False)
    if summary["checks"]:
        console.print(checks_table(summary["checks"]))
    figures = sorted(Path(summary["path"], "figures").glob("*.png"))
    for fig in figures:
        console.print(f"figure: {fig}", highlight=False, markup=False, soft_wrap=True)


def checks_table(rows) -> Table:
    """The check rows of one run (:func:`lmech.contract.tables.check_table`)."""
    return check_table(rows, title="checks")


@app.command("sweep")
def sweep(
    experiment: str = typer.Argument(..., help="experiment name (see `lmech list`)"),
    set_: List[str] = typer.Option([], "--set", help="fix a config key: --set key=value (repeatable)"),
    grid: List[str] = typer.Option([], "--grid", help="sweep a key: --grid key=v1,v2,... (repeatable; product)"),
    point: List[str] = typer.Option([], "--point", help="an explicit config, --point key=v,key=v (repeatable; "
                                                        "the sweep runs points x grid)"),
    random: Optional[int] = typer.Option(None, "--random", help="run N grid points sampled from the grid (seeded)"),
    seeds: int = typer.Option(1, "--seeds", help="seeds 0..K-1 for every grid point"),
    order: str = typer.Option("points", "--order", help="points (every seed of a point, then the next) or seeds "
                                                       "(seed 0 of every point first)"),
    executor: str = typer.Option("local", "--executor", help="local (process per run) or ray"),
    workers: Optional[int] = typer.Option(None, "--workers", help="runs at a time (default: CPU count)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local one)"),
    out: Path = typer.Option(Path("runs"), "--out", "--store", help="run store folder"),
    name: Optional[str] = typer.Option(None, "--name", help="sweep name (default: from experiment, sets and grid)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="re-run runs that failed before"),
    quick: bool = typer.Option(False, "--quick", help="start from the experiment's small, real configuration"),
) -> None:
    """Run an experiment over a grid of configs and seeds; re-running it resumes (finished runs are skipped)."""
    from lmech.errors import ConfigError
    from lmech.sweeps import run_sweep, sweep_table

    _check_out(out)
    try:
        grid_dict = parse_grid(grid)
        points = [parse_point(p) for p in point] or None
        df = run_sweep(experiment, sets=set_, grid=grid_dict, seeds=seeds, random=random, executor=executor,
                       workers=workers, address=address, out=out, name=name, retry_failed=retry_failed,
                       quick=quick, progress=True, points=points, order=order)
    except ConfigError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted; unfinished runs are marked incomplete and re-run when the sweep is run again", code=130)
    console.print(sweep_table(df, title=f"sweep {df.attrs['sweep']}"))
    console.print(f"lmech runs --sweep {df.attrs['sweep']} --out {out}", highlight=False, markup=False)
    if df["state"].isin(["failed", "incomplete", "missing"]).any():
        raise typer.Exit(1)


def parse_bytes(text: str) -> int:
    """``"8G"`` -> 8 GiB in bytes (suffixes K, M, G, T, powers of 1024; none: bytes)."""
    from lmech.errors import ConfigError

    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in units and raw[-1:] else (raw, "")
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"--max-memory {text!r} is not a size (e.g. 8G, 512M)") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(f"--max-memory must be a positive size, got {text!r}")
    return int(value)


@app.command("compare")
def compare(
    experiment: str = typer.Argument(..., help="experiment name (see `lmech list`)"),
    arm: List[str] = typer.Option(..., "--arm", help="an arm: NAME:key=value,key=value (repeatable)"),
    grid: List[str] = typer.Option(..., "--grid", help="tuning grid, the same for every arm: --grid lr=1e-3,3e-3"),
    set_: List[str] = typer.Option([], "--set", help="config key shared by all arms: --set key=value"),
    seeds: int = typer.Option(3, "--seeds", help="evaluation seeds for each arm's best setting"),
    tune_seed: int = typer.Option(0, "--tune-seed", help="seed of the tuning runs (evaluation uses the next ones)"),
    metric: Optional[str] = typer.Option(None, "--metric", help="result key to rank by (default per experiment)"),
    mode: Optional[str] = typer.Option(None, "--mode", help="min or max"),
    tiebreak: Optional[str] = typer.Option(None, "--tiebreak", help="result key ranking runs that lack the metric"),
    workers: Optional[int] = typer.Option(2, "--workers", help="runs at a time"),
    out: Path = typer.Option(Path("runs"), "--out", "--store", help="run store folder"),
    name: Optional[str] = typer.Option(None, "--name", help="comparison name (default: from its inputs)"),
    quick: bool = typer.Option(False, "--quick", help="start from the experiment's small, real configuration"),
) -> None:
    """Compare optimizers fairly: same tuning grid per arm on one seed, then each arm's best on fresh seeds."""
    from lmech.compare import compare_command
    from lmech.errors import ConfigError

    _check_out(out)
    try:
        result = compare_command(experiment, arm, grid, set_, seeds, tune_seed, metric, mode, tiebreak, workers,
                                 out, name, quick)
    except ConfigError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", code=130)
    console.print(result.markdown(), highlight=False, markup=False)
    console.print(f"table: {result.directory / 'table.md'}\nfigure: {result.figure}", highlight=False, markup=False)


@app.command("runs")
def runs(
    out: Path = typer.Option(Path("runs"), "--out", "--store", help="run store folder"),
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="only this experiment"),
    sweep_name: Optional[str] = typer.Option(None, "--sweep", help="summary table of one sweep"),
    reindex: bool = typer.Option(False, "--reindex", help="rebuild the index from the run folders first"),
) -> None:
    """List stored runs with their state."""
    from lmech.runs import RunStore

    store = RunStore(out)
    if reindex:
        store.reindex()
    if sweep_name is not None:
        from lmech.errors import ConfigError
        from lmech.runs.manifests import summary
        from lmech.sweeps import sweep_table

        try:
            console.print(sweep_table(summary(sweep_name, out=out), title=f"sweep {sweep_name}"))
        except ConfigError as err:
            _fail(str(err))
        return
    df = store.runs(experiment=experiment)
    if df.empty:
        console.print(f"no runs in {out}")
        return
    table = Table("id", "experiment", "seed", "state", "last step", "message")
    colors = {"done": "green", "running": "cyan", "diverged": "yellow", "failed": "red", "incomplete": "magenta"}
    for row in df.itertuples():
        color = colors.get(row.state, "white")
        table.add_row(escape(row.id), escape(row.experiment), str(row.seed), f"[{color}]{row.state}[/]",
                      str(row.last_step), escape((row.message or "")[:60]))
    console.print(table)


@app.command("report")
def report(
    target: str = typer.Argument(..., help="a run folder or id, a sweep name, or a `lmech verify` output folder"),
    out: Optional[Path] = typer.Option(None, "--out", help="report folder (default: reports/<name>)"),
    store: Path = typer.Option(Path("runs"), "--store", help="run store holding the run or sweep"),
) -> None:
    """Write a self-contained HTML report (figures embedded) plus its PNG and SVG figures."""
    from lmech.errors import ConfigError
    from lmech.report.build import build_report

    if out is not None:
        _check_out(out)
    try:
        from lmech.report.build import resolve_target

        kind, _, what = resolve_target(target, store)  # refuses a bad target before anything is printed
        console.print(f"building the report of {kind} {what} (figures of every run; this can take a while)",
                      highlight=False, markup=False, soft_wrap=True)
        path = build_report(target, out=out, store=store)
    except ConfigError as err:
        _fail(str(err))
    console.print(f"report: {path}", highlight=False, markup=False)


@app.command("verify")
def verify(
    names: Optional[List[str]] = typer.Argument(None, help="catalog entries to verify (default: the law catalog)"),
    every: bool = typer.Option(False, "--all", help="every catalog entry that has checks, paper claims included"),
    quick: bool = typer.Option(False, "--quick", help="each entry's small, real configuration"),
    out: Path = typer.Option(Path("verify"), "--out", help="output folder: runs/, verify.json, report.html"),
    seed: int = typer.Option(0, "--seed", help="random seed of every run"),
    threads: int = typer.Option(1, "--threads", help="torch and BLAS threads per run"),
) -> None:
    """Run the catalog's theory-vs-measurement checks; one table, an HTML report, exit 1 if any fails."""
    from lmech.errors import ConfigError
    from lmech.verify import checked_names, checks_table, resolve_names
    from lmech.verify import verify as run_verify

    _check_threads(threads)
    if every and names:
        _fail("give entry names or --all, not both")
    try:
        todo = checked_names() if every else resolve_names(names)
    except ConfigError as err:
        _fail(str(err))

    def progress(name: str, state: str, rows, seconds: float) -> None:
        bad = sum(not r.passed for r in rows)
        mark = "[green]ok[/]" if state == "done" and not bad else f"[red]{bad} failing[/]"
        console.print(f"{name}: {state}, {len(rows)} checks, {mark} ({seconds:.1f} s)", highlight=False)

    from lmech.contract.spec import validate_seed

    try:
        validate_seed(seed)
    except ConfigError as err:
        _fail(str(err))
    _check_out(out)
    console.print(f"verifying {len(todo)} entries{' (quick)' if quick else ''}: {', '.join(todo)}", highlight=False, markup=False)
    try:
        result = run_verify(todo, quick=quick, out=out, seed=seed, threads=threads, on_entry=progress)
    except ConfigError as err:
        _fail(str(err))
    flags = "".join(f" {f}" for f, on in (("--all", every), ("--quick", quick)) if on)
    console.print(checks_table(result.rows, title=f"lmech verify{flags}"))
    console.print(f"{len(result.rows) - len(result.failed)}/{len(result.rows)} checks pass; "
                  f"summary {result.json_path}; report {result.html_path}", highlight=False, markup=False)
    if not result.passed:
        raise typer.Exit(1)


@app.command("lab")
def lab(
    out: Path = typer.Option(Path("runs"), "--out", "--store",
                                help="run store folder to show and to run into"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on (default: this machine only)"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    max_active: int = typer.Option(1, "--max-active", help="playground runs at a time"),
) -> None:
    """A local web page: runs, sweeps, live curves and a label-noise playground (needs the lab extra)."""
    from lmech.lab import LabUnavailable, serve

    if not 0 < port < 65536 or max_active < 1:
        _fail("--port must be in 1..65535 and --max-active at least 1")
    try:
        serve(out, host=host, port=port, max_active=max_active)
    except LabUnavailable as err:
        _fail(str(err))


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `lmech runs | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
