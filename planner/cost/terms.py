"""Placement-independent terms of the cost model (DESIGN §4): activation workspace and pinned
staging memory, and the draft model's memory and time. The ILP treats them as constants."""

from __future__ import annotations

from planner.cost.attention import attention_decode, attention_prefill
from planner.cost.options import Scenario, head_fixed, layer_fixed, matmul_on_acc


# Split-KV prefill attention holds at most this many fp32 scores at once (executor/attention.py).
SCORE_CHUNK_ELEMENTS = 2 ** 21
KERNEL_ACT_BYTES = 2  # the fused quantized kernels take and return bf16 (executor/qkernels.py)


def acc_workspace_bytes(scn: Scenario) -> int:
    """Peak temporaries of the largest forward pass (prefill of the whole prompt), as the
    executor allocates them (executor/model.py), per prompt row the larger of a layer's two
    phases: residual stream, normed input and RMSNorm's temporaries (4 rows of hidden) plus
    either the MLP's gate, SiLU and up outputs (3 of intermediate; with packed weights also the
    kernel's bf16 copies of the widest matrix's input and output) or attention's q, k, v, RoPE's
    rotated copies and output ((heads + 2 kv_heads) + 3 heads of head_dim; causal attention is
    fused, no scores). Plus the split-KV prefill's bounded score chunk and fp32 logits."""
    spec = scn.spec
    mlp = 3 * spec.ffn_width * scn.act_bytes
    if spec.quantization is not None:
        mlp += (spec.hidden + spec.ffn_width) * KERNEL_ACT_BYTES
    attn = (spec.heads * 4 + 2 * spec.kv_heads) * spec.head_dim * scn.act_bytes
    per_row = 4 * spec.hidden * scn.act_bytes + max(mlp, attn)
    scores = min(SCORE_CHUNK_ELEMENTS, scn.workload.batch * spec.heads * scn.workload.prompt ** 2)
    return scn.prefill_rows * per_row + scores * (4 + scn.act_bytes) + scn.decode_rows * spec.vocab * 4


def host_staging_bytes(scn: Scenario) -> int:
    """Host memory for activations crossing the link around a host matmul at its widest, as
    the executor holds it: the input copied down [rows, in], the output [rows, out] and the
    page-locked staging buffer it goes up from (as wide as the widest output). Widest: a
    prefill MLP up-projection, or the lm_head's logits in decode."""
    spec = scn.spec
    mlp = scn.prefill_rows * (spec.hidden + 2 * spec.ffn_width)
    head = scn.decode_rows * (spec.hidden + 2 * spec.vocab)
    return max(mlp, head) * scn.act_bytes


def _resident_scenario(scn: Scenario) -> Scenario:
    assert scn.draft is not None
    return Scenario(scn.draft, scn.profile, scn.workload)


def draft_vram_bytes(scn: Scenario) -> int:
    """Draft weights and its KV cache at full context (the draft stays resident)."""
    if scn.draft is None:
        return 0
    d = scn.draft
    kv = scn.workload.batch * (scn.workload.context + scn.gamma + 1) * d.kv_bytes_per_token
    return d.weight_bytes + kv


def draft_step_s(scn: Scenario) -> float:
    """The `gamma` draft forwards of one speculative step, all on the accelerator."""
    if scn.draft is None or scn.gamma == 0:
        return 0.0
    dscn = _resident_scenario(scn)
    rows = scn.workload.batch
    one = head_fixed(dscn, rows).total_s + scn.draft.layers * (layer_fixed(dscn, rows).total_s
                                                             + attention_decode(dscn, 0.0).total_s)
    one += sum(matmul_on_acc(dscn, t, rows).total_s for t in scn.draft.tensors() if t.group != "embed")
    return scn.gamma * one


def draft_prefill_s(scn: Scenario) -> float:
    """The draft's own prefill of the prompt (it needs its KV cache too)."""
    if scn.draft is None or scn.gamma == 0:
        return 0.0
    dscn = _resident_scenario(scn)
    rows = dscn.prefill_rows
    total = head_fixed(dscn, scn.workload.batch).total_s
    total += scn.draft.layers * (layer_fixed(dscn, rows).total_s + attention_prefill(dscn, 0.0).total_s)
    total += sum(matmul_on_acc(dscn, t, scn.workload.batch if t.group == "head" else rows).total_s
                 for t in scn.draft.tensors() if t.group != "embed")
    return total
