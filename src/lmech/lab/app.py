"""The lab's web application (Flask): JSON endpoints over one run store, and the page that uses them.

Endpoints (all JSON unless noted; errors are ``{"error": "<one line>"}`` with status 400, 404 or
409):

====================================  ============================================================
``GET /``                             the lab page (HTML; its script and uPlot under ``/static``)
``GET /api/info``                     the store, playground entries, poll interval
``GET /api/runs``                     runs, newest first (``?experiment=``, ``?sweep=``)
``GET /api/runs/<id>``                one run: config, provenance, status, result, checks, figures
``GET /api/runs/<id>/metrics``        its scalar metrics by step and their panel grouping
                                      (accuracies as error rates ``1 - acc``)
``GET /api/runs/<id>/figures/<name>`` one of its figure files (PNG or SVG)
``GET /api/sweeps``                   sweeps (from ``ROOT/sweeps/*.json``) with run counts by state
``GET /api/sweeps/<name>``            a sweep's table (:func:`lmech.sweeps.summary`)
``GET /api/playground/<experiment>``  the playground form of one entry
``POST /api/playground``              start a playground run; body ``{"experiment", "values", "seed"}``
``GET /runs/<id>/report``             the run's self-contained HTML report (made in memory)
``GET /sweeps/<name>/report``         the sweep's HTML report (made in memory)
====================================  ============================================================

Confinement: a run id or sweep name from a URL is never joined into a path as given. It must look
like a name (letters, digits, ``._+=-``, starting with a letter or digit, so no ``..`` and no
``/``) *and* be one of the names listed in the store folder (runs) or in ``ROOT/sweeps``; a figure
name must be one of the files listed in that run's ``figures`` folder. Static files go through
Flask's ``send_from_directory`` (``safe_join``). The playground takes no path at all and writes
only into the store. ``POST /api/playground`` only accepts a JSON body, which a page from another
origin cannot send without a CORS preflight that this app does not answer, so another site open in
the same browser cannot start runs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request, send_file, send_from_directory
from werkzeug.exceptions import HTTPException

from lmech.errors import ConfigError
from lmech.lab.playground import FORM_KEYS, Launcher, form_fields, playground_experiments, validate_form
from lmech.report.curves import metric_panels, with_errors
from lmech.report.data import read_metrics, run_view
from lmech.runs import RunStore

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,254}")
STATIC = Path(__file__).parent / "static"
POLL_MS = 1000


class LabError(Exception):
    """A request the lab refuses: ``status`` and a one-line message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf as ``null`` and numpy scalars as Python numbers (strict JSON for JS)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return obj.name
    return str(obj)


def _ok(payload: Any) -> Response:
    return jsonify(jsonable(payload))


class Lab:
    """The state behind the app: the run store and the playground launcher."""

    def __init__(self, root: str | Path, max_active: int = 1, python: str | None = None):
        self.root = Path(root).resolve()
        self.store = RunStore(self.root)
        self.launcher = Launcher(self.root, max_active=max_active, python=python)

    # -- confinement -----------------------------------------------------------------------------
    def run_folder(self, run_id: str) -> Path | None:
        """The folder of run ``run_id`` if it is one of the store's run folders, else None."""
        if not NAME_RE.fullmatch(run_id) or not self.root.is_dir():
            return None
        if run_id not in {p.name for p in self.root.iterdir()}:
            return None
        folder = self.root / run_id
        return folder if (folder / "config.json").is_file() else None

    def sweep_names(self) -> list[str]:
        folder = self.root / "sweeps"
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    def require_run(self, run_id: str) -> Path:
        folder = self.run_folder(run_id)
        if folder is None:
            raise LabError(404, f"no run {run_id!r} in the store {self.root}; pick one from the runs list")
        return folder

    def require_sweep(self, name: str) -> str:
        if not NAME_RE.fullmatch(name) or name not in self.sweep_names():
            raise LabError(404, f"no sweep {name!r} in the store {self.root}; pick one from the sweeps list")
        return name

    # -- views -----------------------------------------------------------------------------------
    def runs(self, experiment: str | None = None, sweep: str | None = None) -> list[dict]:
        if sweep is not None:
            self.require_sweep(sweep)
        df = self.store.runs(experiment=experiment or None, sweep=sweep)
        out = []
        for row in df.iloc[::-1].itertuples():
            config = json.loads(row.config) if isinstance(row.config, str) else {}
            out.append({"id": row.id, "experiment": row.experiment, "sweep": row.sweep, "seed": row.seed,
                        "state": row.state, "last_step": row.last_step, "created": row.created,
                        "message": row.message or "",
                        "params": {k: config[k] for k in FORM_KEYS if k in config}})
        known = {r["id"] for r in out}
        for run_id in self.launcher.active():  # started here, folder not created yet
            if run_id not in known and self.run_folder(run_id) is None:
                out.insert(0, {"id": run_id, "experiment": run_id.split("-lab-")[0], "sweep": None, "seed": None,
                               "state": "starting", "last_step": -1, "created": None, "message": "", "params": {}})
        return out

    def run(self, run_id: str) -> dict:
        folder = self.run_folder(run_id)
        if folder is None:
            pending = self.launcher.state(run_id) if NAME_RE.fullmatch(run_id) else None
            if pending is None:
                self.require_run(run_id)
            return {"id": run_id, "status": pending, "state": pending["state"], "config": {}, "result": {},
                    "checks": [], "figures": [], "provenance": {}}
        view = run_view(self.store, folder)
        return {"id": view.id, "experiment": view.experiment, "sweep": view.sweep, "seed": view.seed,
                "state": view.state, "status": view.status, "config": view.config, "provenance": view.provenance,
                "result": view.result, "checks": view.checks, "figures": [p.name for p in view.figures]}

    def metrics(self, run_id: str) -> dict:
        folder = self.run_folder(run_id)
        if folder is None:
            if NAME_RE.fullmatch(run_id) and self.launcher.state(run_id) is not None:
                return {"step": [], "series": {}, "panels": []}
            self.require_run(run_id)
        df = with_errors(read_metrics(self.store, folder, wide=True))
        if df.empty:
            return {"step": [], "series": {}, "panels": []}
        series = {c: df[c].to_numpy(float) for c in df.columns if c != "step"}
        return {"step": df["step"].to_numpy(), "series": series,
                "panels": [p.as_dict() for p in metric_panels(df)]}

    def figure(self, run_id: str, name: str) -> Path:
        folder = self.require_run(run_id)
        figures = {p.name: p for p in run_view(self.store, folder).figures}
        if name not in figures:
            raise LabError(404, f"run {run_id} has no figure {name!r}; it has {', '.join(figures) or 'none'}")
        return figures[name]

    def sweeps(self) -> list[dict]:
        from lmech.runs.manifests import read_manifest

        out = []
        for name in self.sweep_names():
            manifest = read_manifest(self.store, name) or {}
            ids = [e["run_id"] for e in manifest.get("runs", [])]
            states: dict[str, int] = {}
            for run_id in ids:
                state = self.store.status(run_id)["state"] if self.run_folder(run_id) else "missing"
                states[state] = states.get(state, 0) + 1
            out.append({"name": name, "experiment": manifest.get("experiment"), "runs": len(ids),
                        "grid_keys": manifest.get("grid_keys", []), "states": states})
        return out

    def sweep(self, name: str) -> dict:
        from lmech.runs.manifests import read_manifest, summary

        self.require_sweep(name)
        df = summary(name, out=self.root)
        manifest = read_manifest(self.store, name) or {}
        return {"name": name, "experiment": manifest.get("experiment"), "grid_keys": manifest.get("grid_keys", []),
                "columns": list(df.columns), "rows": df.to_dict("records")}

    def start(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise LabError(400, "send a JSON object {experiment, values, seed}")
        try:
            overrides, seed = validate_form(body.get("experiment"), body.get("values", {}), body.get("seed", 0))
        except ConfigError as err:
            raise LabError(400, str(err)) from None
        try:
            run_id = self.launcher.start(body["experiment"], overrides, seed)
        except RuntimeError as err:
            raise LabError(409, str(err)) from None
        return {"id": run_id, "experiment": body["experiment"], "overrides": overrides, "seed": seed}

    def report(self, run_id: str | None = None, sweep: str | None = None) -> str:
        from lmech.report.build import render_run, render_sweep

        if run_id is not None:
            return render_run(self.store, self.require_run(run_id).name).html
        return render_sweep(self.store, self.require_sweep(sweep)).html


def create_app(root: str | Path = "runs", max_active: int = 1, python: str | None = None) -> Flask:
    """The lab app over the run store ``root``. ``max_active``: playground runs at a time;
    ``python``: the interpreter that runs them (default: this one)."""
    app = Flask(__name__, static_folder=None)
    lab = Lab(root, max_active=max_active, python=python)
    app.extensions["lmech_lab"] = lab

    @app.errorhandler(LabError)
    def lab_error(err: LabError):
        return jsonify({"error": err.message}), err.status

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        if request.path.startswith("/api/"):
            return jsonify({"error": f"{err.name}: {request.path} (see GET / for the lab page)"}), err.code
        return err

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "lab.html")

    @app.get("/static/<path:filename>")
    def static_file(filename: str):
        return send_from_directory(STATIC, filename)

    @app.get("/api/info")
    def info():
        return _ok({"root": str(lab.root), "playground": playground_experiments(), "poll_ms": POLL_MS,
                    "max_active": lab.launcher.max_active})

    @app.get("/api/runs")
    def runs():
        return _ok({"runs": lab.runs(request.args.get("experiment"), request.args.get("sweep"))})

    @app.get("/api/runs/<run_id>")
    def run(run_id: str):
        return _ok(lab.run(run_id))

    @app.get("/api/runs/<run_id>/metrics")
    def metrics(run_id: str):
        return _ok(lab.metrics(run_id))

    @app.get("/api/runs/<run_id>/figures/<name>")
    def figure(run_id: str, name: str):
        return send_file(lab.figure(run_id, name), max_age=0)

    @app.get("/api/sweeps")
    def sweeps():
        return _ok({"sweeps": lab.sweeps()})

    @app.get("/api/sweeps/<name>")
    def sweep(name: str):
        return _ok(lab.sweep(name))

    @app.get("/api/playground/<experiment>")
    def playground_form(experiment: str):
        try:
            return _ok({"experiment": experiment, "fields": form_fields(experiment)})
        except ConfigError as err:
            raise LabError(404, str(err)) from None

    @app.post("/api/playground")
    def playground_start():
        if not request.is_json:
            raise LabError(400, "send the form as JSON (Content-Type: application/json)")
        body = request.get_json(silent=True)
        return _ok(lab.start(body)), 201

    @app.get("/runs/<run_id>/report")
    def run_report(run_id: str):
        return Response(lab.report(run_id=run_id), mimetype="text/html")

    @app.get("/sweeps/<name>/report")
    def sweep_report(name: str):
        return Response(lab.report(sweep=name), mimetype="text/html")

    return app


__all__ = ["Lab", "LabError", "create_app", "jsonable"]
