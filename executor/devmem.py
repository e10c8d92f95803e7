"""Accelerator memory: is there enough for the plan before anything is loaded, and how much a
run took, measured the same way on CUDA and on the loopback device.

On CUDA "taken" is what the caching allocator reserved at its peak
(`torch.cuda.max_memory_reserved`: blocks it holds, in use or cached) plus what the device
holds outside PyTorch's allocator (`torch.cuda.mem_get_info` used bytes minus the reserved
bytes: the CUDA context, libraries' workspaces, other processes) — what `nvidia-smi` shows
for the card at the peak. The plan's side of that comparison is its accelerator memory plus
the reserve the profile set aside for the context and for other processes.
On the loopback device the accelerator is host memory: "taken" counts the tensors offplan
places there (weights, stream buffers, KV cache), and the memory available is the host's
available RAM, which must hold the accelerator's and the host's share of the plan.
CUDA-only calls are the `_cuda_*` functions, each beside its CPU twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from planner.errors import PlanError
from planner.plan.record import MemorySummary, Plan
from planner.units import fmt_bytes

from .streams import Devices


@dataclass(frozen=True)
class Available:
    free_bytes: int
    total_bytes: int
    what: str  # "NVIDIA GeForce RTX 3060" / "host RAM (loopback device)"


def _cuda_available(devices: Devices) -> Available:
    free, total = torch.cuda.mem_get_info(devices.accelerator)
    return Available(free, total, torch.cuda.get_device_name(devices.accelerator))


def _host_available() -> Available:
    """CPU twin: the host's available RAM (MemAvailable)."""
    from .hostfacts import probe_host
    facts = probe_host()
    return Available(facts.ram_available_bytes, facts.ram_total_bytes, "host RAM (loopback device)")


def available_memory(devices: Devices) -> Available:
    return _cuda_available(devices) if devices.cuda else _host_available()


def planned_device_bytes(vram: MemorySummary) -> int:
    """Everything the plan puts on the accelerator, temporaries (workspace) included."""
    return (vram.weights_bytes + vram.kv_bytes + vram.buffer_bytes + vram.workspace_bytes + vram.draft_bytes
            + vram.compensation_bytes)


def planned_host_bytes(host: MemorySummary) -> int:
    return (host.weights_bytes + host.kv_bytes + host.buffer_bytes + host.workspace_bytes + host.draft_bytes
            + host.compensation_bytes)


def check_memory(vram: MemorySummary, host: MemorySummary, devices: Devices) -> None:
    """Refuse, in one line and before any weight is loaded, a plan that needs more memory
    than this machine has free: on CUDA the card's free memory against the plan's accelerator
    bytes (and the host's available RAM against its host bytes); on the loopback device the
    available RAM against both shares together."""
    device_bytes, host_bytes = planned_device_bytes(vram), planned_host_bytes(host)
    ram = _host_available()
    if devices.cuda:
        card = available_memory(devices)
        if device_bytes > card.free_bytes:
            raise PlanError(f"the plan needs {fmt_bytes(device_bytes)} of accelerator memory but {card.what} has "
                            f"{fmt_bytes(card.free_bytes)} free of {fmt_bytes(card.total_bytes)}: profile this "
                            "machine (`offplan profile`) and solve again with that profile")
    else:
        host_bytes += device_bytes
    if host_bytes > ram.free_bytes:
        options = "`--ram`" if devices.cuda else "`--vram` and `--ram` adding up to"
        raise PlanError(f"the plan needs {fmt_bytes(host_bytes)} of {'host' if devices.cuda else 'loopback'} "
                        f"memory but {ram.what} has {fmt_bytes(ram.free_bytes)} available of "
                        f"{fmt_bytes(ram.total_bytes)}: solve again with {options} what is available")


def _cuda_reset_peak(devices: Devices) -> None:
    torch.cuda.reset_peak_memory_stats(devices.accelerator)


def reset_peak(devices: Devices) -> None:
    if devices.cuda:
        _cuda_reset_peak(devices)


def _cuda_peak_bytes(devices: Devices) -> int:
    """Peak reserved by the caching allocator plus what the device holds outside it now."""
    free, total = torch.cuda.mem_get_info(devices.accelerator)
    outside = max(total - free - torch.cuda.memory_reserved(devices.accelerator), 0)
    return torch.cuda.max_memory_reserved(devices.accelerator) + outside


def peak_bytes(devices: Devices, accounted_bytes: int) -> int:
    """Accelerator bytes taken at the peak of the run (see the module docstring). CPU twin:
    `accounted_bytes`, the tensors offplan placed on the loopback device."""
    return _cuda_peak_bytes(devices) if devices.cuda else accounted_bytes


def planned_peak_bytes(vram: MemorySummary, cuda: bool) -> int:
    """The plan's side of peak_bytes: on CUDA everything it places on the card plus the
    reserve (context, other processes); on the loopback the tensors offplan places there."""
    if cuda:
        return planned_device_bytes(vram) + vram.reserve_bytes
    return vram.weights_bytes + vram.kv_bytes + vram.buffer_bytes + vram.draft_bytes


def planned_link_host_bytes(plan: Plan, host: MemorySummary) -> int:
    """The plan's side of the host memory the link copies from (page-locked on CUDA): the
    weights that stream in some phase, and its activation staging term."""
    placement = plan.placement
    streamed = sum(t.n_bytes for t in plan.model.tensors()
                   if placement.device(t.name) == "stream" or placement.streams_for_prefill(t.name))
    return streamed + host.buffer_bytes
