"""Expert banks in other runtimes' terms. llama.cpp stores a layer's routed experts as three
tensors (`blk.N.ffn_{gate,up,down}_exps`, gpt-oss adds their biases) and places each tensor
whole; transformers (5.x) holds them in one `mlp.experts` module per layer. Neither can keep
some of a layer's experts on the GPU and the rest on the host, so a plan's per-layer counts
become whole layers: the layers with the most resident experts keep their bank on the GPU,
as many as the plan's resident expert bytes allow, the others on the CPU.
"""

from __future__ import annotations

from planner.errors import PlanError
from planner.plan.record import Plan

# ModelSpec tensor kind -> llama.cpp tensor base name (alternatives where converters differ:
# newer DeepSeek GGUFs split kv_b into k_b and v_b).
LLAMACPP_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "q_a_proj": "attn_q_a", "q_b_proj": "attn_q_b", "kv_a_proj_with_mqa": "attn_kv_a_mqa",
                  "kv_b_proj": "attn_(kv_b|k_b|v_b)", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                  "down_proj": "ffn_down", "router": "ffn_gate_inp", "shared_gate_proj": "ffn_gate_shexp",
                  "shared_up_proj": "ffn_up_shexp", "shared_down_proj": "ffn_down_shexp"}
EXPERT_TENSORS = r"ffn_(up|gate|down)_exps"


def bank_layers_on_cpu(plan: Plan) -> list[int]:
    """Layers whose whole expert bank goes to the CPU in a whole-bank runtime: the resident
    experts of the plan, counted in banks, stay on the GPU in the layers that have most."""
    p, spec = plan.placement, plan.model
    banks = [t for t in spec.tensors() if t.experts]
    if not banks:
        return []
    counts = {t.layer: (p.experts_on_gpu(t) if p.device(t.name) != "stream" else 0) for t in banks}
    resident_banks = round(sum(counts[t.layer] / t.experts for t in banks))
    # Ties keep the later layers' banks on the GPU, so the CPU part is the first N layers when it
    # can be (`--n-cpu-moe N`).
    by_residence = sorted(counts, key=lambda layer: (-counts[layer], -layer))
    on_gpu = set(by_residence[:resident_banks])
    return sorted(layer for layer in counts if layer not in on_gpu)


def layer_alternatives(layers: list[int]) -> str:
    return "|".join(str(i) for i in layers)


def llamacpp_expert_args(plan: Plan) -> tuple[list[str], list[str]]:
    """`--cpu-moe`, `--n-cpu-moe N` (the first N layers' experts on the CPU) or one `-ot`
    pattern naming the banks' tensors of the layers that go to the CPU."""
    cpu_layers = bank_layers_on_cpu(plan)
    banks = [t for t in plan.model.tensors() if t.experts]
    if not cpu_layers:
        return [], []
    moe_layers = [t.layer for t in banks]
    notes = []
    split = [t for t in banks if 0 < plan.placement.experts_on_gpu(t) < t.experts]
    if split:
        total = sum(plan.placement.experts_on_gpu(t) for t in split)
        notes.append(f"llama.cpp places a layer's experts together: the plan's {total} resident experts in "
                     f"{len(split)} split layers become {len(moe_layers) - len(cpu_layers)} whole layers on the GPU")
    if cpu_layers == moe_layers:
        return ["--cpu-moe"], notes
    if cpu_layers == list(range(cpu_layers[-1] + 1)):
        return ["--n-cpu-moe", str(len(cpu_layers))], notes
    pattern = rf"blk\.({layer_alternatives(cpu_layers)})\.{EXPERT_TENSORS}\.=CPU"
    return ["-ot", pattern], notes


def hf_module(plan: Plan, name: str) -> str:
    """The transformers (5.x) module holding ModelSpec tensor `name`."""
    if name == "lm_head":
        return "lm_head"
    if plan.model.family == "gpt_oss" and name.endswith(".mlp.gate"):
        return "model." + name[: -len("gate")] + "router"
    return f"model.{name}"


def ktransformers_args(plan: Plan) -> tuple[list[str], list[str]]:
    """SGLang-KT's `--kt-num-gpu-experts N`: one resident count for every MoE layer, the plan's
    mean (rounded down, so it fits), placed by routing frequency when the plan had a table."""
    banks = [t for t in plan.model.tensors() if t.experts]
    if not banks:
        raise PlanError("--to ktransformers: the plan's model has no routed experts")
    counts = [plan.placement.experts_on_gpu(t) if plan.placement.device(t.name) != "stream" else 0 for t in banks]
    strategy = "frequency" if plan.routing else "uniform"
    args = ["--kt-num-gpu-experts", str(sum(counts) // len(counts)), "--kt-expert-placement-strategy", strategy]
    notes = []
    if len(set(counts)) > 1:
        notes.append(f"KTransformers keeps the same number of experts on the GPU in every layer: the plan's "
                     f"{min(counts)}-{max(counts)} per layer become {sum(counts) // len(counts)}")
    notes.append("attention, routers and shared experts stay on the GPU in KTransformers; offplan's other "
                 "placements (streamed or host-computed dense tensors, split KV cache) have no equivalent there")
    return args, notes
