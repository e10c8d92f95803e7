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
from planner.cost.evaluate import OptionTables, evaluate
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
