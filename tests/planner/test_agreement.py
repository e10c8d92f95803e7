"""The ILP, `evaluate` and the simulator agree on the decode step, host memory bus and copy
slowdown included, on random small instances (tests/assets/random_instances.py) where the
simulator's model is exact: weights resident or streamed (none computed on the host), the
KV cache on the accelerator, no compensation, and two prefetch buffers taken stage by stage
(the ILP's model). Random machines are sometimes loopback, with a measured bus figure and
a copy slowdown, so stages bound by the memory bus and slowed compute both occur."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from assets.random_instances import random_spec, tight_instance
from planner.cost.evaluate import OptionTables, chosen_options, evaluate, predict
from planner.cost.runtime import LLAMACPP, OFFPLAN
from planner.cost.stage import OFFPLAN_RULE, rule_for
from planner.errors import InfeasiblePlanError
from planner.plan.record import make_plan
from planner.simulate.engine import simulate_plan
from planner.solve.ilp import SolverOptions, solve_placement

EXACT = SolverOptions(gap_rel=1e-9, time_limit_s=60.0)
REL = 1e-6


def _exact_for_the_simulator(tables: OptionTables) -> OptionTables:
    """Options whose stage the simulator schedules exactly as the ILP sums it."""
    tensor = {name: [o for o in opts if o.device in ("gpu", "stream") and o.rank == 0]
              for name, opts in tables.tensor.items()}
    return replace(tables, tensor=tensor, kv=[o for o in tables.kv if o.host_fraction == 0])


def test_ilp_evaluate_and_simulator_agree_on_the_decode_step():
    solved, memory_bound, slowed = 0, 0, 0
    for seed in range(60):
        rng = random.Random(seed)
        spec = random_spec(rng, layers=rng.choice((1, 2, 3, 6)), quantized=False)
        inst = tight_instance(rng, spec=spec, host_tight=False)
        try:
            solution = solve_placement(inst.scenario, EXACT, _exact_for_the_simulator(inst.tables))
        except InfeasiblePlanError:
            continue
        predicted = evaluate(inst.scenario, solution.placement)
        simulated = simulate_plan(make_plan(inst.scenario, solution.placement, "ilp"), buffers=2,
                                  prefetch="next-stage")
        assert solution.decode_step_s == pytest.approx(predicted.decode_step_s, rel=REL), seed
        assert simulated.decode_step_s == pytest.approx(predicted.decode_step_s, rel=REL), seed
        assert simulated.ilp_decode_step_s == pytest.approx(predicted.decode_step_s, rel=1e-12)
        solved += 1
        memory_bound += any(s.bound("decode") == "memory" for s in predicted.stages)
        slowed += any(s.decode.lagged_s("path") > 0 for s in predicted.stages)
    # The instances exercise what the check is about.
    assert solved >= 30 and memory_bound >= 3 and slowed >= 2, (solved, memory_bound, slowed)


def test_a_runtime_is_data_to_the_stage_rule():
    """llama.cpp copies host-held weights for a prompt batch before computing with them: its
    rule charges the prefill copy to the stage's own path. The ILP and `evaluate` follow the
    rule they are given, and agree under it."""
    rule = rule_for(LLAMACPP)
    assert rule_for(OFFPLAN) is OFFPLAN_RULE
    assert rule.term("prefill", "prefetch").operand == "path" and rule.term("prefill", "prefetch").lag == 0
    checked = 0
    for seed in range(8):
        rng = random.Random(seed)
        inst = tight_instance(rng, spec=random_spec(rng, quantized=False), host_tight=False)
        tables = replace(inst.tables, rule=rule)
        try:
            solution = solve_placement(inst.scenario, EXACT, tables)
        except InfeasiblePlanError:
            continue
        tensor, kv = chosen_options(tables, solution.placement)
        under_rule = predict(tables, tensor, kv)
        assert solution.objective_s == pytest.approx(under_rule.total_s, rel=REL)
        overlapped = predict(inst.tables, tensor, kv)
        for stage, timing, before in zip(tables.stages, under_rule.stages, overlapped.stages):
            copies = sum(tensor[t.name].prefill_link_s for t in stage.tensors)
            assert timing.prefill.operand_s("path") == pytest.approx(before.prefill_path.total_s + copies,
                                                                     rel=1e-12, abs=1e-15)
        assert under_rule.prefill_start_s == 0.0
        checked += 1
    assert checked >= 4
