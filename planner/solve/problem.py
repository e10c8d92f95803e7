"""The placement MILP (DESIGN §4), built from the option tables and the stage rule.

Variables: one-hot binaries per tensor over its options (device x prefill mode x rank),
one-hot binaries per layer group over KV host-fraction levels, an epigraph variable per
stage and phase for the max over the stage's operands, and the largest streamed stage
(buffer size). Every stage constraint is the rule of planner/cost/stage.py read term by
term, so a new term or a rule with other overlap rules needs no edit here. Objective:
prefill time + decode steps x step time. Times are in milliseconds and memory in GiB inside
the model, to keep coefficients well scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulp

from planner.cost.evaluate import OptionTables, memory_use, predict
from planner.cost.stage import PHASES, Term
from planner.cost.terms import host_staging_bytes
from planner.model.placement import Placement
from planner.solve.groups import EXACT_LAYERS, segment_groups

MS = 1e3
GIB = float(2**30)
@dataclass(frozen=True)
class Problem:
    """The MILP and what reading its answer needs."""

    prob: pulp.LpProblem
    x: list  # x[g][i][k]: tensor i of unit g (groups, then the head) takes its option k
    z: list  # z[g][k]: the layers of group g take KV level k
    groups: list[tuple[int, int]]  # (first layer, layers) per group
    decode_ms: pulp.LpAffineExpression  # one decode step (draft included), as the ILP sees it
    prefill_ms: pulp.LpAffineExpression


def new_var(prob: pulp.LpProblem, name: str, low: float | None = None, cat: str = pulp.LpContinuous):
    """A variable owned by `prob` (PuLP >= 3.3, and the only way from PuLP 4); free-standing
    on older PuLP."""
    add = getattr(prob, "add_variable", None)
    if add is not None:
        return add(name, lowBound=low, cat=cat)
    return pulp.LpVariable(name, lowBound=low, cat=cat)


class _Units:
    """The ILP's stages: one per layer group (its first layer stands for every layer of the
    group), then the head. Holds the choice variables and turns terms into expressions."""

    def __init__(self, prob: pulp.LpProblem, tables: OptionTables, groups: list[tuple[int, int]]):
        self.tables, self.groups = tables, groups
        spec, head = tables.scenario.spec, tables.stages[-1]
        self.rep = [spec.layer_tensors(first) for first, _ in groups] + [head.tensors]
        self.stage_names = [tables.stages[first].name for first, _ in groups] + [head.name]
        self.sizes = [size for _, size in groups] + [1]
        self.x = [[self._one_hot(prob, f"x_{g}_{i}", len(tables.tensor[t.name])) for i, t in enumerate(ts)]
                  for g, ts in enumerate(self.rep)]
        self.z = [self._one_hot(prob, f"kv_{g}", len(tables.kv)) for g in range(len(groups))]
        self.prob = prob
        self.t_inner = {ph: [new_var(prob, f"T_{ph}_inner_{g}", low=0) for g in range(len(groups))] for ph in PHASES}
        self.t_outer = {ph: [new_var(prob, f"T_{ph}_{g}", low=0) for g in range(len(self.rep))] for ph in PHASES}
        self.buffer_gib = new_var(prob, "largest_streamed_stage_gib", low=0)
        # 1 when anything computes on the host: the pinned activation staging is needed then.
        self.host_compute = new_var(prob, "host_compute", cat=pulp.LpBinary)

    @staticmethod
    def _one_hot(prob, prefix: str, n: int) -> list:
        return [new_var(prob, f"{prefix}_{k}", cat=pulp.LpBinary) for k in range(n)]

    def __len__(self) -> int:
        return len(self.rep)

    def choices(self, g: int):
        """(option, variable) of every tensor of unit g, then of its KV levels."""
        for t, vars_ in zip(self.rep[g], self.x[g]):
            yield from zip(self.tables.tensor[t.name], vars_)
        if g < len(self.groups):
            yield from zip(self.tables.kv, self.z[g])

    def expr(self, g: int, read, scale: float = MS):
        """Σ read(option) x its variable over unit g's choices, times `scale`."""
        return pulp.lpSum(read(o) * scale * v for o, v in self.choices(g))

    def operand(self, g: int, following: int | None, phase: str, operand: str):
        """The stage rule for one operand of unit g: its own lag-0 terms and the lag-1 terms
        of the unit after it (`following`). Seconds are summed per variable before scaling."""
        terms = [t for t in self.tables.rule.phase_terms(phase) if t.operand == operand]
        const, coef = 0.0, {}
        for unit, lag in ((g, 0), (following, 1)):
            if unit is None:
                continue
            chosen = [t for t in terms if t.lag == lag]
            fixed = (self.tables.fixed_decode if phase == "decode" else self.tables.fixed_prefill)[
                self.stage_names[unit]]
            const += _read(chosen, fixed)
            for o, v in self.choices(unit):
                coef[v] = coef.get(v, 0.0) + _read(chosen, o)
        return const * MS + pulp.lpSum(c * MS * v for v, c in coef.items() if c)


def _read(terms: list[Term], item) -> float:
    total = 0.0
    for t in terms:
        total += t.of(item)
    return total


# Row order of the stage constraints, per unit and then inside a group. It is the order of
# the model's first version: the solver stops within its gap at a plan that depends on the
# order of rows, and the shipped examples' plans stay the same with it.
_OUTER_ROWS = (("decode", "path"), ("decode", "link"), ("prefill", "path"), ("prefill", "link"),
               ("decode", "memory"), ("prefill", "memory"))
_INNER_ROWS = (("decode", "memory"), ("prefill", "memory"), ("decode", "path"), ("decode", "link"),
               ("prefill", "path"), ("prefill", "link"))


def _phase_time(units: _Units, phase: str):
    """A phase's time: every unit's epigraph variable (inner ones once per layer of the group
    after the first) and, for a phase that does not wrap around, the wait before its first
    stage."""
    rule = units.tables.rule
    total = (pulp.lpSum((m - 1) * t for m, t in zip(units.sizes, units.t_inner[phase]))
             + pulp.lpSum(units.t_outer[phase]))
    if phase in rule.cyclic_phases or not rule.start_operands:
        return total
    starts = [_lagged(units, 0, phase, op) for op in rule.start_operands]
    if len(starts) == 1:
        return total + starts[0]
    start = new_var(units.prob, f"T_{phase}_start", low=0)
    for k, expr in enumerate(starts):
        units.prob += start >= expr, f"{phase}_start_{k}"
    return total + start


def _stage_constraints(units: _Units) -> None:
    """Each unit's epigraph variables bound every operand of the stage rule; inside a group a
    layer is followed by an identical one, the group's last layer by the next unit."""
    prob, rule, n = units.prob, units.tables.rule, len(units)
    for g in range(n):
        for phase, op in _OUTER_ROWS:
            prob += units.t_outer[phase][g] >= units.operand(g, rule.following(g, n, phase), phase, op), \
                f"{phase}_{op}_{g}"
        if g < len(units.groups) and units.sizes[g] > 1:
            for phase, op in _INNER_ROWS:
                prob += units.t_inner[phase][g] >= units.operand(g, g, phase, op), f"{phase}_{op}_inner_{g}"
        prob += units.buffer_gib >= units.expr(g, lambda o: getattr(o, "buffer_bytes", 0), 1 / GIB), f"buffer_{g}"


def _lagged(units: _Units, g: int, phase: str, operand: str):
    """Unit g's lag-1 terms on `operand`: what the stage before it waits for."""
    terms = [t for t in units.tables.rule.phase_terms(phase) if t.operand == operand and t.lag == 1]
    return units.expr(g, lambda o: _read(terms, o))


def _cheapest(tables: OptionTables):
    """Any fixed choice; used to read placement-independent constants through predict()."""
    tensor = {name: opts[0] for name, opts in tables.tensor.items()}
    return tensor, [tables.kv[0]] * tables.scenario.spec.layers


def _memory_constraints(units: _Units, margin_bytes: tuple[float, float]) -> None:
    prob, tables = units.prob, units.tables
    scn = tables.scenario
    vram0, host0 = memory_use(tables, *_cheapest(tables), 0)
    vram_fixed = scn.spec.norm_bytes + vram0.workspace_bytes + vram0.draft_bytes
    vram = pulp.lpSum(units.sizes[g] * units.expr(g, lambda o: o.vram_bytes, 1 / GIB) for g in range(len(units)))
    prob += (vram + 2 * units.buffer_gib <= (vram0.capacity_bytes - vram_fixed - margin_bytes[0]) / GIB,
             "accelerator_memory")
    host = pulp.lpSum(units.sizes[g] * units.expr(g, lambda o: o.host_bytes + getattr(o, "comp_bytes", 0), 1 / GIB)
                      for g in range(len(units)))
    prob += (host + host_staging_bytes(scn) / GIB * units.host_compute
             <= (host0.capacity_bytes - margin_bytes[1]) / GIB, "host_memory")
    for g, slots in enumerate(units.x):  # any host computation needs the staging buffers
        for i, (t, vars_) in enumerate(zip(units.rep[g], slots)):
            for k, (o, v) in enumerate(zip(tables.tensor[t.name], vars_)):
                if o.device == "cpu":
                    prob += units.host_compute >= v, f"host_compute_{g}_{i}_{k}"
    for g, vars_ in enumerate(units.z):
        for k, (o, v) in enumerate(zip(tables.kv, vars_)):
            if o.host_fraction > 0:
                prob += units.host_compute >= v, f"host_compute_kv_{g}_{k}"


def build_problem(tables: OptionTables, options, margin_bytes: tuple[float, float] = (0.0, 0.0)) -> Problem:
    """The MILP for `options` (ilp.SolverOptions). `margin_bytes` = (accelerator, host)
    memory kept free beyond the model."""
    scn, spec = tables.scenario, tables.scenario.spec
    prob = pulp.LpProblem("offplan_placement", pulp.LpMinimize)
    max_groups = options.max_groups
    if spec.moe is not None and spec.layers > EXACT_LAYERS:
        max_groups = min(max_groups, options.moe_max_groups)
    groups = segment_groups(spec, max_groups)
    units = _Units(prob, tables, groups)
    constants = predict(tables, *_cheapest(tables))
    prefill_ms = _phase_time(units, "prefill") + constants.draft_prefill_s * MS
    decode_ms = _phase_time(units, "decode") + constants.draft_step_s * MS
    total_ms = prefill_ms + scn.decode_steps * decode_ms
    n_quantized = sum(1 for t in spec.tensors() if t.group in ("attn", "mlp")) if spec.quantization else 0
    recovered = pulp.lpSum(units.sizes[g] * units.expr(g, lambda o: getattr(o, "recovered", 0.0), 1.0)
                           for g in range(len(groups)))
    if options.quality_mode == "max" and n_quantized:
        prob.sense = pulp.LpMaximize
        prob += recovered / n_quantized, "mean_recovered"
    else:
        prob += total_ms, "total_time_ms"
    if options.time_budget_s is not None:
        prob += total_ms <= options.time_budget_s * MS, "time_budget"
    for g, slots in enumerate(units.x):
        for i, vars_ in enumerate(slots):
            prob += pulp.lpSum(vars_) == 1, f"one_option_{g}_{i}"
    for g, vars_ in enumerate(units.z):
        prob += pulp.lpSum(vars_) == 1, f"one_kv_level_{g}"
    _stage_constraints(units)
    _memory_constraints(units, margin_bytes)
    if options.quality is not None and n_quantized:
        prob += recovered >= options.quality * n_quantized, "recovered_error"
    return Problem(prob, units.x, units.z, groups, decode_ms, prefill_ms)


def read_placement(tables: OptionTables, problem: Problem) -> Placement:
    """The placement the solved problem chose: each group's choice for all its layers."""
    spec = tables.scenario.spec

    def chosen(vars_):
        return max(range(len(vars_)), key=lambda i: vars_[i].value() or 0.0)

    devices, streamed, ranks, kv, gpu_experts = {}, [], {}, [0.0] * spec.layers, {}
    for g, slots in enumerate(problem.x):
        if g < len(problem.groups):
            first, size = problem.groups[g]
            layers = [spec.layer_tensors(layer) for layer in range(first, first + size)]
            for layer in range(first, first + size):
                kv[layer] = tables.kv[chosen(problem.z[g])].host_fraction
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
