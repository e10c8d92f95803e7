"""Tables for `offplan run`: measured against predicted, and per-stage timings."""

from __future__ import annotations

from rich.table import Table

from planner.units import fmt_bytes, fmt_seconds


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return fmt_seconds(value)
    if unit == "bytes":
        return fmt_bytes(value)
    if unit == "":
        return f"{value:.2f}"
    return f"{value:,.2f} {unit}"


def comparison_table(rows: list[tuple[str, float, float, str]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col, justify in (("metric", "left"), ("predicted", "right"), ("measured", "right"), ("error", "right")):
        table.add_column(col, justify=justify)
    for name, predicted, measured, unit in rows:
        if not measured:
            table.add_row(name, _fmt(predicted, unit), _fmt(measured, unit), "-")
            continue
        error = 100.0 * (predicted - measured) / measured
        style = "green" if abs(error) <= 15 else ("yellow" if abs(error) <= 30 else "red")
        table.add_row(name, _fmt(predicted, unit), _fmt(measured, unit), f"[{style}]{error:+.1f}%[/]")
    return table


def stage_table(stages) -> Table:
    table = Table(title="Decode time per stage (mean per step)", title_justify="left")
    for col in ("stage", "predicted", "measured", "error", "host attention"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in stages:
        error = f"{100.0 * (s.predicted_s - s.measured_s) / s.measured_s:+.1f}%" if s.measured_s else "-"
        table.add_row(s.name, fmt_seconds(s.predicted_s), fmt_seconds(s.measured_s), error,
                      fmt_seconds(s.host_attention_s) if s.host_attention_s else "-")
    return table
