"""MoE plans run on the loopback device: resident and host experts computed side by side give
the tokens of an all-resident run (and therefore of transformers, test_moe_model.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from executor.offload import apply_plan
from executor.offload_moe import SplitExperts, resident_order
from executor.run import RunOptions, run_plan
from executor.weights import synthetic_model
from planner.model.placement import Placement, uniform_placement
from planner.model.spec import MoE, Workload
from test_offload import CPU, plan_for, small_spec


def moe_spec(family: str = "qwen3_moe"):
    return small_spec(family=family, layers=3, moe=MoE(experts=8, active=2, expert_intermediate=64,
                                                         norm_topk=True), qk_norm=family == "qwen3_moe",
                      head_dim=16)


def split_placement(spec, counts: tuple[int, ...], prefill_copied: bool = False, attn: str = "gpu"):
    """Bank of layer i with counts[i] experts resident; attention `attn`, routers on the host."""
    base = uniform_placement(spec, "gpu")
    devices, gpu_experts = dict(base.devices), {}
    for t in spec.tensors():
        if t.experts:
            devices[t.name] = "gpu" if counts[t.layer] == t.experts else "cpu"
            if 0 < counts[t.layer] < t.experts:
                gpu_experts[t.name] = counts[t.layer]
        elif t.kind == "router":
            devices[t.name] = "cpu"
        elif t.group == "attn" and t.kind in ("q_proj", "o_proj"):
            devices[t.name] = attn
    streamed = tuple(t.name for t in spec.tensors() if t.experts and devices[t.name] == "cpu") \
        if prefill_copied else ()
    return Placement(devices, (0.0, 0.5, 0.0), streamed, gpu_experts=gpu_experts)


def _tokens(spec, placement, routing=None):
    plan = plan_for(spec, placement)
    if routing is not None:
        plan = replace(plan, routing=routing)
    return run_plan(plan, RunOptions(synthetic=True, warmup_steps=1), devices=CPU).measured.tokens


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_offloaded_moe_plans_give_the_tokens_of_an_all_resident_run(family):
    spec = moe_spec(family)
    reference = _tokens(spec, uniform_placement(spec, "gpu"))
    assert len(set(reference[0])) > 2
    routing = {layer: tuple(float((7 * e + layer) % 8) for e in range(8)) for layer in range(3)}
    cases = {"split": split_placement(spec, (3, 0, 8)),
             "split-routing": (split_placement(spec, (5, 2, 1)), routing),
             "prefill-copied": split_placement(spec, (4, 4, 0), prefill_copied=True, attn="stream"),
             "all-host": split_placement(spec, (0, 0, 0), attn="cpu"),
             "all-stream": uniform_placement(spec, "stream")}  # banks too: every expert matrix streams
    for name, case in cases.items():
        placement, table = case if isinstance(case, tuple) else (case, None)
        assert _tokens(spec, placement, table) == reference, name


def test_split_banks_put_the_most_routed_experts_on_the_accelerator():
    spec = moe_spec()
    plan = replace(plan_for(spec, split_placement(spec, (3, 3, 3))),
                   routing={0: (1.0, 9.0, 5.0, 0.0, 7.0, 2.0, 2.0, 3.0)})
    bank = spec.by_name["layers.0.mlp.experts"]
    assert resident_order(plan, bank)[:3] == [1, 4, 2]
    assert resident_order(plan, spec.by_name["layers.1.mlp.experts"])[:3] == [0, 1, 2]  # no table: index order
    model = synthetic_model(spec, seed=2)
    handle = apply_plan(model, plan, CPU, max_tokens=64)
    try:
        dispatch = model.model.layers[0].mlp.dispatch
        assert isinstance(dispatch, SplitExperts)
        assert (dispatch.resident, dispatch.host) == ([1, 2, 4], [0, 3, 5, 6, 7])
        # Resident bytes count the router-less attention, norms and three experts per layer.
        expert_bytes = bank.n_bytes // bank.experts
        others = sum(t.n_bytes for t in spec.tensors() if not t.experts and plan.placement.device(t.name) == "gpu")
        assert handle.resident_bytes == others + 9 * expert_bytes + spec.norm_bytes
    finally:
        handle.close()


def test_host_experts_run_while_the_accelerator_computes_its_own():
    """The host worker thread, not the calling thread, computes the host experts."""
    spec = moe_spec()
    model = synthetic_model(spec, seed=2)
    handle = apply_plan(model, plan_for(spec, split_placement(spec, (4, 4, 4))), CPU, max_tokens=64)
    seen = []
    expert = model.model.layers[0].mlp.experts[7]
    expert.register_forward_pre_hook(lambda module, args: seen.append(__import__("threading").current_thread().name))
    try:
        handle.begin("prefill")
        model(torch.randint(0, spec.vocab, (1, 16)))
    finally:
        handle.close()
    assert seen and all(name.startswith("offplan-experts") for name in seen)


def test_offloaded_qwen3_runs_give_the_tokens_of_an_all_resident_run():
    """q/k norms stay with the accelerator while their projections stream or run on the host."""
    from test_offload import mixed_placements
    spec = small_spec(family="qwen3", qk_norm=True, head_dim=32)
    reference = _tokens(spec, uniform_placement(spec, "gpu"))
    assert len(set(reference[0])) > 2
    for name, placement in mixed_placements(spec).items():
        assert _tokens(spec, placement) == reference, name


def test_quantized_moe_plans_are_refused_in_one_line():
    from planner.errors import PlanError
    from planner.model.spec import Quantization
    spec = replace(moe_spec(), quantization=Quantization(4, 32))
    with pytest.raises(PlanError, match="unquantized weights only") as info:
        run_plan(plan_for(spec, uniform_placement(spec, "gpu")), RunOptions(synthetic=True), devices=CPU)
    assert "\n" not in str(info.value)
