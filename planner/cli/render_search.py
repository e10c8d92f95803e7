"""Text for the draft search: one line on the chosen draft, and a table of every alternative."""

from __future__ import annotations

from itertools import groupby

from rich.table import Table

from planner.cli.render_fit import FitTable

from planner.solve.drafts import Candidate, SearchResult
from planner.units import fmt_seconds


def draft_summary(result: SearchResult) -> str:
    """'draft llama-3.2-1b, γ=6: E = 3.69 tokens per verify step (acceptance 0.80); predicted
    2.90x faster than the best plan without a draft (59.87 s -> 20.62 s)'."""
    best, base = result.best, result.no_draft_best
    drafted = [c for c in result.candidates if c.draft_name is not None]
    if best.draft_name is None:
        if not drafted:
            return "no draft: no draft candidates were given (add `drafts:` to the model file)"
        solved = [c for c in drafted if c.solution]
        if not solved:
            reasons = sorted({c.status if c.status != "infeasible" else f"does not fit ({c.infeasible_resource})"
                              for c in drafted})
            return f"no draft: no draft plan could be used ({'; '.join(reasons)})"
        alt = min(solved, key=lambda c: c.per_sequence_s)
        return (f"no draft: the best plan with one ({alt.draft_name}, γ={alt.gamma}, E = {alt.expected_tokens:.2f}) "
                f"is predicted {alt.per_sequence_s / best.per_sequence_s:.2f}x slower "
                f"({fmt_seconds(alt.total_s)} vs {fmt_seconds(best.total_s)})")
    head = (f"draft {best.draft_name}, γ={best.gamma}: E = {best.expected_tokens:.2f} tokens per verify step "
            f"(acceptance {best.acceptance:.2f})")
    if base is None:
        return f"{head}; no plan without a draft fits"
    return (f"{head}; predicted {result.speedup:.2f}x faster than the best plan without a draft "
            f"({fmt_seconds(base.total_s)} -> {fmt_seconds(best.total_s)})")


def alternatives_table(result: SearchResult) -> FitTable:
    """Draft x draft length (x batch): E, decode tok/s, total time, and whether it fits.
    Consecutive draft lengths of one draft that fail for the same reason share a row."""
    several_batches = len({c.batch for c in result.candidates}) > 1
    table = Table(title="Speculative decoding: alternatives", title_justify="left")
    table.add_column("draft", no_wrap=True)
    table.add_column("γ", justify="right", no_wrap=True)
    if several_batches:
        table.add_column("batch", justify="right", no_wrap=True)
    for column in ("acceptance", "E", "decode\ntok/s", "total time"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("fits")

    def row_key(c: Candidate):
        shared = c.status in ("infeasible", "needs acceptance")
        return (c.draft_name, c.batch, c.status, c.infeasible_resource) if shared else id(c)

    for _, group in groupby(result.candidates, key=row_key):
        rows = list(group)
        c = rows[0]
        gammas = f"{c.gamma}" if len(rows) == 1 else f"{c.gamma}-{rows[-1].gamma}"
        cells = [c.draft_name or "(none)", gammas if c.draft_name and c.gamma else "-"]
        if several_batches:
            cells.append(str(c.batch))
        cells += [f"{c.acceptance:.2f}" if c.acceptance is not None else "-",
                  f"{c.expected_tokens:.2f}" if len(rows) == 1 and c.status != "needs acceptance" else "-",
                  f"{c.decode_tokens_per_s:,.2f}" if c.solution else "-",
                  _total_text(c), "yes (chosen)" if c is result.best else _fits_text(c)]
        table.add_row(*cells, style="bold green" if c is result.best else None)
    return FitTable(table, optional=("acceptance",))


def _total_text(c: Candidate) -> str:
    if c.solution:
        return fmt_seconds(c.total_s)
    if c.status == "pruned":
        return f">= {fmt_seconds(c.lower_bound_s)}"
    return "-"


def _fits_text(c: Candidate) -> str:
    if c.status == "solved":
        return "yes"
    if c.status == "infeasible":
        return f"no ({c.infeasible_resource})"
    if c.status == "pruned":
        return "pruned: cannot win"
    return "acceptance: measure"
