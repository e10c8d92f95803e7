"""The placement MILP for llama.cpp: what `-ngl`, `-ot` and `-nkvo` can express, priced by
planner/cost/llamacpp.py.

Variables: a binary per GGUF matrix (on the GPU or in host memory) and per layer (KV cache
and attention on the GPU), the latter non-decreasing over layers because `-ngl N` offloads
the last N; a continuous variable per consecutive pair of graph steps that is at least
|device(a) - device(b)|, so the objective pays each change of backend. llama.cpp runs
everything in sequence, so the objective (prefill + decode steps x step time) is a plain
sum of the items' costs: the model is exact, one set of variables per layer, no grouping.
Times are in milliseconds and memory in GiB inside the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pulp

from planner.cost.evaluate import Prediction
from planner.cost.llamacpp import (LlamaPlacement, LlamaScenario, attention_decode, attention_prefill,
                                   compute_buffer_bytes, evaluate_llamacpp, layer_sequence, memory_llamacpp,
                                   switch_costs, weight_decode, weight_prefill)
from planner.errors import InfeasiblePlanError
from planner.solve.ilp import SolverOptions, _new_var, pick_solver
from planner.units import fmt_bytes

MS, GIB = 1e3, float(2**30)


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
    name, solver = pick_solver(options)
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
    w = {t.name: _new_var(prob, f"gpu_{i}", cat=pulp.LpBinary) for i, t in enumerate(movable)}
    k = [_new_var(prob, f"kv_gpu_{i}", cat=pulp.LpBinary) for i in range(spec.layers)]
    for a, b in zip(k, k[1:]):
        prob += a <= b  # -ngl offloads the last layers
    objective = pulp.lpSum(weights_ms[n]["cpu"] + (weights_ms[n]["gpu"] - weights_ms[n]["cpu"]) * v
                           for n, v in w.items())
    objective += pulp.lpSum(attention_ms[False] + (attention_ms[True] - attention_ms[False]) * v for v in k)
    objective += (scn.fit.token_s * scn.decode_steps) * MS
    one_decode, prefill = switch_costs(scn)
    phases = [(one_decode.total_s * scn.decode_steps * MS, False)] + [(c.total_s * MS, g) for c, g in prefill]
    n_pairs = 0
    for cost_ms, weights_on_gpu in phases:
        steps = _step_exprs(scn, w, k, weights_on_gpu)
        for a, b in zip(steps, steps[1:]):
            y = _new_var(prob, f"switch_{n_pairs}", low=0)
            n_pairs += 1
            prob += y >= a - b
            prob += y >= b - a
            objective += cost_ms * y
    prob += objective, "total_time_ms"
    _memory_rows(prob, scn, w, k, margin_bytes)
    return prob, w, k


def _step_exprs(scn: LlamaScenario, w: dict, k: list, weights_on_gpu: bool) -> list:
    """Every graph step in order, as 1 (GPU) / 0 (host) expressions: embedding lookup (host),
    each layer's matrices with its attention, the output matrix."""
    steps: list = [0]
    for layer in range(scn.spec.layers):
        for name in layer_sequence(scn, layer):
            if name == "attention":
                steps.append(k[layer])
            else:
                steps.append(1 if weights_on_gpu else w[name])
    steps.append(w["output.weight"])
    return steps


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
