"""The host half of a split KV cache, as seen from the device: CUDA functions (pinned host
buffers, asynchronous copies ordered by events, timing events) and their CPU twins (plain
buffers, synchronous copies, perf_counter). Follows PyTorch's documented stream semantics:
a copy queued on the current stream is complete once an event recorded after it is."""

from __future__ import annotations

import time

import torch
from torch import Tensor


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def alloc_host(numel: int, dtype: torch.dtype, host_device: torch.device, pin: bool) -> Tensor:
    """Flat host buffer; page-locked when it takes part in async copies with a CUDA device."""
    if pin:
        return torch.empty(numel, dtype=dtype, device=host_device, pin_memory=True)
    return torch.empty(numel, dtype=dtype, device=host_device)


def copy(dst: Tensor, src: Tensor, cuda: bool) -> None:
    """Cross-link copy. CUDA: async on the current stream (callers pass pinned host memory and
    order reuse with `ready_marker`); CPU twin: a plain synchronous memcpy."""
    dst.copy_(src, non_blocking=cuda)


def ready_marker(device: torch.device, cuda: bool) -> torch.cuda.Event | None:
    """An event recorded after the copies queued so far on the device's current CUDA stream;
    None on CPU, where copies are already complete when `copy` returns."""
    if not cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def wait_ready(marker: torch.cuda.Event | None) -> None:
    """Blocks the calling (host worker) thread until the marked copies have landed."""
    if marker is not None:
        marker.synchronize()


def clock(device: torch.device, cuda: bool) -> float | torch.cuda.Event:
    """A time stamp on the device's own timeline: a timing event on CUDA, perf_counter on CPU."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def elapsed_s(start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
    """Seconds between two `clock` stamps; on CUDA waits for the end event to complete."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3
