"""How much host memory bandwidth weight streaming and compute get when they run at once.

The executor copies the next stage's weights on a copy thread (loopback) or by DMA (CUDA)
while the current stage computes; on loopback the compute reads DRAM too, and on both a
CPU-computed matmul does. Timing each alone overstates what they reach together, because
they share the memory bus (planner/cost/membus.py). This probe runs both at once, as the
executor does, for a fixed time, and reports the host DRAM traffic they achieved together.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from .measure import COLD_POOL_BYTES, host_buffer
from .timing import DTYPES, relative_spread

COPY_BYTES = 16 * 2**20  # one prefetch copy: a decoder layer of a small model
DEVICE_BUFFER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class BusFigure:
    """Means over the probe's runs."""

    copy_gbps: float  # link bytes/s while the matmuls ran
    gemv_gbps: float  # weight bytes/s the matmuls read while the copy ran
    gemv_alone_gbps: float  # the same matmuls with no copy running
    dram_gbps: float  # host DRAM bytes/s of both together
    slowdown_s_per_gb: float  # matmul seconds lost per GB copied beside them
    spread: float  # relative spread of dram_gbps over the runs


def slowdown_s_per_gb(copy_gbps: float, gemv_gbps: float, gemv_alone_gbps: float) -> float:
    """The matmuls ran at gemv_gbps instead of gemv_alone_gbps while copy_gbps went by: the
    fraction of their time lost, per GB copied (0 when they did not slow)."""
    lost_fraction = max(1.0 - gemv_gbps / gemv_alone_gbps, 0.0)
    return lost_fraction / copy_gbps if copy_gbps > 0 else 0.0


def _cuda_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A pinned host-to-device copy, waited for on this (the copy) thread only."""
    dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream(dst.device).synchronize()


def _cpu_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """CPU twin: the loopback copy thread's plain copy."""
    dst.copy_(src)


def _copy_loop(pool: torch.Tensor, dev: torch.Tensor, stop: threading.Event, counted: list[int]) -> None:
    """Copies COPY_BYTES pieces from the cold host `pool` into the device buffer `dev` until
    `stop`, counting the bytes copied in counted[0]."""
    copy = _cuda_copy if dev.device.type == "cuda" else _cpu_copy
    sources = itertools.cycle(range(0, pool.numel() - COPY_BYTES + 1, COPY_BYTES))
    targets = itertools.cycle(range(0, dev.numel() - COPY_BYTES + 1, COPY_BYTES))
    while not stop.is_set():
        s, d = next(sources), next(targets)
        copy(dev[d:d + COPY_BYTES], pool[s:s + COPY_BYTES])
        counted[0] += COPY_BYTES


def _gemv_run(weights: list[torch.Tensor], x: torch.Tensor, duration_s: float) -> tuple[int, float]:
    """Matrix-vector products cycling through `weights` for about `duration_s`."""
    calls, start = 0, time.perf_counter()
    for w in itertools.cycle(weights):
        torch.nn.functional.linear(x, w)
        calls += 1
        if calls % len(weights) == 0 and time.perf_counter() - start >= duration_s:
            break
    return calls * weights[0].numel() * weights[0].element_size(), time.perf_counter() - start


def bus_figure(copy_device: torch.device, dtype: str, gemv_shape: tuple[int, int], duration_s: float,
               repeats: int) -> BusFigure:
    """Host-side matmuls (batch 1, weights cycled cold) alone, then while a copy thread streams
    to `copy_device`, `repeats` times, `duration_s` each. Copy traffic counts twice on loopback
    (the copy reads and writes host memory), once over a real link.

    Each run pairs an alone and a shared measurement, and the figures are means over the runs:
    on a shared or virtual machine how much the two slow each other changes over seconds
    (here between 2 and 16 ms per GB copied), and the mean is the best single figure for the
    minutes a run takes."""
    out_f, in_f = gemv_shape
    tdt = DTYPES[dtype]
    n_weights = max(2, -(-COLD_POOL_BYTES // (out_f * in_f * tdt.itemsize)))
    weights = [torch.randn(out_f, in_f, dtype=tdt) for _ in range(n_weights)]  # [out, in] each
    x = torch.randn(1, in_f, dtype=tdt)  # [1, in]
    copy_factor = 1 if copy_device.type == "cuda" else 2
    pool = host_buffer(max(COLD_POOL_BYTES, 2 * COPY_BYTES), pinned=copy_device.type == "cuda")  # [pool_bytes]
    dev = torch.empty(DEVICE_BUFFER_BYTES, dtype=torch.uint8, device=copy_device)  # [buffer_bytes]
    _gemv_run(weights, x, 0.0)  # warm-up
    runs: list[tuple[float, float, float, float]] = []  # copy, gemv, gemv alone, dram GB/s
    for _ in range(repeats):
        read_alone, alone_s = _gemv_run(weights, x, duration_s / 2)
        stop, counted = threading.Event(), [0]
        copier = threading.Thread(target=_copy_loop, args=(pool, dev, stop, counted), daemon=True)
        copier.start()
        while counted[0] == 0 and copier.is_alive():  # the copier is running
            time.sleep(0.001)
        copied_before, t0 = counted[0], time.perf_counter()
        read_bytes, _ = _gemv_run(weights, x, duration_s)
        copied, elapsed_s = counted[0] - copied_before, time.perf_counter() - t0
        stop.set()
        copier.join()
        runs.append((copied / elapsed_s / 1e9, read_bytes / elapsed_s / 1e9, read_alone / alone_s / 1e9,
                     (copy_factor * copied + read_bytes) / elapsed_s / 1e9))
    copy, gemv, alone, dram = (statistics.fmean(column) for column in zip(*runs))
    return BusFigure(copy, gemv, alone, dram, statistics.fmean(slowdown_s_per_gb(*r[:3]) for r in runs),
                     relative_spread([r[3] for r in runs]))
