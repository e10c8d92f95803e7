"""Terminal Gantt chart of a timeline (simulated or measured) and the simulation summary.

One row per resource; each column is a time bin of width (end - start) / columns, marked with
the letter (and colour) of the kind of work that fills most of it: upper case when the
resource is busy at least half the bin, lower case when less, a dot when idle. Letters keep
the kinds apart without colour (a pipe, a log file, NO_COLOR).
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from planner.cli.render_fit import FitTable
from rich.text import Text

from planner.simulate.engine import SimResult
from planner.simulate.events import KINDS, RESOURCES, Event, event_kind
from planner.units import fmt_bytes, fmt_seconds

KIND_COLOURS = {"compute": "green", "stream": "blue", "transfer": "magenta", "cpu": "yellow", "memory": "red"}
KIND_WORDS = {"compute": "accelerator compute", "stream": "weight streaming", "transfer": "activation transfers",
              "cpu": "CPU compute", "memory": "host memory bandwidth"}
KIND_MARKS = {"compute": "A", "stream": "S", "transfer": "T", "cpu": "C", "memory": "M"}  # upper case: busy >= half the bin
IDLE = "·"
TICKS = 4  # intervals on the time axis


def _max_overlap(events: list[Event]) -> int:
    points = sorted([(e.start_s, 1) for e in events] + [(e.end_s, -1) for e in events])
    depth = best = 0
    for _, step in points:
        depth += step
        best = max(best, depth)
    return max(best, 1)


def _row(events: list[Event], t0: float, bin_s: float, cols: int) -> Text:
    occupancy = [dict.fromkeys(KINDS, 0.0) for _ in range(cols)]
    for e in events:
        kind = event_kind(e)
        first = min(int((e.start_s - t0) / bin_s), cols - 1)
        last = min(int((e.end_s - t0) / bin_s), cols - 1)
        for c in range(first, last + 1):
            lo, hi = t0 + c * bin_s, t0 + (c + 1) * bin_s
            occupancy[c][kind] += max(0.0, min(e.end_s, hi) - max(e.start_s, lo))
    capacity_s = bin_s * _max_overlap(events)
    row = Text()
    for cell in occupancy:
        busy = sum(cell.values()) / capacity_s
        if busy < 1e-3:
            row.append(IDLE, style="grey50")
        else:
            kind = max(cell, key=cell.get)
            mark = KIND_MARKS[kind] if busy >= 0.5 else KIND_MARKS[kind].lower()
            row.append(mark, style=KIND_COLOURS[kind])
    return row


def _axis(label_w: int, cols: int, t0: float, span_s: float) -> tuple[Text, Text]:
    marks = sorted({round(k * (cols - 1) / TICKS) for k in range(TICKS + 1)})
    axis = "".join("┬" if c in marks else "─" for c in range(cols))
    labels = [" "] * cols
    for m in marks:
        text = f"t={fmt_seconds(t0)}" if m == 0 else f"+{fmt_seconds(m / max(cols - 1, 1) * span_s)}"
        at = m if m + len(text) <= cols else cols - len(text)
        if all(ch == " " for ch in labels[max(at - 1, 0):at + len(text) + 1]):
            labels[at:at + len(text)] = list(text)
    return Text(" " * label_w + axis, style="grey50"), Text(" " * label_w + "".join(labels))


def gantt(events, width: int = 100, title: str = "") -> Group:
    """Rows per resource over the span of `events`, `width` characters wide in all."""
    events = [e for e in events if e.end_s > e.start_s]
    rows = list(RESOURCES) + sorted({e.resource for e in events} - set(RESOURCES))
    label_w = max(len(r) for r in rows) + 2
    cols = max(width - label_w, 10)
    parts = [Text(title, style="bold")] if title else []
    if not events:
        return Group(*parts, Text("(no events)"))
    t0 = min(e.start_s for e in events)
    span_s = max(e.end_s for e in events) - t0
    bin_s = span_s / cols
    for r in rows:
        line = Text(r.ljust(label_w), style="bold")
        line.append_text(_row([e for e in events if e.resource == r], t0, bin_s, cols))
        parts.append(line)
    parts += list(_axis(label_w, cols, t0, span_s))
    parts.append(Text("  ").join(Text.assemble((KIND_MARKS[k], KIND_COLOURS[k]), f" {KIND_WORDS[k]}") for k in KINDS))
    parts.append(Text.assemble((IDLE, "grey50"), " idle; lower case: busy less than half of the time bin"))
    return Group(*parts)


def _diff(sim_s: float, ilp_s: float) -> str:
    return f"{(sim_s - ilp_s) / ilp_s:+.1%}" if ilp_s > 0 else "—"


def summary_table(result: SimResult) -> FitTable:
    """Simulated against ILP step and prefill time, resource busy shares, what bounds the step."""
    table = Table(title="simulated vs ILP estimate", title_justify="left")
    table.add_column("", no_wrap=True)
    for header in ("simulated", "ILP", "difference"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_row("decode step", fmt_seconds(result.decode_step_s), fmt_seconds(result.ilp_decode_step_s),
                  _diff(result.decode_step_s, result.ilp_decode_step_s))
    table.add_row("prefill", fmt_seconds(result.prefill_s), fmt_seconds(result.ilp_prefill_s),
                  _diff(result.prefill_s, result.ilp_prefill_s))
    for r in RESOURCES:
        table.add_row(f"busy: {r}", f"{result.busy_fraction.get(r, 0.0):.0%}", "", "")
    path_s = sum(result.critical_by_kind_s.values())
    bound = result.decode_bound
    share = result.critical_by_kind_s[bound] / path_s if path_s > 0 else 0.0
    notes = [f"decode step bound by {KIND_WORDS[bound]} ({share:.0%} of its critical path)"]
    if result.per_stage_diff_s:
        stage, gap = max(result.per_stage_diff_s, key=lambda p: abs(p[1]))
        notes.append(f"largest stage difference: {stage} {'+' if gap >= 0 else '-'}{fmt_seconds(abs(gap))}")
    chunks = f", copies in {fmt_bytes(result.copy_chunk_bytes)} pieces" if result.copy_chunk_bytes else ""
    notes.append(f"{result.buffers} prefetch buffers ({result.prefetch}){chunks}, {result.cpu_workers} cpu worker(s)")
    table.caption, table.caption_justify = "\n".join(notes), "left"
    return FitTable(table)
