"""lmech.contract.tables: the one markdown writer and the one rich check table give, byte for byte,
what the writers they replaced gave (issue 15). The old writers are copied here verbatim as the
reference."""

from __future__ import annotations

import doctest
import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmech.compare import markdown_table as compare_markdown
from lmech.contract import CheckRow, tables
from lmech.contract.tables import check_table, markdown_table
from lmech.report.signal_reservoir import markdown_table as label_noise_markdown
from lmech.verify import VerifyResult, VerifyRow, checks_table

ROOT = Path(__file__).resolve().parents[1]


# ----- the old writers (before issue 15), verbatim -------------------------------------------

def old_compare_markdown(df) -> str:
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return "not reached" if math.isinf(v) else f"{v:.4g}"
        return str(v)

    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.to_dict("records"):
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def old_label_noise_markdown(df, floatfmt: str = ".3f") -> str:
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "nan" if not np.isfinite(v) else format(float(v), floatfmt)
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def old_fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def old_verify_markdown(rows) -> str:
    lines = ["| entry | quantity | predicted | measured | rel. err | tolerance | pass |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r.row
        rel = "" if c.rel_err is None else f"{c.rel_err:.3g}"
        cells = [r.entry, c.quantity, old_fmt(c.predicted), old_fmt(c.measured), rel, old_fmt(c.tolerance),
                 "PASS" if c.passed else "**FAIL**"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def old_poprisk_fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "not reached"
        return str(int(v)) if v.is_integer() and abs(v) < 1e9 else f"{v:.4g}"
    return str(v)


def old_poprisk_table(df, cols) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.to_dict("records"):
        lines.append("| " + " | ".join(old_poprisk_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def old_cli_checks_table(rows) -> Table:
    table = Table("quantity", "predicted", "measured", "rel. err", "tolerance", "pass", title="checks")
    for r in rows:
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        table.add_row(escape(r.quantity), escape(fmt(r.predicted)), escape(fmt(r.measured)),
                      "" if r.rel_err is None else f"{r.rel_err:.3g}",
                      escape(fmt(r.tolerance)), "[green]PASS[/]" if r.passed else "[red]FAIL[/]")
    return table


def old_verify_checks_table(rows, title: str = "lmech verify") -> Table:
    table = Table("entry", "quantity", "predicted", "measured", "rel. err", "tolerance", "pass", title=title)
    for r in rows:
        c = r.row
        table.add_row(r.entry, c.quantity, old_fmt(c.predicted), old_fmt(c.measured),
                      "" if c.rel_err is None else f"{c.rel_err:.3g}", old_fmt(c.tolerance),
                      "[green]PASS[/]" if c.passed else "[bold red]FAIL[/]")
    return table


# ----- inputs like the real ones ---------------------------------------------------------------

@pytest.fixture
def comparison_frame():
    return pd.DataFrame({"arm": ["adamw", "poprisk:snr", "grokfast"], "lr": [1e-3, 3e-3, 1e-2],
                         "median step_to_95": [1200.0, float("inf"), float("nan")],
                         "reached": ["3/3", "0/3", "1/3"], "median final_test_acc": [0.9934, 0.51, None],
                         "seeds": ["0,1,2", "0,1,2", "0,1,2"]})


@pytest.fixture
def check_rows():
    return [CheckRow.relative("top Hessian eigenvalue", 2 / 0.01, 198.7654321, 0.05),
            CheckRow.at_least("final held-out accuracy", 0.95, 0.9934),
            CheckRow.at_most("loss at the end", 0.1, None),
            CheckRow("exponent alpha", 1.0, 1.37, 0.2, False, 0.37),
            CheckRow("steps", 100, 120, "exact", False)]


def test_doctests():
    assert doctest.testmod(tables, raise_on_error=True).attempted > 0


def test_comparison_table_is_byte_identical(comparison_frame):
    assert compare_markdown(comparison_frame) == old_compare_markdown(comparison_frame)
    assert "not reached" in compare_markdown(comparison_frame)


def test_label_noise_table_is_byte_identical():
    df = pd.DataFrame({"noise": [0.0, 0.2, 0.4], "seed": [0, 0, 1], "final_test_error": [0.01234, np.nan, 0.5],
                       "noise_reservoir_fraction_final": np.array([0.9, 0.95, np.inf], dtype=np.float32),
                       "state": ["done", "done", "diverged"]})
    assert label_noise_markdown(df) == old_label_noise_markdown(df)
    assert label_noise_markdown(df, floatfmt=".1e") == old_label_noise_markdown(df, floatfmt=".1e")


def test_verify_markdown_is_byte_identical(check_rows):
    rows = [VerifyRow("edge-of-stability", "r1", check_rows[0]), VerifyRow("grokking", "r2", check_rows[1]),
            VerifyRow("a|b entry", None, check_rows[2]), VerifyRow("scaling-law", "r4", check_rows[3]),
            VerifyRow("quanta", "r5", check_rows[4])]
    result = VerifyResult(rows, {}, {}, Path("."), Path("verify.json"), None, True, 0, {})
    assert result.markdown() == old_verify_markdown(rows)
    assert "a\\|b entry" in result.markdown()


def test_poprisk_study_table_is_byte_identical():
    spec = importlib.util.spec_from_file_location("poprisk_study", ROOT / "scripts" / "poprisk_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    df = pd.DataFrame({"arm": ["adamw", "poprisk"], "seed": [0, 1], "state": ["done", "running"],
                       "step_to_95": [4500.0, float("inf")], "final_test_acc": [0.99341, None]})
    cols = ["arm", "seed", "state", "step_to_95", "final_test_acc"]
    assert study._table(df, cols) == old_poprisk_table(df, cols)


def render(table: Table, color: bool) -> str:
    console = Console(width=100, record=True, force_terminal=color, color_system="truecolor" if color else None)
    console.print(table)
    return console.export_text(styles=color)


def test_run_check_table_is_byte_identical(check_rows):
    from lmech.cli import checks_table as cli_checks_table

    assert render(cli_checks_table(check_rows), color=False) == render(old_cli_checks_table(check_rows), False)


def test_verify_check_table_is_byte_identical(check_rows):
    rows = [VerifyRow(e, None, r) for e, r in zip(["deep-linear", "mup", "quanta", "lazy-rich", "grokking"], check_rows)]
    for color in (False, True):
        assert render(checks_table(rows), color) == render(old_verify_checks_table(rows), color)


def test_markup_in_a_quantity_is_shown_as_written():
    rows = [CheckRow("lambda[0] of [bold]H[/bold]", 1.0, 1.0, 0.1, True, 0.0)]
    assert "lambda[0] of [bold]H[/bold]" in render(check_table(rows), color=False)


def test_markdown_table_rules_and_escapes():
    assert markdown_table(["a", 1], [["x|y", 2.5]]) == "| a | 1 |\n|---|---|\n| x\\|y | 2.5 |"
    assert markdown_table(["a"], [], spaced_rule=True) == "| a |\n| --- |"


def test_check_table_needs_one_entry_per_row(check_rows):
    with pytest.raises(ValueError, match="5 rows"):
        check_table(check_rows, entries=["only-one"])
