"""What the profiler times, how, and the figures it derives: kernels return the median
time of several timed runs after warm-up; `measure_all` runs a whole sweep.

Every kernel runs on a torch device: a CUDA device, or the CPU (the loopback accelerator
and the host); executor/timing.py times them. CUDA-specific calls live in the few functions
named `_cuda_*`, each beside its CPU twin.

Spread: the relative spread of the timed runs, (q3 - q1) / median (interquartile range),
or (max - min) / median when there are fewer than four runs. A rate derived from a time
(bytes / s, flop / s) has the same relative spread to first order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from planner.hardware.profile import Link
from planner.model.spec import Quantization

from .overhead import (DEEP_LAYERS, SHALLOW_LAYERS, attention_tflops, branch_overhead_s, elementwise_gbps,
                       split_kv_overhead_s, step_overhead)
from . import qkernels
from .quant import quant_matmul, quantize
from .timing import DTYPES, Timing, time_runs

# The host side of a transfer rotates through a pool at least this large, so each timed copy
# reads (or writes) memory that no recent run touched: weights streamed by the executor come
# from DRAM, not from a cache warmed by the previous repeat. Twice a large last-level cache.
COLD_POOL_BYTES = 128 * 2**20
# At most this many host slices per transfer size (tiny copies need not span the pool).
MAX_SLOTS = 1024
TINY_COPY_BYTES = 256  # a transfer whose time is all latency
CPU_DTYPES = ("fp32", "bf16")  # fp16 matmul on CPUs is a slow emulated path nothing uses
CUDA_DTYPES = ("bf16", "fp16", "fp32")
# Packed formats whose fused matmul is timed (executor/qkernels.py), as the planner counts
# their bytes (planner/model/spec.py): int4 in groups of 128 with the kernel's stored
# scale-and-zero operand, int8 with one scale per output channel.
QUANT_FORMAT = {4: Quantization(4, 128, symmetric=False), 8: Quantization(8, 0)}
ATTENTION_SHAPE = (8, 4, 128)  # kv_heads, query heads per kv head, head_dim (Llama-3-8B-like)
ATTENTION_DTYPE = "bf16"

Progress = Callable[[str, float], None]


# ---- buffers ------------------------------------------------------------------------------

def _cuda_pinned_buffer(n_bytes: int) -> torch.Tensor:
    return torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)  # [n_bytes] page-locked


def _cpu_pinned_buffer(n_bytes: int) -> torch.Tensor:
    """CPU twin: without a CUDA device there is nothing to pin for; plain host memory."""
    return torch.empty(n_bytes, dtype=torch.uint8)  # [n_bytes]


def host_buffer(n_bytes: int, pinned: bool) -> torch.Tensor:
    """A touched host buffer (pages faulted in before timing)."""
    if pinned:
        buf = _cuda_pinned_buffer(n_bytes) if torch.cuda.is_available() else _cpu_pinned_buffer(n_bytes)
    else:
        buf = torch.empty(n_bytes, dtype=torch.uint8)  # [n_bytes] pageable
    return buf.fill_(1)


# ---- kernels -------------------------------------------------------------------------------

def transfer_timing(device: torch.device, size_bytes: int, to_device: bool, pinned: bool,
                    warmup: int, repeats: int, calls: int = 1, cold_pool_bytes: int = COLD_POOL_BYTES) -> Timing:
    """One copy of `size_bytes` between host memory and `device` (a CPU device: host to host).

    The host side rotates through slices of a pool of at least `cold_pool_bytes`; the device
    side is one fixed buffer, as the executor's streaming buffers are."""
    pool_bytes = max(size_bytes, cold_pool_bytes)
    pool = host_buffer(pool_bytes, pinned)  # [pool_bytes]
    n_slots = min(pool_bytes // size_bytes, MAX_SLOTS)
    stride = pool_bytes // n_slots
    slots = [pool[i * stride:i * stride + size_bytes] for i in range(n_slots)]
    dev = torch.ones(size_bytes, dtype=torch.uint8, device=device)  # [size_bytes]
    views = itertools.cycle(slots)
    if to_device:
        def fn() -> object:
            return dev.copy_(next(views), non_blocking=pinned)
    else:
        def fn() -> object:
            return next(views).copy_(dev, non_blocking=pinned)
    return time_runs(fn, device, warmup, repeats, calls)


def copy_timing(device: torch.device, size_bytes: int, warmup: int, repeats: int) -> Timing:
    """A copy between two buffers of `size_bytes` on `device` (moves 2 x size_bytes)."""
    src = torch.ones(size_bytes, dtype=torch.uint8, device=device)  # [size_bytes]
    dst = torch.zeros(size_bytes, dtype=torch.uint8, device=device)  # [size_bytes]
    return time_runs(lambda: dst.copy_(src), device, warmup, repeats)


def matmul_timing(device: torch.device, dtype: str, m: int, k: int, n: int,
                  warmup: int, repeats: int) -> Timing:
    """[m, k] @ [k, n] into a preallocated output (2 m k n flops)."""
    tdt = DTYPES[dtype]
    a = torch.randn(m, k, device=device, dtype=tdt)  # [m, k]
    b = torch.randn(k, n, device=device, dtype=tdt)  # [k, n]
    out = torch.empty(m, n, device=device, dtype=tdt)  # [m, n]
    return time_runs(lambda: torch.matmul(a, b, out=out), device, warmup, repeats)


def linear_timing(device: torch.device, dtype: str, out_features: int, in_features: int,
                  batch: int, warmup: int, repeats: int, cold_pool_bytes: int = COLD_POOL_BYTES) -> Timing:
    """A decode-step linear layer: x [batch, in] times weight [out, in] transposed.

    Each call uses the next of a pool of weights spanning at least `cold_pool_bytes`, as a
    decode step walks through a model's matrices: every weight comes from memory, never from
    a cache the previous call warmed (one matrix timed alone reads partly from cache)."""
    tdt = DTYPES[dtype]
    weight_bytes = out_features * in_features * tdt.itemsize
    n_weights = max(2, math.ceil(cold_pool_bytes / weight_bytes))
    weights = [torch.randn(out_features, in_features, device=device, dtype=tdt)  # [out, in]
               for _ in range(n_weights)]
    x = torch.randn(batch, in_features, device=device, dtype=tdt)  # [batch, in]
    pool = itertools.cycle(weights)
    return time_runs(lambda: torch.nn.functional.linear(x, next(pool)), device, warmup, repeats,
                     calls=n_weights)


def quant_linear_timing(device: torch.device, dtype: str, bits: int, out_features: int, in_features: int,
                        batch: int, warmup: int, repeats: int, cold_pool_bytes: int = COLD_POOL_BYTES) -> Timing:
    """The executor's fused quantized matmul (QUANT_FORMAT, packed for `device`'s kernel) over
    a cold pool of packed weights, activations in `dtype`: what a quantized matmul costs here."""
    fmt = QUANT_FORMAT[bits]
    packed_bytes = fmt.bytes_for(out_features * in_features, in_features)
    n_weights = max(2, math.ceil(cold_pool_bytes / packed_bytes))
    one = qkernels.pack(quantize(torch.randn(out_features, in_features), bits, fmt.group_size, fmt.symmetric),
                        qkernels.kernel_layout(device)).to(device)
    # Copies of one packed matrix: the kernel's speed does not depend on the values.
    weights = [one.with_storage(tuple(t.clone() for t in one.storage)) for _ in range(n_weights)]
    x = torch.randn(batch, in_features, device=device, dtype=DTYPES[dtype])  # [batch, in]
    pool = itertools.cycle(weights)
    return time_runs(lambda: quant_matmul(x, next(pool)), device, warmup, repeats, calls=len(weights))


def op_overhead_timing(device: torch.device, calls: int, warmup: int, repeats: int) -> Timing:
    """A matmul so small that its time is the fixed cost of one operator call."""
    a = torch.ones(1, 16, device=device)  # [1, 16]
    b = torch.ones(16, 16, device=device)  # [16, 16]
    out = torch.empty(1, 16, device=device)  # [1, 16]
    return time_runs(lambda: torch.matmul(a, b, out=out), device, warmup, repeats, calls)


def attention_kv_bytes(tokens: int) -> int:
    """Bytes of K and V one decode attention (ATTENTION_SHAPE) reads for one sequence."""
    kv_heads, _, head_dim = ATTENTION_SHAPE
    return 2 * kv_heads * tokens * head_dim * DTYPES[ATTENTION_DTYPE].itemsize


def attention_timing(device: torch.device, tokens: int, warmup: int, repeats: int) -> Timing:
    """One decode token's attention over a KV cache of `tokens`, returning output and
    log-sum-exp (what the hybrid attention merges), grouped-query layout."""
    kv_heads, group, head_dim = ATTENTION_SHAPE
    tdt = DTYPES[ATTENTION_DTYPE]
    scale = 1.0 / math.sqrt(head_dim)
    q = torch.randn(kv_heads, group, head_dim, device=device, dtype=tdt)  # [kv_heads, group, head_dim]
    k = torch.randn(kv_heads, tokens, head_dim, device=device, dtype=tdt)  # [kv_heads, tokens, head_dim]
    v = torch.randn(kv_heads, tokens, head_dim, device=device, dtype=tdt)  # [kv_heads, tokens, head_dim]

    def attend() -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [kv_heads, group, tokens]
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [kv_heads, group, 1]
        out = torch.matmul(torch.exp(scores - lse), v)  # [kv_heads, group, head_dim]
        return out, lse

    return time_runs(attend, device, warmup, repeats)


@dataclass(frozen=True)
class Settings:
    """How much to measure. Sizes keep allocations under ~2 GiB at once."""
    link_sizes_bytes: tuple[int, ...]
    warmup: int
    repeats: int
    latency_calls: int  # tiny copies per timed run
    overhead_calls: int  # tiny matmuls per timed run
    copy_bytes: int  # memory-bandwidth copy (two buffers of this size)
    cpu_gemm_shapes: tuple[tuple[int, int, int], ...]  # (m, k, n), prefill-like
    cuda_gemm_shapes: tuple[tuple[int, int, int], ...]
    gemv_shape: tuple[int, int]  # (out, in): one decode-sized weight; a pool of them is cycled
    gemv_batches: tuple[int, ...]  # decode-like; the first must be 1
    attention_tokens: int
    # (out, in) timed at batch 1 for the size factor. Small matrices come from narrow models,
    # and a matrix-vector product over short rows (in = 1024) streams slower than over long
    # ones, so the small shapes here have LLM proportions, not the reference's 4096-wide rows.
    gemv_size_shapes: tuple[tuple[int, int], ...] = ()
    bus_seconds: float = 0.3  # per run of the streaming-and-matmul probe (executor/contention.py)
    bus_runs: int = 8  # its runs: the slowdown drifts over seconds on shared machines
    cold_pool_bytes: int = COLD_POOL_BYTES  # smaller only for tests: then caches may serve some reads


@dataclass(frozen=True)
class Target:
    """A device whose compute is timed, under a key prefix (`accelerator` or `host`)."""
    prefix: str
    device: torch.device
    dtypes: tuple[str, ...]
    gemm_shapes: tuple[tuple[int, int, int], ...]
    copy_bytes: int  # two buffers of this size must fit on the device


# ---- figures derived from timings -----------------------------------------------------------

def sig(value: float, digits: int = 4) -> float:
    """Round to `digits` significant digits: the runs do not support more."""
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class Figure:
    value: float
    spread: float  # relative

    @staticmethod
    def rate(units: float, timing: Timing, scale: float) -> Figure:
        """`units` per second of `timing`, divided by `scale` (1e9 for GB/s, 1e12 for TFLOP/s)."""
        return Figure(sig(units / timing.median_s / scale), sig(timing.spread))

    @staticmethod
    def time(timing: Timing) -> Figure:
        return Figure(sig(timing.median_s), sig(timing.spread))


@dataclass(frozen=True)
class Compute:
    """What one device (accelerator or host CPU) achieved."""
    mem_bw_gbps: Figure  # copy, read + write bytes
    flops_tflops: dict[str, Figure]  # best prefill-like matmul by dtype
    gemv_gbps: dict[str, dict[int, Figure]]  # weight bytes / s by dtype, then batch
    gemv_size_gbps: dict[int, Figure]  # batch-1 weight bytes / s of the first dtype, by weight bytes
    op_overhead_s: Figure
    layer_overhead_s: Figure  # fixed time of one decoder layer in a decode step (executor/overhead.py)
    head_overhead_s: Figure  # fixed time per decode step outside the layers
    split_overhead_s: Figure  # what a host/accelerator split of one layer's KV cache adds to its attention
    elementwise_gbps: Figure  # a prefill layer's element-wise operators, against cost.elementwise_bytes
    attention_tflops: Figure  # causal prefill attention through the executor's KV cache
    task_overhead_s: Figure  # a compensation branch's hand-off to the host worker and back

    def flops_values(self) -> dict[str, float]:
        return {dtype: f.value for dtype, f in self.flops_tflops.items()}

    def gemv_dtype(self) -> str:
        """The dtype model weights are kept in (bf16) when measured, else the first measured."""
        return "bf16" if "bf16" in self.gemv_gbps else next(iter(self.gemv_gbps))

    def gemv_curves(self) -> dict[str, tuple[tuple[float, float], ...]]:
        """Weight GB/s by dtype as (rows, GB/s) curves, for the cost model's matmul roofline."""
        return {dt: tuple((float(b), fig.value) for b, fig in sorted(by_batch.items()))
                for dt, by_batch in self.gemv_gbps.items()}

    def gemv_size_factor(self) -> tuple[tuple[float, float], ...]:
        """(weight bytes, batch-1 speed relative to the reference matrix of `gemv_gbps`), in
        the dtype the sizes were timed in; empty when no sizes were timed."""
        if not self.gemv_size_gbps:
            return ()
        reference = self.gemv_gbps[next(iter(self.gemv_gbps))][1].value
        return tuple((float(n), sig(f.value / reference)) for n, f in sorted(self.gemv_size_gbps.items()))

    def gemv_efficiency(self) -> Figure:
        """Batch-1 GEMV bytes/s over copy bandwidth, clamped to (0, 1]: a GEMV only reads,
        so on some machines it beats a copy's read + write rate."""
        batch1 = self.gemv_gbps[self.gemv_dtype()][1]
        return Figure(sig(min(1.0, max(batch1.value / self.mem_bw_gbps.value, 1e-3))), batch1.spread)

    def spread(self, prefix: str) -> dict[str, float]:
        """Relative spreads keyed by profile field path."""
        out = {f"{prefix}.mem_bw_gbps": self.mem_bw_gbps.spread,
               f"{prefix}.gemv_efficiency": self.gemv_efficiency().spread,
               f"{prefix}.op_overhead_s": self.op_overhead_s.spread}
        if prefix == "accelerator":  # the host profile has no per-layer figures
            out[f"{prefix}.layer_overhead_s"] = self.layer_overhead_s.spread
            out[f"{prefix}.split_overhead_s"] = self.split_overhead_s.spread
            out[f"{prefix}.elementwise_gbps"] = self.elementwise_gbps.spread
            out[f"{prefix}.attention_tflops"] = self.attention_tflops.spread
        out.update({f"{prefix}.flops_tflops.{dt}": f.spread for dt, f in self.flops_tflops.items()})
        return out


def quant_shape(s: Settings) -> tuple[int, int]:
    """(out, in) of the timed fused quantized matmul: the GEMV shape (LLM-sized in FULL/QUICK)."""
    return s.gemv_shape


def compute_figures(target: Target, timings: dict[str, Timing], s: Settings) -> Compute:
    """Rates from the timings `measure_all` took for `target`."""
    p, (out_f, in_f) = target.prefix, s.gemv_shape
    flops, gemv = {}, {}
    for dt in target.dtypes:
        rates = [Figure.rate(2 * m * k * n, timings[f"{p}.gemm.{dt}.{i}"], 1e12)
                 for i, (m, k, n) in enumerate(target.gemm_shapes)]
        flops[dt] = max(rates, key=lambda f: f.value)
        weight_bytes = out_f * in_f * DTYPES[dt].itemsize
        gemv[dt] = {b: Figure.rate(weight_bytes, timings[f"{p}.gemv.{dt}.{b}"], 1e9) for b in s.gemv_batches}
    q_out, q_in = quant_shape(s)
    for bits, fmt in QUANT_FORMAT.items():  # packed bytes / s, after the float dtypes
        packed_bytes = fmt.bytes_for(q_out * q_in, q_in)
        gemv[f"int{bits}"] = {b: Figure.rate(packed_bytes, timings[f"{p}.gemv.int{bits}.{b}"], 1e9)
                              for b in s.gemv_batches}
    size_dtype = target.dtypes[0]
    sizes = {out * inn * DTYPES[size_dtype].itemsize: Figure.rate(out * inn * DTYPES[size_dtype].itemsize,
                                                                 timings[f"{p}.gemv_size.{out}x{inn}"], 1e9)
             for out, inn in s.gemv_size_shapes}
    sizes[out_f * in_f * DTYPES[size_dtype].itemsize] = gemv[size_dtype][1]
    step = step_overhead(timings[f"{p}.decoder.{SHALLOW_LAYERS}"], timings[f"{p}.decoder.{DEEP_LAYERS}"])
    return Compute(mem_bw_gbps=Figure.rate(2 * target.copy_bytes, timings[f"{p}.copy"], 1e9),
                   flops_tflops=flops, gemv_gbps=gemv, gemv_size_gbps=sizes if s.gemv_size_shapes else {},
                   op_overhead_s=Figure.time(timings[f"{p}.overhead"]),
                   layer_overhead_s=Figure(sig(step.layer_s), sig(step.spread)),
                   head_overhead_s=Figure(sig(step.head_s), sig(step.spread)),
                   split_overhead_s=Figure(sig(split_kv_overhead_s(timings[f"{p}.attention.split"],
                                                                timings[f"{p}.attention.device"])),
                                           sig(timings[f"{p}.attention.split"].spread)),
                   elementwise_gbps=Figure(sig(elementwise_gbps(timings[f"{p}.prefill.elementwise"], step.layer_s,
                                                                target.dtypes[0])),
                                           sig(timings[f"{p}.prefill.elementwise"].spread)),
                   attention_tflops=Figure(sig(attention_tflops(timings[f"{p}.prefill.attention"])),
                                           sig(timings[f"{p}.prefill.attention"].spread)),
                   task_overhead_s=Figure(sig(branch_overhead_s(timings[f"{p}.branch.with"],
                                                                timings[f"{p}.branch.without"])),
                                          sig(timings[f"{p}.branch.with"].spread)))


def link_figures(timings: dict[str, Timing], s: Settings,
                 pageable_measured: bool) -> tuple[Link, dict[str, float]]:
    """Curves (bytes / (time - latency)) by size, asymptotes at the largest size, spreads."""
    latency = Figure.time(timings["link.latency"])
    curves, spread = {}, {"link.latency_s": latency.spread}
    for direction in ("h2d", "d2h"):
        for kind in ("pinned", "pageable") if pageable_measured else ("pinned",):
            runs = [timings[f"link.{direction}.{kind}.{size}"] for size in s.link_sizes_bytes]
            field = f"{direction}_curve" if kind == "pinned" else f"{direction}_pageable_curve"
            curves[field] = tuple(
                (float(size), sig(size / max(t.median_s - latency.value, t.median_s / 2) / 1e9))
                for size, t in zip(s.link_sizes_bytes, runs))
            spread[f"link.{field}"] = sig(max(t.spread for t in runs))
            if kind == "pinned":  # the asymptote: the largest size
                spread[f"link.{direction}_gbps"] = sig(runs[-1].spread)
    if not pageable_measured:  # loopback: host memory is never pinned; one copy path
        curves["h2d_pageable_curve"], curves["d2h_pageable_curve"] = curves["h2d_curve"], curves["d2h_curve"]
    link = Link(h2d_gbps=curves["h2d_curve"][-1][1], d2h_gbps=curves["d2h_curve"][-1][1],
                latency_s=latency.value, **curves)
    return link, spread


def attention_figure(timings: dict[str, Timing], s: Settings) -> Figure:
    """KV bytes scanned per second by one decode token's CPU attention."""
    return Figure.rate(attention_kv_bytes(s.attention_tokens), timings["host.attention"], 1e9)
