"""The two tables lmech prints results in: a GitHub markdown pipe table and the rich check table.

:func:`markdown_table` writes every markdown table of the library and its scripts (a comparison's
``table.md``, ``lmech verify``'s results table, the label-noise sweep table): a header row, a rule
row, one row per record, cells joined by ``" | "``; a ``|`` inside a cell is escaped as ``\\|`` so
it cannot split the cell. Callers format their own values (``fmt``): a comparison writes
``inf`` as "not reached", the label-noise table floats with three decimals.

:func:`check_table` is the table of :class:`~lmech.contract.checks.CheckRow` s that ``lmech run``
and ``lmech verify`` print: quantity, predicted, measured, relative error, tolerance, PASS/FAIL,
with an ``entry`` column first when the rows come from several entries. Text is shown as written
(rich markup in a quantity such as ``[0]`` is escaped).

Example:
    >>> print(markdown_table(["arm", "steps"], [["adamw", 1200], ["poprisk", float("inf")]],
    ...                      fmt=lambda v: "not reached" if v == float("inf") else str(v)))
    | arm | steps |
    |---|---|
    | adamw | 1200 |
    | poprisk | not reached |
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from lmech.contract.checks import CheckRow


def markdown_table(columns: Sequence[Any], rows: Iterable[Sequence[Any]], fmt: Callable[[Any], str] = str, *,
                   spaced_rule: bool = False) -> str:
    """A markdown pipe table: ``columns`` (shown with ``str``), then one line per row of ``rows``
    (each cell shown with ``fmt``). The rule row is ``|---|---|`` or, with ``spaced_rule``,
    ``| --- | --- |``. No trailing newline."""
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    header = [str(c) for c in columns]
    rule = line(["---"] * len(header)) if spaced_rule else "|" + "|".join("---" for _ in header) + "|"
    return "\n".join([line(header), rule, *(line(fmt(v) for v in row) for row in rows)])


def format_number(value: Any) -> str:
    """A check's predicted / measured / tolerance cell: floats with 4 significant digits, anything
    else (a bound such as ``">= 0.95"``, an int) as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def check_table(rows: Sequence[CheckRow], title: str = "checks", entries: Sequence[str] | None = None):
    """A ``rich.table.Table`` of check rows, one line each, PASS in green and FAIL in red; with
    ``entries`` (one name per row) an ``entry`` column comes first."""
    from rich.markup import escape
    from rich.table import Table

    columns = ["quantity", "predicted", "measured", "rel. err", "tolerance", "pass"]
    if entries is not None:
        if len(entries) != len(rows):
            raise ValueError(f"check_table: {len(entries)} entry names for {len(rows)} rows")
        columns.insert(0, "entry")
    table = Table(*columns, title=title)
    for i, r in enumerate(rows):
        cells = [escape(r.quantity), escape(format_number(r.predicted)), escape(format_number(r.measured)),
                 "" if r.rel_err is None else f"{r.rel_err:.3g}", escape(format_number(r.tolerance)),
                 "[green]PASS[/]" if r.passed else "[bold red]FAIL[/]"]
        if entries is not None:
            cells.insert(0, escape(str(entries[i])))
        table.add_row(*cells)
    return table


__all__ = ["check_table", "format_number", "markdown_table"]
