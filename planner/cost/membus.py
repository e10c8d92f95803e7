"""Host memory traffic: the one resource that weight streaming and host compute share.

The link and the host's cores are separate resources, but both draw on host DRAM: a
host-to-device copy reads the weight from host memory, a CPU-computed matmul reads its
weight, host attention reads the host part of the KV cache. On the loopback profile
(DESIGN §6) the accelerator *is* the CPU, so its reads come from the same DRAM, and a copy
both reads and writes it. When the sum of that traffic over a stage exceeds what the memory
bus delivers, the stage takes bus time, not compute or link time: on a 2-core loopback
machine a streamed layer took 1.7x its compute time for this reason.

A stage's bus time is its own traffic (matmul and attention reads) plus the traffic of
prefetching the next stage's weights, which runs while it computes, as the link term does.

The bus figure bounds the sum; it does not say that compute runs at full speed below it.
On loopback the profiler measured matmuls slowing by 5-20% while a copy ran beside them,
well before the sum reached the bus figure, so a loopback stage also pays the compute time
that prefetching the next stage takes from it (`copy_slowdown_s`), in its compute path.
Units: bytes, seconds; the profile's bus figure is GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.hardware.profile import HardwareProfile


def bus_gbps(profile: HardwareProfile) -> float:
    """Host DRAM bytes/s available to concurrent copies and host compute: the measured
    figure (copy and matmul running together) when the profile has one, else the host's
    copy bandwidth."""
    return profile.host.bus_gbps or profile.host.mem_bw_gbps


def dram_s(profile: HardwareProfile, n_bytes: float) -> float:
    return n_bytes / (bus_gbps(profile) * 1e9) if n_bytes > 0 else 0.0


def copy_dram_bytes(profile: HardwareProfile, n_bytes: float) -> float:
    """Host DRAM traffic of copying `n_bytes` up the link: a DMA reads them once; the
    loopback copy reads and writes host memory."""
    return (2.0 if profile.accelerator.loopback else 1.0) * n_bytes


@dataclass(frozen=True)
class BusTime:
    """Bus seconds one weight option costs: during its own stage (`own_*`: reads by compute)
    and while it is prefetched during the stage before (`fetch_*`)."""

    own_decode_s: float = 0.0
    own_prefill_s: float = 0.0
    fetch_decode_s: float = 0.0
    fetch_prefill_s: float = 0.0
    slow_decode_s: float = 0.0  # compute time the stage before loses while this weight is copied
    slow_prefill_s: float = 0.0


def weight_bus(profile: HardwareProfile, device: str, prefill_streamed: bool, read_decode_bytes: float,
               read_prefill_bytes: float, weight_bytes: float) -> BusTime:
    """A weight matrix placed on `device` (gpu | stream | cpu). `read_*_bytes`: what its
    matmul reads per decode step / per prefill (less than `weight_bytes` for a rarely routed
    expert). Compensation factors are left out: a few percent of their matrix's bytes."""
    loopback = profile.accelerator.loopback
    fetch, slow = dram_s(profile, copy_dram_bytes(profile, weight_bytes)), copy_slowdown_s(profile, weight_bytes)
    if device == "cpu":
        prefill_read = read_prefill_bytes if (loopback or not prefill_streamed) else 0.0
        return BusTime(dram_s(profile, read_decode_bytes), dram_s(profile, prefill_read),
                       0.0, fetch if prefill_streamed else 0.0, 0.0, slow if prefill_streamed else 0.0)
    acc_read_decode = read_decode_bytes if loopback else 0.0
    acc_read_prefill = read_prefill_bytes if loopback else 0.0
    streams = device == "stream"
    return BusTime(dram_s(profile, acc_read_decode), dram_s(profile, acc_read_prefill),
                   fetch if streams else 0.0, fetch if streams else 0.0, slow if streams else 0.0,
                   slow if streams else 0.0)


def copy_slowdown_s(profile: HardwareProfile, copy_bytes: float) -> float:
    """Compute time lost while `copy_bytes` stream in beside it: on loopback, where matmuls
    and the copy thread share one memory system. Over a real link the accelerator's matmuls
    do not slow, and host matmuls beside a DMA are left to the bus term (charging them would
    need a product of two placements, which the ILP cannot express linearly)."""
    if not profile.accelerator.loopback:
        return 0.0
    return profile.host.copy_slowdown_s_per_gb * copy_bytes / 1e9


def kv_bus_s(profile: HardwareProfile, host_kv_bytes: float, device_kv_bytes: float) -> float:
    """One decode step's attention reads: the host part always, the device part on loopback."""
    device_part = device_kv_bytes if profile.accelerator.loopback else 0.0
    return dram_s(profile, host_kv_bytes + device_part)
