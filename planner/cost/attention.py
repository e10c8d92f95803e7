"""Attention and the KV cache in the cost model (DESIGN §4): one layer's decode attention
split between the accelerator (recent keys) and the host (the oldest `host_fraction` of the
context), prefill attention, and one KV option per host-fraction level.

Units: seconds (`_s`), bytes (`_bytes`), flop counts; bandwidths in the profile are GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.membus import kv_bus_s
from planner.cost.options import KVOption, Scenario
from planner.cost.roofline import PathCost, acc_op_s, d2h_s, h2d_s, host_attention_s, parallel
from planner.hardware.profile import HardwareProfile

# Host fraction levels offered to the ILP for each layer's KV cache (oldest tokens first).
KV_LEVELS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def mean_host_tokens(host_tokens: float, start: float, end: float) -> float:
    """Mean of min(host_tokens, depth) as the cache depth grows linearly from start to end."""
    if end <= start:
        return min(host_tokens, start)
    if host_tokens >= end:
        return (start + end) / 2.0
    if host_tokens <= start:
        return host_tokens
    below = (host_tokens ** 2 - start ** 2) / 2.0  # integral of depth from start to host_tokens
    return (below + host_tokens * (end - host_tokens)) / (end - start)


@dataclass(frozen=True)
class AttentionParts:
    """One layer's decode attention, piece by piece (cost.attention_decode sums these)."""

    device_s: float  # accelerator, over device-resident keys
    q_down_s: float  # d2h of q
    host_s: float  # host attention over host-resident keys
    out_up_s: float  # h2d of O_c and L_c
    merge_s: float  # log-sum-exp merge on the accelerator


def split_merge_s(profile: HardwareProfile) -> float:
    """Fixed cost of splitting a layer's decode attention: the measured coordination overhead
    when the profile has it, else the two operators of the log-sum-exp merge."""
    a = profile.accelerator
    return a.split_overhead_s if a.split_overhead_s > 0 else 2 * a.op_overhead_s


def kv_bytes_per_key(scn: Scenario) -> float:
    """KV bytes of one key position in one layer over the batch (a layer's average:
    sliding-window layers hold at most their window)."""
    wl = scn.workload
    return wl.batch * scn.spec.mean_kv_bytes_per_token_layer(wl.context)


def out_lse_bytes(scn: Scenario) -> int:
    """O_c and L_c of a split decode attention, sent up per step, in fp32."""
    return scn.decode_rows * scn.spec.heads * (scn.spec.head_dim + 1) * 4


def decode_keys(scn: Scenario, host_fraction: float) -> tuple[float, float]:
    """(host, device) keys one decode step attends to, averaged over the decode as the cache
    grows from the prompt to the context; the oldest `host_fraction` of the context is on the host."""
    wl = scn.workload
    start, end = float(wl.prompt), float(wl.context)
    host = mean_host_tokens(host_fraction * wl.context, start, end)
    return host, (start + end) / 2.0 - host


def attention_decode_parts(scn: Scenario, host_fraction: float) -> AttentionParts:
    """One layer's decode attention with `host_fraction` of the cache on the host, piece by
    piece (the simulator schedules the pieces; attention_decode combines them)."""
    spec = scn.spec
    host_tokens, device_tokens = decode_keys(scn, host_fraction)
    rows = scn.decode_rows
    flops_per_key = 4.0 * spec.heads * spec.head_dim * rows
    kv_per_key = kv_bytes_per_key(scn)
    device_s = 0.0
    if device_tokens > 0 or host_tokens == 0:
        device_s = acc_op_s(scn.profile, scn.compute_dtype, flops_per_key * device_tokens, kv_per_key * device_tokens)
    if host_fraction == 0:
        return AttentionParts(device_s, 0.0, 0.0, 0.0, 0.0)
    q_bytes = rows * spec.heads * spec.head_dim * scn.act_bytes
    host_s = host_attention_s(scn.profile, spec.dtype, flops_per_key * host_tokens, kv_per_key * host_tokens)
    merge_s = split_merge_s(scn.profile) if device_tokens > 0 else 0.0
    return AttentionParts(device_s, d2h_s(scn.profile, q_bytes), host_s, h2d_s(scn.profile, out_lse_bytes(scn)),
                          merge_s)


def attention_decode(scn: Scenario, host_fraction: float) -> PathCost:
    """One layer's attention for one decode step: the device part in parallel with the host
    part and its transfers, then the merge."""
    parts = attention_decode_parts(scn, host_fraction)
    if host_fraction == 0:
        return PathCost(acc_s=parts.device_s)
    cpu_side = PathCost(cpu_s=parts.host_s, xfer_s=parts.q_down_s + parts.out_up_s)
    if parts.merge_s == 0.0:  # everything on the host
        return cpu_side
    return parallel(PathCost(acc_s=parts.device_s), cpu_side) + PathCost(acc_s=parts.merge_s)


def attention_prefill(scn: Scenario, host_fraction: float) -> PathCost:
    """Prefill attention runs on the accelerator (all keys are fresh there); the host part of
    the new K/V is then copied down."""
    spec, wl = scn.spec, scn.workload
    p = wl.prompt
    flops = attention_prefill_flops(spec.heads, spec.head_dim, wl.batch, p)
    kv_bytes = p * kv_bytes_per_key(scn)
    qo_bytes = 2 * wl.batch * p * spec.heads * spec.head_dim * scn.act_bytes
    a = scn.profile.accelerator
    if a.attention_tflops > 0:  # measured on the executor's causal attention
        cost = PathCost(acc_s=a.op_overhead_s + max(flops / (a.attention_tflops * 1e12),
                                                    (kv_bytes + qo_bytes) / (a.mem_bw_gbps * 1e9)))
    else:
        cost = PathCost(acc_s=acc_op_s(scn.profile, scn.compute_dtype, flops, kv_bytes + qo_bytes))
    host_tokens = min(host_fraction * wl.context, p)
    if host_tokens > 0:
        cost += PathCost(xfer_s=d2h_s(scn.profile, host_tokens * kv_bytes_per_key(scn)))
    return cost


def kv_options(scn: Scenario) -> list[KVOption]:
    """One option per host-fraction level; identical for every layer of a model."""
    kv_per_key = kv_bytes_per_key(scn)
    full_kv_bytes = int(round(kv_per_key * scn.workload.context))
    options = []
    for c in KV_LEVELS:
        host_bytes = int(round(c * full_kv_bytes))
        host_keys, device_keys = decode_keys(scn, c)
        options.append(KVOption(c, attention_decode(scn, c), attention_prefill(scn, c),
                                h2d_s(scn.profile, out_lse_bytes(scn)) if c > 0 else 0.0,
                                full_kv_bytes - host_bytes, host_bytes,
                                kv_bus_s(scn.profile, kv_per_key * host_keys, kv_per_key * device_keys)))
    return options


def attention_prefill_flops(heads: int, head_dim: int, batch: int, prompt: int) -> float:
    """Causal attention over a fresh prompt: QKᵀ and PV over the lower triangle."""
    return 4.0 * heads * head_dim * batch * prompt * (prompt + 1) / 2.0
