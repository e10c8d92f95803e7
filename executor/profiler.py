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
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from planner.errors import HardwareError
from planner.hardware.profile import Accelerator, HardwareProfile, Host, Link, Source, pcie_gbps
from planner.units import fmt_bytes

from . import measure
from .contention import BusFigure, bus_figure
from .sweep import measure_all
from .hostfacts import HostFacts, probe_host
from .measure import CPU_DTYPES, CUDA_DTYPES, Compute, Figure, Settings, Target, sig

log = logging.getLogger(__name__)

Progress = measure.Progress

KIB, MIB, GIB = 2**10, 2**20, 2**30
LOOPBACK_RESERVE_BYTES = 64 * MIB  # the loopback "device" has no runtime context to pay for
HOST_RESERVE_BYTES = 1 * GIB  # kept for the OS and the Python runtime
CUDA_CONTEXT_BYTES = 512 * MIB  # assumed for this process's context when NVML cannot tell
FRAGMENTATION_FRACTION = 0.03  # of device memory, lost to allocator fragmentation
MIN_FRAGMENTATION_BYTES = 256 * MIB
BUSY_LOAD_FRACTION = 0.5  # load average above this fraction of the CPUs counts as busy
NO_CUDA_MESSAGE = ("no CUDA device: profiling this CPU as a loopback accelerator "
                   "(link = host-to-host copy, accelerator memory = half of available RAM)")

FULL = Settings(
    link_sizes_bytes=(64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, 1 * GIB),
    warmup=2, repeats=9, latency_calls=200, overhead_calls=200, copy_bytes=1 * GIB,
    cpu_gemm_shapes=((512, 2048, 2048), (1024, 4096, 4096)),
    cuda_gemm_shapes=((2048, 4096, 4096), (4096, 8192, 8192)),
    gemv_shape=(4096, 4096), gemv_batches=(1, 4, 16, 64), attention_tokens=65536,
    gemv_size_shapes=((512, 1024), (1024, 1024), (2048, 1024), (4096, 1024), (8192, 1024), (16384, 4096)),
    bus_seconds=0.5, bus_runs=16)
QUICK = Settings(
    link_sizes_bytes=(64 * KIB, 1 * MIB, 16 * MIB, 256 * MIB),
    warmup=1, repeats=5, latency_calls=100, overhead_calls=100, copy_bytes=256 * MIB,
    cpu_gemm_shapes=((512, 2048, 2048),), cuda_gemm_shapes=((4096, 8192, 8192),),
    gemv_shape=(4096, 4096), gemv_batches=(1, 16, 64), attention_tokens=32768,
    gemv_size_shapes=((1024, 1024), (4096, 1024), (16384, 4096)), bus_seconds=0.3, bus_runs=8)
TINY = Settings(  # tests: same code paths, seconds instead of minutes; figures are rougher
    link_sizes_bytes=(64 * KIB, 1 * MIB, 64 * MIB),
    warmup=1, repeats=3, latency_calls=50, overhead_calls=50, copy_bytes=64 * MIB,
    cpu_gemm_shapes=((64, 1024, 1024),), cuda_gemm_shapes=((1024, 2048, 2048),),
    gemv_shape=(1024, 1024), gemv_batches=(1,), attention_tokens=8192,
    gemv_size_shapes=((512, 512),), bus_seconds=0.05, bus_runs=1, cold_pool_bytes=16 * MIB)


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
    """`profile_machine` with explicit settings (FULL, QUICK, or TINY for tests)."""
    if threads is not None and threads < 1:
        raise HardwareError(f"--threads: must be at least 1, got {threads}")
    report = progress or _no_progress
    host = probe_host()
    gpu = _cuda_probe_gpu() if torch.cuda.is_available() else None
    if gpu is None:
        log.info(NO_CUDA_MESSAGE)
        report(NO_CUDA_MESSAGE, 0.0)
    return _profile_with(settings, threads, report, host, gpu)


def _profile_with(settings: Settings, threads: int | None, report: Progress, host: HostFacts,
                  gpu: GpuFacts | None) -> HardwareProfile:
    """Measures and assembles the profile of `host` with `gpu` (None: loopback)."""
    busy = busy_note(threads)  # `offplan profile` prints it before measuring
    if busy:
        report(busy, 0.0)
    cpu = torch.device("cpu")
    host_target = Target("host", cpu, CPU_DTYPES, settings.cpu_gemm_shapes, settings.copy_bytes)
    targets = (host_target,) if gpu is None else (_gpu_target(settings, gpu), host_target)
    with _torch_threads(threads) as n_threads:
        timings = measure_all(settings, gpu.device if gpu else cpu, gpu is not None,
                                      targets, report)
        report("host memory bus: streaming and matmuls at once", 1.0)
        bus = bus_figure(gpu.device if gpu else cpu, host_target.dtypes[0], settings.gemv_shape,
                         settings.bus_seconds, settings.bus_runs)
    link, link_spread = measure.link_figures(timings, settings, pageable_measured=gpu is not None)
    figures = _Figures(cpu=measure.compute_figures(host_target, timings, settings),
                       attention=measure.attention_figure(timings, settings),
                       link=link, link_spread=link_spread, threads=n_threads, busy=busy, bus=bus)
    if gpu is None:
        return _loopback_profile(host, figures)
    return _cuda_profile(host, gpu, measure.compute_figures(targets[0], timings, settings), figures)


def busy_note(threads: int | None = None) -> str:
    """A warning when other programs keep the CPUs busy: the figures would come out low
    (a parallel operator waits for a descheduled thread for a whole time slice). `threads`:
    what --threads asked for; fewer threads are suggested only when it was not given."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load <= BUSY_LOAD_FRACTION * cpus:
        return ""
    advice = "profile again when it is idle" + (", or with --threads 1" if threads is None else "")
    return f"machine busy: load average {load:.1f} on {cpus} CPUs before profiling; figures may come out low; {advice}"


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
    nvml = _nvml_facts(str(getattr(props, "uuid", "")), index)
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
                    bf16=props.major >= 8)  # bf16 tensor cores from compute capability 8.0


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
            pass  # drivers that cannot look up by UUID: fall back to the index below
    return pynvml.nvmlDeviceGetHandleByIndex(index)


# ---- the profile ---------------------------------------------------------------------------

def _gpu_target(s: Settings, gpu: GpuFacts) -> Target:
    dtypes = tuple(d for d in CUDA_DTYPES if d != "bf16" or gpu.bf16)
    copy_bytes = min(s.copy_bytes, gpu.free_bytes // 4)  # two copy buffers, with room to spare
    return Target("accelerator", gpu.device, dtypes, s.cuda_gemm_shapes, copy_bytes)


@dataclass(frozen=True)
class _Figures:
    """What the sweep found on the host and the link (both profiles need these)."""
    cpu: Compute
    attention: Figure  # host attention, KV GB/s
    link: Link
    link_spread: dict[str, float]
    threads: int
    busy: str  # a warning when other programs loaded the CPU while measuring, else ''
    bus: BusFigure  # host DRAM traffic of streaming and host matmuls running together


def _loopback_profile(host: HostFacts, f: _Figures) -> HardwareProfile:
    device_bytes = host.ram_available_bytes // 2
    accelerator = Accelerator(
        name=f"loopback (CPU: {host.cpu_model})", memory_bytes=device_bytes,
        mem_bw_gbps=f.cpu.mem_bw_gbps.value, flops_tflops=f.cpu.flops_values(),
        gemv_efficiency=f.cpu.gemv_efficiency().value, matmul_efficiency=1.0,
        op_overhead_s=f.cpu.op_overhead_s.value, gemv_gbps=f.cpu.gemv_curves(),
        gemv_size_factor=f.cpu.gemv_size_factor(),
        layer_overhead_s=f.cpu.layer_overhead_s.value, head_overhead_s=f.cpu.head_overhead_s.value,
        split_overhead_s=f.cpu.split_overhead_s.value, elementwise_gbps=f.cpu.elementwise_gbps.value,
        attention_tflops=f.cpu.attention_tflops.value,
        loopback=True)
    host_bytes = host.ram_available_bytes - device_bytes
    notes = [f"host {host.hostname}, torch {torch.__version__}, {f.threads} threads",
             "loopback: no CUDA device, the CPU plays the accelerator; accelerator memory is a "
             f"budget of half the available RAM ({fmt_bytes(host.ram_available_bytes)} available, "
             f"{fmt_bytes(host.ram_total_bytes)} total; pass --vram to shrink it); link = copy_ "
             "between two host buffers; pageable curves = pinned curves",
             _gemv_note("host", f.cpu), _bus_note(f.bus, loopback=True)]
    return HardwareProfile(
        name=slug(f"{host.hostname}-loopback"), accelerator=accelerator, link=f.link,
        host=_host_part(host, f, host_bytes, host_bytes), source=_source(notes, f.busy),
        reserve_bytes=LOOPBACK_RESERVE_BYTES, host_reserve_bytes=HOST_RESERVE_BYTES,
        spread=_spread(f, f.cpu))


def _cuda_profile(host: HostFacts, gpu: GpuFacts, dev: Compute, f: _Figures) -> HardwareProfile:
    accelerator = Accelerator(
        name=gpu.name, memory_bytes=gpu.total_bytes, mem_bw_gbps=dev.mem_bw_gbps.value,
        flops_tflops=dev.flops_values(), gemv_efficiency=dev.gemv_efficiency().value,
        matmul_efficiency=1.0, op_overhead_s=dev.op_overhead_s.value, gemv_gbps=dev.gemv_curves(),
        gemv_size_factor=dev.gemv_size_factor(),
        layer_overhead_s=dev.layer_overhead_s.value, head_overhead_s=dev.head_overhead_s.value,
        split_overhead_s=dev.split_overhead_s.value, elementwise_gbps=dev.elementwise_gbps.value,
        attention_tflops=dev.attention_tflops.value,
        used_by_others_bytes=gpu.used_by_others_bytes, pcie_generation=gpu.pcie_generation,
        pcie_width=gpu.pcie_width)
    fragmentation = max(MIN_FRAGMENTATION_BYTES, int(FRAGMENTATION_FRACTION * gpu.total_bytes))
    notes = [f"host {host.hostname}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"{f.threads} threads",
             f"reserve = runtime context {fmt_bytes(gpu.context_bytes)} + fragmentation margin "
             f"{fmt_bytes(fragmentation)}",
             _pcie_note(gpu, f.link), _gemv_note("accelerator", dev), _gemv_note("host", f.cpu),
             _bus_note(f.bus, loopback=False)]
    others_bytes = max(host.ram_total_bytes - host.ram_available_bytes, 0)
    return HardwareProfile(
        name=slug(f"{host.hostname}-{gpu.name}"), accelerator=accelerator, link=f.link,
        host=_host_part(host, f, host.ram_total_bytes, host.ram_available_bytes),
        source=_source(notes, f.busy), reserve_bytes=gpu.context_bytes + fragmentation,
        host_reserve_bytes=others_bytes + HOST_RESERVE_BYTES, spread=_spread(f, dev))


def _host_part(host: HostFacts, f: _Figures, memory_bytes: int, available_bytes: int) -> Host:
    return Host(name=host.cpu_model, cores=host.cores, memory_bytes=memory_bytes,
                mem_bw_gbps=f.cpu.mem_bw_gbps.value, flops_tflops=f.cpu.flops_values(),
                gemv_efficiency=f.cpu.gemv_efficiency().value, matmul_efficiency=1.0,
                op_overhead_s=f.cpu.op_overhead_s.value, gemv_gbps=f.cpu.gemv_curves(),
                gemv_size_factor=f.cpu.gemv_size_factor(), attention_gbps=f.attention.value,
                bus_gbps=sig(f.bus.dram_gbps), copy_slowdown_s_per_gb=sig(f.bus.slowdown_s_per_gb),
                task_overhead_s=f.cpu.task_overhead_s.value,
                available_bytes=available_bytes, threads=f.threads)


def _spread(f: _Figures, accelerator: Compute) -> dict[str, float]:
    return {**f.link_spread, **accelerator.spread("accelerator"), **f.cpu.spread("host"),
            "host.attention_gbps": f.attention.spread, "host.bus_gbps": sig(f.bus.spread)}


def _source(notes: list[str], busy: str) -> Source:
    notes = [*notes, *([busy] if busy else []),
             "spread = (q3 - q1) / median of the timed runs; memory bandwidth counts read + write "
             "bytes of a copy; link curves = bytes / (time - latency)"]
    return Source(kind="measured", date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  notes="; ".join(notes))


def _gemv_note(prefix: str, c: Compute) -> str:
    parts = [f"{dt} " + ", ".join(f"b{batch} {f.value:.1f}" for batch, f in by_batch.items())
             for dt, by_batch in c.gemv_gbps.items()]
    return f"{prefix} GEMV GB/s by batch: " + "; ".join(parts)


def _bus_note(bus: BusFigure, loopback: bool) -> str:
    copies = "copy read + write" if loopback else "DMA reads"
    return (f"host memory bus: {bus.dram_gbps:.1f} GB/s with streaming ({bus.copy_gbps:.1f} GB/s, counted as "
            f"{copies}) and host matmuls ({bus.gemv_gbps:.1f} GB/s, {bus.gemv_alone_gbps:.1f} alone) running at once")


def _pcie_note(gpu: GpuFacts, link: Link) -> str:
    theory = pcie_gbps(gpu.pcie_generation, gpu.pcie_width)
    if not theory:
        return f"PCIe link unknown; measured h2d {link.h2d_gbps:.1f} / d2h {link.d2h_gbps:.1f} GB/s"
    return (f"PCIe gen{gpu.pcie_generation} x{gpu.pcie_width}: theoretical {theory:.1f} GB/s per "
            f"direction; measured h2d {link.h2d_gbps:.1f} GB/s ({link.h2d_gbps / theory:.0%}), "
            f"d2h {link.d2h_gbps:.1f} GB/s ({link.d2h_gbps / theory:.0%})")
