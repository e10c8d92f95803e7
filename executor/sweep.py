"""The profiler's sweep: the list of timed steps (link, each target's compute, host
attention) and running them with progress. The timings themselves are in measure.py."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from planner.units import fmt_bytes

from .measure import (QUANT_FORMAT, TINY_COPY_BYTES, Progress, Settings, Target, attention_kv_bytes,
                      attention_timing, copy_timing, linear_timing, matmul_timing, op_overhead_timing,
                      quant_linear_timing, quant_shape, transfer_timing)
from .overhead import (DEEP_LAYERS, SHALLOW_LAYERS, attention_prefill_timing, branch_timing,
                       decode_step_timing, prefill_elementwise_timing, split_attention_timing)
from .timing import Timing


@dataclass(frozen=True)
class _Step:
    key: str
    label: str
    run: Callable[[], Timing]


def measure_all(s: Settings, link_device: torch.device, pageable: bool, targets: tuple[Target, ...],
                report: Progress) -> dict[str, Timing]:
    """Times the link to `link_device`, each target's compute and CPU attention; keys name the
    step (`link.h2d.pinned.<bytes>`, `host.gemm.bf16.0`, ...). `report(step, fraction_done)`."""
    steps = _link_steps(link_device, s, (True, False) if pageable else (True,))
    for target in targets:
        steps += _compute_steps(target, s)
    cpu, kv_bytes = torch.device("cpu"), attention_kv_bytes(s.attention_tokens)
    steps.append(_Step("host.attention", f"host attention over {fmt_bytes(kv_bytes)} of KV cache",
                       functools.partial(attention_timing, cpu, s.attention_tokens, s.warmup, s.repeats)))
    timings = {}
    for i, step in enumerate(steps):
        report(step.label, i / len(steps))
        timings[step.key] = step.run()
    report("done", 1.0)
    return timings


def _link_steps(device: torch.device, s: Settings, pinned_kinds: tuple[bool, ...]) -> list[_Step]:
    steps = [_Step("link.latency", "link latency (tiny copies)",
                   functools.partial(transfer_timing, device, TINY_COPY_BYTES, True, True,
                                     s.warmup, s.repeats, s.latency_calls, s.cold_pool_bytes))]
    for direction in ("h2d", "d2h"):
        for pinned in pinned_kinds:
            kind = "pinned" if pinned else "pageable"
            steps += [_Step(f"link.{direction}.{kind}.{size}", f"link {direction} {kind} {fmt_bytes(size)}",
                            functools.partial(transfer_timing, device, size, direction == "h2d",
                                              pinned, s.warmup, s.repeats, cold_pool_bytes=s.cold_pool_bytes))
                      for size in s.link_sizes_bytes]
    return steps


def _compute_steps(target: Target, s: Settings) -> list[_Step]:
    p, dev, w, r = target.prefix, target.device, s.warmup, s.repeats
    out_f, in_f = s.gemv_shape
    steps = [_Step(f"{p}.copy", f"{p} memory bandwidth ({fmt_bytes(target.copy_bytes)} copy)",
                   functools.partial(copy_timing, dev, target.copy_bytes, w, r))]
    for dt in target.dtypes:
        steps += [_Step(f"{p}.gemm.{dt}.{i}", f"{p} {dt} matmul {m}x{k}x{n}",
                        functools.partial(matmul_timing, dev, dt, m, k, n, w, r))
                  for i, (m, k, n) in enumerate(target.gemm_shapes)]
        steps += [_Step(f"{p}.gemv.{dt}.{b}", f"{p} {dt} GEMV batch {b}",
                        functools.partial(linear_timing, dev, dt, out_f, in_f, b, w, r, s.cold_pool_bytes))
                  for b in s.gemv_batches]
    steps.append(_Step(f"{p}.overhead", f"{p} per-operator overhead",
                       functools.partial(op_overhead_timing, dev, s.overhead_calls, w, r)))
    probe_dtype = target.dtypes[0]
    q_out, q_in = quant_shape(s)
    steps += [_Step(f"{p}.gemv.int{bits}.{b}", f"{p} int{bits} fused GEMV batch {b}",
                    functools.partial(quant_linear_timing, dev, probe_dtype, bits, q_out, q_in, b, w, r,
                                      s.cold_pool_bytes))
              for bits in QUANT_FORMAT for b in s.gemv_batches]
    steps += [_Step(f"{p}.gemv_size.{o}x{i}", f"{p} {probe_dtype} GEMV {o}x{i}",
                    functools.partial(linear_timing, dev, probe_dtype, o, i, 1, w, r, s.cold_pool_bytes))
              for o, i in s.gemv_size_shapes]
    steps += [_Step(f"{p}.decoder.{n}", f"{p} decode step overhead ({n} layers)",
                    functools.partial(decode_step_timing, dev, probe_dtype, n, w, r))
              for n in (SHALLOW_LAYERS, DEEP_LAYERS)]
    steps += [_Step(f"{p}.attention.{kind}", f"{p} decode attention, KV cache {kind}",
                    functools.partial(split_attention_timing, dev, probe_dtype, fraction, w, r))
              for kind, fraction in (("device", 0.0), ("split", 0.5))]
    steps += [_Step(f"{p}.prefill.elementwise", f"{p} prefill element-wise operators",
                    functools.partial(prefill_elementwise_timing, dev, probe_dtype, w, r)),
              _Step(f"{p}.prefill.attention", f"{p} prefill causal attention",
                    functools.partial(attention_prefill_timing, dev, probe_dtype, w, r))]
    steps += [_Step(f"{p}.branch.{kind}", f"{p} int4 linear {kind} a host branch",
                    functools.partial(branch_timing, dev, kind == "with", w, r)) for kind in ("with", "without")]
    return steps
