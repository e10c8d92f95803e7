"""Compensation quality on top of the placement MILP (planner/solve/ilp.py).

`quality=R` (SolverOptions) keeps the fastest plan whose mean recovered error fraction is at
least R; `quality_mode="max"` recovers the most error while the total time stays within
`slack` of the uncompensated optimum: solve without ranks, maximise recovery under that time
budget, then take the fastest plan recovering that much.
"""

from __future__ import annotations

from dataclasses import replace

from planner.cost.options import Scenario
from planner.errors import InfeasiblePlanError, OffplanError
from planner.solve.ilp import QUALITY_MODES, Solution, SolverOptions, check_quality, solve_placement
from planner.cost.evaluate import OptionTables, option_tables

_REL_TOL = 1e-9  # rounding slack between the ILP's sums and predict()'s


def solve_compensated(scn: Scenario, options: SolverOptions = SolverOptions(),
                      tables: OptionTables | None = None) -> Solution:
    """Solve with the compensation quality the options ask for.

    Without `quality_mode` this is solve_placement. With "max", lexicographically: (1) the
    fastest plan without compensation (rank 0 everywhere: time T0); (2) the most recovered
    error R* of any plan whose total time is at most (1 + slack) x T0; (3) the fastest plan
    within that time recovering R*. Step 3 is skipped when R* is 0 (plan 1 is the answer).
    `solve_time_s` covers every solve."""
    tables = tables or option_tables(scn)
    if options.quality_mode is None:
        return solve_placement(scn, options, tables)
    check_quality(tables, options)
    plain = replace(options, quality_mode=None, quality=None, time_budget_s=None)
    first = solve_placement(scn, plain, uncompensated(tables))
    if not has_rank_choices(tables):
        return first
    # The uncompensated optimum must stay feasible despite rounding between ILP and predict().
    budget_s = (1.0 + options.slack) * max(first.prediction.total_s, first.objective_s) * (1.0 + _REL_TOL)
    second = solve_placement(scn, replace(options, time_budget_s=budget_s), tables)
    spent_s = first.solve_time_s + second.solve_time_s
    best = second.prediction.recovered_error
    if best <= _REL_TOL:
        return replace(first, solve_time_s=spent_s)
    try:
        third = solve_placement(scn, replace(plain, quality=best * (1.0 - _REL_TOL), time_budget_s=budget_s), tables)
    except InfeasiblePlanError:  # only a time limit can get here: keep the plan of step 2
        return replace(second, solve_time_s=spent_s)
    spent_s += third.solve_time_s
    better = third.prediction.total_s <= second.prediction.total_s
    return replace(third if better else second, solve_time_s=spent_s)


def uncompensated(tables: OptionTables) -> OptionTables:
    """The same tables with only the rank-0 options (no compensation branch)."""
    return replace(tables, tensor={name: [o for o in opts if o.rank == 0] for name, opts in tables.tensor.items()})


def has_rank_choices(tables: OptionTables) -> bool:
    return any(o.rank > 0 for opts in tables.tensor.values() for o in opts)


def parse_quality(text: str | None) -> tuple[str | None, float | None]:
    """`--quality` -> (quality_mode, quality): 'max' -> ("max", None), '0.6' -> (None, 0.6)."""
    if text is None:
        return None, None
    if text.strip().lower() in QUALITY_MODES:
        return text.strip().lower(), None
    try:
        value = float(text)
    except ValueError:
        raise OffplanError(f"--quality: expected 'max' or a recovered-error fraction between 0 and 1, "
                           f"got {text!r}") from None
    return None, value  # its range is checked with the other options (ilp.check_options)
