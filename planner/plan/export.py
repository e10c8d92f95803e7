"""Plan -> the flags or maps other runtimes understand. Those runtimes cannot express every
offplan decision; what is approximated is said in the returned notes."""

from __future__ import annotations

import json
import re

from planner.plan.record import Plan
from planner.schema import to_dict

_LLAMACPP_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                   "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def llamacpp_args(plan: Plan) -> tuple[list[str], list[str]]:
    """`-ngl` and `-ot` (override-tensor) arguments placing each tensor like the plan.

    llama.cpp cannot stream weights per decode step: streamed and cpu tensors both stay in
    host memory (`=CPU`); llama.cpp itself copies them to the GPU for large prompt batches."""
    p, spec = plan.placement, plan.model
    host_by_kind: dict[str, list[int]] = {}
    for t in spec.tensors():
        if t.layer is not None and p.device(t.name) != "gpu":
            host_by_kind.setdefault(_LLAMACPP_NAMES.get(t.kind, t.kind), []).append(t.layer)
    args = ["-ngl", "999"]
    for kind, layers in sorted(host_by_kind.items()):
        alternatives = "|".join(str(i) for i in layers)
        args += ["-ot", rf"blk\.({alternatives})\.{re.escape(kind)}\.weight=CPU"]
    if p.device("lm_head") != "gpu":
        args += ["-ot", r"output\.weight=CPU"]
    notes = []
    if any(d == "stream" for d in p.devices.values()):
        notes.append("streamed tensors are kept in host memory (=CPU): llama.cpp computes them on the CPU "
                     "at batch 1, so decode will be slower than offplan predicts")
    if any(c > 0 for c in p.kv_host_fraction):
        notes.append("llama.cpp keeps each layer's KV cache with its layer (or all of it on the host with "
                     "--no-kv-offload); offplan's split KV cache has no equivalent")
    return args, notes


def hf_device_map(plan: Plan) -> tuple[dict[str, int | str], list[str]]:
    """Module-level `device_map` for `from_pretrained(device_map=...)`: gpu -> 0, else 'cpu'
    (Accelerate then moves those weights to the GPU on use, i.e. streams them)."""
    p = plan.placement
    device_map: dict[str, int | str] = {}
    for t in plan.model.tensors():
        module = "lm_head" if t.name == "lm_head" else f"model.{t.name}"
        device_map[module] = 0 if p.device(t.name) == "gpu" else "cpu"
    device_map["model.norm"] = 0
    for i in range(plan.model.layers):
        device_map[f"model.layers.{i}.input_layernorm"] = 0
        device_map[f"model.layers.{i}.post_attention_layernorm"] = 0
    device_map["model.rotary_emb"] = 0
    notes = ["Accelerate runs 'cpu' modules on the GPU after copying them in, without prefetch; "
             "offplan's cpu-computed tensors and split KV cache have no equivalent"]
    return device_map, notes


def plan_json(plan: Plan) -> str:
    return json.dumps(to_dict(plan), indent=1)
