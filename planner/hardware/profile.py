"""HardwareProfile: what the cost model needs to know about a machine.

Units: bytes, seconds, GB/s (1e9 bytes/s), TFLOP/s (1e12 flop/s). Curves are tuples of
(transfer size in bytes, GB/s) points; `curve_gbps` interpolates them in log-size.
Shipped profiles live in the `hwprofiles` package and are found by name (`--hw rtx4090`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from planner.errors import HardwareError
from planner.schema import atomic_write, check_version, dump_yaml, from_dict, read_yaml, stable_hash, to_dict
from planner.units import fmt_bytes

PROFILE_VERSION = 1
# PCIe bandwidth per lane and direction after line encoding (8b/10b to gen2, 128b/130b after,
# FLIT mode for gen6), GB/s.
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
Curve = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int  # physical memory
    mem_bw_gbps: float  # achievable device memory bandwidth
    flops_tflops: dict[str, float]  # dense matmul peak by dtype (bf16, fp16, fp32)
    gemv_efficiency: float = 0.8  # fraction of mem_bw a decode GEMV reaches
    matmul_efficiency: float = 0.7  # fraction of peak flops a prefill GEMM reaches
    op_overhead_s: float = 5e-6  # fixed cost per kernel (launch + tail), counted per matmul and per layer
    # Measured fixed time of one decoder layer / of the rest of a decode step (embedding, head,
    # argmax) at negligible width: every operator's dispatch. 0 = unknown (estimated from
    # op_overhead_s and an operator count).
    layer_overhead_s: float = 0.0
    head_overhead_s: float = 0.0
    # Measured extra time of one layer's decode attention when its KV cache is split between
    # host and accelerator (staging copies, the host worker's round trip, the merge) at a
    # negligible context. 0 = unknown (estimated as two operator overheads).
    split_overhead_s: float = 0.0
    # Measured on the executor's own operators in a prefill: element-wise traffic rate (against
    # cost.elementwise_bytes) and causal attention flop rate. 0 = memory bandwidth / matmul peak.
    elementwise_gbps: float = 0.0
    attention_tflops: float = 0.0
    gemv_gbps: dict[str, Curve] = field(default_factory=dict)  # measured weight GB/s by dtype, by rows
    gemv_size_factor: Curve = ()  # (weight bytes, batch-1 GEMV speed relative to gemv_gbps' matrix)
    used_by_others_bytes: int = 0  # memory held by other processes when profiled
    pcie_generation: int = 0  # 0 = unknown / not PCIe
    pcie_width: int = 0
    loopback: bool = False  # the torch CPU device playing the accelerator (DESIGN §6)
    present: bool = True  # False: a machine without a GPU (CPU-only build); nothing is placed there


@dataclass(frozen=True)
class Link:
    h2d_gbps: float  # asymptotic pinned host-to-device bandwidth
    d2h_gbps: float
    latency_s: float = 1e-5  # fixed cost per transfer
    h2d_curve: Curve = ()  # pinned, by size; empty = flat at h2d_gbps
    d2h_curve: Curve = ()
    h2d_pageable_curve: Curve = ()
    d2h_pageable_curve: Curve = ()


@dataclass(frozen=True)
class Host:
    name: str
    cores: int
    memory_bytes: int
    mem_bw_gbps: float
    flops_tflops: dict[str, float]  # at the thread count the executor uses
    gemv_efficiency: float = 0.6
    matmul_efficiency: float = 0.6
    op_overhead_s: float = 2e-6  # fixed cost per operator call on the host
    gemv_gbps: dict[str, Curve] = field(default_factory=dict)  # measured weight GB/s by dtype, by rows
    gemv_size_factor: Curve = ()  # (weight bytes, batch-1 GEMV speed relative to gemv_gbps' matrix)
    attention_gbps: float = 0.0  # KV bytes/s scanned by CPU attention; 0 = mem_bw * gemv_efficiency
    bus_gbps: float = 0.0  # DRAM bytes/s while copies and matmuls run at once (planner/cost/membus.py); 0 = mem_bw
    copy_slowdown_s_per_gb: float = 0.0  # matmul seconds lost per GB copied beside them (measured)
    task_overhead_s: float = 0.0  # handing a task to a host worker thread and joining it (measured)
    available_bytes: int = 0  # free RAM when profiled; 0 = unknown
    threads: int = 0  # threads the executor uses; 0 = cores


@dataclass(frozen=True)
class Source:
    kind: str  # datasheet | measured
    date: str = ""
    notes: str = ""
    citations: dict[str, str] = field(default_factory=dict)  # field path -> URL / reference


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    accelerator: Accelerator
    link: Link
    host: Host
    source: Source
    reserve_bytes: int = 0  # accelerator memory lost to the runtime context and fragmentation
    host_reserve_bytes: int = 0  # host memory kept for the OS and other programs
    price_usd: float = 0.0  # accelerator street price, for tokens/s per dollar; 0 = unknown
    spread: dict[str, float] = field(default_factory=dict)  # measured field -> relative spread

    def __post_init__(self) -> None:
        validate_profile(self)

    @property
    def vram_usable_bytes(self) -> int:
        a = self.accelerator
        if not a.present:
            return 0
        return a.memory_bytes - a.used_by_others_bytes - self.reserve_bytes

    @property
    def host_usable_bytes(self) -> int:
        return self.host.memory_bytes - self.host_reserve_bytes

    @property
    def digest(self) -> str:
        return stable_hash(self)

    @property
    def is_measured(self) -> bool:
        return self.source.kind == "measured"


def validate_profile(p: HardwareProfile) -> None:
    if p.source.kind not in ("datasheet", "measured"):
        raise HardwareError(f"source.kind: must be 'datasheet' or 'measured', got {p.source.kind!r}")
    for where, flops in (("accelerator", p.accelerator.flops_tflops), ("host", p.host.flops_tflops)):
        if not flops:
            raise HardwareError(f"{where}.flops_tflops: needs at least one dtype (bf16, fp16, fp32)")
    for where, value in (("accelerator.gemv_efficiency", p.accelerator.gemv_efficiency),
                         ("accelerator.matmul_efficiency", p.accelerator.matmul_efficiency),
                         ("host.gemv_efficiency", p.host.gemv_efficiency),
                         ("host.matmul_efficiency", p.host.matmul_efficiency)):
        if not 0 < value <= 1:
            raise HardwareError(f"{where}: must be in (0, 1], got {value}")
    for where, curve in (("accelerator.gemv_size_factor", p.accelerator.gemv_size_factor),
                         ("host.gemv_size_factor", p.host.gemv_size_factor)):
        if any(size <= 0 or factor <= 0 for size, factor in curve):
            raise HardwareError(f"{where}: sizes and factors must be positive")
    for name in ("h2d_curve", "d2h_curve", "h2d_pageable_curve", "d2h_pageable_curve"):
        curve = getattr(p.link, name)
        if any(size <= 0 or gbps <= 0 for size, gbps in curve):
            raise HardwareError(f"link.{name}: sizes and bandwidths must be positive")
    if p.accelerator.present and p.vram_usable_bytes <= 0:
        raise HardwareError(
            f"accelerator.memory_bytes: {p.accelerator.memory_bytes} bytes leave nothing after "
            f"reserve_bytes ({p.reserve_bytes}) and memory used by others")
    if p.host_usable_bytes <= 0:
        raise HardwareError("host.memory_bytes: nothing left after host_reserve_bytes")


# ---- figures the cost model reads -----------------------------------------------------------

def curve_gbps(curve: Curve, size_bytes: float, flat_gbps: float) -> float:
    """Bandwidth at `size_bytes`, interpolated in log(size); clamps beyond the ends."""
    if not curve:
        return flat_gbps
    points = sorted(curve)
    if size_bytes <= points[0][0]:
        return points[0][1]
    for (s0, g0), (s1, g1) in zip(points, points[1:]):
        if size_bytes <= s1:
            w = (math.log(size_bytes) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return g0 + w * (g1 - g0)
    return points[-1][1]


def weight_read_gbps(gemv_gbps: dict[str, Curve], dtype: str, rows: float, mem_bw_gbps: float,
                     gemv_efficiency: float, weight_bytes: float = 0.0, size_factor: Curve = ()) -> float:
    """GB/s at which a matmul of `rows` input rows streams its `dtype` weights: the measured
    curve when the profile has one for that dtype (matrix-vector kernels get slower per byte
    as rows grow on CPUs), else the datasheet bandwidth times the GEMV efficiency; scaled by
    the measured size factor at `weight_bytes` (small matrices stream slower than the
    profiler's reference matrix: per-call start-up, prefetchers, too few blocks to fill a GPU)."""
    curve = gemv_gbps.get(dtype)
    base = curve_gbps(curve, max(rows, 1.0), mem_bw_gbps * gemv_efficiency) if curve else mem_bw_gbps * gemv_efficiency
    if weight_bytes > 0 and size_factor:
        return base * curve_gbps(size_factor, weight_bytes, 1.0)
    return base


def flops_for(flops_tflops: dict[str, float], dtype: str) -> float:
    """Peak flop/s for `dtype`; a missing dtype falls back to the slowest one listed."""
    if dtype in flops_tflops:
        return flops_tflops[dtype] * 1e12
    return min(flops_tflops.values()) * 1e12


# ---- loading, overrides, saving -------------------------------------------------------------

def shipped_profile_names() -> list[str]:
    root = resources.files("hwprofiles")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _resolve(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        return path
    shipped = resources.files("hwprofiles") / f"{name_or_path.strip().lower()}.yaml"  # any letter case
    if shipped.is_file():
        return Path(str(shipped))
    names = ", ".join(shipped_profile_names())
    raise HardwareError(f"--hw {name_or_path}: no such profile file or shipped profile; shipped: {names}")


def profile_from_data(data: object, where: str = "profile") -> HardwareProfile:
    body = check_version(data, where, PROFILE_VERSION, HardwareError)
    return from_dict(HardwareProfile, body, "", HardwareError)


def load_profile(name_or_path: str) -> HardwareProfile:
    path = _resolve(name_or_path)
    try:
        return profile_from_data(read_yaml(path, HardwareError), str(path))
    except HardwareError as exc:
        message = str(exc)
        raise HardwareError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def profile_to_yaml(profile: HardwareProfile) -> str:
    return dump_yaml({"version": PROFILE_VERSION, **to_dict(profile)})


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    atomic_write(path, profile_to_yaml(profile))


def with_overrides(profile: HardwareProfile, vram_bytes: int | None = None, ram_bytes: int | None = None,
                   host_bw_gbps: float | None = None) -> HardwareProfile:
    """Apply command-line overrides (`--vram`, `--ram`, `--host-bw`); the name records them.

    `--vram` is what the user can give offplan: it replaces physical memory minus what others
    hold, so the runtime reserve still applies on top of it."""
    acc, host, notes = profile.accelerator, profile.host, []
    if vram_bytes is not None:
        acc = replace(acc, memory_bytes=vram_bytes, used_by_others_bytes=0)
        notes.append(f"vram={fmt_bytes(vram_bytes)}")
    if ram_bytes is not None:
        host = replace(host, memory_bytes=ram_bytes, available_bytes=0)
        notes.append(f"ram={fmt_bytes(ram_bytes)}")
    if host_bw_gbps is not None:
        host = replace(host, mem_bw_gbps=host_bw_gbps, attention_gbps=0.0)
        notes.append(f"host_bw={host_bw_gbps:g}GB/s")
    if not notes:
        return profile
    name = f"{profile.name} ({', '.join(notes)})"
    return replace(profile, name=name, accelerator=acc, host=host)


def pcie_gbps(generation: int, width: int) -> float:
    """Theoretical per-direction PCIe bandwidth in GB/s; 0 when the link is unknown."""
    return PCIE_LANE_GBPS.get(generation, 0.0) * width
