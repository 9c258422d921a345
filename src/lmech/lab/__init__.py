"""``lmech lab``: a local web page over the run store (needs the ``lab`` extra: ``pip install "lmech[lab]"``).

The page lists runs and sweeps, draws the curves of any run and keeps redrawing them while it
runs (it polls a JSON endpoint that reads the store through :mod:`lmech.runs`), links each run's
and sweep's HTML report, and has a label-noise playground: choose a task, a noise level and an
optimizer (the form of the ``label-noise`` experiment, or of ``grokking`` where that is all there
is), start a run in a background process and watch its error rates and signal-channel / reservoir
energies evolve. Built on Flask (:mod:`lmech.lab.app`); served by Werkzeug's threaded server on
127.0.0.1 by default.

>>> from lmech.lab import create_app                # doctest: +SKIP
>>> client = create_app("runs").test_client()       # doctest: +SKIP
>>> client.get("/api/runs").get_json()["runs"]      # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost")


class LabUnavailable(ImportError):
    """The ``lab`` extra (Flask) is not installed."""


def require_flask() -> None:
    try:
        import flask  # noqa: F401
    except ImportError:
        raise LabUnavailable('lmech lab needs Flask: pip install "lmech[lab]"') from None


def create_app(root: str | Path = "runs", max_active: int = 1, python: str | None = None,
               host: str | None = None):
    """The Flask app of the lab over the run store ``root`` (see :mod:`lmech.lab.app`).

    ``host``: the interface it will be served on. On a loopback host (127.0.0.1, localhost),
    requests whose ``Host`` header names any other host are refused with 400 (Flask's
    ``TRUSTED_HOSTS``): a page on another site that rebinds its DNS name to 127.0.0.1 cannot
    reach the lab.
    """
    require_flask()
    from lmech.lab.app import create_app as _create_app

    app = _create_app(root, max_active=max_active, python=python)
    if host in LOOPBACK:
        app.config["TRUSTED_HOSTS"] = list(LOOPBACK)
    return app


def serve(root: str | Path = "runs", host: str = "127.0.0.1", port: int = 8000, max_active: int = 1) -> None:
    """Serve the lab (Werkzeug's threaded server) until interrupted.

    The playground's experiment modules (torch and all) are imported in a background thread at
    start, so that the page's first form does not wait for them.
    """
    import threading

    from lmech.lab.playground import form_fields, playground_experiments

    app = create_app(root, max_active=max_active, host=host)
    threading.Thread(target=lambda: [form_fields(name) for name in playground_experiments()], daemon=True).start()
    app.run(host=host, port=port, threaded=True, debug=False, use_reloader=False)


__all__ = ["LabUnavailable", "create_app", "require_flask", "serve"]
