"""Time on one resource: operator rooflines, link transfers, and how costs on different
resources combine (DESIGN §4). planner/cost/options.py builds every option from these.

Units: seconds (`_s`), bytes (`_bytes`), flop counts; bandwidths in the profile are GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.hardware.profile import HardwareProfile, curve_gbps, flops_for, weight_read_gbps


# ---- time on one resource -----------------------------------------------------------------

def roofline_s(flops: float, n_bytes: float, flops_per_s: float, bytes_per_s: float,
               overhead_s: float) -> float:
    """Operator time on one device: the slower of compute and memory traffic, plus overhead."""
    return overhead_s + max(flops / flops_per_s, n_bytes / bytes_per_s)


def acc_op_s(profile: HardwareProfile, dtype: str, flops: float, n_bytes: float, rows: float = 1.0,
             weight_bytes: float = 0.0, read_dtype: str = "") -> float:
    """An operator on the accelerator computing in `dtype`; `rows`, `weight_bytes` and
    `read_dtype` (the stored weights' dtype, int4 for packed ones; default `dtype`) of a matmul
    select the measured GEMV speed."""
    a = profile.accelerator
    bw_gbps = weight_read_gbps(a.gemv_gbps, _read_key(a.gemv_gbps, read_dtype, dtype), rows, a.mem_bw_gbps,
                               a.gemv_efficiency, weight_bytes, a.gemv_size_factor)
    return roofline_s(flops, n_bytes, flops_for(a.flops_tflops, dtype) * a.matmul_efficiency,
                      bw_gbps * 1e9, a.op_overhead_s)


def host_op_s(profile: HardwareProfile, dtype: str, flops: float, n_bytes: float, rows: float = 1.0,
              weight_bytes: float = 0.0, read_dtype: str = "") -> float:
    h = profile.host
    bw_gbps = weight_read_gbps(h.gemv_gbps, _read_key(h.gemv_gbps, read_dtype, dtype), rows, h.mem_bw_gbps,
                               h.gemv_efficiency, weight_bytes, h.gemv_size_factor)
    return roofline_s(flops, n_bytes, flops_for(h.flops_tflops, dtype) * h.matmul_efficiency,
                      bw_gbps * 1e9, h.op_overhead_s)


def _read_key(gemv_gbps: dict, read_dtype: str, dtype: str) -> str:
    """The GEMV curve to read: the stored weights' own (packed int4 is measured through the
    executor's dequantizing matmul, in packed bytes/s) when the profile has it, else the
    compute dtype's."""
    return read_dtype if read_dtype and read_dtype in gemv_gbps else dtype


def host_attention_s(profile: HardwareProfile, dtype: str, flops: float, kv_bytes: float) -> float:
    h = profile.host
    attn_bytes_per_s = (h.attention_gbps or h.mem_bw_gbps * h.gemv_efficiency) * 1e9
    return roofline_s(flops, kv_bytes, flops_for(h.flops_tflops, dtype) * h.matmul_efficiency,
                      attn_bytes_per_s, h.op_overhead_s)


def h2d_s(profile: HardwareProfile, n_bytes: float) -> float:
    """Pinned host-to-device copy of one buffer: latency + bytes / bandwidth(size)."""
    if n_bytes <= 0:
        return 0.0
    link = profile.link
    return link.latency_s + n_bytes / (curve_gbps(link.h2d_curve, n_bytes, link.h2d_gbps) * 1e9)


def d2h_s(profile: HardwareProfile, n_bytes: float) -> float:
    if n_bytes <= 0:
        return 0.0
    link = profile.link
    return link.latency_s + n_bytes / (curve_gbps(link.d2h_curve, n_bytes, link.d2h_gbps) * 1e9)


def touched_fraction(route_prob: float, tokens: float) -> float:
    """Expected fraction of a (possibly expert) weight read when `tokens` rows pass."""
    return 1.0 - (1.0 - route_prob) ** tokens


def expected_tokens_per_step(acceptance: float, gamma: int) -> float:
    """E = (1 - a^(g+1)) / (1 - a): tokens a draft/verify step yields per sequence."""
    if gamma == 0:
        return 1.0
    if acceptance >= 1.0:
        return float(gamma + 1)
    return (1.0 - acceptance ** (gamma + 1)) / (1.0 - acceptance)


# ---- composite costs --------------------------------------------------------------------------

@dataclass(frozen=True)
class PathCost:
    """Time an item adds to a stage's compute path, split by the resource that spends it.
    `hidden_cpu_s` is host work overlapped with accelerator work (not on the path)."""

    acc_s: float = 0.0
    cpu_s: float = 0.0
    xfer_s: float = 0.0
    hidden_cpu_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.acc_s + self.cpu_s + self.xfer_s

    def __add__(self, other: "PathCost") -> "PathCost":
        return PathCost(self.acc_s + other.acc_s, self.cpu_s + other.cpu_s,
                        self.xfer_s + other.xfer_s, self.hidden_cpu_s + other.hidden_cpu_s)


def parallel(acc_side: PathCost, cpu_side: PathCost) -> PathCost:
    """Two branches that run concurrently: the longer is the path, the other is hidden."""
    if acc_side.total_s >= cpu_side.total_s:
        return PathCost(acc_side.acc_s, acc_side.cpu_s, acc_side.xfer_s,
                        acc_side.hidden_cpu_s + cpu_side.total_s)
    return PathCost(cpu_side.acc_s, cpu_side.cpu_s, cpu_side.xfer_s,
                    cpu_side.hidden_cpu_s + acc_side.total_s)
