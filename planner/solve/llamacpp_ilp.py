"""The placement MILP for llama.cpp: what `-ngl`, `-ot` and `-nkvo` can express, priced by
planner/cost/llamacpp.py.

Variables: a binary per GGUF matrix (on the GPU or in host memory) and per layer (KV cache
and attention on the GPU), the latter non-decreasing over layers because `-ngl N` offloads
the last N; likewise each kind of matrix (attn_q, ffn_down_exps ...) is on the GPU for the
last n_kind layers. Layers of one shape cost the same wherever they sit, so this loses
nothing on the separable terms, removes the layer symmetry that keeps branch and bound
from proving optimality, and gives `-ot` patterns over layer ranges (`--n-cpu-moe N` for
experts). A continuous variable per consecutive pair of graph steps that is at least
|device(a) - device(b)|, so the objective pays each change of backend. llama.cpp runs
everything in sequence, so the objective (prefill + decode steps x step time) is a plain
sum of the items' costs: the model is exact, one set of variables per layer, no grouping.
Times are in milliseconds and memory in GiB inside the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import pulp

from planner.cost.evaluate import Prediction
from planner.cost.llamacpp import (LlamaPlacement, LlamaScenario, attention_decode, attention_prefill,
                                   compute_buffer_bytes, evaluate_llamacpp, layer_sequence, memory_llamacpp,
                                   switch_costs, weight_decode, weight_prefill)
from planner.errors import InfeasiblePlanError
from planner.solve.ilp import SolverOptions, pick_solver
from planner.solve.problem import new_var
from planner.units import fmt_bytes

MS, GIB = 1e3, float(2**30)
LLAMACPP_GAP = 1e-3


@dataclass(frozen=True)
class LlamaSolution:
    placement: LlamaPlacement
    prediction: Prediction
    solver: str
    status: str
    objective_s: float
    solve_time_s: float
    n_variables: int


def _item_costs_ms(scn: LlamaScenario) -> tuple[dict, dict]:
    """Per matrix, objective ms on the GPU and in host memory; per layer-device, attention ms."""
    steps = scn.decode_steps
    weights = {}
    for t in scn.tensors:
        weights[t.name] = {d: (weight_prefill(scn, t, d).total_s + steps * weight_decode(scn, t, d).total_s) * MS
                           for d in ("gpu", "cpu")}
    attention = {on: (attention_prefill(scn, on).total_s + steps * attention_decode(scn, on).total_s) * MS
                 for on in (True, False)}
    return weights, attention


def solve_llamacpp(scn: LlamaScenario, options: SolverOptions = SolverOptions()) -> LlamaSolution:
    if not scn.has_gpu:  # nothing can be offloaded: one placement
        lp = LlamaPlacement(frozenset(), (False,) * scn.spec.layers)
        pred = evaluate_llamacpp(scn, lp)
        _check_fits(pred)
        return LlamaSolution(lp, pred, "none", "optimal", pred.total_s, 0.0, 0)
    # 0.1% of the predicted time is far inside the model's accuracy, and proving 0.01% on a
    # knapsack of near-identical layers takes branch and bound many seconds.
    name, solver = pick_solver(replace(options, gap_rel=max(options.gap_rel, LLAMACPP_GAP)))
    margin, elapsed = (0.0, 0.0), 0.0
    for _attempt in range(3):
        prob, w, k = build_llamacpp_problem(scn, margin)
        start = time.perf_counter()
        prob.solve(solver)
        elapsed += time.perf_counter() - start
        if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            raise _infeasible(scn, pulp.LpStatus[prob.status])
        lp = LlamaPlacement(frozenset(n for n, v in w.items() if (v.value() or 0) > 0.5),
                            tuple((v.value() or 0) > 0.5 for v in k))
        pred = evaluate_llamacpp(scn, lp)
        over = (pred.vram.used_bytes - pred.vram.capacity_bytes, pred.host.used_bytes - pred.host.capacity_bytes)
        if max(over) <= 0:
            break
        margin = tuple(m + 4 * max(o, 0) for m, o in zip(margin, over))
    else:
        raise InfeasiblePlanError("the solver's plans keep exceeding memory by a few bytes; leave a little "
                                  "more --vram / --ram free", "memory")
    status = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time limit (best found)"
    return LlamaSolution(lp, pred, name, status, pulp.value(prob.objective) / MS, elapsed, len(prob.variables()))


def build_llamacpp_problem(scn: LlamaScenario, margin_bytes: tuple[float, float] = (0.0, 0.0)):
    spec = scn.spec
    prob = pulp.LpProblem("offplan_llamacpp", pulp.LpMinimize)
    weights_ms, attention_ms = _item_costs_ms(scn)
    movable = [t for t in scn.tensors if t.kind != "token_embd"]
    # GGUF tensors standing for one ModelSpec tensor (an expert bank's up, gate and down) move
    # together, as --n-cpu-moe moves them, so that a plan records exactly what was priced.
    by_member = {}
    for t in movable:
        by_member.setdefault(t.members, new_var(prob, f"gpu_{len(by_member)}", cat=pulp.LpBinary))
    w = {t.name: by_member[t.members] for t in movable}
    k = [new_var(prob, f"kv_gpu_{i}", cat=pulp.LpBinary) for i in range(spec.layers)]
    for a, b in zip(k, k[1:]):
        prob += a <= b  # -ngl offloads the last layers
    by_kind: dict[str, list] = {}
    for t in movable:
        if t.layer is not None:
            by_kind.setdefault(t.kind, []).append((t.layer, w[t.name]))
    for pairs in by_kind.values():  # each kind of matrix on the GPU for the last n layers
        ordered = [v for _, v in sorted(pairs, key=lambda p: p[0])]
        for a, b in zip(ordered, ordered[1:]):
            prob += a <= b
    objective = pulp.lpSum(weights_ms[n]["cpu"] + (weights_ms[n]["gpu"] - weights_ms[n]["cpu"]) * v
                           for n, v in w.items())  # a shared variable adds each tensor's cost
    objective += pulp.lpSum(attention_ms[False] + (attention_ms[True] - attention_ms[False]) * v for v in k)
    objective += (scn.fit.token_s * scn.decode_steps) * MS
    one_decode, prefill = switch_costs(scn)
    phases = [(one_decode.total_s * scn.decode_steps * MS, False)] + [(c.total_s * MS, g) for c, g in prefill]
    for cost_ms, weights_on_gpu in phases:
        for diff in _switch_terms(scn, w, k, weights_on_gpu):
            if isinstance(diff, tuple):  # |a - b| of two variable sums: an epigraph variable
                y = new_var(prob, f"switch_{len(prob.variables())}", low=0)
                prob += y >= diff[0] - diff[1]
                prob += y >= diff[1] - diff[0]
                objective += cost_ms * y
            else:
                objective += cost_ms * diff
    prob += objective, "total_time_ms"
    _memory_rows(prob, scn, w, k, margin_bytes)
    return prob, w, k


def _step_expr(scn: LlamaScenario, w: dict, k: list, layer: int, name: str, weights_on_gpu: bool):
    if name == "attention":  # big prompt batches run attention on the GPU either way (no -nkvo here)
        return 1 if weights_on_gpu else k[layer]
    return 1 if weights_on_gpu else w[name]


def _switch_terms(scn: LlamaScenario, w: dict, k: list, weights_on_gpu: bool) -> list:
    """The changes of device along the graph, as linear expressions or (a, b) pairs meaning |a - b|.

    Two consecutive steps of the same layer, over a run of layers where both exist, are suffix
    indicators (GPU for the last n layers), so the changes summed over the run are
    |sum of a - sum of b|: one term per kind of pair, not one per layer. Between layers (the
    last step of one and the first of the next) and at the ends, one term per boundary."""
    n = scn.spec.layers
    seqs = [layer_sequence(scn, layer) for layer in range(n)]
    kinds = [[name.split(".")[2] if name != "attention" else name for name in seq] for seq in seqs]
    runs: dict[tuple[str, str], list[list[int]]] = {}
    for layer in range(n):
        for a, b in zip(kinds[layer], kinds[layer][1:]):
            layers = runs.setdefault((a, b), [])
            if layers and layers[-1][-1] == layer - 1:
                layers[-1].append(layer)
            else:
                layers.append([layer])
    terms = []
    for (a, b), groups in runs.items():
        for group in groups:
            xa = [_step_expr(scn, w, k, i, seqs[i][kinds[i].index(a)], weights_on_gpu) for i in group]
            xb = [_step_expr(scn, w, k, i, seqs[i][kinds[i].index(b)], weights_on_gpu) for i in group]
            terms.append(_abs_of_sums(xa, xb))
    first = [_step_expr(scn, w, k, i, seqs[i][0], weights_on_gpu) for i in range(n)]
    last = [_step_expr(scn, w, k, i, seqs[i][-1], weights_on_gpu) for i in range(n)]
    boundaries = [(0, first[0])] + list(zip(last, first[1:])) + [(last[-1], w["output.weight"])]
    terms += [_abs_of_sums([a], [b]) for a, b in boundaries]
    return terms


def _abs_of_sums(xa: list, xb: list):
    """|sum(xa) - sum(xb)| for two suffix indicators over the same layers. Linear when one side
    is all constants (every step there on the GPU, or every step on the host); else the pair
    (a, b), priced through an epigraph variable."""
    const_a, const_b = all(isinstance(x, int) for x in xa), all(isinstance(x, int) for x in xb)
    if const_a and const_b:
        return abs(sum(xa) - sum(xb))
    if const_a or const_b:
        constant, variable = (xa, xb) if const_a else (xb, xa)
        total = pulp.lpSum(variable)
        return total if sum(constant) == 0 else len(constant) - total  # constants are all 0 or all 1
    return (pulp.lpSum(xa), pulp.lpSum(xb))


def _memory_rows(prob, scn: LlamaScenario, w: dict, k: list, margin_bytes: tuple[float, float]) -> None:
    p, spec = scn.profile, scn.spec
    size = {t.name: t.n_bytes for t in scn.tensors}
    empty = LlamaPlacement(frozenset(), (False,) * spec.layers)
    vram0, host0 = memory_llamacpp(scn, empty)  # everything in host memory
    kv_layer = scn.workload.batch * scn.ctx_tokens * scn.kv_bytes_per_token_layer
    norm_layer = spec.norm_bytes / spec.layers
    logits = compute_buffer_bytes(scn, True) - compute_buffer_bytes(scn, False)
    out = w["output.weight"]
    gpu = (pulp.lpSum(size[n] / GIB * v for n, v in w.items()) + pulp.lpSum((kv_layer + norm_layer) / GIB * v for v in k)
           + vram0.buffer_bytes / GIB + logits / GIB * out)
    prob += gpu <= (p.vram_usable_bytes - margin_bytes[0]) / GIB, "accelerator_memory"
    host = (host0.used_bytes / GIB - pulp.lpSum(size[n] / GIB * v for n, v in w.items())
            - pulp.lpSum((kv_layer + norm_layer) / GIB * v for v in k) - logits / GIB * out)
    prob += host <= (p.host_usable_bytes - margin_bytes[1]) / GIB, "host_memory"


def _check_fits(pred: Prediction) -> None:
    if not pred.host.fits:
        raise InfeasiblePlanError(
            f"needs {fmt_bytes(pred.host.used_bytes)} of host memory, {fmt_bytes(pred.host.capacity_bytes)} "
            "available; add --ram, shorten the context (-c), or pick a smaller quantization", "host memory",
            pred.host.used_bytes, pred.host.capacity_bytes)


def _infeasible(scn: LlamaScenario, status: str) -> InfeasiblePlanError:
    p = scn.profile
    total = sum(t.n_bytes for t in scn.tensors)
    return InfeasiblePlanError(
        f"no llama.cpp placement fits ({status.lower()}): the weights take {fmt_bytes(total)}, GPU and host "
        f"memory together offer {fmt_bytes(p.vram_usable_bytes + p.host_usable_bytes)} before the KV cache and "
        "compute buffers; add --ram, shorten the context (-c) or pick a smaller quantization",
        "memory", total, p.vram_usable_bytes + p.host_usable_bytes)
