"""Timing primitives: the median of several timed runs after warm-up, and its spread.

Timing on CUDA uses `torch.cuda.Event`s recorded on the current stream (device time, no host
jitter); on the CPU, `time.perf_counter`. CUDA-specific calls live in the functions named
`_cuda_*`, each beside its CPU twin.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The smallest spread stored: timer resolution makes anything below it meaningless.
MIN_SPREAD = 1e-4


@dataclass(frozen=True)
class Timing:
    median_s: float  # per call
    spread: float  # relative spread of the runs (see module docstring)
    runs: int


def relative_spread(samples_s: list[float]) -> float:
    """(q3 - q1) / median for four or more samples, (max - min) / median below that."""
    median = statistics.median(samples_s)
    if len(samples_s) >= 4:
        q1, _, q3 = statistics.quantiles(samples_s, n=4, method="inclusive")
        width = q3 - q1
    else:
        width = max(samples_s) - min(samples_s)
    return max(width / median, MIN_SPREAD) if median > 0 else MIN_SPREAD


# ---- clocks: the CUDA functions and their CPU twins ----------------------------------------

def _cuda_synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def _cpu_synchronize(device: torch.device) -> None:
    """CPU twin: torch CPU operators have finished when they return."""


def _cuda_elapsed_s(fn: Callable[[], object], calls: int) -> float:
    """Device time of `calls` back-to-back calls, between two events on the current stream."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


def _cpu_elapsed_s(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start


def time_runs(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              calls: int = 1) -> Timing:
    """Median per-call time of `repeats` runs of `calls` calls each, after `warmup` calls."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    (_cuda_synchronize if cuda else _cpu_synchronize)(device)
    samples_s = []
    for _ in range(repeats):
        elapsed_s = _cuda_elapsed_s(fn, calls) if cuda else _cpu_elapsed_s(fn, calls)
        samples_s.append(elapsed_s / calls)
    return Timing(statistics.median(samples_s), relative_spread(samples_s), repeats)
