"""Routed experts in the cost model and the ILP (planner/cost/moe.py): the ILP finds the
brute-force optimum over expert counts; a step pays for the routed experts only, in one
grouped dispatch per device; a routing table puts the most used experts on the GPU."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from assets.random_instances import brute_force, n_combinations, tight_instance
from planner.cost.evaluate import evaluate, option_tables
from planner.cost.moe import expert_counts, expert_probs, routed_share
from planner.cost.options import Scenario
from planner.errors import InfeasiblePlanError
from planner.hardware.profile import load_profile, with_overrides
from planner.model.placement import Placement, uniform_placement
from planner.model.presets import preset
from planner.model.spec import MoE, ModelSpec, Quantization, Workload
from planner.solve.ilp import SolverOptions, solve_placement
from planner.units import GIB

EXACT = SolverOptions(gap_rel=1e-9, time_limit_s=60.0)


def random_moe_spec(rng: random.Random) -> ModelSpec:
    layers = rng.randint(1, 3)
    experts = rng.choice((4, 8, 16))
    return ModelSpec(name="rand-moe", family="qwen3_moe", layers=layers, hidden=256, intermediate=512, heads=4,
                     kv_heads=2, head_dim=64, vocab=512, qk_norm=True, max_context=4096,
                     dtype=rng.choice(("fp32", "bf16")),
                     quantization=Quantization(4, 32) if rng.random() < 0.3 else None,
                     moe=MoE(experts, rng.choice((1, 2)), rng.choice((256, 512)),
                             shared_intermediate=rng.choice((0, 256)),
                             dense_first=rng.randint(0, layers - 1)))


def random_routing(rng: random.Random, spec: ModelSpec) -> dict[int, tuple[float, ...]]:
    """Skewed token counts per expert, as a measured routing table has them."""
    return {layer: tuple(float(rng.randint(1, 1000) ** 2) for _ in range(spec.moe.experts))
            for layer in range(spec.moe.dense_first, spec.layers)}


def restrict_banks_last(tables, rng: random.Random, budget: int):
    """Random option subsets within `budget` combinations that keep up to 5 expert counts per
    bank (all-host, all-resident and three between) and trim the other tensors first."""
    spec = tables.scenario.spec
    keep = {}
    for name, opts in tables.tensor.items():
        if spec.by_name[name].experts:
            ends = [k for k, o in enumerate(opts) if o.device != "stream" and not o.prefill_streamed
                    and o.gpu_experts in (0, spec.by_name[name].experts)]
            middle = [k for k in range(len(opts)) if k not in ends]
            keep[name] = ends + rng.sample(middle, min(3, len(middle)))
        else:
            leanest = min(range(len(opts)), key=lambda k: opts[k].vram_bytes + 2 * opts[k].buffer_bytes)
            keep[name] = [leanest] + rng.sample([k for k in range(len(opts)) if k != leanest], 1)
    kv = sorted(rng.sample(tables.kv, 2), key=lambda o: o.host_fraction)
    trimmable = [n for n in keep if not spec.by_name[n].experts]
    while len(kv) ** spec.layers * math.prod(len(k) for k in keep.values()) > budget:
        wide = [n for n in trimmable if len(keep[n]) > 1] or [n for n in keep if len(keep[n]) > 2]
        keep[rng.choice(wide)].pop()
    tensor = {name: [tables.tensor[name][k] for k in sorted(keep[name])] for name in tables.tensor}
    return replace(tables, tensor=tensor, kv=kv)


@pytest.mark.parametrize("seed", range(12))
def test_moe_ilp_matches_brute_force(seed):
    rng = random.Random(1000 + seed)
    spec = random_moe_spec(rng)
    routing = random_routing(rng, spec) if rng.random() < 0.5 else None
    inst = tight_instance(rng, spec=spec, below_resident=True, host_tight=seed % 3 == 0, routing=routing)
    tables = restrict_banks_last(inst.tables, rng, budget=4000)
    assert 1 <= n_combinations(tables) <= 4000
    best = brute_force(tables)
    if best is None:
        with pytest.raises(InfeasiblePlanError):
            solve_placement(inst.scenario, EXACT, tables)
        return
    solution = solve_placement(inst.scenario, EXACT, tables)
    assert solution.status == "optimal"
    assert solution.objective_s == pytest.approx(best.total_s, rel=1e-6)
    # The plan records the chosen counts: evaluating it again gives the same time.
    assert evaluate(inst.scenario, solution.placement).total_s == pytest.approx(best.total_s, rel=1e-6)


def _scn(name="qwen3-30b-a3b", hw="rtx4090", ram_gib=64, **fields) -> Scenario:
    spec = preset(name)
    spec = replace(spec, quantization=Quantization(4, 32)) if spec.quantization is None and not spec.weight_bits \
        else spec
    return Scenario(spec, with_overrides(load_profile(hw), ram_bytes=ram_gib * GIB), Workload(1, 512, 64),
                    **fields)


def test_a_step_reads_only_the_routed_experts_in_one_dispatch():
    scn = _scn()
    tables = option_tables(scn)
    bank = scn.spec.by_name["layers.5.mlp.experts"]
    on_gpu = next(o for o in tables.tensor[bank.name] if o.gpu_experts == bank.experts)
    a = scn.profile.accelerator
    read_s = 8 * bank.expert_bytes / (a.mem_bw_gbps * 1e9)  # 8 of 128 experts per token
    assert on_gpu.decode.acc_s < a.op_overhead_s + 2 * read_s  # one overhead, not one per expert
    assert on_gpu.decode.acc_s > a.op_overhead_s + 0.9 * read_s * 0.5


def test_activations_cross_the_link_once_per_layer_each_way():
    scn = _scn()
    bank = scn.spec.by_name["layers.5.mlp.experts"]
    options = option_tables(scn).tensor[bank.name]
    split = [o for o in options if 0 < o.gpu_experts < bank.experts and not o.prefill_streamed]
    row_up = scn.spec.hidden * scn.act_bytes
    from planner.cost.roofline import h2d_s
    assert all(o.decode_act_h2d_s == pytest.approx(h2d_s(scn.profile, row_up)) for o in split)
    assert len({round(o.decode_act_h2d_s, 12) for o in split}) == 1  # the same whatever the count


def test_uniform_share_without_a_table_and_top_n_share_with_one():
    scn = _scn()
    bank = scn.spec.by_name["layers.3.mlp.experts"]
    assert routed_share(expert_probs(scn, bank), 32) == pytest.approx(0.25)
    counts = tuple([100.0] * 16 + [1.0] * 112)
    routed = replace(scn, routing={3: counts})
    assert routed_share(expert_probs(routed, bank), 16) == pytest.approx(1600 / 1712)
    assert expert_counts(128) == (0, 16, 32, 48, 64, 80, 96, 112, 128)
    assert expert_counts(8) == tuple(range(9))


def test_skewed_routing_makes_the_plan_faster():
    """With a table, fewer resident experts take most routed tokens: the CPU's share drops."""
    plain = solve_placement(_scn(hw="rtx3060"), SolverOptions(time_limit_s=60))
    skew = tuple(float(1000 if e < 16 else 10) for e in range(128))
    routing = {layer: skew for layer in range(48)}
    routed = solve_placement(_scn(hw="rtx3060", routing=routing), SolverOptions(time_limit_s=60))
    assert routed.prediction.decode_step_s < 0.8 * plain.prediction.decode_step_s


def test_resident_expert_memory_is_counted():
    scn = _scn()
    spec = scn.spec
    p = uniform_placement(spec, "gpu")
    devices = {**p.devices, **{t.name: "cpu" for t in spec.tensors() if t.experts}}
    half = {t.name: 64 for t in spec.tensors() if t.experts}
    pred = evaluate(scn, Placement(devices, p.kv_host_fraction, gpu_experts=half))
    banks = sum(t.n_bytes for t in spec.tensors() if t.experts)
    others = sum(t.n_bytes for t in spec.tensors() if not t.experts)
    assert pred.vram.weights_bytes == pytest.approx(others + spec.norm_bytes + banks / 2, rel=1e-6)
    assert pred.host.weights_bytes == pytest.approx(banks / 2, rel=1e-6)


@pytest.mark.parametrize("routed", [False, True])
def test_simulated_split_banks_take_the_ilp_time(routed):
    """The simulator runs a split bank's host experts beside the resident ones (CPU busy),
    and its decode step is the ILP's."""
    from planner.plan.record import make_plan
    from planner.simulate.engine import simulate_plan
    skew = tuple(float(1000 if e < 16 else 10) for e in range(128))
    scn = _scn(hw="rtx3060", routing={layer: skew for layer in range(48)} if routed else None)
    solution = solve_placement(scn, SolverOptions(time_limit_s=60))
    assert any(0 < n < 128 for n in solution.placement.gpu_experts.values())
    result = simulate_plan(make_plan(scn, solution.placement, "ilp", solution.prediction))
    assert result.decode_step_s == pytest.approx(result.ilp_decode_step_s, rel=0.02)
    assert result.busy_fraction["cpu"] > 0.05


def test_moe_activations_are_as_wide_as_the_active_experts():
    """Workspace and element-wise traffic count k experts' activations per token, not one MLP's."""
    from planner.cost.terms import acc_workspace_bytes
    assert preset("mixtral-8x7b").ffn_width == 2 * 14336
    assert preset("gpt-oss-120b").ffn_width == 4 * 2880
    assert preset("glm-4.5-air").ffn_width == 8 * 1408 + 1408  # wider than its dense first layer (10944)
    assert preset("qwen3-8b").ffn_width == 12288
    mixtral = Scenario(preset("mixtral-8x7b"), load_profile("rtx4090"), Workload(1, 512, 64))
    dense_twin = replace(mixtral, spec=replace(mixtral.spec, moe=None, family="mistral"))
    extra = acc_workspace_bytes(mixtral) - acc_workspace_bytes(dense_twin)
    assert extra >= 512 * 14336 * 2  # at least the second expert's activations: prompt rows x width x bf16


def test_routers_and_banks_are_not_compensated():
    """Compensation ranks go to quantized attention / MLP matrices, never to a router (kept in
    the model dtype) or an expert bank."""
    from planner.model.ranks import quantized_tensors
    scn = replace(_scn(), rank_choices=(0, 16))
    kinds = {t.kind for t in quantized_tensors(scn.spec)}
    assert "router" not in kinds and "experts" not in kinds and "q_proj" in kinds
    tables = option_tables(scn)
    assert {o.rank for o in tables.tensor["layers.0.mlp.gate"]} == {0}
    assert {o.rank for o in tables.tensor["layers.0.self_attn.q_proj"]} == {0, 16}


def test_the_usual_experts_on_cpu_recipe_is_a_baseline_and_never_faster():
    from planner.solve.baselines import run_baselines
    scn = _scn(hw="rtx3060")
    baselines = {b.name: b for b in run_baselines(scn)}
    recipe = baselines["experts-cpu"]
    assert recipe.prediction is not None
    banks = [t for t in scn.spec.tensors() if t.experts]
    assert all(recipe.placement.experts_on_gpu(t) == 0 for t in banks)
    solution = solve_placement(scn, SolverOptions(time_limit_s=60))
    assert solution.prediction.total_s <= recipe.prediction.total_s * (1 + 1e-6)
    dense = Scenario(preset("qwen3-8b"), load_profile("rtx3060"), Workload(1, 512, 64))
    assert "experts-cpu" not in {b.name for b in run_baselines(dense)}
