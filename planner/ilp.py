"""The placement MILP (DESIGN §4), built from the option tables of cost.py.

Variables: one-hot binaries per tensor over its options (device x prefill mode x rank),
one-hot binaries per layer over KV host-fraction levels, an epigraph variable per stage and
phase for `max(compute path, link)`, and the largest streamed stage (buffer size).
Objective: prefill time + decode steps x step time. Times are in milliseconds and memory
in GiB inside the model, to keep coefficients well scaled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pulp

from .cost import Scenario
from .errors import InfeasiblePlanError
from .placement import Placement
from .predict import OptionTables, Prediction, chosen_options, memory_use, option_tables, predict
from .units import fmt_bytes

MS = 1e3
GIB = float(2**30)


@dataclass(frozen=True)
class SolverOptions:
    time_limit_s: float = 30.0
    gap_rel: float = 1e-4
    solver: str = "auto"  # auto | highs | cbc
    threads: int = 0  # 0 = solver default
    quality: float | None = None  # minimum mean recovered error fraction (compensation)
    max_groups: int = 16  # layers share configurations in at most this many contiguous groups


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


def pick_solver(options: SolverOptions) -> tuple[str, pulp.LpSolver]:
    time_limit = options.time_limit_s
    if options.solver in ("auto", "highs"):
        highs = pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=options.gap_rel,
                           **({"threads": options.threads} if options.threads else {}))
        if highs.available():
            return "HiGHS", highs
        if options.solver == "highs":
            raise InfeasiblePlanError("--solver highs: highspy is not installed (pip install highspy)")
    cbc = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=options.gap_rel,
                            **({"threads": options.threads} if options.threads else {}))
    return "CBC", cbc


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
    needed = total - spare_vram + host.buffer_bytes
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
    prob, x, z, groups, _ = build_problem(tables, options)
    name, solver = pick_solver(options)
    start = time.perf_counter()
    prob.solve(solver)
    elapsed = time.perf_counter() - start
    status = pulp.LpStatus[prob.status]
    has_solution = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    if not has_solution:
        raise _infeasible(tables, status)
    placement = _read_placement(tables, x, z, groups)
    tensor, kv = chosen_options(tables, placement)
    prediction = predict(tables, tensor, kv)
    label = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time limit (best found)"
    return Solution(placement, prediction, name, label, pulp.value(prob.objective) / MS, elapsed,
                    len(prob.variables()), len(prob.constraints))


def layer_groups(n_layers: int, max_groups: int) -> list[tuple[int, int]]:
    """Split layers into contiguous (first, size) groups that share one configuration.

    Decoder layers are identical, so per-layer binaries make the MILP highly symmetric and
    branch-and-bound cannot close its gap. Groups of sizes 1, 1, 2, 2, 4, 4, ... still let
    any number of layers take any configuration; the boundaries between groups are modelled
    exactly. With `n_layers <= max_groups` every layer is its own group (the exact model)."""
    if n_layers <= max_groups:
        return [(i, 1) for i in range(n_layers)]
    sizes, size = [], 1
    while sum(sizes) + 2 * size <= n_layers and len(sizes) + 2 < max_groups:
        sizes += [size, size]
        size *= 2
    rest = n_layers - sum(sizes)
    while rest > 0:
        take = min(rest, max(size, -(-rest // max(max_groups - len(sizes), 1))))
        sizes.append(take)
        rest -= take
    groups, first = [], 0
    for size in sizes:
        groups.append((first, size))
        first += size
    return groups


def build_problem(tables: OptionTables, options: SolverOptions):
    scn = tables.scenario
    spec = scn.spec
    prob = pulp.LpProblem("offplan_placement", pulp.LpMinimize)
    groups = layer_groups(spec.layers, options.max_groups)
    head = tables.stages[-1]
    layer_slots = [t.kind if spec.moe is None else t.name.split(".", 2)[2] for t in spec.layer_tensors(0)]

    # ---- variables ----------------------------------------------------------------------
    # x[g][slot]: one-hot over the options of tensor `slot` of every layer in group g
    # (g = len(groups) is the head stage: embed + lm_head); z[g]: one-hot over KV levels.
    def one_hot(prefix, n):
        return [pulp.LpVariable(f"{prefix}_{k}", cat=pulp.LpBinary) for k in range(n)]

    rep = [spec.layer_tensors(first) for first, _ in groups] + [head.tensors]
    x = [[one_hot(f"x_{g}_{i}", len(tables.tensor[t.name])) for i, t in enumerate(ts)] for g, ts in enumerate(rep)]
    z = [one_hot(f"kv_{g}", len(tables.kv)) for g in range(len(groups))]
    n_units = len(rep)
    t_in_dec = [pulp.LpVariable(f"T_decode_inner_{g}", lowBound=0) for g in range(len(groups))]
    t_in_pf = [pulp.LpVariable(f"T_prefill_inner_{g}", lowBound=0) for g in range(len(groups))]
    t_out_dec = [pulp.LpVariable(f"T_decode_{g}", lowBound=0) for g in range(n_units)]
    t_out_pf = [pulp.LpVariable(f"T_prefill_{g}", lowBound=0) for g in range(n_units)]
    buffer_gib = pulp.LpVariable("largest_streamed_stage_gib", lowBound=0)
    sizes = [size for _, size in groups] + [1]

    def unit_sum(g, attr, scale=1.0):
        return pulp.lpSum(getattr(o, attr) * scale * v for t, vars_ in zip(rep[g], x[g])
                          for o, v in zip(tables.tensor[t.name], vars_))

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
    prob += prefill_ms + scn.decode_steps * decode_ms + constant_ms, "total_time_ms"

    # ---- constraints: one choice per item -----------------------------------------------
    for g, slots in enumerate(x):
        for i, vars_ in enumerate(slots):
            prob += pulp.lpSum(vars_) == 1, f"one_option_{g}_{i}"
    for g, vars_ in enumerate(z):
        prob += pulp.lpSum(vars_) == 1, f"one_kv_level_{g}"

    # ---- constraints: stage time = max(compute path, prefetch of the next stage) --------
    # Inside a group a layer is followed by an identical one; the group's last layer is
    # followed by the next group's first (the head wraps to layer 0 for decode).
    for g in range(n_units):
        nxt = (g + 1) % n_units
        path_dec, path_pf = unit_path(g, "decode"), unit_path(g, "prefill")
        prob += t_out_dec[g] >= path_dec, f"decode_path_{g}"
        prob += t_out_dec[g] >= unit_sum(nxt, "decode_link_s", MS), f"decode_link_{g}"
        prob += t_out_pf[g] >= path_pf, f"prefill_path_{g}"
        if g + 1 < n_units:
            prob += t_out_pf[g] >= unit_sum(nxt, "prefill_link_s", MS), f"prefill_link_{g}"
        if g < len(groups) and sizes[g] > 1:
            prob += t_in_dec[g] >= path_dec, f"decode_path_inner_{g}"
            prob += t_in_dec[g] >= unit_sum(g, "decode_link_s", MS), f"decode_link_inner_{g}"
            prob += t_in_pf[g] >= path_pf, f"prefill_path_inner_{g}"
            prob += t_in_pf[g] >= unit_sum(g, "prefill_link_s", MS), f"prefill_link_inner_{g}"
        prob += buffer_gib >= unit_sum(g, "buffer_bytes", 1 / GIB), f"buffer_{g}"

    # ---- constraints: memory per device -------------------------------------------------
    vram0, host0 = _memory(tables, *_cheapest(tables))
    vram_fixed = spec.norm_bytes + vram0.workspace_bytes + vram0.draft_bytes
    kv_vram = pulp.lpSum(sizes[g] * o.vram_bytes / GIB * v for g in range(len(groups)) for o, v in zip(tables.kv, z[g]))
    kv_host = pulp.lpSum(sizes[g] * o.host_bytes / GIB * v for g in range(len(groups)) for o, v in zip(tables.kv, z[g]))
    prob += (pulp.lpSum(sizes[g] * unit_sum(g, "vram_bytes", 1 / GIB) for g in range(n_units)) + 2 * buffer_gib
             + kv_vram <= (vram0.capacity_bytes - vram_fixed) / GIB), "accelerator_memory"
    prob += (pulp.lpSum(sizes[g] * (unit_sum(g, "host_bytes", 1 / GIB) + unit_sum(g, "comp_bytes", 1 / GIB))
                        for g in range(n_units))
             + kv_host <= (host0.capacity_bytes - host0.buffer_bytes) / GIB), "host_memory"

    # ---- constraints: quality (compensation) --------------------------------------------
    if options.quality is not None and spec.quantization:
        n_quantized = sum(1 for t in spec.tensors() if t.group in ("attn", "mlp"))
        prob += (pulp.lpSum(sizes[g] * unit_sum(g, "recovered") for g in range(len(groups)))
                 >= options.quality * n_quantized), "recovered_error"
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
    devices, streamed, ranks, kv = {}, [], {}, [0.0] * spec.layers
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
    return Placement(devices, tuple(kv), tuple(streamed), ranks)


def _infeasible(tables: OptionTables, status: str) -> InfeasiblePlanError:
    scn = tables.scenario
    total = sum(min(o.vram_bytes + o.host_bytes for o in opts) for opts in tables.tensor.values())
    capacity = scn.profile.vram_usable_bytes + scn.profile.host_usable_bytes
    return InfeasiblePlanError(
        f"no placement fits ({status.lower()}): weights alone take {fmt_bytes(total)}, accelerator and "
        f"host memory together offer {fmt_bytes(capacity)}; the KV cache and workspace need the rest. "
        "Add --ram or --vram, or shorten the context",
        "memory", total, capacity)
