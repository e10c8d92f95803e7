"""Plan -> the flags or maps other runtimes understand. Those runtimes cannot express every
offplan decision; what is approximated is said in the returned notes."""

from __future__ import annotations

import json

from planner.plan.export_moe import (LLAMACPP_NAMES, bank_layers_on_cpu, hf_module, layer_alternatives,
                                     llamacpp_expert_args)
from planner.plan.record import Plan
from planner.schema import to_dict


def llamacpp_args(plan: Plan) -> tuple[list[str], list[str]]:
    """`-ngl` and `-ot` (override-tensor) arguments placing each tensor like the plan, and
    `--n-cpu-moe` / an expert pattern for the expert banks (planner/plan/export_moe.py).

    llama.cpp cannot stream weights per decode step: streamed and cpu tensors both stay in
    host memory (`=CPU`); llama.cpp itself copies them to the GPU for large prompt batches."""
    p, spec = plan.placement, plan.model
    host_by_kind: dict[str, list[int]] = {}
    for t in spec.tensors():
        if t.layer is not None and not t.experts and p.device(t.name) != "gpu":
            host_by_kind.setdefault(LLAMACPP_NAMES.get(t.kind, t.kind), []).append(t.layer)
    args = ["-ngl", "999"]
    for kind, layers in sorted(host_by_kind.items()):
        args += ["-ot", rf"blk\.({layer_alternatives(layers)})\.{kind}\.weight=CPU"]
    if p.device("lm_head") != "gpu":
        args += ["-ot", r"output\.weight=CPU"]
    expert_args, notes = llamacpp_expert_args(plan)
    args += expert_args
    if any(d == "stream" for n, d in p.devices.items() if not spec.by_name[n].experts):
        notes.append("streamed tensors are kept in host memory (=CPU): llama.cpp computes them on the CPU "
                     "at batch 1, so decode will be slower than offplan predicts")
    if any(c > 0 for c in p.kv_host_fraction):
        notes.append("llama.cpp keeps each layer's KV cache with its layer (or all of it on the host with "
                     "--no-kv-offload); offplan's split KV cache has no equivalent")
    return args, notes


def hf_device_map(plan: Plan) -> tuple[dict[str, int | str], list[str]]:
    """Module-level `device_map` for `from_pretrained(device_map=...)` (transformers 5 module
    names): gpu -> 0, else 'cpu' (Accelerate then moves those weights to the GPU on use, i.e.
    streams them). Expert banks go whole, as in llama.cpp."""
    p, spec = plan.placement, plan.model
    cpu_banks = set(bank_layers_on_cpu(plan))
    device_map: dict[str, int | str] = {}
    for t in spec.tensors():
        on_gpu = t.layer not in cpu_banks if t.experts else p.device(t.name) == "gpu"
        device_map[hf_module(plan, t.name)] = 0 if on_gpu else "cpu"
    device_map["model.norm"] = 0
    for i in range(spec.layers):
        device_map[f"model.layers.{i}.input_layernorm"] = 0
        device_map[f"model.layers.{i}.post_attention_layernorm"] = 0
    device_map["model.rotary_emb"] = 0
    notes = ["Accelerate runs 'cpu' modules on the GPU after copying them in, without prefetch; "
             "offplan's cpu-computed tensors and split KV cache have no equivalent"]
    if cpu_banks:
        notes.append(f"the experts of {len(cpu_banks)} layers are copied to the GPU on use: Accelerate does not "
                     "compute them on the CPU, so decode will be slower than offplan predicts")
    return device_map, notes


def plan_json(plan: Plan) -> str:
    return json.dumps(to_dict(plan), indent=1)
