"""Describing the host on the command line: `--dram ddr5-6400x2`, `--host-bw`, `--cpu-cores`.

A DRAM channel is 64 bits wide (8 bytes per transfer), so its peak is MT/s x 8 bytes;
`channels` channels give channels x MT/s x 8 / 1000 GB/s (DDR5-6400, two channels:
102.4 GB/s). What multi-threaded reads reach is a fraction of that peak: the shipped
profiles estimate 73-80% (STREAM-like reads on desktop and server parts), so `--dram`
sets the host bandwidth to the peak times STREAM_FRACTION, the same meaning as a profile's
`host.mem_bw_gbps`. `--host-bw` gives that achievable figure directly.

Units: GB/s (1e9 bytes/s), TFLOP/s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from planner.errors import HardwareError
from planner.hardware.profile import HardwareProfile

# Achievable share of the DRAM peak in a multi-threaded streaming read: the middle of the
# 73-80% the shipped datasheet profiles estimate (see their host.mem_bw_gbps citations).
STREAM_FRACTION = 0.75
BYTES_PER_TRANSFER = 8  # one 64-bit DDR channel
DRAM_KINDS = ("ddr3", "ddr4", "ddr5")
_DRAM_RE = re.compile(r"^(ddr[345])-(\d{3,5})x(\d{1,2})$")


@dataclass(frozen=True)
class Dram:
    kind: str  # ddr4 | ddr5 ...
    rate_mts: int  # mega-transfers per second per pin
    channels: int

    @property
    def peak_gbps(self) -> float:
        return self.channels * self.rate_mts * BYTES_PER_TRANSFER / 1000.0

    @property
    def achievable_gbps(self) -> float:
        return self.peak_gbps * STREAM_FRACTION

    def __str__(self) -> str:
        return f"{self.kind}-{self.rate_mts}x{self.channels}"


def parse_dram(text: str) -> Dram:
    """'ddr5-6400x2' -> Dram('ddr5', 6400, 2). One clear error line for anything else."""
    match = _DRAM_RE.match(text.strip().lower())
    hint = "write TYPE-RATExCHANNELS, e.g. ddr5-6400x2 or ddr4-3200x8 (DDR3/4/5, MT/s, 64-bit channels)"
    if not match:
        raise HardwareError(f"--dram {text!r}: {hint}")
    kind, rate, channels = match.group(1), int(match.group(2)), int(match.group(3))
    if not 800 <= rate <= 12800:
        raise HardwareError(f"--dram {text!r}: {rate} MT/s is not a DDR transfer rate (800-12800); {hint}")
    if not 1 <= channels <= 24:
        raise HardwareError(f"--dram {text!r}: {channels} channels is not 1-24; {hint}")
    return Dram(kind, rate, channels)


def with_host(profile: HardwareProfile, dram: str | None = None, cpu_cores: int | None = None) -> HardwareProfile:
    """The profile with the host's DRAM and/or core count replaced; the name records it.

    Fewer or more cores scale the host's peak flops (per-core rate kept) and the thread count."""
    host, notes = profile.host, []
    if dram is not None:
        d = parse_dram(dram)
        host = replace(host, mem_bw_gbps=round(d.achievable_gbps, 2), attention_gbps=0.0, bus_gbps=0.0)
        notes.append(f"dram={d} ({d.peak_gbps:g} GB/s peak)")
    if cpu_cores is not None:
        if cpu_cores <= 0 or cpu_cores > 1024:
            raise HardwareError(f"--cpu-cores: must be between 1 and 1024, got {cpu_cores}")
        scale = cpu_cores / max(host.cores, 1)
        host = replace(host, cores=cpu_cores, threads=cpu_cores,
                       flops_tflops={k: v * scale for k, v in host.flops_tflops.items()})
        notes.append(f"cores={cpu_cores}")
    if not notes:
        return profile
    acc = profile.accelerator
    if not acc.present:  # the placeholder accelerator follows the host it stands for
        acc = replace(acc, mem_bw_gbps=host.mem_bw_gbps, flops_tflops=dict(host.flops_tflops))
    return replace(profile, name=f"{profile.name} ({', '.join(notes)})", host=host, accelerator=acc)
