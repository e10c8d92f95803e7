"""Tables that stay readable in a narrow terminal (80 columns and up).

Rule for every table offplan prints: a key column (no_wrap: names to type back, figures) never
shrinks below its widest cell; the other columns wrap at word boundaries (a column with
overflow="fold", such as command-line flags, breaks long words instead of shortening them);
when even that is wider than the terminal, the table's optional columns are left out, the
last-named first, and the caption says which (the same data is in `--json`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Column, Table


FOLD_MIN_WIDTH = 20  # a folding column is given at least this much (its words break, none is lost)


class FitTable:
    """Render `table` so it fits the console width: see the module docstring.
    `optional`: headers of the columns that may be left out, most dispensable last."""

    def __init__(self, table: Table, optional: Sequence[str] = ()):
        self.table = table
        self.optional = tuple(optional)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield fit_table(self.table, console, options.max_width, self.optional)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, fit_table(self.table, console, options.max_width, self.optional))


def fit_table(table: Table, console: Console, max_width: int, optional: Sequence[str] = ()) -> Table:
    """A copy of `table` laid out for `max_width` characters (see the module docstring)."""
    dropped: list[str] = []
    candidates = [h for h in reversed(optional) if any(_header(c) == h for c in table.columns)]
    while True:
        laid_out = _layout(_without(table, dropped), console, max_width)
        if laid_out is not None:
            break
        if not candidates:
            laid_out = _without(table, dropped)  # nothing left to drop: let rich squeeze it
            break
        dropped.append(candidates.pop(0))
    if dropped:
        note = f"not shown at this width: {', '.join(dropped)} (widen the terminal or use --json)"
        laid_out.caption = f"{laid_out.caption}\n{note}" if laid_out.caption else note
        laid_out.caption_justify = "left"
    return laid_out


def _header(column: Column) -> str:
    return " ".join(str(column.header).split())


def _without(table: Table, headers: Sequence[str]) -> Table:
    out = copy.copy(table)
    kept = [c for c in table.columns if _header(c) not in headers]
    out.columns = [dataclasses.replace(c, _index=i) for i, c in enumerate(kept)]
    return out


def _cell_widths(console: Console, column: Column) -> tuple[int, int]:
    """(longest word, longest line) over the header and cells of `column`."""
    options = console.options.update_width(10**4)
    sizes = [Measurement.get(console, options, cell) for cell in (column.header, *column.cells)]
    return max(m.minimum for m in sizes), max(m.maximum for m in sizes)


def _layout(table: Table, console: Console, max_width: int) -> Table | None:
    """Fixed widths for the columns when the table would otherwise squeeze a key column or
    break a word; None when the key columns and the longest words alone do not fit."""
    padding = [table._get_padding_width(i) for i in range(len(table.columns))]
    room = max_width - table._extra_width - sum(padding)
    widths = [_cell_widths(console, c) for c in table.columns]
    fixed = [c.no_wrap or c.width is not None for c in table.columns]
    need = [w[1] if f else (min(w[0], FOLD_MIN_WIDTH) if c.overflow == "fold" else w[0])
            for w, f, c in zip(widths, fixed, table.columns)]
    if sum(need) > room:
        return None
    if sum(w[1] for w in widths) <= room:
        return table
    spare = room - sum(need)
    stretch = [0 if f else w[1] - w[0] for w, f in zip(widths, fixed)]
    total = sum(stretch) or 1
    grant = [need[i] + spare * stretch[i] // total for i in range(len(need))]
    out = copy.copy(table)
    out.columns = [dataclasses.replace(c, width=g, min_width=None, max_width=None, ratio=None)
                   for c, g in zip(table.columns, grant)]
    return out
