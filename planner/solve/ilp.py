"""Solving the placement MILP (built in planner/solve/problem.py): the solver, checks
before solving that name the resource or flag at fault, and the solution read back and
scored with `predict`.

The two-step `quality_mode="max"` search over compensation lives in planner/solve/quality.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pulp

from planner.cost.options import Scenario
from planner.solve import backend
from planner.errors import InfeasiblePlanError, OffplanError, SolverStoppedError, SpecError
from planner.model.placement import Placement
from planner.model.spec import ModelSpec
from planner.cost.evaluate import OptionTables, Prediction, chosen_options, memory_use, option_tables, predict
from planner.solve.problem import MS, build_problem, read_placement
from planner.units import fmt_bytes

# Memory rows are in GiB and the solver's feasibility tolerance is absolute, so a plan can
# overshoot a device by up to a few KiB; solve_placement then solves again with the overshoot
# (times this factor) kept free.
_MARGIN_FACTOR = 4.0


@dataclass(frozen=True)
class SolverOptions:
    time_limit_s: float = 30.0
    gap_rel: float = 1e-4
    solver: str = "auto"  # auto | highs | cbc
    threads: int = 0  # 0 = solver default
    quality: float | None = None  # minimum mean recovered error fraction (compensation)
    max_groups: int = 6  # layers share configurations in at most this many contiguous groups
    quality_mode: str | None = None  # "max": most recovered error within `slack` of the fastest time
    slack: float = 0.02  # quality "max": allowed total-time increase over the uncompensated optimum
    time_budget_s: float | None = None  # cap on the total time (solve_compensated sets it for "max")
    # Mixture-of-experts models: at most this many layer groups (each picks its resident expert
    # count from planner/cost/moe.py's levels, which already grade memory finely); with 6 the
    # 94-layer Qwen3-235B-A22B took 10-20 s to prove optimal, with 3 under 1 s, 0.2% slower.
    moe_max_groups: int = 3


QUALITY_MODES = ("max",)


@dataclass(frozen=True)
class Solution:
    placement: Placement
    prediction: Prediction
    solver: str
    status: str  # optimal | time limit (feasible)
    objective_s: float  # the ILP's own objective value
    solve_time_s: float
    n_variables: int
    n_constraints: int
    gap: float = 0.0  # proven relative distance from the optimum (0 when optimal; nan if unknown)
    decode_step_s: float = float("nan")  # the ILP's own decode step (its epigraph variables)


def pick_solver(options: SolverOptions) -> tuple[str, pulp.LpSolver]:
    """The solver of `options`, built by planner/solve/backend.py (silent, interruptible)."""
    return backend.pick_solver(options.solver, options.time_limit_s, options.gap_rel, options.threads)


def check_lower_bounds(tables: OptionTables) -> None:
    """Name the resource when no placement can fit, before handing the problem to a solver."""
    scn = tables.scenario
    # Accelerator: the least any placement needs there (every weight and all KV on the host).
    least = {name: min(options, key=lambda o: o.vram_bytes) for name, options in tables.tensor.items()}
    least_kv = [min(tables.kv, key=lambda o: o.vram_bytes)] * scn.spec.layers
    vram, _ = _memory(tables, least, least_kv)
    if vram.used_bytes > vram.capacity_bytes:
        raise InfeasiblePlanError(
            f"needs {fmt_bytes(vram.used_bytes)} of accelerator memory even with every weight and the "
            f"whole KV cache in host memory (workspace {fmt_bytes(vram.workspace_bytes)}, draft "
            f"{fmt_bytes(vram.draft_bytes)}), {fmt_bytes(vram.capacity_bytes)} available; "
            "shorten --prompt, lower the batch, or give more --vram",
            "accelerator memory", vram.used_bytes, vram.capacity_bytes)
    # Host: whatever does not fit in VRAM must be in host memory.
    total = sum(min(o.vram_bytes + o.host_bytes for o in opts) for opts in tables.tensor.values())
    total += sum(o.vram_bytes + o.host_bytes for o in least_kv)
    spare_vram = max(vram.capacity_bytes - vram.used_bytes, 0)
    _, host = _memory(tables, least, least_kv)
    # Staging is left out: a placement that streams everything needs none (a valid bound).
    needed = total - spare_vram
    if needed > host.capacity_bytes:
        raise InfeasiblePlanError(
            f"needs {fmt_bytes(needed)} of host memory, {fmt_bytes(host.capacity_bytes)} available "
            f"(the model and its KV cache take {fmt_bytes(total)}, at most {fmt_bytes(spare_vram)} fit on "
            "the accelerator); add --ram, shorten the context, or pick a smaller/quantized model",
            "host memory", needed, host.capacity_bytes)


def _memory(tables: OptionTables, tensor, kv):
    """Memory of a choice, ignoring streaming buffers (the ILP models those itself)."""
    return memory_use(tables, tensor, kv, 0)


def solve_placement(scn: Scenario, options: SolverOptions = SolverOptions(),
                    tables: OptionTables | None = None) -> Solution:
    tables = tables or option_tables(scn)
    check_lower_bounds(tables)
    check_quality(tables, options)
    name, solver = pick_solver(options)
    margin, elapsed = (0.0, 0.0), 0.0
    for _attempt in range(3):
        problem = build_problem(tables, options, margin)
        prob = problem.prob
        start = time.perf_counter()
        prob.solve(solver)
        elapsed += time.perf_counter() - start
        status = pulp.LpStatus[prob.status]
        if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            if prob.sol_status != pulp.LpSolutionInfeasible:  # stopped, nothing proven
                raise SolverStoppedError(f"the solver ({name}) stopped without a plan within "
                                         f"{options.time_limit_s:g} s; give a longer --time-limit")
            raise _infeasible(tables, status, options)
        placement = read_placement(tables, problem)
        prediction = predict(tables, *chosen_options(tables, placement))
        over = (prediction.vram.used_bytes - prediction.vram.capacity_bytes,
                prediction.host.used_bytes - prediction.host.capacity_bytes)
        if max(over) <= 0:
            break
        margin = tuple(m + _MARGIN_FACTOR * max(o, 0) for m, o in zip(margin, over))
    else:
        raise InfeasiblePlanError("the solver's plans keep exceeding memory by a few bytes; "
                                  "leave a little more --vram / --ram free", "memory")
    label = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time limit (best found)"
    gap = _mip_gap(prob) if label != "optimal" else 0.0
    # Under quality "max" the objective is recovery, not time: report the plan's time.
    objective_s = prediction.total_s if options.quality_mode == "max" else pulp.value(prob.objective) / MS
    return Solution(placement, prediction, name, label, objective_s, elapsed,
                    len(prob.variables()), prob.numConstraints(), gap, pulp.value(problem.decode_ms) / MS)


def _mip_gap(prob: pulp.LpProblem) -> float:
    """HiGHS's proven relative gap of the incumbent (nan for solvers that do not say)."""
    model = getattr(prob, "solverModel", None)
    try:
        return float(model.getInfo().mip_gap)
    except AttributeError:
        return float("nan")


def max_recovered(tables: OptionTables) -> float:
    """The mean recovered fraction if every quantized tensor took its best rank."""
    quantized = [t.name for t in tables.scenario.spec.tensors() if t.group in ("attn", "mlp")]
    if not quantized:
        return 0.0
    return sum(max(o.recovered for o in tables.tensor[name]) for name in quantized) / len(quantized)


def check_options(options: SolverOptions, spec: ModelSpec) -> None:
    """Reject solver options that cannot mean anything for `spec`, naming the flag (the one
    place these are checked; `check_quality` adds what needs the option tables)."""
    if options.quality_mode is not None and options.quality_mode not in QUALITY_MODES:
        raise OffplanError(f"--quality: unknown mode {options.quality_mode!r}; use 'max' or a fraction")
    if options.quality_mode is not None and options.quality is not None:
        raise OffplanError("--quality: give either 'max' or a fraction, not both")
    if not 0.0 <= options.slack <= 1.0:
        raise OffplanError(f"--slack: {options.slack:g} must be between 0 and 1 (a fraction: 0.02 = 2%)")
    if options.quality is None and options.quality_mode is None:
        return
    if spec.quantization is None:
        raise SpecError("--quality needs a quantized model: add `quantization: {bits: 4, group_size: 128}` "
                        "to model.yaml")
    if options.quality is not None and not 0.0 <= options.quality <= 1.0:
        raise OffplanError(f"--quality: {options.quality:g} is not between 0 and 1")


def check_quality(tables: OptionTables, options: SolverOptions) -> None:
    """`check_options`, and a quality target the offered ranks can reach."""
    check_options(options, tables.scenario.spec)
    if options.quality is not None:
        best = max_recovered(tables)
        if options.quality > best + 1e-12:
            raise InfeasiblePlanError(
                f"--quality {options.quality:g}: the offered ranks recover at most {best:.3f} of the "
                "quantization error on average; lower --quality or offer larger ranks "
                "(compensation.ranks in model.yaml)", "quality", options.quality, best)


def _infeasible(tables: OptionTables, status: str, options: SolverOptions) -> InfeasiblePlanError:
    scn = tables.scenario
    if options.quality is not None and options.quality > 0:
        return InfeasiblePlanError(
            f"--quality {options.quality:g}: no placement that fits in memory recovers that much "
            f"quantization error ({status.lower()}; the ranks alone allow up to {max_recovered(tables):.3f}); "
            "lower --quality, or add --ram for the compensation factors", "quality", options.quality,
            max_recovered(tables))
    total = sum(min(o.vram_bytes + o.host_bytes for o in opts) for opts in tables.tensor.values())
    capacity = scn.profile.vram_usable_bytes + scn.profile.host_usable_bytes
    return InfeasiblePlanError(
        f"no placement fits ({status.lower()}): weights alone take {fmt_bytes(total)}, accelerator and "
        f"host memory together offer {fmt_bytes(capacity)}; the KV cache and workspace need the rest. "
        "Add --ram or --vram, or shorten the context",
        "memory", total, capacity)
