"""Routed experts in the cost model (DESIGN §3, §4): the options of one MoE layer's expert bank.

The decision per MoE layer is how many of its experts live on the accelerator, `n` of `E`
(a few levels, EXPERT_LEVELS); which ones comes from a routing table: the n most used, taking
`routed_share(n)` of the routed tokens (n / E without a table). Per token only the `active`
experts chosen run, so a step reads the experts its rows touch and does their FLOPs. Each
device runs its experts as one grouped dispatch per layer (llama.cpp's MUL_MAT_ID, a grouped
GEMM), and the activations cross the link once per layer each way when any expert is on the
host; host and accelerator experts run in parallel and their outputs are summed.

Prefill: the host's experts are either computed there or copied up for the prompt (a long
prompt routes to every expert, so the copy is the whole host part of the bank); llama.cpp does
the copy for large batches, offplan's executor may do either. Both are offered to the solver.
Units: seconds, bytes, flop counts.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from planner.cost.membus import weight_bus
from planner.cost.roofline import PathCost, acc_op_s, d2h_s, h2d_s, host_op_s, parallel
from planner.model.spec import TensorSpec

# Fractions of a layer's experts the solver may keep on the accelerator.
EXPERT_LEVELS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def expert_counts(experts: int) -> tuple[int, ...]:
    """The distinct expert counts offered for a bank of `experts` (every count up to 8)."""
    return tuple(sorted({round(level * experts) for level in EXPERT_LEVELS}))


def routing_shares(scn, layer: int | None) -> tuple[float, ...] | None:
    """Each expert's share of layer `layer`'s routed tokens, most used first (None: uniform)."""
    counts = (scn.routing or {}).get(layer) if layer is not None else None
    if not counts or sum(counts) <= 0:
        return None
    total = float(sum(counts))
    return tuple(sorted((c / total for c in counts), reverse=True))


def expert_probs(scn, t: TensorSpec) -> tuple[float, ...]:
    """Per-token probability that each expert of bank `t` runs, most used first: `active`
    times its share of routed tokens (uniform without a routing table)."""
    active = round(t.route_prob * t.experts)
    shares = routing_shares(scn, t.layer)
    if shares is None:
        return (t.route_prob,) * t.experts
    return tuple(min(active * s, 1.0) for s in shares)


def routed_share(probs: tuple[float, ...], n: int) -> float:
    """Share of routed tokens that go to the n most used experts."""
    total = sum(probs)
    return sum(probs[:n]) / total if total > 0 else 0.0


def _touched(probs: tuple[float, ...], rows: int) -> float:
    """Expected number of these experts that at least one of `rows` tokens uses."""
    if not probs:
        return 0.0
    return float(np.sum(1.0 - (1.0 - np.asarray(probs)) ** rows))


def _part(scn, t: TensorSpec, probs: tuple[float, ...], rows: int, on_host: bool) -> tuple[PathCost, float]:
    """(cost, weight bytes read) of the experts `probs` for `rows` tokens as one grouped dispatch."""
    if not probs:
        return PathCost(), 0.0
    expert_flops = 2.0 * t.rows * t.cols
    assignments = rows * sum(probs)  # token-expert pairs routed here
    read = t.expert_bytes * _touched(probs, rows)
    act = assignments * (t.rows + 2 * t.cols) * scn.act_bytes  # input, hidden and output activations
    op = host_op_s if on_host else acc_op_s
    read_dtype = scn.weight_dtype
    seconds = op(scn.profile, scn.compute_dtype, assignments * expert_flops, read + act, max(assignments, 1.0),
                 t.expert_bytes * len(probs), read_dtype)
    return (PathCost(cpu_s=seconds) if on_host else PathCost(acc_s=seconds)), read


def bank_parts(scn, t: TensorSpec, n: int, rows: int) -> tuple[float, float, float, float]:
    """A split bank's two branches for `rows` tokens, as the simulator schedules them:
    (accelerator s, hidden states down s, host experts s incl. the worker hand-off, outputs up s)."""
    probs = expert_probs(scn, t)
    acc, _ = _part(scn, t, probs[:n], rows, on_host=False)
    host, _ = _part(scn, t, probs[n:], rows, on_host=True)
    row_bytes = rows * t.cols * scn.act_bytes
    return (acc.acc_s, d2h_s(scn.profile, row_bytes), host.cpu_s + scn.profile.host.task_overhead_s,
            h2d_s(scn.profile, row_bytes))


def _split_cost(scn, t: TensorSpec, probs: tuple[float, ...], n: int, rows: int,
                host_on_acc: bool) -> tuple[PathCost, float, float, float]:
    """(cost, accelerator bytes read, host bytes read, activation h2d s) with n experts on the
    accelerator; `host_on_acc`: the host experts were copied up and run with the rest."""
    if host_on_acc:
        cost, read = _part(scn, t, probs, rows, on_host=False)
        return cost, read, 0.0, 0.0
    acc, acc_read = _part(scn, t, probs[:n], rows, on_host=False)
    host, host_read = _part(scn, t, probs[n:], rows, on_host=True)
    if n == len(probs):
        return acc, acc_read, 0.0, 0.0
    row_bytes = rows * t.cols * scn.act_bytes
    up_s = h2d_s(scn.profile, row_bytes)
    host = host + PathCost(cpu_s=scn.profile.host.task_overhead_s, xfer_s=d2h_s(scn.profile, row_bytes) + up_s)
    return (parallel(acc, host) if n else host), acc_read, host_read, up_s


def expert_options(scn, t: TensorSpec) -> list:
    """Every way to hold bank `t`: n experts resident for each offered n (prefill of the host
    part computed there, or copied up), plus streaming the whole bank (a baseline's choice)."""
    from planner.cost.options import TensorOption
    probs = expert_probs(scn, t)
    dec_rows, pf_rows = scn.decode_rows, scn.prefill_rows
    options = []
    for n in expert_counts(t.experts):
        resident = int(round(t.expert_bytes * n))
        host_bytes = t.n_bytes - resident
        device = "gpu" if n == t.experts else "cpu"
        dec, acc_dec, host_dec, up_dec = _split_cost(scn, t, probs, n, dec_rows, False)
        modes = (False,) if n == t.experts else (False, True)
        for copied in modes:
            pf, acc_pf, host_pf, up_pf = _split_cost(scn, t, probs, n, pf_rows, copied)
            link_pf = h2d_s(scn.profile, host_bytes) if copied else 0.0
            option = TensorOption(device, copied, 0, dec, pf, 0.0, link_pf, up_dec, up_pf, resident,
                                  host_bytes if copied else 0, host_bytes, 0, 0.0, gpu_experts=n)
            options.append(_bank_bus(scn, option, acc_dec, acc_pf, host_dec, host_pf, resident, host_bytes))
    stream_dec, read_dec, _, _ = _split_cost(scn, t, probs, t.experts, dec_rows, False)
    stream_pf, read_pf, _, _ = _split_cost(scn, t, probs, t.experts, pf_rows, False)
    stream = TensorOption("stream", False, 0, stream_dec, stream_pf, h2d_s(scn.profile, t.n_bytes),
                          h2d_s(scn.profile, t.n_bytes), 0.0, 0.0, 0, t.n_bytes, t.n_bytes, 0, 0.0,
                          gpu_experts=t.experts)
    bus = weight_bus(scn.profile, "stream", False, read_dec, read_pf, t.n_bytes)
    options.append(replace(stream, decode_bus_s=bus.own_decode_s, prefill_bus_s=bus.own_prefill_s,
                           decode_fetch_bus_s=bus.fetch_decode_s, prefill_fetch_bus_s=bus.fetch_prefill_s,
                           decode_fetch_slow_s=bus.slow_decode_s, prefill_fetch_slow_s=bus.slow_prefill_s))
    return options


def _bank_bus(scn, o, acc_dec: float, acc_pf: float, host_dec: float, host_pf: float, resident: int,
              host_bytes: int):
    """Host memory bus of a split bank: the host part as a cpu weight (copied up for prefill
    when `o.prefill_streamed`), the resident part as a gpu weight."""
    host = weight_bus(scn.profile, "cpu", o.prefill_streamed, host_dec, host_pf, host_bytes)
    acc = weight_bus(scn.profile, "gpu", False, acc_dec, acc_pf, resident)
    return replace(o, decode_bus_s=host.own_decode_s + acc.own_decode_s,
                   prefill_bus_s=host.own_prefill_s + acc.own_prefill_s,
                   decode_fetch_bus_s=host.fetch_decode_s, prefill_fetch_bus_s=host.fetch_prefill_s,
                   decode_fetch_slow_s=host.slow_decode_s, prefill_fetch_slow_s=host.slow_prefill_s)
