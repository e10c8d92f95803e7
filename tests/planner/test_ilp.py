"""The placement MILP (planner/ilp.py) finds exactly the optimum of the cost model.

Small random problems are solved by brute force (every combination of tensor options and KV
levels scored with predict()) and by the ILP; the two must agree. Larger problems check that
the ILP's objective is the cost model's own total, that grouped layers stay feasible, that
more memory never makes the plan slower, and that infeasible problems name the resource.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

import planner.cost
from assets.random_instances import (
    GIB, brute_force, memory_span, n_combinations, random_profile, random_spec, resident_vram_bytes, restrict,
    tight_instance, with_memory)
from planner.cost import Scenario, host_staging_bytes
from planner.errors import InfeasiblePlanError
from planner.hardware import load_profile, with_overrides
from planner.ilp import SolverOptions, layer_groups, solve_placement
from planner.modelfile import load_model_file
from planner.placement import Placement, uniform_placement
from planner.predict import evaluate, option_tables
from planner.presets import preset
from planner.spec import ModelSpec, Workload
from planner.units import fmt_bytes

EXACT = SolverOptions(gap_rel=1e-9, time_limit_s=60.0)
REL = 1e-6
EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples"


def solve_and_check(scn: Scenario, options: SolverOptions = EXACT, tables=None):
    """Solve, and check the properties every answer must have: the objective is the cost
    model's total for the returned placement, and that placement fits."""
    solution = solve_placement(scn, options, tables)
    again = evaluate(scn, solution.placement)
    assert solution.objective_s == pytest.approx(again.total_s, rel=REL)
    assert solution.prediction.total_s == pytest.approx(again.total_s, rel=1e-12)
    assert again.fits, (again.vram, again.host)
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


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_ilp_matches_brute_force_with_every_option(seed, monkeypatch):
    """One layer, plain MLP (7 weight tensors with all 4 options, the embedding with 2) and two
    KV levels: 65536 combinations, none left out."""
    monkeypatch.setattr(planner.cost, "KV_LEVELS", (0.0, 0.5))
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
    if best is None:
        pytest.skip("no option subset reaches the quality floor")  # pragma: no cover - seeds are chosen
    solution = solve_and_check(inst.scenario, replace(EXACT, quality=quality), tables)
    assert solution.prediction.recovered_error >= quality - 1e-9
    assert solution.objective_s == pytest.approx(best.total_s, rel=REL)
    assert best.total_s >= unconstrained.total_s * (1 - REL)


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
        solution = solve_and_check(inst.scenario, EXACT, inst.tables)
    except InfeasiblePlanError as exc:
        assert exc.resource in ("host memory", "accelerator memory", "memory")
        return
    assert solution.prediction.total_s == pytest.approx(
        solution.prediction.prefill_s + solution.prediction.decode_steps * solution.prediction.decode_step_s)


def test_tiny_example_plan_on_a_shipped_profile_matches_evaluate():
    spec = load_model_file(str(EXAMPLES / "tiny.yaml")).spec
    scn = Scenario(spec, with_overrides(load_profile("rtx3060"), vram_bytes=int(1.25 * GIB)), Workload(1, 256, 64))
    solution = solve_and_check(scn, SolverOptions())
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
    if n_layers <= max_groups:
        assert groups == [(i, 1) for i in range(n_layers)]


@pytest.mark.parametrize("seed,max_groups", [(400, 4), (401, 6), (402, 4), (403, 8)])
def test_grouped_ilp_is_feasible_and_agrees_with_evaluate(seed, max_groups):
    """20 layers in fewer groups: every layer of a group gets its group's configuration."""
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, layers=20, scale=4), host_tight=False, below_resident=True)
    options = SolverOptions(gap_rel=1e-9, time_limit_s=20.0, max_groups=max_groups)
    solution = solve_and_check(inst.scenario, options, inst.tables)
    spec, placement = inst.scenario.spec, solution.placement
    for first, size in layer_groups(spec.layers, max_groups):
        signature = [[placement.device(t.name) for t in spec.layer_tensors(layer)]
                     + [placement.kv_host_fraction[layer]] for layer in range(first, first + size)]
        assert all(s == signature[0] for s in signature), f"group at layer {first} is not uniform"


@pytest.mark.parametrize("seed", [410, 411, 412])
@pytest.mark.xfail(strict=False, reason="the exact per-layer solve can stop at its time limit on a loaded machine")
def test_fewer_groups_never_beat_one_group_per_layer(seed):
    """Grouping restricts the choices, so its optimum can only be slower or equal."""
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, layers=5, scale=4), host_tight=False, below_resident=True)
    options = SolverOptions(gap_rel=1e-6, time_limit_s=60.0)
    exact = solve_and_check(inst.scenario, options, inst.tables)
    grouped = solve_and_check(inst.scenario, replace(options, max_groups=2), inst.tables)
    assert layer_groups(5, 2) == [(0, 1), (1, 4)]
    assert grouped.objective_s >= exact.objective_s * (1 - 1e-6)


# ---- more memory never hurts --------------------------------------------------------------------

@pytest.mark.parametrize("seed", [500, 501, 502])
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
        totals.append(solve_and_check(scn).objective_s)
    assert all(b <= a * (1 + REL) for a, b in zip(totals, totals[1:])), totals
    assert totals[-1] < totals[0]  # the sweep spans a real trade-off


def test_more_vram_never_gives_a_slower_plan_for_a_real_model():
    """Llama 3.2 1B (16 layers: one group per layer) on the RTX 3060 profile, 1.5-4 GiB."""
    spec, workload = preset("llama-3.2-1b"), Workload(1, 1024, 128)
    options = SolverOptions()
    totals = []
    for vram_gib in (2.0, 2.5, 3.0, 3.5, 4.0):
        profile = with_overrides(load_profile("rtx3060"), vram_bytes=int(vram_gib * GIB))
        totals.append(solve_and_check(Scenario(spec, profile, workload), options).objective_s)
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
    for share in (0.7, 0.85, 1.0, 2.0):
        host = int(staging + lo_h + share * (hi_h - lo_h))
        scn = replace(inst.scenario, profile=with_memory(profile, profile.accelerator.memory_bytes, host))
        totals.append(solve_and_check(scn).objective_s)
    assert all(b <= a * (1 + REL) for a, b in zip(totals, totals[1:])), totals


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


@pytest.mark.xfail(strict=True, reason="ilp.check_lower_bounds adds host staging even when no placement "
                                       "needs it, and rejects a problem that has a feasible placement")
def test_lower_bound_does_not_reject_a_feasible_stream_only_problem():
    scn, placement = _stream_only_instance()
    feasible = evaluate(scn, placement)
    assert feasible.fits and feasible.host.buffer_bytes == 0
    assert host_staging_bytes(scn) > 4 * feasible.host.used_bytes
    solution = solve_and_check(scn)
    assert solution.objective_s <= feasible.total_s * (1 + REL)


def _staging_instance() -> Scenario:
    """A problem whose best plan computes on the host, with host memory cut to half a staging
    buffer below what that plan needs: weights and KV still fit, staging does not."""
    rng = random.Random(6)
    inst = tight_instance(rng, spec=random_spec(rng, layers=2, scale=4), host_tight=False, below_resident=True)
    best = solve_and_check(inst.scenario)
    host = best.prediction.host
    assert host.buffer_bytes > 0  # the plan computes on the host
    profile = inst.scenario.profile
    return replace(inst.scenario, profile=with_memory(profile, profile.accelerator.memory_bytes,
                                                      host.used_bytes - host.buffer_bytes // 2))


@pytest.mark.xfail(strict=True, reason="ilp.build_problem reads host staging from an all-GPU choice "
                                       "(_cheapest) and so never counts it: the plan overflows host memory")
def test_ilp_counts_host_staging_when_it_computes_on_the_host():
    scn = _staging_instance()
    solution = solve_placement(scn, EXACT)
    assert solution.prediction.fits, solution.prediction.host


@pytest.mark.xfail(strict=True, reason="memory rows are in GiB, so HiGHS' ~1e-6 feasibility tolerance "
                                       "lets plans exceed capacity by up to ~1 KiB; solve_placement does "
                                       "not check prediction.fits")
def test_ilp_plans_never_exceed_capacity_by_a_single_byte():
    overflows = []
    for seed in range(600, 615):
        rng = random.Random(seed)
        layers = rng.choice((2, 20))
        inst = tight_instance(rng, spec=random_spec(rng, layers=layers), host_tight=False, below_resident=True)
        solution = solve_placement(inst.scenario, SolverOptions(gap_rel=1e-9, max_groups=4), inst.tables)
        vram = solution.prediction.vram
        if vram.used_bytes > vram.capacity_bytes:
            overflows.append((seed, vram.used_bytes - vram.capacity_bytes))
    assert not overflows, f"(seed, bytes over) {overflows}"
