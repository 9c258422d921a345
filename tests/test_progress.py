"""Run progress: a bar that fits the terminal and ends at 100% when a run stops early; plain lines
every few seconds when the output is not a terminal."""

import io
import re
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from lmech.experiments import run_experiment
from lmech.experiments.progress import RunProgress, headline

TINY = {"model": "mlp", "p": 11, "op": "+", "train_fraction": 0.5, "steps": 40, "eval_every": 10, "width": 16,
        "batch_size": 32}


class FakeRun:
    id = "grokking-20260101-120000-0123abcd"
    path = Path("runs") / id

    def __init__(self):
        self.on_log = []


def test_bar_fits_an_80_column_terminal_and_ends_at_100_percent_when_the_run_stops_early():
    buffer = io.StringIO()
    progress = RunProgress(Console(file=buffer, force_terminal=True, width=80, color_system=None))
    run = FakeRun()
    progress.start(run, SimpleNamespace(steps=50_000), "grokking")
    for step in (0, 5000, 12_300):  # the run stops early at step 12,300 of 50,000
        run.on_log[0](step, {"train_loss": 0.7693123, "test_acc": 0.0123, "test_loss": 4.5})
    progress.finish("done")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue()).replace("\r", "\n")  # drop cursor codes
    frames = [line for line in text.splitlines() if line.startswith("grokking ")]
    assert frames and all(len(line) <= 80 for line in frames), max(frames, key=len)
    assert "50000/50000" in frames[-1] and "train_loss 0.769" in frames[-1]


def test_without_a_step_count_the_bar_shows_the_step_alone():
    buffer = io.StringIO()
    progress = RunProgress(Console(file=buffer, force_terminal=True, width=80, color_system=None))
    run = FakeRun()
    progress.start(run, SimpleNamespace(), "deep-linear")
    run.on_log[0](3572, {"loss": 0.5})
    progress.finish("done")
    assert "None" not in buffer.getvalue() and "3572" in buffer.getvalue()


def test_piped_output_gets_a_line_every_interval_and_one_at_the_end(tmp_path):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=80)
    run_experiment("grokking", TINY, out=tmp_path, progress=RunProgress(console, every_s=0.0))
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("run grokking-") and "folder" in lines[0]
    steps = [line for line in lines if line.startswith("grokking: step ")]
    assert steps[0].startswith("grokking: step 0/40") and steps[-1].startswith("grokking: step 40/40")


def test_headline_shows_two_metrics_in_order():
    assert headline({"test_acc": 0.5, "train_loss": 0.123456, "loss": 2.0}) == "train_loss 0.123  loss 2"
