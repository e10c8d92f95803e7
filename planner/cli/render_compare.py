"""The table of `offplan compare`: one row per hardware profile."""

from __future__ import annotations

from rich.table import Table

from planner.cli.render_fit import FitTable

from planner.cli.render import RESOURCE_WORDS
from planner.units import fmt_bytes, fmt_seconds


def hardware_table(rows) -> FitTable:
    """rows: (label, profile, prediction or None, reason it does not fit). The profile name is
    never shortened; narrow terminals lose the price column first."""
    table = Table(title="Best plan per hardware profile", title_justify="left")
    table.add_column("profile", no_wrap=True)
    table.add_column("VRAM", justify="right", no_wrap=True)
    table.add_column("fits")
    for col in ("time to\nfirst token", "decode\ntok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("bound by")
    table.add_column("tok/s per\n$1000", justify="right", no_wrap=True)
    for label, profile, prediction, reason in rows:
        vram = fmt_bytes(profile.accelerator.memory_bytes) if profile.accelerator.present else "none"
        if prediction is None:
            table.add_row(label, vram, f"[red]no[/]: {reason.split(';')[0]}", "-", "-", "-", "-")
            continue
        per_k = (f"{prediction.decode_tokens_per_s / profile.price_usd * 1000:.2f}"
                 if profile.price_usd else "-")
        table.add_row(label, vram, "yes", fmt_seconds(prediction.ttft_s),
                      f"{prediction.decode_tokens_per_s:,.2f}", RESOURCE_WORDS[prediction.bound("decode")], per_k)
    return FitTable(table, optional=("bound by", "tok/s per $1000"))
