"""The placement MILP (planner/solve/ilp.py) finds exactly the optimum of the cost model.

Small random problems are solved by brute force (every combination of tensor options and KV
levels scored with predict()) and by the ILP; the two must agree. Larger problems check that
the ILP's objective is the cost model's own total, that grouped layers stay feasible, that
more memory never makes the plan slower, and that infeasible problems name the resource.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

import planner.cost.attention
from assets.random_instances import (
    GIB, brute_force, memory_span, n_combinations, random_profile, random_spec, resident_vram_bytes, restrict,
    tight_instance, with_memory)
from planner.cost.options import Scenario
from planner.cost.terms import host_staging_bytes
from planner.errors import InfeasiblePlanError
from planner.hardware.profile import load_profile, with_overrides
from planner.solve.ilp import SolverOptions, solve_placement
from planner.solve.groups import layer_groups
from planner.model.modelfile import load_model_file
from planner.model.placement import Placement, uniform_placement
from planner.cost.evaluate import evaluate
from planner.model.presets import preset
from planner.model.spec import ModelSpec, Workload
from planner.units import fmt_bytes

EXACT = SolverOptions(gap_rel=1e-9, time_limit_s=60.0)
# For checks that hold for any answer the solver returns, optimal or not.
QUICK = SolverOptions(gap_rel=0.05, time_limit_s=2.0)  # stops at the first plan within 5 %
REL = 1e-6
SOLVER_SLACK_BYTES = 4096
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def fits_within_tolerance(prediction) -> bool:
    """Fits, up to the ~1 KiB the solver's feasibility tolerance can overshoot by (a known
    defect, pinned exactly by test_ilp_plans_never_exceed_capacity_by_a_single_byte)."""
    return all(m.used_bytes <= m.capacity_bytes + SOLVER_SLACK_BYTES for m in (prediction.vram, prediction.host))


def solve_and_check(scn: Scenario, options: SolverOptions = EXACT, tables=None):
    """Solve, and check the properties every answer must have: the objective is the cost
    model's total for the returned placement, and that placement fits."""
    solution = solve_placement(scn, options, tables)
    again = evaluate(scn, solution.placement)
    assert solution.objective_s == pytest.approx(again.total_s, rel=REL)
    assert solution.prediction.total_s == pytest.approx(again.total_s, rel=1e-12)
    assert fits_within_tolerance(again), (again.vram, again.host)
    return solution


# ---- ILP == brute force ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_ilp_matches_brute_force_on_random_option_subsets(seed):
    """1-3 layers, a random subset of each tensor's options and 2-3 KV levels (<= 3000
    combinations); the accelerator cannot hold everything and host memory is sometimes tight."""
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, scale=4), below_resident=True)
    tables = restrict(inst.tables, rng, budget=3000, kv_levels=rng.choice((2, 3)))
    assert 1 <= n_combinations(tables) <= 3000
    best = brute_force(tables)
    if best is None:
        with pytest.raises(InfeasiblePlanError):
            solve_placement(inst.scenario, EXACT, tables)
        return
    solution = solve_and_check(inst.scenario, EXACT, tables)
    assert solution.status == "optimal"
    assert solution.objective_s == pytest.approx(best.total_s, rel=REL)
    assert evaluate(inst.scenario, solution.placement).total_s == pytest.approx(best.total_s, rel=REL)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_ilp_matches_brute_force_with_every_option(seed, monkeypatch):
    """One layer, plain MLP (7 weight tensors with all 4 options, the embedding with 2) and two
    KV levels: 65536 combinations, none left out."""
    monkeypatch.setattr(planner.cost.attention, "KV_LEVELS", (0.0, 0.5))
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, layers=1, ffn="plain", quantized=False, scale=4),
                          below_resident=True)
    assert n_combinations(inst.tables) == 4**7 * 2 * 2
    best = brute_force(inst.tables)
    assert best is not None
    assert not evaluate(inst.scenario, uniform_placement(inst.scenario.spec, "gpu")).fits  # tight
    solution = solve_and_check(inst.scenario, EXACT, inst.tables)
    assert solution.objective_s == pytest.approx(best.total_s, rel=REL)


@pytest.mark.parametrize("seed", range(100, 104))
def test_ilp_matches_brute_force_with_a_draft_model(seed):
    """Speculative decoding adds constant draft time and draft VRAM; the optimum must still match."""
    rng = random.Random(seed)
    draft = random_spec(rng, layers=1, quantized=False, scale=1)
    inst = tight_instance(rng, spec=random_spec(rng, scale=4), host_tight=False, below_resident=True,
                          draft=draft, gamma=rng.randint(1, 4), acceptance=rng.uniform(0.3, 0.9))
    tables = restrict(inst.tables, rng, budget=2000, kv_levels=2)
    best = brute_force(tables)
    assert best is not None
    assert best.draft_step_s > 0 and best.vram.draft_bytes > 0
    solution = solve_and_check(inst.scenario, EXACT, tables)
    assert solution.objective_s == pytest.approx(best.total_s, rel=REL)


@pytest.mark.parametrize("seed", range(200, 204))
def test_ilp_matches_brute_force_under_a_quality_floor(seed):
    """Quantized model with compensation ranks (0, 8): the ILP honours the minimum recovered
    error fraction exactly like brute force filtering on Prediction.recovered_error."""
    rng = random.Random(seed)
    spec = random_spec(rng, layers=1, quantized=True, scale=4)
    recovery = {kind: {8: rng.uniform(0.2, 0.9)} for kind in
                ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    inst = tight_instance(rng, spec=spec, host_tight=False, below_resident=True, rank_choices=(0, 8),
                          rank_recovery=recovery)
    tables = restrict(inst.tables, rng, budget=4000, kv_levels=2)
    unconstrained = brute_force(tables)
    ceiling = max(o.recovered for opts in tables.tensor.values() for o in opts)
    quality = rng.uniform(0.05, 0.3) * ceiling
    best = brute_force(tables, quality=quality)
    assert best is not None, "the seeds are chosen so that the floor is reachable"
    solution = solve_and_check(inst.scenario, replace(EXACT, quality=quality), tables)
    assert solution.prediction.recovered_error >= quality - 1e-9
    assert solution.objective_s == pytest.approx(best.total_s, rel=REL)
    assert unconstrained.recovered_error < quality  # the floor binds: the fastest plan falls short
    assert best.total_s > unconstrained.total_s


# ---- the ILP and the cost model agree ---------------------------------------------------------

@pytest.mark.parametrize("seed", range(300, 308))
def test_objective_is_the_cost_model_total(seed):
    """Full option sets, 1-6 layers (one group per layer), sometimes a draft."""
    rng = random.Random(seed)
    fields = {}
    if rng.random() < 0.4:
        fields = dict(draft=random_spec(rng, layers=1, quantized=False, scale=1), gamma=rng.randint(1, 5),
                      acceptance=rng.uniform(0.2, 0.95))
    inst = tight_instance(rng, spec=random_spec(rng, layers=rng.randint(1, 6), scale=4), below_resident=True,
                          **fields)
    try:
        solution = solve_and_check(inst.scenario, QUICK, inst.tables)
    except InfeasiblePlanError as exc:
        assert exc.resource in ("host memory", "accelerator memory", "memory")
        return
    assert solution.prediction.total_s == pytest.approx(
        solution.prediction.prefill_s + solution.prediction.decode_steps * solution.prediction.decode_step_s)


def test_tiny_example_plan_on_a_shipped_profile_matches_evaluate():
    spec = load_model_file(str(EXAMPLES / "tiny.yaml")).spec
    scn = Scenario(spec, with_overrides(load_profile("rtx3060"), vram_bytes=int(1.25 * GIB)), Workload(1, 256, 64))
    solution = solve_and_check(scn, replace(QUICK, max_groups=4))
    assert set(solution.placement.devices.values()) != {"gpu"}  # 250 MiB usable: must offload


# ---- grouped layers ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers,max_groups", [(1, 16), (16, 16), (17, 16), (32, 16), (80, 16), (126, 16),
                                                  (20, 4), (9, 3), (5, 1), (40, 12)])
def test_layer_groups_partition_the_layers_in_order(n_layers, max_groups):
    groups = layer_groups(n_layers, max_groups)
    assert len(groups) <= max_groups
    assert sum(size for _, size in groups) == n_layers
    firsts = [first for first, _ in groups]
    assert firsts == [sum(size for _, size in groups[:i]) for i in range(len(groups))]
    assert all(size >= 1 for _, size in groups)
    if n_layers <= min(max_groups, 4):
        assert groups == [(i, 1) for i in range(n_layers)]
    sizes = [size for _, size in groups]
    assert len(set(sizes[:-1])) == len(sizes[:-1])  # no two interchangeable groups but the remainder


@pytest.mark.parametrize("seed,max_groups", [(400, 4), (401, 6), (402, 4), (403, 8)])
def test_grouped_ilp_is_feasible_and_agrees_with_evaluate(seed, max_groups):
    """20 layers in fewer groups: every layer of a group gets its group's configuration."""
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, layers=20, scale=4), host_tight=False, below_resident=True)
    options = replace(QUICK, max_groups=max_groups)
    solution = solve_and_check(inst.scenario, options, inst.tables)
    spec, placement = inst.scenario.spec, solution.placement
    for first, size in layer_groups(spec.layers, max_groups):
        signature = [[placement.device(t.name) for t in spec.layer_tensors(layer)]
                     + [placement.kv_host_fraction[layer]] for layer in range(first, first + size)]
        assert all(s == signature[0] for s in signature), f"group at layer {first} is not uniform"


@pytest.mark.parametrize("seed", [411, 412, 414])
def test_fewer_groups_never_beat_one_group_per_layer(seed):
    """Grouping restricts the choices, so its optimum can only be slower or equal. Four layers:
    the exact per-layer model closes its gap in about a second."""
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, layers=4, scale=4), host_tight=False, below_resident=True)
    exact = solve_and_check(inst.scenario, EXACT, inst.tables)
    grouped = solve_and_check(inst.scenario, replace(EXACT, max_groups=2), inst.tables)
    assert exact.status == "optimal"
    assert layer_groups(4, 2) == [(0, 1), (1, 3)]
    assert grouped.objective_s >= exact.objective_s * (1 - REL)


# ---- more memory never hurts --------------------------------------------------------------------

@pytest.mark.parametrize("seed", [500, 501, 504])
def test_more_vram_never_gives_a_slower_plan(seed):
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, layers=rng.randint(2, 4), scale=4), host_tight=False)
    lo_v, _, _, _ = memory_span(inst.tables)
    hi_v = resident_vram_bytes(inst.tables)
    profile = inst.scenario.profile
    totals = []
    for share in (0.05, 0.2, 0.4, 0.6, 0.8, 1.0, 1.3):
        vram = int(lo_v + share * (hi_v - lo_v))
        scn = replace(inst.scenario, profile=with_memory(profile, vram, profile.host.memory_bytes))
        solution = solve_and_check(scn)
        assert solution.status == "optimal"
        totals.append(solution.objective_s)
    assert all(b <= a * (1 + REL) for a, b in zip(totals, totals[1:])), totals
    assert totals[-1] < totals[0]  # the sweep spans a real trade-off


@pytest.mark.slow
def test_more_vram_never_gives_a_slower_plan_for_a_real_model():
    """Llama 3.2 1B (16 layers in 4 groups, which the solver closes in seconds) on the RTX 3060
    profile with 1.5-3.5 GiB of VRAM."""
    spec, workload = preset("llama-3.2-1b"), Workload(1, 1024, 128)
    options = SolverOptions(max_groups=4, time_limit_s=60.0)
    totals = []
    for vram_gib in (1.5, 2.0, 3.0, 3.5):
        profile = with_overrides(load_profile("rtx3060"), vram_bytes=int(vram_gib * GIB))
        solution = solve_and_check(Scenario(spec, profile, workload), options)
        assert solution.status == "optimal"
        totals.append(solution.objective_s)
    assert all(b <= a * (1 + options.gap_rel) for a, b in zip(totals, totals[1:])), totals
    assert totals[-1] < totals[0]


@pytest.mark.parametrize("seed", [510, 511])
def test_more_host_memory_never_gives_a_slower_plan(seed):
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, layers=2, scale=4), host_tight=True, below_resident=True)
    _, _, lo_h, hi_h = memory_span(inst.tables)
    staging = host_staging_bytes(inst.scenario)
    profile = inst.scenario.profile
    totals = []
    for share in (0.5, 0.7, 0.85, 1.0, 2.0):
        host = int(staging + lo_h + share * (hi_h - lo_h))
        scn = replace(inst.scenario, profile=with_memory(profile, profile.accelerator.memory_bytes, host))
        try:
            solution = solve_and_check(scn)
            assert solution.status == "optimal"
            totals.append(solution.objective_s)
        except InfeasiblePlanError:
            totals.append(math.inf)  # once a size fits, every larger one must fit too
    assert all(b <= a * (1 + REL) for a, b in zip(totals, totals[1:])), totals
    assert math.isfinite(totals[-1])


# ---- infeasible problems name the resource ------------------------------------------------------

def test_host_memory_too_small_names_host_memory_and_the_shortfall():
    scn = Scenario(preset("llama-3.1-70b"), with_overrides(load_profile("rtx4090"), ram_bytes=64 * GIB),
                   Workload(1, 2048, 256))
    with pytest.raises(InfeasiblePlanError) as info:
        solve_placement(scn)
    exc = info.value
    assert exc.resource == "host memory"
    assert exc.needed_bytes > exc.available_bytes > 0
    message = str(exc)
    assert "host memory" in message and "GiB" in message
    assert fmt_bytes(exc.needed_bytes) in message and fmt_bytes(exc.available_bytes) in message
    assert "--ram" in message  # the fix


def test_vram_too_small_for_the_workspace_names_accelerator_memory():
    scn = Scenario(preset("llama-3.1-8b"), with_overrides(load_profile("rtx4090"), vram_bytes=int(1.5 * GIB)),
                   Workload(1, 8192, 128))
    with pytest.raises(InfeasiblePlanError) as info:
        solve_placement(scn)
    exc = info.value
    assert exc.resource == "accelerator memory"
    assert exc.needed_bytes > exc.available_bytes > 0
    message = str(exc)
    assert "accelerator memory" in message and "workspace" in message
    assert fmt_bytes(exc.needed_bytes) in message and fmt_bytes(exc.available_bytes) in message


def test_a_comfortable_problem_keeps_everything_on_the_accelerator():
    spec = load_model_file(str(EXAMPLES / "tiny.yaml")).spec
    solution = solve_and_check(Scenario(spec, load_profile("rtx4090"), Workload(1, 256, 64)))
    assert set(solution.placement.devices.values()) == {"gpu"}
    assert solution.placement.kv_host_fraction == (0.0,) * spec.layers


# ---- known defects ------------------------------------------------------------------------------

def _stream_only_instance() -> tuple[Scenario, Placement]:
    """One layer, every matrix streamed, embedding resident, KV on the accelerator: a placement
    that uses no host compute (so needs no pinned activation staging), with host memory exactly
    its streamed weights and VRAM exactly its needs. A long prompt makes the staging large."""
    spec = ModelSpec(name="stream-only", family="llama", layers=1, hidden=64, intermediate=96, heads=4,
                     kv_heads=2, vocab=128, ffn="plain", dtype="fp32", max_context=4096)
    scn = Scenario(spec, random_profile(random.Random(11)), Workload(1, 1024, 16))
    placement = Placement({t.name: "gpu" if t.group == "embed" else "stream" for t in spec.tensors()}, (0.0,))
    need = evaluate(scn, placement)
    scn = replace(scn, profile=with_memory(scn.profile, need.vram.used_bytes, need.host.used_bytes))
    return scn, placement


def test_the_stream_only_instance_fits_without_staging():
    scn, placement = _stream_only_instance()
    feasible = evaluate(scn, placement)
    assert feasible.fits and feasible.host.buffer_bytes == 0
    assert host_staging_bytes(scn) > 4 * feasible.host.used_bytes  # counting staging would not fit


def test_lower_bound_does_not_reject_a_feasible_stream_only_problem():
    scn, placement = _stream_only_instance()
    solution = solve_and_check(scn)
    assert solution.objective_s <= evaluate(scn, placement).total_s * (1 + REL)


STAGING_SEEDS = (1, 3, 9, 10)


def _staging_instance(seed: int) -> tuple[Scenario, Placement]:
    """A problem whose best plan computes on the host, and the same problem with host memory cut
    to half a staging buffer below what that plan needs: its weights and KV still fit there,
    its staging buffer does not."""
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, layers=2, scale=4), host_tight=False, below_resident=True)
    best = solve_placement(inst.scenario, EXACT, inst.tables)
    host = best.prediction.host
    profile = inst.scenario.profile
    cut = replace(inst.scenario, profile=with_memory(profile, profile.accelerator.memory_bytes,
                                                     host.used_bytes - host.buffer_bytes // 2))
    return cut, best.placement


@pytest.mark.parametrize("seed", STAGING_SEEDS)
def test_the_staging_instances_need_staging_to_fit(seed):
    scn, placement = _staging_instance(seed)
    host = evaluate(scn, placement).host
    assert host.buffer_bytes == host_staging_bytes(scn) > 0  # the plan computes on the host
    assert host.used_bytes - host.buffer_bytes <= host.capacity_bytes < host.used_bytes


def test_ilp_counts_host_staging_when_it_computes_on_the_host():
    overflows = []
    for seed in STAGING_SEEDS:
        scn, _ = _staging_instance(seed)
        try:
            host = solve_placement(scn, EXACT).prediction.host
        except InfeasiblePlanError:
            continue  # also correct: nothing else may fit
        if host.used_bytes > host.capacity_bytes:
            overflows.append((seed, host.used_bytes - host.capacity_bytes, host.buffer_bytes))
    assert not overflows, f"(seed, bytes over, staging bytes) {overflows}"


def test_ilp_plans_never_exceed_capacity_by_a_single_byte():
    """Small tensors (4-500 KiB) make the tolerance visible: these seeds overflow by 0.4-1 KiB."""
    overflows = []
    for seed in (637, 720, 725, 729):
        rng = random.Random(seed)
        layers = rng.choice((2, 3))
        inst = tight_instance(rng, spec=random_spec(rng, layers=layers), host_tight=False, below_resident=True)
        solution = solve_placement(inst.scenario, EXACT, inst.tables)
        vram = solution.prediction.vram
        if vram.used_bytes > vram.capacity_bytes:
            overflows.append((seed, vram.used_bytes - vram.capacity_bytes))
    assert not overflows, f"(seed, bytes over) {overflows}"
