"""The placement MILP (DESIGN §4), built from the option tables of cost.py.

Variables: one-hot binaries per tensor over its options (device x prefill mode x rank),
one-hot binaries per layer over KV host-fraction levels, an epigraph variable per stage and
phase for `max(compute path, link)`, and the largest streamed stage (buffer size).
Objective: prefill time + decode steps x step time. Times are in milliseconds and memory
in GiB inside the model, to keep coefficients well scaled.

Compensation quality constraints are built here; the two-step `quality_mode="max"` search
over them lives in planner/solve/quality.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pulp

from planner.cost.options import Scenario
from planner.solve import backend
from planner.cost.terms import host_staging_bytes
from planner.errors import InfeasiblePlanError, OffplanError, SolverStoppedError, SpecError
from planner.model.placement import Placement
from planner.cost.evaluate import OptionTables, Prediction, chosen_options, memory_use, option_tables, predict
from planner.solve.groups import EXACT_LAYERS, layer_groups, segment_groups  # noqa: F401 (re-exported)
from planner.units import fmt_bytes

MS = 1e3
GIB = float(2**30)
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
        prob, x, z, groups, _ = build_problem(tables, options, margin)
        start = time.perf_counter()
        prob.solve(solver)
        elapsed += time.perf_counter() - start
        status = pulp.LpStatus[prob.status]
        if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            if prob.sol_status != pulp.LpSolutionInfeasible:  # stopped, nothing proven
                raise SolverStoppedError(f"the solver ({name}) stopped without a plan within "
                                         f"{options.time_limit_s:g} s; give a longer --time-limit")
            raise _infeasible(tables, status, options)
        placement = _read_placement(tables, x, z, groups)
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
                    len(prob.variables()), prob.numConstraints(), gap)


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


def check_quality(tables: OptionTables, options: SolverOptions) -> None:
    """Reject quality options that cannot mean anything for this scenario, naming the flag."""
    if options.quality_mode is not None and options.quality_mode not in QUALITY_MODES:
        raise OffplanError(f"--quality: unknown mode {options.quality_mode!r}; use 'max' or a fraction")
    if options.quality_mode is not None and options.quality is not None:
        raise OffplanError("--quality: give either 'max' or a fraction, not both")
    if not 0.0 <= options.slack < 10.0:
        raise OffplanError(f"--slack: {options.slack:g} must be between 0 and 10 (a fraction: 0.02 = 2%)")
    if options.quality is None and options.quality_mode is None:
        return
    if tables.scenario.spec.quantization is None:
        raise SpecError("--quality needs a quantized model: add `quantization: {bits: 4, group_size: 128}` "
                        "to model.yaml")
    if options.quality is not None:
        if not 0.0 <= options.quality <= 1.0:
            raise OffplanError(f"--quality: {options.quality:g} is not between 0 and 1")
        best = max_recovered(tables)
        if options.quality > best + 1e-12:
            raise InfeasiblePlanError(
                f"--quality {options.quality:g}: the offered ranks recover at most {best:.3f} of the "
                "quantization error on average; lower --quality or offer larger ranks "
                "(compensation.ranks in model.yaml)", "quality", options.quality, best)


def _new_var(prob: pulp.LpProblem, name: str, low: float | None = None, cat: str = pulp.LpContinuous):
    """A variable owned by `prob` (PuLP >= 3.3, and the only way from PuLP 4); free-standing
    on older PuLP."""
    add = getattr(prob, "add_variable", None)
    if add is not None:
        return add(name, lowBound=low, cat=cat)
    return pulp.LpVariable(name, lowBound=low, cat=cat)


def build_problem(tables: OptionTables, options: SolverOptions, margin_bytes: tuple[float, float] = (0.0, 0.0)):
    """The MILP. `margin_bytes` = (accelerator, host) memory kept free beyond the model."""
    scn = tables.scenario
    spec = scn.spec
    prob = pulp.LpProblem("offplan_placement", pulp.LpMinimize)
    max_groups = options.max_groups
    if spec.moe is not None and spec.layers > EXACT_LAYERS:
        max_groups = min(max_groups, options.moe_max_groups)
    groups = segment_groups(spec, max_groups)
    head = tables.stages[-1]
    layer_slots = [t.kind for t in spec.layer_tensors(spec.layers - 1)]

    # ---- variables ----------------------------------------------------------------------
    # x[g][slot]: one-hot over the options of tensor `slot` of every layer in group g
    # (g = len(groups) is the head stage: embed + lm_head); z[g]: one-hot over KV levels.
    def one_hot(prefix, n):
        return [_new_var(prob, f"{prefix}_{k}", cat=pulp.LpBinary) for k in range(n)]

    rep = [spec.layer_tensors(first) for first, _ in groups] + [head.tensors]
    x = [[one_hot(f"x_{g}_{i}", len(tables.tensor[t.name])) for i, t in enumerate(ts)] for g, ts in enumerate(rep)]
    z = [one_hot(f"kv_{g}", len(tables.kv)) for g in range(len(groups))]
    n_units = len(rep)
    t_in_dec = [_new_var(prob, f"T_decode_inner_{g}", low=0) for g in range(len(groups))]
    t_in_pf = [_new_var(prob, f"T_prefill_inner_{g}", low=0) for g in range(len(groups))]
    t_out_dec = [_new_var(prob, f"T_decode_{g}", low=0) for g in range(n_units)]
    t_out_pf = [_new_var(prob, f"T_prefill_{g}", low=0) for g in range(n_units)]
    buffer_gib = _new_var(prob, "largest_streamed_stage_gib", low=0)
    # 1 when anything computes on the host: the pinned activation staging is needed then.
    host_compute = _new_var(prob, "host_compute", cat=pulp.LpBinary)
    sizes = [size for _, size in groups] + [1]

    def unit_sum(g, attr, scale=1.0):
        return pulp.lpSum(getattr(o, attr) * scale * v for t, vars_ in zip(rep[g], x[g])
                          for o, v in zip(tables.tensor[t.name], vars_))

    def own_link(g, phase):
        """h2d time of activations unit g sends up (they share the link with prefetching)."""
        expr = unit_sum(g, f"{phase}_act_h2d_s", MS)
        if g < len(groups) and phase == "decode":
            expr += pulp.lpSum(o.decode_act_h2d_s * MS * v for o, v in zip(tables.kv, z[g]))
        return expr

    def own_bus(g, phase):
        """Host memory bus time of unit g's own reads (planner/cost/membus.py)."""
        expr = unit_sum(g, f"{phase}_bus_s", MS)
        if g < len(groups) and phase == "decode":
            expr += pulp.lpSum(o.decode_bus_s * MS * v for o, v in zip(tables.kv, z[g]))
        return expr

    def unit_path(g, phase):
        fixed = (tables.fixed_decode if phase == "decode" else tables.fixed_prefill)[
            head.name if g == len(groups) else tables.stages[groups[g][0]].name]
        expr = fixed.total_s * MS + pulp.lpSum(getattr(o, phase).total_s * MS * v for t, vars_ in zip(rep[g], x[g])
                                              for o, v in zip(tables.tensor[t.name], vars_))
        if g < len(groups):
            expr += pulp.lpSum(getattr(o, phase).total_s * MS * v for o, v in zip(tables.kv, z[g]))
        return expr

    # ---- objective ----------------------------------------------------------------------
    constants = predict(tables, *_cheapest(tables))
    constant_ms = (constants.draft_prefill_s + scn.decode_steps * constants.draft_step_s) * MS
    prefill_ms = (pulp.lpSum((m - 1) * t for m, t in zip(sizes, t_in_pf)) + pulp.lpSum(t_out_pf)
                  + unit_sum(0, "prefill_link_s", MS))
    decode_ms = pulp.lpSum((m - 1) * t for m, t in zip(sizes, t_in_dec)) + pulp.lpSum(t_out_dec)
    total_ms = prefill_ms + scn.decode_steps * decode_ms + constant_ms
    n_quantized = sum(1 for t in spec.tensors() if t.group in ("attn", "mlp")) if spec.quantization else 0
    recovered_sum = pulp.lpSum(sizes[g] * unit_sum(g, "recovered") for g in range(len(groups)))
    if options.quality_mode == "max" and n_quantized:
        prob.sense = pulp.LpMaximize
        prob += recovered_sum / n_quantized, "mean_recovered"
    else:
        prob += total_ms, "total_time_ms"
    if options.time_budget_s is not None:
        prob += total_ms <= options.time_budget_s * MS, "time_budget"

    # ---- constraints: one choice per item -----------------------------------------------
    for g, slots in enumerate(x):
        for i, vars_ in enumerate(slots):
            prob += pulp.lpSum(vars_) == 1, f"one_option_{g}_{i}"
    for g, vars_ in enumerate(z):
        prob += pulp.lpSum(vars_) == 1, f"one_kv_level_{g}"

    # ---- constraints: stage time = max(compute path, prefetch of the next stage, memory bus)
    # Inside a group a layer is followed by an identical one; the group's last layer is
    # followed by the next group's first (the head wraps to layer 0 for decode).
    for g in range(n_units):
        nxt = (g + 1) % n_units
        path_dec, path_pf = unit_path(g, "decode"), unit_path(g, "prefill")
        # Compute slows while the following unit streams in (loopback; planner/cost/membus.py).
        slow_pf = unit_sum(nxt, "prefill_fetch_slow_s", MS) if g + 1 < n_units else 0
        prob += t_out_dec[g] >= path_dec + unit_sum(nxt, "decode_fetch_slow_s", MS), f"decode_path_{g}"
        prob += t_out_dec[g] >= unit_sum(nxt, "decode_link_s", MS) + own_link(g, "decode"), f"decode_link_{g}"
        prob += t_out_pf[g] >= path_pf + slow_pf, f"prefill_path_{g}"
        next_pf = unit_sum(nxt, "prefill_link_s", MS) if g + 1 < n_units else 0
        prob += t_out_pf[g] >= next_pf + own_link(g, "prefill"), f"prefill_link_{g}"
        prob += t_out_dec[g] >= own_bus(g, "decode") + unit_sum(nxt, "decode_fetch_bus_s", MS), \
            f"decode_memory_bus_{g}"
        next_fetch_pf = unit_sum(nxt, "prefill_fetch_bus_s", MS) if g + 1 < n_units else 0
        prob += t_out_pf[g] >= own_bus(g, "prefill") + next_fetch_pf, f"prefill_memory_bus_{g}"
        if g < len(groups) and sizes[g] > 1:
            prob += t_in_dec[g] >= own_bus(g, "decode") + unit_sum(g, "decode_fetch_bus_s", MS), \
                f"decode_memory_bus_inner_{g}"
            prob += t_in_pf[g] >= own_bus(g, "prefill") + unit_sum(g, "prefill_fetch_bus_s", MS), \
                f"prefill_memory_bus_inner_{g}"
            prob += t_in_dec[g] >= path_dec + unit_sum(g, "decode_fetch_slow_s", MS), f"decode_path_inner_{g}"
            prob += t_in_dec[g] >= unit_sum(g, "decode_link_s", MS) + own_link(g, "decode"), \
                f"decode_link_inner_{g}"
            prob += t_in_pf[g] >= path_pf + unit_sum(g, "prefill_fetch_slow_s", MS), f"prefill_path_inner_{g}"
            prob += t_in_pf[g] >= unit_sum(g, "prefill_link_s", MS) + own_link(g, "prefill"), \
                f"prefill_link_inner_{g}"
        prob += buffer_gib >= unit_sum(g, "buffer_bytes", 1 / GIB), f"buffer_{g}"

    # ---- constraints: memory per device -------------------------------------------------
    vram0, host0 = _memory(tables, *_cheapest(tables))
    vram_fixed = spec.norm_bytes + vram0.workspace_bytes + vram0.draft_bytes
    kv_vram = pulp.lpSum(sizes[g] * o.vram_bytes / GIB * v for g in range(len(groups)) for o, v in zip(tables.kv, z[g]))
    kv_host = pulp.lpSum(sizes[g] * o.host_bytes / GIB * v for g in range(len(groups)) for o, v in zip(tables.kv, z[g]))
    prob += (pulp.lpSum(sizes[g] * unit_sum(g, "vram_bytes", 1 / GIB) for g in range(n_units)) + 2 * buffer_gib
             + kv_vram <= (vram0.capacity_bytes - vram_fixed - margin_bytes[0]) / GIB), "accelerator_memory"
    staging_gib = host_staging_bytes(scn) / GIB
    prob += (pulp.lpSum(sizes[g] * (unit_sum(g, "host_bytes", 1 / GIB) + unit_sum(g, "comp_bytes", 1 / GIB))
                        for g in range(n_units))
             + kv_host + staging_gib * host_compute <= (host0.capacity_bytes - margin_bytes[1]) / GIB), "host_memory"
    for g, slots in enumerate(x):
        for i, (t, vars_) in enumerate(zip(rep[g], slots)):
            for k, (o, v) in enumerate(zip(tables.tensor[t.name], vars_)):
                if o.device == "cpu":
                    prob += host_compute >= v, f"host_compute_{g}_{i}_{k}"
    for g, vars_ in enumerate(z):
        for k, (o, v) in enumerate(zip(tables.kv, vars_)):
            if o.host_fraction > 0:
                prob += host_compute >= v, f"host_compute_kv_{g}_{k}"

    # ---- constraints: quality (compensation) --------------------------------------------
    if options.quality is not None and n_quantized:
        prob += recovered_sum >= options.quality * n_quantized, "recovered_error"
    return prob, x, z, groups, layer_slots


def _cheapest(tables: OptionTables):
    """Any fixed choice; used to read placement-independent constants through predict()."""
    tensor = {name: opts[0] for name, opts in tables.tensor.items()}
    return tensor, [tables.kv[0]] * tables.scenario.spec.layers


def _read_placement(tables: OptionTables, x, z, groups) -> Placement:
    spec = tables.scenario.spec

    def chosen(vars_):
        return max(range(len(vars_)), key=lambda i: vars_[i].value() or 0.0)

    units = [(first, size) for first, size in groups]
    devices, streamed, ranks, kv, gpu_experts = {}, [], {}, [0.0] * spec.layers, {}
    for g, slots in enumerate(x):
        if g < len(units):
            first, size = units[g]
            layers = [spec.layer_tensors(layer) for layer in range(first, first + size)]
            for layer in range(first, first + size):
                kv[layer] = tables.kv[chosen(z[g])].host_fraction
        else:
            layers = [tables.stages[-1].tensors]
        for tensors in layers:
            for t, vars_ in zip(tensors, slots):
                option = tables.tensor[t.name][chosen(vars_)]
                devices[t.name] = option.device
                if option.prefill_streamed:
                    streamed.append(t.name)
                if option.rank:
                    ranks[t.name] = option.rank
                if t.experts and option.device == "cpu" and option.gpu_experts:
                    gpu_experts[t.name] = option.gpu_experts
    return Placement(devices, tuple(kv), tuple(streamed), ranks, gpu_experts)


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
