"""``lmech report`` and its pieces: panel grouping, sweep statistics, target resolution, the HTML."""

from __future__ import annotations

import base64
import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from report_store import shared_store
from typer.testing import CliRunner

from lmech.cli import app
from lmech.report import build
from lmech.report.curves import (curves_figure, log_steps, metric_panels, sweep_curves_figure, sweep_result_figure,
                                 with_errors)
from lmech.runs import load
from lmech.sweeps import summary

runner = CliRunner()


@pytest.fixture(scope="module")
def shared():
    return shared_store()


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# -- curves ----------------------------------------------------------------------------------------
def test_panels_group_by_meaning_then_by_prefix():
    df = pd.DataFrame({"step": [1, 10, 100, 1000], "train_acc": [0.1, 0.5, 0.9, 1.0], "test_acc": 0.5,
                       "train_loss": [10.0, 1.0, 0.1, 0.01], "poprisk": 1.0, "noise_channel": 0.3,
                       "signal_reservoir": 0.2, "noise_reservoir_fraction": 0.4, "noise_channel_soft": 0.1,
                       "lin_error": 0.01, "weight_norm": 3.0, "weight_rank": 2.0, "lr": 1e-3, "SA/energy": 1.0})
    panels = metric_panels(df)
    assert [(p.title, p.series, p.main) for p in panels] == [
        ("accuracy", ("train_acc", "test_acc"), True), ("loss", ("train_loss", "poprisk"), True),
        ("signal channel / reservoir", ("noise_channel", "signal_reservoir"), True),
        ("reservoir fraction", ("noise_reservoir_fraction",), True), ("energy", ("SA/energy",), True),
        ("lin", ("lin_error",), False), ("lr", ("lr",), False), ("noise", ("noise_channel_soft",), False),
        ("weight", ("weight_norm", "weight_rank"), False)]
    assert [p.logy for p in panels] == [False, True, False, False, False, False, False, False, False]  # loss: 3 decades
    assert log_steps(df["step"]) and not log_steps([0, 10, 50])


def test_errors_replace_accuracies():
    df = pd.DataFrame({"step": [0, 1], "train_acc": [0.25, 1.0], "acc": [0.5, 0.75], "loss": [1.0, 0.5]})
    out = with_errors(df)
    assert list(out.columns) == ["step", "train_error", "error", "loss"]
    assert out["train_error"].tolist() == [0.75, 0.0] and out["error"].tolist() == [0.5, 0.25]
    assert [p.title for p in metric_panels(out)] == ["error", "loss"]


def test_curves_figure_draws_every_series_and_nothing_for_an_empty_run():
    df = pd.DataFrame({"step": [0, 5, 10], "train_loss": [3.0, 2.0, np.nan], "test_acc": [0.1, 0.2, 0.3]})
    fig = curves_figure(df)
    drawn = {line.get_label(): line.get_ydata().tolist() for ax in fig.axes for line in ax.lines}
    assert drawn == {"test_acc": [0.1, 0.2, 0.3], "train_loss": [3.0, 2.0]}  # NaN rows dropped, not drawn as 0
    assert curves_figure(pd.DataFrame({"step": []})) is None


def test_sweep_result_figure_draws_median_and_min_max_over_seeds(shared):
    table = summary(shared.sweep, out=shared.root)
    fig = sweep_result_figure(table, ["lr"], "final_test_acc")
    (ax,) = fig.axes
    (line,) = ax.lines
    expected = table.groupby("lr")["final_test_acc"]
    assert line.get_xdata().tolist() == [1e-3, 1e-2] and ax.get_xscale() == "log"
    assert line.get_ydata().tolist() == pytest.approx(expected.median().tolist())
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(table["final_test_acc"].min())
    assert band.max() == pytest.approx(table["final_test_acc"].max())
    assert sorted(ax.collections[1].get_offsets()[:, 1]) == pytest.approx(sorted(table["final_test_acc"]))


def test_sweep_result_figure_with_two_grid_keys_draws_one_line_per_other_value():
    rows = [{"run_id": f"r{a}{b}{s}", "seed": s, "a": a, "b": b, "state": "done", "y": a * 10 + b + s}
            for a in (1, 2, 3) for b in (0, 5) for s in (0, 1, 2)]
    rows[0]["state"] = "failed"  # failed runs are left out
    rows[-1]["y"] = None  # a=3, b=5, seed 2 has no value (e.g. never reached the target): 2 of 3 counted
    table = pd.DataFrame(rows)
    fig = sweep_result_figure(table, ["a", "b"], "y")
    ax_a, ax_b = fig.axes
    assert [line.get_label() for line in ax_a.lines] == ["b=0", "b=5"]
    assert ax_a.lines[0].get_ydata().tolist() == [11.5, 21, 31]  # a=1,b=0: seeds 1, 2 only -> median 11.5
    assert ax_a.lines[1].get_ydata().tolist() == [16, 26, 35.5]
    assert [t.get_text() for t in ax_a.texts] == ["2/3"]  # the missing value is marked, the failed run is not
    assert [line.get_label() for line in ax_b.lines] == ["a=1", "a=2", "a=3"]


def test_sweep_curves_figure_medians_match_pandas(shared):
    table = summary(shared.sweep, out=shared.root)
    metrics = load(sweep=shared.sweep, root=shared.root, wide=True)
    fig = sweep_curves_figure(metrics, table, ["lr"], "test_loss")
    lines = fig.axes[0].lines
    assert [line.get_label() for line in lines] == ["lr=0.001 (n=2)", "lr=0.01 (n=2)"]
    merged = metrics[["run_id", "step", "test_loss"]].merge(table[["run_id", "lr"]], on="run_id")
    want = merged[merged.lr == 1e-2].groupby("step")["test_loss"].median()
    assert lines[1].get_xdata().tolist() == want.index.tolist()
    assert lines[1].get_ydata().tolist() == pytest.approx(want.tolist())


def test_sweep_figures_order_lines_by_grid_value_not_load_order():
    # runs load in no fixed order; the legend must not follow it (a CI failure once showed lr=0.01 first)
    rows = [{"run_id": f"r{lr}-{d}-{s}", "seed": s, "lr": lr, "depth": d, "state": "done", "y": lr + s}
            for lr in (0.01, 0.001, 0.1) for d in (4, 2) for s in (0, 1)]
    table = pd.DataFrame(rows)
    metrics = pd.DataFrame([{"run_id": r["run_id"], "step": step, "loss": r["y"] + step} for r in rows
                            for step in (1, 2)])
    for shuffled in (table, table.iloc[::-1], table.sample(frac=1, random_state=3)):
        fig = sweep_result_figure(shuffled, ["lr", "depth"], "y")
        assert [line.get_label() for line in fig.axes[0].lines] == ["depth=2", "depth=4"]
        assert [line.get_label() for line in fig.axes[1].lines] == ["lr=0.001", "lr=0.01", "lr=0.1"]
        curves = sweep_curves_figure(metrics.sample(frac=1, random_state=5), shuffled, ["lr"], "loss")
        assert [line.get_label() for line in curves.axes[0].lines] == ["lr=0.001 (n=4)", "lr=0.01 (n=4)",
                                                                       "lr=0.1 (n=4)"]


# -- targets and the CLI ---------------------------------------------------------------------------
def test_targets_resolve_to_runs_sweeps_and_folders(shared):
    assert build.resolve_target(shared.run_id, shared.root)[0::2] == ("run", shared.run_id)
    assert build.resolve_target(shared.run_id[:-4], shared.root)[0::2] == ("run", shared.run_id)  # unique prefix
    assert build.resolve_target(shared.root / shared.run_id, "elsewhere")[0::2] == ("run", shared.run_id)
    assert build.resolve_target(shared.sweep, shared.root)[0::2] == ("sweep", shared.sweep)


@pytest.mark.parametrize("target, message", [
    ("grokking-nosuch", "no run, sweep or verify folder 'grokking-nosuch'"),
    ("grokking-", "is ambiguous"),
    ("../secret", "no run, sweep or verify folder '../secret'"),
    ("*", "no run, sweep or verify folder '*'"),
    ("{root}", "is a folder but neither a run folder"),
    ("{root}/sweeps", "is a folder but neither a run folder"),
])
def test_bad_targets_exit_2_with_one_line_and_write_nothing(shared, tmp_path, target, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["report", target.format(root=shared.root), "--store", str(shared.root),
                                 "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_run_report_is_self_contained_with_checks_config_and_figures(shared, tmp_path):
    result = runner.invoke(app, ["report", shared.run_id, "--store", str(shared.root), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r" / "report.html").read_text()
    files = sorted(p.name for p in (tmp_path / "r" / "figures").iterdir())
    assert files == ["curves-other.png", "curves-other.svg", "curves.png", "curves.svg", "grokking.png"]
    pngs = _embedded_pngs(html)
    assert len(pngs) == 3 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert (tmp_path / "r" / "figures" / "grokking.png").read_bytes() in pngs
    assert "final held-out accuracy" in html and "FAIL" in html  # the check table
    assert "train_fraction" in html and "batch_size" in html  # the config
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from a network


def test_sweep_report_has_the_table_and_comparison_plots(shared, tmp_path):
    path = build.build_report(shared.sweep, out=tmp_path / "s", store=shared.root)
    html = path.read_text()
    assert all(run_id in html for run_id in shared.sweep_runs)
    names = sorted(p.stem for p in (tmp_path / "s" / "figures").glob("*.png"))
    assert "final_test_acc-vs-grid" in names and "test_acc-curves" in names
    assert len(_embedded_pngs(html)) == len(names)
    assert "median and min-max over seeds" in html
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_verify_folder_report_lists_every_check_and_each_entrys_figures(shared, tmp_path):
    folder = tmp_path / "verify-out"
    folder.mkdir()
    rows = [{"entry": "grokking", "quantity": "final held-out accuracy", "predicted": ">= 0.95", "measured": 0.04,
             "rel_err": None, "tolerance": "one-sided", "passed": False, "run_id": shared.run_id},
            {"entry": "other", "quantity": "slope", "predicted": -0.5, "measured": -0.49, "rel_err": 0.02,
             "tolerance": 0.1, "passed": True}]
    (folder / "verify.json").write_text(json.dumps({"store": str(shared.root), "checks": rows,
                                                     "runs": {"other": "other-nosuch"}}))
    assert build.resolve_target(folder)[0] == "verify"
    path = build.build_report(folder, out=tmp_path / "v")
    html = path.read_text()
    assert html.count('<td class="fail">FAIL</td>') == 1 and html.count('<td class="pass">PASS</td>') == 1
    assert "final held-out accuracy" in html and "slope" in html and "2 checks, 1 failing" in html
    assert "run other-nosuch is not in" in html
    assert sorted(p.name for p in (tmp_path / "v" / "figures").glob("*.png")) == [
        "grokking-curves-other.png", "grokking-curves.png", "grokking-grokking.png"]
