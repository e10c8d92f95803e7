"""Tables for `offplan run`: measured against predicted, and per-stage timings."""

from __future__ import annotations

from rich.table import Table

from planner.cli.render_fit import FitTable

from planner.units import error_pct, fmt_bytes, fmt_seconds


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return fmt_seconds(value)
    if unit == "bytes":
        return fmt_bytes(value)
    if unit == "":
        return f"{value:.2f}"
    return f"{value:,.2f} {unit}"


def comparison_table(rows: list[tuple[str, float, float, str]], title: str) -> FitTable:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for col in ("predicted", "measured", "error"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, predicted, measured, unit in rows:
        if not measured:
            table.add_row(name, _fmt(predicted, unit), _fmt(measured, unit), "-")
            continue
        error = error_pct(predicted, measured)
        style = "green" if abs(error) <= 15 else ("yellow" if abs(error) <= 30 else "red")
        table.add_row(name, _fmt(predicted, unit), _fmt(measured, unit), f"[{style}]{error:+.1f}%[/]")
    return FitTable(table)


def stage_table(stages) -> FitTable:
    table = Table(title="Decode time per stage (mean per step)", title_justify="left")
    table.add_column("stage", no_wrap=True)
    for col in ("predicted", "measured", "error", "host\nattention"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in stages:
        error = f"{error_pct(s.predicted_s, s.measured_s):+.1f}%" if s.measured_s else "-"
        table.add_row(s.name, fmt_seconds(s.predicted_s), fmt_seconds(s.measured_s), error,
                      fmt_seconds(s.host_attention_s) if s.host_attention_s else "-")
    return FitTable(table)
