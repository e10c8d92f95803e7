"""What this machine is: host name, CPU model, physical cores and memory, read from /proc
(with portable fallbacks). Used by the profiler, the memory check before loading and
`sensitivity`'s size check."""

from __future__ import annotations

import os
import platform
import re
import socket
from dataclasses import dataclass
from pathlib import Path

KIB = 2**10


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
