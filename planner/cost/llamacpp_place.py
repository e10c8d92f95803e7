"""llama.cpp placements and offplan Placements, both ways (a Plan stores a Placement)."""

from __future__ import annotations

from planner.cost.llamacpp import LlamaPlacement, LlamaScenario
from planner.errors import PlanError
from planner.model.placement import Placement


def to_placement(scn: LlamaScenario, lp: LlamaPlacement) -> Placement:
    """A ModelSpec tensor is on the GPU when every GGUF tensor standing for it is (an expert
    bank is three: ffn_up_exps, ffn_gate_exps, ffn_down_exps)."""
    devices: dict[str, str] = {}
    for t in scn.tensors:
        for member in t.members:
            on = t.name in lp.gpu and devices.get(member, "gpu") == "gpu"
            devices[member] = "gpu" if on else "cpu"
    gpu_experts = {t.name: t.experts for t in scn.spec.tensors() if t.experts and devices[t.name] == "gpu"}
    return Placement(devices, tuple(0.0 if on else 1.0 for on in lp.kv_gpu), gpu_experts=gpu_experts)


def from_placement(scn: LlamaScenario, placement: Placement) -> tuple[LlamaPlacement, list[str]]:
    """The llama.cpp placement nearest to `placement`, and what had to change: streamed
    tensors stay in host memory; a layer's experts move together (one GGUF tensor); a split
    KV cache goes wholly to the host; GPU caches must be the last layers (-ngl)."""
    notes, gpu = [], set()
    for t in scn.tensors:
        devices = {placement.device(m) for m in t.members}
        if t.kind == "token_embd":
            continue
        spec_t = scn.spec.by_name[t.members[0]]
        if spec_t.experts and devices == {"gpu"} and placement.experts_on_gpu(spec_t) < spec_t.experts:
            notes.append(f"{t.name}: {placement.experts_on_gpu(spec_t)} of {spec_t.experts} experts on the GPU; "
                         "llama.cpp keeps the tensor whole, so it stays in host memory")
        elif devices == {"gpu"}:
            gpu.add(t.name)
        elif "gpu" in devices:
            notes.append(f"{t.name}: some of its experts were on the GPU; llama.cpp keeps the tensor whole, "
                         "so it stays in host memory")
    if any(d == "stream" for d in placement.devices.values()):
        notes.append("streamed tensors stay in host memory: llama.cpp multiplies them on the CPU at decode")
    kv = [c == 0.0 for c in placement.kv_host_fraction]
    if any(0.0 < c < 1.0 for c in placement.kv_host_fraction):
        notes.append("a layer's KV cache split between host and GPU has no llama.cpp equivalent: it goes to the host")
    first = next((i for i, on in enumerate(kv) if on), len(kv))
    if not all(kv[first:]):
        notes.append("GPU-held KV caches must belong to the last layers (-ngl counts from the back): "
                     "the earlier ones go to the host")
        last_gap = max(i for i, on in enumerate(kv) if not on)
        kv = [i > last_gap for i in range(len(kv))]
    if not scn.has_gpu and (gpu or any(kv)):
        raise PlanError(f"{scn.profile.name} has no GPU: a plan with GPU tensors cannot run there")
    return LlamaPlacement(frozenset(gpu), tuple(kv)), notes
