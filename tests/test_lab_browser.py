"""Reports and the lab page in headless Chromium (Debian's package, driven by Playwright).

Skips, with the reason, where chromium or playwright is missing; .ci/run installs both.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from lmech.lab.browser import open_browser, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")

pytest.importorskip("flask", reason="the lab extra is not installed (pip install 'lmech[lab]')")

from report_store import shared_store  # noqa: E402

from lmech.report import build as report_build  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    with open_browser() as context:
        yield context


def offline_page(browser):
    """A page that records every request that is not to the local lab, a file or a data: URL."""
    page = browser.new_page()
    page.external = []
    page.errors = []
    page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "http://127.0.0.1"))
            else page.external.append(r.url))
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    return page


def check_images(page, at_least: int) -> list[str]:
    """Every <img> has loaded (natural width > 0); returns their alt texts."""
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete && e.naturalWidth])")
    assert len(images) >= at_least, images
    assert all(width and width > 100 for _, width in images), images
    return [alt for alt, _ in images]


def test_run_and_sweep_reports_render_offline(browser, tmp_path):
    shared = shared_store()
    run_html = report_build.build_report(shared.run_id, out=tmp_path / "run", store=shared.root)
    page = offline_page(browser)
    page.goto(run_html.as_uri())
    assert shared.run_id in page.title()
    alts = check_images(page, 2)  # the metric curves and the run's own grokking figure
    assert any("curves" in a for a in alts) and any("grokking" in a for a in alts)
    checks = page.inner_text("table.checks")
    assert "final held-out accuracy" in checks and "FAIL" in checks
    assert "train_fraction" in page.inner_text("table.config")
    assert page.external == [] and page.errors == []
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)
    assert (tmp_path / "run.png").stat().st_size > 20_000

    sweep_html = report_build.build_report(shared.sweep, out=tmp_path / "sweep", store=shared.root)
    page.goto(sweep_html.as_uri())
    alts = check_images(page, 2)
    assert any("vs lr" in a for a in alts)
    runs_table = page.inner_text("table.sweep")
    assert all(run_id in runs_table for run_id in shared.sweep_runs)
    assert page.external == [] and page.errors == []
    page.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def lab_server(tmp_path):
    """``lmech lab`` (the real command) over a copy of the shared store, on a free local port."""
    shared = shared_store()
    root = tmp_path / "runs"
    shutil.copytree(shared.root, root)
    port = free_port()
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lmech.cli", "lab", "--out", str(root), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/api/info", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError((tmp_path / "lab.log").read_text())
            time.sleep(0.3)
    yield url, root, shared
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_lab_page_lists_shows_curves_and_runs_the_playground(browser, lab_server):
    url, root, shared = lab_server
    page = offline_page(browser)
    page.goto(url)
    page.wait_for_selector(f"#runs-table tr[data-run-id='{shared.run_id}']")
    page.wait_for_selector(f"#sweeps-table tr[data-sweep='{shared.sweep}']")

    # a finished run: its curves (uPlot canvases), tables and figure
    page.click(f"#runs-table tr[data-run-id='{shared.run_id}']")
    page.wait_for_selector("#charts .chart[data-panel='error'] canvas")
    assert page.inner_text("#run-state") == "done"
    assert "final held-out accuracy" in page.inner_text("#checks-table")
    check_images(page, 1)

    # a sweep: its table
    page.click(f"#sweeps-table tr[data-sweep='{shared.sweep}']")
    page.wait_for_selector("#sweep-table")
    assert all(run_id in page.inner_text("#sweep-table") for run_id in shared.sweep_runs)

    # the playground (label-noise) refuses a bad value with the config's own message, then runs a good one
    page.wait_for_selector("#pg-noise", timeout=120_000)  # the form's first load imports torch
    assert page.eval_on_selector("#pg-experiment", "e => e.value") == "label-noise"
    page.fill("#pg-noise", "0.7")
    page.click("#pg-start")
    page.wait_for_selector("#pg-error:not([hidden])")
    assert "noise (flip fraction q) must be in [0, 0.5)" in page.inner_text("#pg-error")
    page.fill("#pg-noise", "0.3")
    page.fill("#pg-steps", "40")
    page.fill("#pg-width", "32")
    page.select_option("#pg-optimizer", "gd")
    page.click("#pg-start")
    page.wait_for_function("location.hash.startsWith('#run=label-noise-lab-')")
    run_id = page.evaluate("decodeURIComponent(location.hash.slice(5))")
    page.wait_for_function("document.querySelector('#run-state').textContent === 'done'", timeout=240_000)
    page.wait_for_selector("#charts .chart[data-panel='error'] canvas")
    page.wait_for_selector("#charts .chart[data-panel='signal channel / reservoir'] canvas")
    page.wait_for_selector("#report-link", state="visible", timeout=60_000)
    assert (root / run_id / "metrics.parquet").exists()
    assert page.external == [] and page.errors == []
    page.close()
