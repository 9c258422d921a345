"""``lmech report``: one self-contained HTML page (and its figures as PNG and SVG) for a run, a
sweep, or a ``lmech verify`` output folder.

What each report holds:

* **run**: state and provenance (created, git commit, versions), the experiment's check table
  (quantity, predicted, measured, relative error, tolerance, pass), its result numbers, every
  logged scalar against step (:func:`lmech.report.curves.curves_figure`), the figures the run
  saved itself, and its full config;
* **sweep**: the table of runs (grid values, seed, state, key results; :func:`lmech.sweeps.summary`),
  for every result that varies across runs its median and min-max spread over seeds against each
  grid key (:func:`~lmech.report.curves.sweep_result_figure`), and the main logged curves with the
  same median and spread per grid point (:func:`~lmech.report.curves.sweep_curves_figure`);
* **verify**: every check row of every catalog entry with PASS/FAIL, then per entry its run's
  curves and figures.

``build_report(target, out)`` writes ``out/report.html`` (figures embedded as base64 PNG, inline
CSS, no script: the file can be mailed or opened offline) and ``out/figures/<name>.png|.svg``.
The page is a list of :class:`Section` blocks (key-value tables, tables, check rows, figures, text)
turned into HTML by :func:`_page` with every value escaped (``html.escape``). :func:`render_run`
and :func:`render_sweep` make the same page in memory (the lab serves them without writing).

Target resolution (``lmech report TARGET``), first match wins: an existing folder with
``config.json`` is a run folder; an existing folder with a verify summary is a verify output; a
name with a manifest ``STORE/sweeps/NAME.json`` is a sweep; a run id (or unique id prefix) in
``STORE`` is a run. Anything else raises :class:`~lmech.errors.ConfigError` with one line.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lmech.errors import ConfigError
from lmech.report.curves import curves_figure, metric_panels, sweep_curves_figure, sweep_result_figure
from lmech.report.data import RunView, read_metrics, run_view
from lmech.runs import RunStore

# logged metrics drawn for a sweep, first ones present (a sweep report is not a run report per run)
SWEEP_CURVES = ("test_acc", "test_loss", "train_loss", "train_acc", "loss")
MAX_SWEEP_RESULTS = 6


@dataclass
class Figure:
    """A figure of the report: its file stem, PNG and SVG bytes, and a caption."""

    name: str
    png: bytes
    svg: bytes | None
    caption: str = ""


@dataclass
class Rendered:
    """A report made in memory: ``html`` embeds every figure; ``figures`` are written beside it."""

    kind: str
    name: str
    html: str
    figures: list[Figure] = field(default_factory=list)


def _figure(fig, name: str, caption: str = "") -> Figure:
    import matplotlib.pyplot as plt

    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    fig.savefig(svg, format="svg", bbox_inches="tight")
    plt.close(fig)
    return Figure(name, png.getvalue(), svg.getvalue(), caption)


@dataclass
class Section:
    """A heading and its blocks, in order: ``("kv", dict, css_class)``, ``("table", columns, rows, css_class)``,
    ``("checks", rows)`` (check-row dicts, optionally with an ``entry``), ``("figure", Figure)``,
    ``("text", str)``."""

    title: str
    blocks: list[tuple] = field(default_factory=list)


# -- one run ---------------------------------------------------------------------------------------
def _run_overview(view: RunView) -> dict:
    prov = view.provenance
    status = view.status
    versions = prov.get("versions") or {}
    return {
        "experiment": view.experiment, "state": view.state, "message": status.get("message") or "",
        "seed": view.seed, "sweep": view.sweep or "", "last step": status.get("last_step"),
        "created": prov.get("created"), "finished": status.get("finished", ""),
        "git commit": prov.get("git_commit") or "", "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "config hash": (prov.get("config_hash") or "")[:16],
    }


def run_sections(store: RunStore, run: str | Path, prefix: str = "") -> tuple[RunView, list[Section], list[Figure]]:
    """The sections and figures of one run's report (``prefix`` names its figures uniquely)."""
    view = run_view(store, run)
    df = read_metrics(store, store.resolve(run), wide=True)
    figures: list[Figure] = []
    panels = metric_panels(df)
    main = [p for p in panels if p.main]
    other = [p for p in panels if not p.main]
    fig = curves_figure(df, title=f"{view.experiment} {view.id}", panels=main)
    if fig is not None:
        figures.append(_figure(fig, f"{prefix}curves", f"{view.id}: logged curves ({', '.join(p.title for p in main)})"))
    fig = curves_figure(df, panels=other, ncols=4)
    if fig is not None:
        figures.append(_figure(fig, f"{prefix}curves-other",
                               f"{view.id}: other logged scalars ({', '.join(p.title for p in other)})"))
    for path in view.figures:
        if path.suffix == ".png":
            svg = path.with_suffix(".svg")
            figures.append(Figure(f"{prefix}{path.stem}", path.read_bytes(), svg.read_bytes() if svg.exists() else None,
                                  f"{view.id}: {path.stem} (saved by the run)"))
    sections = [Section("Run", [("kv", _run_overview(view), "overview")])]
    if view.checks:
        sections.append(Section("Checks", [("checks", view.checks)]))
    if view.result:
        sections.append(Section("Result", [("kv", view.result, "result")]))
    if figures:
        sections.append(Section("Figures", [("figure", f) for f in figures]))
    else:
        sections.append(Section("Figures", [("text", "nothing logged yet")]))
    sections.append(Section("Config", [("kv", {"seed": view.seed, **view.config}, "config")]))
    return view, sections, figures


def render_run(store: RunStore, run: str | Path) -> Rendered:
    """One run's report, in memory."""
    view, sections, figures = run_sections(store, run)
    subtitle = f"{view.experiment} run, {view.state}, store {store.root}"
    return Rendered("run", view.id, _page(f"lmech report: {view.id}", subtitle, sections), figures)


# -- a sweep ---------------------------------------------------------------------------------------
def _varying_results(summary: pd.DataFrame, exclude: set[str]) -> list[str]:
    """Numeric result columns that differ between runs (constant ones say nothing about the sweep)."""
    out = []
    for col in summary.columns:
        if col in exclude or col == "wall_time_s":
            continue
        values = pd.to_numeric(summary[col], errors="coerce")
        if summary[col].dtype == bool or values.notna().sum() < 2:
            continue
        if values.dropna().nunique() > 1:
            out.append(col)
    return out


def render_sweep(store: RunStore, name: str) -> Rendered:
    """A sweep's report, in memory: its runs' table and the comparison plots over its grid keys."""
    from lmech.runs import load
    from lmech.runs.manifests import read_manifest, summary

    table = summary(name, out=store.root)
    manifest = read_manifest(store, name) or {}
    grid_keys = [k for k in manifest.get("grid_keys", []) if k in table.columns]
    fixed = {"run_id", "seed", "state", "message", "ran", *grid_keys}
    results = _varying_results(table, fixed)[:MAX_SWEEP_RESULTS]
    figures: list[Figure] = []
    for metric in results:
        fig = sweep_result_figure(table, grid_keys, metric)
        if fig is not None:
            figures.append(_figure(fig, f"{metric}-vs-grid",
                                   f"{metric} vs {', '.join(grid_keys)}: median and min-max over seeds"))
    metrics = load(sweep=name, root=store.root, wide=True)
    for metric in [m for m in SWEEP_CURVES if m in metrics.columns][:2]:
        fig = sweep_curves_figure(metrics, table, grid_keys, metric)
        if fig is not None:
            figures.append(_figure(fig, f"{metric}-curves",
                                   f"{metric} against step per grid point: median and min-max over seeds"))
    states = table["state"].value_counts().to_dict()
    seeds = sorted(set(table["seed"].tolist()))
    overview = {"experiment": manifest.get("experiment"), "runs": len(table),
                "states": ", ".join(f"{v} {k}" for k, v in states.items()), "grid keys": ", ".join(grid_keys) or "-",
                "seeds": ", ".join(map(str, seeds)), "invocations": len(manifest.get("invocations", []))}
    shown = ["run_id", *grid_keys, "seed", "state", *results, *(["wall_time_s"] if "wall_time_s" in table else [])]
    rows = table[shown].to_dict("records")
    sections = [Section("Sweep", [("kv", overview, "overview")]),
                Section("Runs", [("table", shown, [[r[c] for c in shown] for r in rows], "sweep")])]
    sections.append(Section("Comparison", [("figure", f) for f in figures] or [("text", "no finished runs yet")]))
    fixed_config = (manifest.get("invocations") or [{}])[-1].get("sets") or {}
    if fixed_config:
        sections.append(Section("Fixed config (--set)", [("kv", fixed_config, "config")]))
    subtitle = f"sweep of {manifest.get('experiment')}, {len(table)} runs, store {store.root}"
    return Rendered("sweep", name, _page(f"lmech report: sweep {name}", subtitle, sections), figures)


# -- a verify output folder ----------------------------------------------------------------------------
VERIFY_SUMMARY_NAMES = ("verify.json", "checks.json")


def verify_summary_path(folder: Path) -> Path | None:
    """The JSON summary that ``lmech verify`` writes in its output folder, if ``folder`` has one."""
    for name in VERIFY_SUMMARY_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def read_verify(folder: Path) -> tuple[list[dict], dict[str, str], RunStore]:
    """``(check rows, entry -> run id, store)`` of a verify output folder.

    The rows carry the entry they belong to under ``entry`` (or ``experiment``/``name``); run ids
    come from a top-level ``runs`` mapping or from each row's ``run_id``; the store is the
    summary's ``store`` (relative to the folder) or the folder's ``runs`` subfolder.
    """
    path = verify_summary_path(folder)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable verify summary ({err}); run `lmech verify` again") from None
    rows = data if isinstance(data, list) else (data.get("checks") or data.get("rows") or [])
    entry_of = lambda r: r.get("entry") or r.get("experiment") or r.get("name") or ""  # noqa: E731
    runs = dict(data.get("runs") or {}) if isinstance(data, dict) else {}
    for row in rows:
        if row.get("run_id"):
            runs.setdefault(entry_of(row), row["run_id"])
    store = data.get("store") if isinstance(data, dict) else None
    root = (folder / store) if store else folder / "runs"
    return [{**r, "entry": entry_of(r)} for r in rows], runs, RunStore(root)


def render_verify(folder: Path) -> Rendered:
    """A verify run's report: every check row with PASS/FAIL, then each entry's curves and figures."""
    rows, runs, store = read_verify(folder)
    failed = sum(not r.get("passed") for r in rows)
    sections = [Section("Checks", [("checks", rows)])]
    figures: list[Figure] = []
    for entry, run_id in runs.items():
        try:
            _, run_secs, run_figs = run_sections(store, run_id, prefix=re.sub(r"[^A-Za-z0-9._-]", "_", entry) + "-")
        except KeyError:
            sections.append(Section(entry, [("text", f"run {run_id} is not in {store.root}")]))
            continue
        figures += run_figs
        sections.append(Section(f"{entry} ({run_id})", [b for sec in run_secs if sec.title == "Figures"
                                                         for b in sec.blocks]))
    subtitle = f"lmech verify: {len(rows)} checks, {failed} failing; {folder}"
    title = "lmech verify" if folder.name == "verify" else f"lmech verify: {folder.name}"
    return Rendered("verify", folder.name, _page(title, subtitle, sections), figures)


# -- writing ---------------------------------------------------------------------------------------
def write_report(rendered: Rendered, out: str | Path) -> Path:
    """Write ``out/report.html`` and ``out/figures/<name>.png`` (and ``.svg``); return the HTML path."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for fig in rendered.figures:
        (out / "figures" / f"{fig.name}.png").write_bytes(fig.png)
        if fig.svg is not None:
            (out / "figures" / f"{fig.name}.svg").write_bytes(fig.svg)
    path = out / "report.html"
    path.write_text(rendered.html, encoding="utf-8")
    return path


def resolve_target(target: str | Path, store: str | Path = "runs") -> tuple[str, RunStore, str | Path]:
    """``(kind, store, what)`` for ``lmech report TARGET`` (rules in the module docstring)."""
    store_obj = RunStore(Path(store))
    path = Path(target)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "run", RunStore(path.parent), path.name
        if verify_summary_path(path) is not None:
            return "verify", store_obj, path
        raise ConfigError(f"{path} is a folder but neither a run folder (no config.json) nor a `lmech verify` "
                          f"output folder (no {' or '.join(VERIFY_SUMMARY_NAMES)}); give a run id, a sweep name "
                          f"or one of those folders")
    name = str(target)
    if name and "/" not in name and (store_obj.root / "sweeps" / f"{name}.json").is_file():
        return "sweep", store_obj, name
    if name and not name.startswith(".") and not any(c in name for c in "/*?["):  # an id or a unique id prefix
        try:
            return "run", store_obj, store_obj.resolve(name).name
        except KeyError as err:
            if "ambiguous" in str(err):
                raise ConfigError(str(err).strip("'\"")) from None
    raise ConfigError(f"no run, sweep or verify folder {name!r} (store {store_obj.root}); `lmech runs --out "
                      f"{store_obj.root}` lists runs, `ls {store_obj.root}/sweeps` sweeps; use --store for another store")


def build_report(target: str | Path, out: str | Path | None = None, store: str | Path = "runs") -> Path:
    """Make the report of ``target`` (a run folder or id, a sweep name, or a verify output folder)
    and write it to ``out`` (default ``reports/<name>``). Returns the path of ``report.html``.
    Bad targets raise :class:`ConfigError` (one line) before anything is written."""
    kind, store_obj, what = resolve_target(target, store)
    if kind == "run":
        rendered = render_run(store_obj, what)
    elif kind == "sweep":
        rendered = render_sweep(store_obj, str(what))
    else:
        rendered = render_verify(Path(what))
    return write_report(rendered, Path(out) if out is not None else Path("reports") / rendered.name)


# -- HTML --------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;max-width:1180px;margin:1.5em auto;padding:0 1em}
h1{font-size:1.35em;margin-bottom:.1em}h2{font-size:1.08em;margin:1.6em 0 .5em;border-bottom:1px solid #e3e6ec;padding-bottom:.2em}
.sub{color:#6b7280;margin-top:0}table{border-collapse:collapse;margin:.3em 0;font-size:.93em}
th,td{text-align:left;padding:.22em .7em;border-bottom:1px solid #e3e6ec;vertical-align:top}th{color:#6b7280}
td.num{text-align:right;font-variant-numeric:tabular-nums}.pass{color:#13612f;font-weight:600}.fail{color:#a4161a;font-weight:600}
figure{margin:.8em 0}figure img{max-width:100%;border:1px solid #e3e6ec}figcaption{color:#6b7280;font-size:.9em}
"""


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def _cell(value, align_numbers: bool = True) -> str:
    import html

    numeric = align_numbers and isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{html.escape(_fmt(value))}</td>' if numeric else f"<td>{html.escape(_fmt(value))}</td>"


def _table(columns: list[str], rows: list[list], css: str, align_numbers: bool = True) -> str:
    import html

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v, align_numbers) for v in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _block(block: tuple) -> str:
    import base64
    import html

    kind = block[0]
    if kind == "kv":
        return _table(["key", "value"], [[k, v] for k, v in block[1].items()], block[2], align_numbers=False)
    if kind == "table":
        return _table(block[1], block[2], block[3])
    if kind == "checks":  # rows of CheckRow.as_dict(), with an "entry" column when the rows carry one
        keys = [*(["entry"] if any("entry" in c for c in block[1]) else []),
                "quantity", "predicted", "measured", "rel_err", "tolerance"]
        rows = "".join(
            "<tr>" + "".join(_cell(c.get(k)) for k in keys)
            + ('<td class="pass">PASS</td>' if c.get("passed") else '<td class="fail">FAIL</td>') + "</tr>"
            for c in block[1])
        head = "".join(f"<th>{h.replace('rel_err', 'rel. err')}</th>" for h in (*keys, "pass"))
        return f'<table class="checks"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
    if kind == "figure":
        fig: Figure = block[1]
        data = base64.b64encode(fig.png).decode()
        caption = html.escape(fig.caption or fig.name)
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>")
    if kind == "text":
        return f"<p>{html.escape(block[1])}</p>"
    raise ValueError(f"unknown report block {kind!r}")


def _page(title: str, subtitle: str, sections: list[Section]) -> str:
    import html

    body = "".join(f"<h2>{html.escape(s.title)}</h2>" + "".join(_block(b) for b in s.blocks) for s in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="sub">{html.escape(subtitle)}</p>{body}</body></html>\n')
