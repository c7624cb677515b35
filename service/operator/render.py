"""What the operator reads: admin API answers as tables (rich), or as JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

# Piped or captured output gets a wide page: a table wrapped at 80 columns is unreadable in a log.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # data: stdout
err = Console(stderr=True, soft_wrap=True)  # progress and errors: stderr, so `--json | jq` stays clean

_TIME_FIELDS = {"at", "created_at", "updated_at", "evaluated_at"}
# The compatibility report's figures, in the order a person compares them.
_REPORT_FIELDS = ("candidate", "incumbent", "base", "metric", "n", "score_old", "score_new", "nfr", "pfr",
                  "agreement", "mean_gain", "mean_regression", "perplexity_old", "perplexity_new",
                  "perplexity_base_drift", "perplexity_ratio")


def emit(value: Any, as_json: bool, title: str | None = None, columns: Iterable[str] | None = None) -> None:
    """`value` as JSON (scripts) or as tables (people)."""
    if as_json:
        out.print_json(json.dumps(value, default=str))
    elif isinstance(value, list):
        out.print(rows_table(value, columns, title))
    else:
        show(value, title)


def show(value: dict, title: str | None = None) -> None:
    """A record: its scalar fields as one table, each list of records or nested record as its own."""
    if {"report", "gate"} <= value.keys() and isinstance(value["report"], dict):
        show({k: v for k, v in value.items() if k not in ("report", "gate")}, title)
        report(value["report"], value["gate"])
        return
    scalars = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
    if scalars:
        table = Table(title=title, show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for key, item in scalars.items():
            table.add_row(key, cell(key, item))
        out.print(table)
    for key, item in value.items():
        if isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            out.print(rows_table(item, None, key))
        elif isinstance(item, list):
            out.print(f"[bold]{key}[/]: {', '.join(map(str, item)) or '—'}")
        elif isinstance(item, dict) and item:
            show(item, key)


def report(summary: dict, gate: dict | None) -> None:
    """A compatibility report (candidate against incumbent) and the gate's verdict on it."""
    table = Table(title="compatibility report", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in _REPORT_FIELDS:
        if key in summary:
            table.add_row(key, cell(key, summary[key]))
    out.print(table)
    if gate:
        verdict = "[green]passed[/]" if gate.get("passed") else "[red]refused[/]"
        reasons = "; ".join(gate.get("reasons") or [])
        out.print(f"gate: {verdict}{' — ' + reasons if reasons else ''}")
        if gate.get("note"):
            out.print(f"note: {gate['note']}")


def rows_table(rows: list[dict], columns: Iterable[str] | None = None, title: str | None = None) -> Table:
    """One row per record; the columns are `columns` or every scalar field the records have."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (dict, list))]
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(cell(c, row.get(c)) for c in columns))
    return table


def cell(key: str, value: Any) -> str:
    """One value as a person reads it: times as local dates, ratios to three decimals."""
    if value is None:
        return "—"
    if key in _TIME_FIELDS and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)
