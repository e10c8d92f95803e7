"""`offplan profile`: measure this machine and describe it as a HardwareProfile.

Every figure is the median of several timed runs after warm-up (executor/measure.py);
`HardwareProfile.spread` keeps each figure's relative spread, keyed by field path
(`link.h2d_gbps`, `host.flops_tflops.bf16`, ...). Conventions:
- memory bandwidth (host DRAM, device memory) is a large copy counting read + write bytes
  (2 x the buffer size per copy), as device bandwidth tests do;
- link curves hold bytes / (time - latency) per transfer size, so that the cost model's
  `latency + bytes / curve(size)` reproduces the measured time; the subtracted part is capped
  at half the time, which only matters for the smallest, noisiest sizes;
- flops are achieved figures at prefill-like shapes (so matmul_efficiency is 1.0), and
  gemv_efficiency is the bytes/s a batch-1 GEMV reaches over the copy bandwidth.

Without a CUDA device the CPU plays the accelerator (the loopback profile): the link is a
`copy_` between two host buffers, and available RAM is split in half between the two sides.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import re
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from planner.errors import HardwareError
from planner.hardware import Accelerator, HardwareProfile, Host, Link, Source
from planner.units import fmt_bytes

from . import measure
from .measure import Compute, Figure, Timing, sig

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]

KIB, MIB, GIB = 2**10, 2**20, 2**30
LOOPBACK_RESERVE_BYTES = 64 * MIB  # the loopback "device" has no runtime context to pay for
HOST_RESERVE_BYTES = 1 * GIB  # kept for the OS and the Python runtime
CUDA_CONTEXT_BYTES = 512 * MIB  # assumed for this process's context when NVML cannot tell
FRAGMENTATION_FRACTION = 0.03  # of device memory, lost to allocator fragmentation
MIN_FRAGMENTATION_BYTES = 256 * MIB
TINY_COPY_BYTES = 256  # a transfer whose time is all latency
CPU_DTYPES = ("fp32", "bf16")  # fp16 matmul on CPUs is a slow emulated path nothing uses
CUDA_DTYPES = ("bf16", "fp16", "fp32")
ATTENTION_SHAPE = (8, 4, 128)  # kv_heads, query heads per kv head, head_dim (Llama-3-8B-like)
ATTENTION_DTYPE = "bf16"
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}  # per direction
NO_CUDA_MESSAGE = ("no CUDA device: profiling this CPU as a loopback accelerator "
                   "(link = host-to-host copy, accelerator memory = half of available RAM)")


# ---- public API ----------------------------------------------------------------------------

def profile_machine(quick: bool = False, threads: int | None = None,
                    progress: Progress | None = None) -> HardwareProfile:
    """Measure this machine (a loopback profile without CUDA). `threads`: CPU threads the
    executor will use (default: torch's). `progress(step, fraction_done)` is called as it runs."""
    return measure_profile(QUICK if quick else FULL, threads, progress)


def default_profile_path(profile: HardwareProfile) -> Path:
    """hwprofiles/<host>-<gpu>.yaml (the profile's name, lowercase, [a-z0-9-] only)."""
    return Path("hwprofiles") / f"{slug(profile.name)}.yaml"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "machine"


def measure_profile(settings: Settings, threads: int | None = None,
                    progress: Progress | None = None) -> HardwareProfile:
    if threads is not None and threads < 1:
        raise HardwareError(f"--threads: must be at least 1, got {threads}")
    report = progress or _no_progress
    host = probe_host()
    gpu = _cuda_probe_gpu() if torch.cuda.is_available() else None
    if gpu is None:
        log.info(NO_CUDA_MESSAGE)
        report(NO_CUDA_MESSAGE, 0.0)
    with _torch_threads(threads) as n_threads:
        timings = _run_steps(_plan(settings, gpu), report)
    if gpu is None:
        return _loopback_profile(host, settings, timings, n_threads)
    return _cuda_profile(host, gpu, settings, timings, n_threads)


def _no_progress(step: str, fraction: float) -> None:
    """Default progress callback: report nothing."""


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ---- what this machine is ------------------------------------------------------------------

@dataclass(frozen=True)
class HostFacts:
    hostname: str
    cpu_model: str
    cores: int  # physical cores this process may use
    ram_total_bytes: int
    ram_available_bytes: int


def parse_meminfo(text: str) -> tuple[int, int]:
    """/proc/meminfo -> (MemTotal, MemAvailable) in bytes; 0 where absent."""
    values = {m.group(1): int(m.group(2)) * KIB
              for m in re.finditer(r"^(\w+):\s+(\d+)\s*kB", text, re.MULTILINE)}
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def parse_cpuinfo(text: str) -> tuple[str, int]:
    """/proc/cpuinfo -> (model name, physical cores); ('', 0) where it does not say."""
    model = re.search(r"^(?:model name|Model|Hardware|cpu model)\s*:\s*(.+)$", text, re.MULTILINE)
    cores = set()
    for block in text.split("\n\n"):
        phys = re.search(r"^physical id\s*:\s*(\d+)", block, re.MULTILINE)
        core = re.search(r"^core id\s*:\s*(\d+)", block, re.MULTILINE)
        if phys and core:
            cores.add((phys.group(1), core.group(1)))
    return (model.group(1).strip() if model else ""), len(cores)


def probe_host() -> HostFacts:
    cpuinfo = _read_text("/proc/cpuinfo")
    model, physical = parse_cpuinfo(cpuinfo)
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total, available = parse_meminfo(_read_text("/proc/meminfo"))
    if total == 0:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    return HostFacts(hostname=socket.gethostname().split(".")[0] or "host",
                     cpu_model=model or platform.processor() or platform.machine() or "CPU",
                     cores=min(physical, logical) if physical else logical,
                     ram_total_bytes=total, ram_available_bytes=available or total)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


@dataclass(frozen=True)
class GpuFacts:
    device: torch.device
    name: str
    total_bytes: int
    free_bytes: int  # after this process created its context
    used_by_others_bytes: int
    context_bytes: int  # this process's runtime context
    pcie_generation: int  # 0 = unknown
    pcie_width: int
    bf16: bool


@dataclass(frozen=True)
class _Nvml:
    used_bytes: int
    pcie_generation: int
    pcie_width: int


def _cuda_probe_gpu() -> GpuFacts:
    """Asks NVML what others use before this process allocates, then creates the context."""
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    nvml = _nvml_facts(str(props.uuid), index)
    free_bytes, total_bytes = torch.cuda.mem_get_info(index)
    if nvml is not None:
        others = nvml.used_bytes
        context = max(0, total_bytes - free_bytes - others)
    else:
        context = min(CUDA_CONTEXT_BYTES, total_bytes - free_bytes)
        others = max(0, total_bytes - free_bytes - context)
    return GpuFacts(device=torch.device("cuda", index), name=props.name, total_bytes=total_bytes,
                    free_bytes=free_bytes, used_by_others_bytes=others, context_bytes=context,
                    pcie_generation=nvml.pcie_generation if nvml else 0,
                    pcie_width=nvml.pcie_width if nvml else 0,
                    bf16=torch.cuda.is_bf16_supported(including_emulation=False))


def _nvml_facts(uuid: str, index: int) -> _Nvml | None:
    """Memory in use and PCIe link capability from NVML; None when NVML is unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = _nvml_handle(pynvml, uuid, index)
        used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

        def ask(query: Callable[[object], int]) -> int:
            try:
                return int(query(handle))
            except pynvml.NVMLError:
                return 0
        return _Nvml(used, ask(pynvml.nvmlDeviceGetMaxPcieLinkGeneration),
                     ask(pynvml.nvmlDeviceGetMaxPcieLinkWidth))
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvml_handle(pynvml: object, uuid: str, index: int) -> object:
    """NVML numbers devices ignoring CUDA_VISIBLE_DEVICES; the UUID names the same device."""
    m = re.search(r"([0-9a-f]{8})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{12})",
                  uuid.lower())
    if m:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID("GPU-" + "-".join(m.groups()))
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def pcie_theoretical_gbps(generation: int, width: int) -> float:
    """Per-direction PCIe bandwidth after line encoding; 0 when unknown."""
    return PCIE_LANE_GBPS.get(generation, 0.0) * width


# ---- the profile ---------------------------------------------------------------------------

def _loopback_profile(host: HostFacts, s: Settings, timings: dict[str, Timing],
                      threads: int) -> HardwareProfile:
    cpu = compute_figures("host", timings, s, s.copy_bytes, s.cpu_gemm_shapes)
    link, link_spread = link_figures(timings, s, pageable_measured=False)
    device_bytes = host.ram_available_bytes // 2
    host_bytes = host.ram_available_bytes - device_bytes
    accelerator = Accelerator(
        name=f"loopback (CPU: {host.cpu_model})", memory_bytes=device_bytes,
        mem_bw_gbps=cpu.mem_bw_gbps.value, flops_tflops=cpu.flops_values(),
        gemv_efficiency=cpu.gemv_efficiency().value, matmul_efficiency=1.0,
        op_overhead_s=cpu.op_overhead_s.value, loopback=True)
    notes = [f"host {host.hostname}, torch {torch.__version__}, {threads} threads",
             "loopback: no CUDA device, the CPU plays the accelerator; accelerator memory is a "
             f"budget of half the available RAM ({fmt_bytes(host.ram_available_bytes)} available, "
             f"{fmt_bytes(host.ram_total_bytes)} total; pass --vram to shrink it); link = copy_ "
             "between two host buffers; pageable curves = pinned curves",
             cpu.gemv_note("host")]
    spread = {**link_spread, **cpu.spread("accelerator"), **cpu.spread("host")}
    return _assemble(host, s, timings, threads, f"{host.hostname}-loopback", accelerator, link, cpu,
                     host_bytes, host_bytes, LOOPBACK_RESERVE_BYTES, 0, notes, spread)


def _cuda_profile(host: HostFacts, gpu: GpuFacts, s: Settings, timings: dict[str, Timing],
                  threads: int) -> HardwareProfile:
    dev = compute_figures("accelerator", timings, s, _device_copy_bytes(s, gpu), s.cuda_gemm_shapes)
    cpu = compute_figures("host", timings, s, s.copy_bytes, s.cpu_gemm_shapes)
    link, link_spread = link_figures(timings, s, pageable_measured=True)
    accelerator = Accelerator(
        name=gpu.name, memory_bytes=gpu.total_bytes, mem_bw_gbps=dev.mem_bw_gbps.value,
        flops_tflops=dev.flops_values(), gemv_efficiency=dev.gemv_efficiency().value,
        matmul_efficiency=1.0, op_overhead_s=dev.op_overhead_s.value,
        used_by_others_bytes=gpu.used_by_others_bytes, pcie_generation=gpu.pcie_generation,
        pcie_width=gpu.pcie_width)
    fragmentation = max(MIN_FRAGMENTATION_BYTES, int(FRAGMENTATION_FRACTION * gpu.total_bytes))
    notes = [f"host {host.hostname}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"{threads} threads",
             f"reserve = runtime context {fmt_bytes(gpu.context_bytes)} + fragmentation margin "
             f"{fmt_bytes(fragmentation)}",
             _pcie_note(gpu, link), dev.gemv_note("accelerator"), cpu.gemv_note("host")]
    spread = {**link_spread, **dev.spread("accelerator"), **cpu.spread("host")}
    others_bytes = max(host.ram_total_bytes - host.ram_available_bytes, 0)
    return _assemble(host, s, timings, threads, f"{host.hostname}-{gpu.name}", accelerator, link, cpu,
                     host.ram_total_bytes, host.ram_available_bytes, gpu.context_bytes + fragmentation,
                     others_bytes, notes, spread)


def _pcie_note(gpu: GpuFacts, link: Link) -> str:
    theory = pcie_theoretical_gbps(gpu.pcie_generation, gpu.pcie_width)
    if not theory:
        return f"PCIe link unknown; measured h2d {link.h2d_gbps:.1f} / d2h {link.d2h_gbps:.1f} GB/s"
    return (f"PCIe gen{gpu.pcie_generation} x{gpu.pcie_width}: theoretical {theory:.1f} GB/s per "
            f"direction; measured h2d {link.h2d_gbps:.1f} GB/s ({link.h2d_gbps / theory:.0%}), "
            f"d2h {link.d2h_gbps:.1f} GB/s ({link.d2h_gbps / theory:.0%})")


def _assemble(host: HostFacts, s: Settings, timings: dict[str, Timing], threads: int, name: str,
              accelerator: Accelerator, link: Link, cpu: Compute, host_memory_bytes: int,
              host_available_bytes: int, reserve_bytes: int, host_others_bytes: int,
              notes: list[str], spread: dict[str, float]) -> HardwareProfile:
    kv_heads, _, head_dim = ATTENTION_SHAPE
    kv_bytes = measure.attention_kv_bytes(ATTENTION_DTYPE, kv_heads, head_dim, s.attention_tokens)
    attention = Figure.rate(kv_bytes, timings["host.attention"], 1e9)
    host_part = Host(
        name=host.cpu_model, cores=host.cores, memory_bytes=host_memory_bytes,
        mem_bw_gbps=cpu.mem_bw_gbps.value, flops_tflops=cpu.flops_values(),
        gemv_efficiency=cpu.gemv_efficiency().value, matmul_efficiency=1.0,
        op_overhead_s=cpu.op_overhead_s.value, attention_gbps=attention.value,
        available_bytes=host_available_bytes, threads=threads)
    notes.append("spread = (q3 - q1) / median of the timed runs; memory bandwidth counts read + "
                 "write bytes of a copy; link curves = bytes / (time - latency)")
    return HardwareProfile(
        name=slug(name), accelerator=accelerator, link=link, host=host_part,
        source=Source(kind="measured", date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      notes="; ".join(notes)),
        reserve_bytes=reserve_bytes, host_reserve_bytes=host_others_bytes + HOST_RESERVE_BYTES,
        spread={**spread, "host.attention_gbps": attention.spread})
