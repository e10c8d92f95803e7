"""The planner's outer loop (DESIGN §4): draft model x draft length x batch -> best ILP plan.

Every combination is one placement ILP (planner.solve.ilp). Big models take seconds per ILP, and a
search over a few drafts x 8 draft lengths is dozens of them, so the search is a best-first
branch and bound over combinations:

1. Each combination's ILP is built and its LP relaxation (integrality dropped) solved, which
   takes milliseconds. The ILP's feasible set lies inside the relaxation's and the objective
   is the same, so the LP optimum is a lower bound on the ILP optimum. Combinations that
   cannot fit at all (`check_lower_bounds`, or an infeasible relaxation) are recorded as
   infeasible with the solver's reason.
2. The plans without a draft are solved: they are the reference for the speed-up and the
   first incumbent.
3. The others are solved in increasing order of their bound; as soon as the next bound is
   no better than the best plan found, no remaining combination can beat it and the rest are
   recorded as pruned. The answer is the one exhaustive solving gives (up to exact ties).

A closed-form bound (e.g. the no-draft optimum scaled by E) would need every placement's
step time to grow with the verify width, which a link bandwidth curve rising steeply with
transfer size does not guarantee; the LP bound needs no such assumption.

Combinations are compared by seconds per sequence (`Prediction.total_s / batch`), which is
the total workload time when a single batch size is searched. Under `quality_mode="max"` the
ILP maximises recovered quantization error instead of minimising time, so its relaxation
bounds nothing about time: every combination is then solved (`solve_compensated`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping, Sequence

import pulp

from planner.cost.options import Scenario
from planner.errors import InfeasiblePlanError, OffplanError
from planner.hardware.profile import HardwareProfile
from planner.solve.ilp import Solution, SolverOptions, check_lower_bounds, pick_solver
from planner.solve.problem import MS, build_problem
from planner.solve.quality import solve_compensated
from planner.model.modelfile import DraftCandidate
from planner.plan.record import Plan, make_plan
from planner.cost.evaluate import OptionTables, option_tables
from planner.cost.roofline import expected_tokens_per_step
from planner.model.spec import ModelSpec, Workload
from planner.units import fmt_seconds

DEFAULT_GAMMAS = range(1, 9)
# A combination is pruned only when its bound exceeds the incumbent by more than the LP
# solver's relative tolerance, so numerical noise never discards a combination that ties.
BOUND_RTOL = 1e-6


@dataclass(frozen=True)
class Candidate:
    """One combination of the search and what became of it.

    status: `solved` (solution set), `infeasible` (infeasible_reason set), `pruned` (its lower
    bound could not beat the best plan; skipped_reason says so) or `needs acceptance` (the
    draft's acceptance is 'measure' and no measured value was given)."""

    draft_name: str | None  # None = no draft
    gamma: int  # draft length; 0 without a draft
    batch: int
    solution: Solution | None
    infeasible_reason: str = ""
    expected_tokens: float = 1.0  # E: tokens per verify step and sequence
    acceptance: float | None = None  # per-token acceptance rate assumed
    lower_bound_s: float = 0.0  # LP-relaxation bound on the total time (0 = none computed)
    skipped_reason: str = ""
    infeasible_resource: str = ""  # the resource that ran out ("accelerator memory", ...)

    @property
    def status(self) -> str:
        if self.solution is not None:
            return "solved"
        if self.infeasible_reason:
            return "infeasible"
        if self.draft_name is not None and self.acceptance is None:
            return "needs acceptance"
        return "pruned"

    @property
    def fits(self) -> bool:
        return self.solution is not None

    @property
    def total_s(self) -> float:
        """Predicted time of the whole workload (inf when not solved)."""
        return self.solution.prediction.total_s if self.solution else math.inf

    @property
    def per_sequence_s(self) -> float:
        """What the search minimises: total time / batch."""
        return self.total_s / self.batch

    @property
    def decode_tokens_per_s(self) -> float:
        return self.solution.prediction.decode_tokens_per_s if self.solution else 0.0

    @property
    def label(self) -> str:
        name = "no draft" if self.draft_name is None else f"{self.draft_name} γ={self.gamma}"
        return f"{name}, batch {self.batch}"


@dataclass(frozen=True)
class SearchResult:
    best: Candidate
    no_draft_best: Candidate | None  # the best plan without a draft (None if none fits)
    candidates: tuple[Candidate, ...]  # every combination, in enumeration order
    scenario: Scenario  # the scenario of `best`

    @property
    def speedup(self) -> float:
        """Predicted speed-up of the best plan over the best plan without a draft (1 = none)."""
        if self.no_draft_best is None:
            return math.inf
        return self.no_draft_best.per_sequence_s / self.best.per_sequence_s

    @property
    def solve_time_s(self) -> float:
        """Solver time of every ILP the search solved."""
        return sum(c.solution.solve_time_s for c in self.candidates if c.solution)

    def count(self, status: str) -> int:
        return sum(1 for c in self.candidates if c.status == status)


@dataclass(frozen=True)
class _Job:
    draft_name: str | None
    gamma: int
    batch: int
    acceptance: float | None
    scenario: Scenario | None  # None: the draft's acceptance is still to be measured

    def candidate(self, **fields) -> Candidate:
        e = expected_tokens_per_step(self.acceptance, self.gamma) if self.acceptance is not None else 1.0
        return Candidate(self.draft_name, self.gamma, self.batch, expected_tokens=e,
                         acceptance=self.acceptance, **{"solution": None, **fields})


def search(spec: ModelSpec, profile: HardwareProfile, workload: Workload, drafts: Sequence[DraftCandidate],
           options: SolverOptions, gammas: Iterable[int] = DEFAULT_GAMMAS, batches: Sequence[int] | None = None,
           progress: Callable[[str], None] | None = None, *, acceptance: Mapping[str, float] | None = None,
           rank_choices: tuple[int, ...] = (0,),
           rank_recovery: Mapping[str, dict[int, float]] | None = None) -> SearchResult:
    """The fastest plan over no draft and every draft candidate x draft length x batch.

    `acceptance` maps draft names to measured acceptance rates; it overrides the model file's
    value and lets candidates marked 'measure' take part. `progress` receives one line per
    step. Raises the no-draft InfeasiblePlanError when no combination fits at all."""
    gamma_list = _positive_ints("gammas (draft lengths)", gammas)
    batch_list = _positive_ints("batches", batches if batches is not None else (workload.batch,))
    measured = _check_acceptance(acceptance or {}, drafts)
    say = progress or (lambda _line: None)
    _, lp_solver = pick_solver(options)  # a missing solver fails here, not once per combination
    jobs = _jobs(Scenario(spec, profile, workload, rank_choices=rank_choices, rank_recovery=dict(rank_recovery or {})),
                 drafts, measured, gamma_list, batch_list)

    done: dict[int, Candidate] = {}
    errors: dict[int, InfeasiblePlanError] = {}
    tables: dict[int, OptionTables] = {}
    bounds: dict[int, float] = {}

    def solve(i: int) -> None:
        job = jobs[i]
        say(f"solving {job.candidate().label} (lower bound {fmt_seconds(bounds[i])})")
        try:
            solution = solve_compensated(job.scenario, options, tables[i])
        except InfeasiblePlanError as exc:
            errors[i], done[i] = exc, _infeasible(job, exc, bounds[i])
            return
        done[i] = job.candidate(solution=solution, lower_bound_s=bounds[i])

    # 1. lower bounds (and what cannot fit at all)
    for i, job in enumerate(jobs):
        if job.scenario is None:
            done[i] = job.candidate(skipped_reason=f"acceptance of {job.draft_name} is 'measure': run "
                                                   "`offplan acceptance` and pass the measured rate")
            continue
        say(f"bounding {job.candidate().label} ({i + 1}/{len(jobs)})")
        tables[i] = option_tables(job.scenario)
        try:
            check_lower_bounds(tables[i])
        except InfeasiblePlanError as exc:
            errors[i], done[i] = exc, _infeasible(job, exc, 0.0)
            continue
        bound = relaxation_bound_s(tables[i], options, lp_solver)
        bounds[i] = 0.0 if bound is None else bound
        if bound is None:
            solve(i)  # the relaxation is infeasible, so is the ILP: let it name the resource

    # 2. the plans without a draft; 3. the rest, best bound first
    for i, job in enumerate(jobs):
        if job.draft_name is None and i not in done:
            solve(i)
    pending = sorted((i for i in range(len(jobs)) if i not in done), key=lambda i: (bounds[i] / jobs[i].batch, i))
    for k, i in enumerate(pending):
        incumbent = min((c.per_sequence_s for c in done.values() if c.solution), default=math.inf)
        if bounds[i] / jobs[i].batch > incumbent * (1 + BOUND_RTOL):
            for j in pending[k:]:
                done[j] = jobs[j].candidate(lower_bound_s=bounds[j], skipped_reason=(
                    f"pruned: takes at least {fmt_seconds(bounds[j] / jobs[j].batch)} per sequence, "
                    f"a plan of {fmt_seconds(incumbent)} was found"))
            say(f"pruned {len(pending) - k} combinations that cannot beat {fmt_seconds(incumbent)}")
            break
        solve(i)

    candidates = tuple(done[i] for i in range(len(jobs)))
    solved = [(i, c) for i, c in enumerate(candidates) if c.solution]
    if not solved:
        no_draft = [i for i, job in enumerate(jobs) if job.draft_name is None]
        first = next((i for i in no_draft if jobs[i].batch == workload.batch), no_draft[0])
        raise errors[first]
    best_i, best = min(solved, key=lambda ic: (ic[1].per_sequence_s, ic[1].draft_name is not None, ic[1].gamma))
    no_draft_best = min((c for _, c in solved if c.draft_name is None), key=lambda c: c.per_sequence_s, default=None)
    return SearchResult(best, no_draft_best, candidates, jobs[best_i].scenario)


def _jobs(base: Scenario, drafts: Sequence[DraftCandidate], measured: Mapping[str, float],
          gammas: list[int], batches: list[int]) -> list[_Job]:
    """Every combination, in enumeration order: per batch, no draft then each draft x gamma
    (one placeholder per draft whose acceptance is still to be measured)."""
    jobs = []
    for batch in batches:
        scn = replace(base, workload=replace(base.workload, batch=batch))
        jobs.append(_Job(None, 0, batch, None, scn))
        for d in drafts:
            a = measured.get(d.name, d.acceptance)
            if a is None:
                jobs.append(_Job(d.name, 0, batch, None, None))
                continue
            jobs.extend(_Job(d.name, g, batch, a, replace(scn, draft=d.spec, gamma=g, acceptance=a)) for g in gammas)
    return jobs


def relaxation_bound_s(tables: OptionTables, options: SolverOptions,
                       lp_solver: pulp.LpSolver | None = None) -> float | None:
    """Optimum of the placement ILP's LP relaxation in seconds: a lower bound on the ILP's
    objective. None when the relaxation is infeasible; 0.0 when the solver gave no optimum or the
    objective is not time (quality_mode "max")."""
    prob = build_problem(tables, options).prob
    for var in prob.variables():
        var.cat = pulp.LpContinuous
    prob.solve(lp_solver or pick_solver(options)[1])
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        return None
    if status != "Optimal" or options.quality_mode is not None:
        return 0.0
    return max(pulp.value(prob.objective) / MS, 0.0)


def search_plan(result: SearchResult) -> Plan:
    """The plan file for the search's answer (draft and draft length included)."""
    sol = result.best.solution
    return make_plan(result.scenario, sol.placement, "ilp", sol.prediction, sol.solver, sol.status,
                     sol.solve_time_s, sol.objective_s, draft_name=result.best.draft_name or "")


def _infeasible(job: _Job, exc: InfeasiblePlanError, bound_s: float) -> Candidate:
    return job.candidate(infeasible_reason=str(exc), infeasible_resource=exc.resource or "memory",
                         lower_bound_s=bound_s)


def _positive_ints(what: str, values: Iterable[int]) -> list[int]:
    out = list(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise OffplanError(f"{what}: need one or more whole numbers >= 1, got {out!r}")
    return sorted(set(out))


def _check_acceptance(measured: Mapping[str, float], drafts: Sequence[DraftCandidate]) -> dict[str, float]:
    names = [d.name for d in drafts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise OffplanError(f"drafts: two candidates are named {duplicates[0]!r}; give each a distinct 'name:'")
    for name, value in measured.items():
        if name not in names:
            raise OffplanError(f"acceptance: no draft candidate named {name!r}; "
                               f"candidates: {', '.join(names) or 'none'}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise OffplanError(f"acceptance of {name}: must be a number between 0 and 1, got {value!r}")
    return {name: float(value) for name, value in measured.items()}
