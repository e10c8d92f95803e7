"""The library's one way to plan: `solve_model(request) -> SolveResult`.

Everything `offplan solve` decides lives here, so the command only parses its flags, calls
this, and renders the result: which compensation ranks are offered (the model file, a
measured rank table, or neither), whether the model file's draft candidates are searched
or a single placement is solved, the plan file, the baselines for `--compare` and the
compensation report. Option validation lives in planner/solve/ilp.py (`check_options`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from planner.cost.compensation import CompensationTime, compensation_time
from planner.cost.evaluate import OptionTables, option_tables
from planner.cost.options import Scenario
from planner.errors import OffplanError
from planner.hardware.profile import HardwareProfile
from planner.model.modelfile import ModelFile
from planner.model.ranks import RankTable, compensation_settings, load_rank_table
from planner.model.spec import Workload
from planner.plan.record import Plan, make_plan
from planner.solve.baselines import BaselineResult, run_baselines
from planner.solve.drafts import SearchResult, search, search_plan
from planner.solve.ilp import Solution, SolverOptions, check_options
from planner.solve.quality import solve_compensated


@dataclass(frozen=True)
class SolveRequest:
    """What to plan. `compensation` is implied by a quality target in `options`."""

    model: ModelFile
    profile: HardwareProfile
    workload: Workload
    options: SolverOptions = SolverOptions()
    drafts: bool = True  # search the model file's draft candidates (when it lists any)
    acceptance: Mapping[str, float] = field(default_factory=dict)  # measured rates by draft name
    rank_table: RankTable | Path | None = None  # measured recovery per rank (`offplan sensitivity`'s ranks.yaml)
    compare: bool = False  # also score what other tools would pick
    progress: Callable[[str], None] | None = None  # one line per step of a draft search
    routing: dict[int, tuple[float, ...]] | None = None  # MoE layer -> routed tokens per expert (single solve)

    @property
    def compensated(self) -> bool:
        return self.options.quality is not None or self.options.quality_mode is not None


@dataclass(frozen=True)
class SolveResult:
    plan: Plan
    solution: Solution
    scenario: Scenario
    tables: OptionTables
    search: SearchResult | None = None  # the draft search, when one ran
    baselines: list[BaselineResult] | None = None  # with `compare`
    compensation: CompensationTime | None = None  # when compensation was offered


def solve_model(request: SolveRequest) -> SolveResult:
    """The fastest plan for `request` (and the best draft, when the model file lists drafts)."""
    spec = request.model.spec
    check_options(request.options, spec)
    if request.rank_table is not None and not request.compensated:
        raise OffplanError("--rank-table: give --quality too (max, or a fraction such as 0.5)")
    rank_choices, rank_recovery = (0,), {}
    if request.compensated:
        table = load_rank_table(request.rank_table) if isinstance(request.rank_table, Path) else request.rank_table
        rank_choices, rank_recovery = compensation_settings(spec, request.model.compensation, table)
    search_result = None
    if request.model.drafts and request.drafts:
        search_result = search(spec, request.profile, request.workload, request.model.drafts, request.options,
                               progress=request.progress, acceptance=request.acceptance,
                               rank_choices=rank_choices, rank_recovery=rank_recovery)
        scn, solution, plan = search_result.scenario, search_result.best.solution, search_plan(search_result)
    else:
        scn = Scenario(spec, request.profile, request.workload, rank_choices=rank_choices,
                       rank_recovery=rank_recovery, routing=request.routing)
        solution = solve_compensated(scn, request.options)
        plan = make_plan(scn, solution.placement, "ilp", solution.prediction, solution.solver, solution.status,
                         solution.solve_time_s, solution.objective_s)
    tables = option_tables(scn)
    return SolveResult(plan, solution, scn, tables, search_result,
                       run_baselines(scn, tables) if request.compare else None,
                       compensation_time(tables, plan.placement) if request.compensated else None)
