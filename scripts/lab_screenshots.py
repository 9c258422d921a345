"""Screenshots of a run report, a sweep report and the lab page for docs/results/ (headless Chromium).

    python scripts/lab_screenshots.py [--store /tmp/lmech-screenshots/runs] [--out docs/results]

Makes (or reuses) a small store: one grokking run of an MLP on (a + b) mod 31 with 60% of the pairs
(it groks in about 3,600 steps), and a sweep of the same setting over weight decay with 3 seeds;
writes their reports; serves ``lmech lab`` on a free port;
starts a playground run from the page (the ``label-noise`` entry when the catalog has it, else
``grokking``) and takes the lab screenshot while it runs and once it is done. Every process uses
one torch thread; about 2-4 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

GROK = {"model": "mlp", "op": "+", "p": 31, "train_fraction": 0.6, "steps": 6000, "width": 128, "batch_size": 128,
        "eval_every": 50, "lr": 3e-3, "weight_decay": 1.0}


def make_store(root: Path) -> tuple[str, str]:
    import torch

    torch.set_num_threads(1)
    from lmech.experiments import run_experiment
    from lmech.runs import RunStore
    from lmech.sweeps import run_sweep

    runs = RunStore(root).runs(experiment="grokking")
    done = runs[(runs["state"] == "done") & runs["sweep"].isna() & ~runs["id"].str.contains("-lab-")]
    run_id = done["id"].iloc[0] if len(done) else run_experiment("grokking", GROK, seed=0, out=root)["id"]
    sets = {k: v for k, v in GROK.items() if k != "weight_decay"}
    df = run_sweep("grokking", sets=sets, grid={"weight_decay": [0.3, 1.0, 3.0]}, seeds=3, workers=2, out=root,
                   progress=False)
    return run_id, df.attrs["sweep"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/lmech-screenshots/runs"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()

    from lmech.lab.browser import open_browser
    from lmech.report.build import build_report

    run_id, sweep = make_store(args.store)
    reports = args.store.parent / "reports"
    run_html = build_report(run_id, out=reports / "run", store=args.store)
    sweep_html = build_report(sweep, out=reports / "sweep", store=args.store)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmech.cli", "lab", "--out", str(args.store), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/api/info", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        with open_browser(width=1400, height=1000) as browser:
            page = browser.new_page()
            page.goto(run_html.as_uri())
            page.screenshot(path=str(args.out / "report-run.png"), full_page=True)
            page.goto(sweep_html.as_uri())
            page.screenshot(path=str(args.out / "report-sweep.png"), full_page=True)

            page.goto(url)
            page.wait_for_selector("#pg-steps", timeout=120_000)  # the form imports torch
            experiment = page.eval_on_selector("#pg-experiment", "e => e.value")
            if experiment == "label-noise":
                page.fill("#pg-noise", "0.3")
                page.fill("#pg-steps", "800")
            else:
                page.fill("#pg-steps", "2000")
            page.click("#pg-start")
            page.wait_for_function("location.hash.startsWith('#run=')")
            page.wait_for_function("document.querySelectorAll('#charts canvas').length > 1 && "
                                   "document.querySelector('#run-state').textContent === 'running'", timeout=120_000)
            page.wait_for_timeout(6_000)  # one more metric flush (every 5 s) into the live curves
            page.screenshot(path=str(args.out / "lab-live.png"))
            page.wait_for_function("document.querySelector('#run-state').textContent === 'done'", timeout=600_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "lab.png"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name in ("report-run.png", "report-sweep.png", "lab-live.png", "lab.png"):
        print(args.out / name)


if __name__ == "__main__":
    main()
