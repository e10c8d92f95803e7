"""Score a fixed placement with the cost model: step times, bounds, memory per device.

`evaluate` is what `solve` reports for the ILP's answer and for every baseline, what the
executor compares its measurements with, and what brute-force tests enumerate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from planner.cost.moe import routing_shares
from planner.cost.options import KVOption, Scenario, TensorOption, head_fixed, kv_options, layer_fixed, tensor_options
from planner.cost.terms import (acc_workspace_bytes, draft_prefill_s, draft_step_s, draft_vram_bytes,
                         host_staging_bytes)
from planner.errors import PlanError
from planner.model.placement import Placement, check_placement
from planner.cost.roofline import PathCost
from planner.model.spec import TensorSpec

RESOURCES = ("accelerator", "cpu", "transfers", "link", "memory")


@dataclass(frozen=True)
class Stage:
    """A unit of the per-stage max: one decoder layer, or the head (embed + norm + lm_head)."""

    name: str
    layer: int | None
    tensors: tuple[TensorSpec, ...]


def stages_of(spec) -> tuple[Stage, ...]:
    layers = [Stage(f"layer {i}", i, spec.layer_tensors(i)) for i in range(spec.layers)]
    head = Stage("head", None, tuple(t for t in spec.tensors() if t.layer is None))
    return (*layers, head)


@dataclass(frozen=True)
class OptionTables:
    """Every option of every item of a scenario, computed once; read by the ILP and evaluate."""

    scenario: Scenario
    stages: tuple[Stage, ...]
    tensor: dict[str, list[TensorOption]]
    kv: list[KVOption]
    fixed_decode: dict[str, PathCost]  # stage name -> element-wise work
    fixed_prefill: dict[str, PathCost]


def option_tables(scn: Scenario) -> OptionTables:
    spec, stages = scn.spec, stages_of(scn.spec)
    # Layers repeat: a tensor's options depend on its shape (and, for an expert bank, its
    # layer's routing), not its name, so each distinct one is computed once.
    cache: dict[tuple, list[TensorOption]] = {}
    tensor = {}
    for t in spec.tensors():
        key = (replace(t, name="", layer=None), routing_shares(scn, t.layer) if t.experts else None)
        if key not in cache:
            cache[key] = tensor_options(scn, t)
        tensor[t.name] = cache[key]
    fixed_decode, fixed_prefill = {}, {}
    for st in stages:
        if st.layer is None:
            fixed_decode[st.name] = head_fixed(scn, scn.decode_rows)
            fixed_prefill[st.name] = head_fixed(scn, scn.workload.batch)
        else:
            fixed_decode[st.name] = layer_fixed(scn, scn.decode_rows)
            fixed_prefill[st.name] = layer_fixed(scn, scn.prefill_rows)
    return OptionTables(scn, stages, tensor, kv_options(scn), fixed_decode, fixed_prefill)


@dataclass(frozen=True)
class MemoryUse:
    """Bytes on one device. `capacity_bytes` is what offplan may use there."""

    weights_bytes: int
    kv_bytes: int
    buffer_bytes: int
    workspace_bytes: int
    draft_bytes: int
    compensation_bytes: int
    reserve_bytes: int  # shown for the reader; already excluded from capacity
    capacity_bytes: int

    @property
    def used_bytes(self) -> int:
        return (self.weights_bytes + self.kv_bytes + self.buffer_bytes + self.workspace_bytes
                + self.draft_bytes + self.compensation_bytes)

    @property
    def fits(self) -> bool:
        return self.used_bytes <= self.capacity_bytes


@dataclass(frozen=True)
class StageTime:
    name: str
    decode_path: PathCost
    decode_link_s: float  # h2d link: prefetch of the next stage + this stage's activations going up
    prefill_path: PathCost
    prefill_link_s: float
    decode_bus_s: float = 0.0  # host memory bus: this stage's reads + prefetch of the next stage
    prefill_bus_s: float = 0.0

    @property
    def decode_s(self) -> float:
        return max(self.decode_path.total_s, self.decode_link_s, self.decode_bus_s)

    @property
    def prefill_s(self) -> float:
        return max(self.prefill_path.total_s, self.prefill_link_s, self.prefill_bus_s)

    def bound(self, phase: str) -> str:
        """What sets this stage's time: `path` (compute and transfers), `link` or `memory`."""
        path, link, bus = ((self.decode_path.total_s, self.decode_link_s, self.decode_bus_s) if phase == "decode"
                           else (self.prefill_path.total_s, self.prefill_link_s, self.prefill_bus_s))
        if bus > max(path, link):
            return "memory"
        return "link" if link > path else "path"


@dataclass(frozen=True)
class Prediction:
    stages: tuple[StageTime, ...]
    prefill_start_s: float  # streaming the first stage before prefill can start
    draft_step_s: float
    draft_prefill_s: float
    expected_tokens: float
    batch: int
    decode_steps: float
    vram: MemoryUse
    host: MemoryUse
    recovered_error: float  # mean fraction of quantization error recovered (0 without compensation)

    @cached_property
    def decode_step_s(self) -> float:
        return sum(s.decode_s for s in self.stages) + self.draft_step_s

    @cached_property
    def prefill_s(self) -> float:
        return self.prefill_start_s + sum(s.prefill_s for s in self.stages) + self.draft_prefill_s

    @property
    def ttft_s(self) -> float:
        return self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.expected_tokens / self.decode_step_s

    @property
    def total_s(self) -> float:
        """The ILP's objective: prefill + remaining tokens / E x step time."""
        return self.prefill_s + self.decode_steps * self.decode_step_s

    @property
    def fits(self) -> bool:
        return self.vram.fits and self.host.fits

    def by_resource(self, phase: str) -> dict[str, float]:
        """Seconds of the critical path spent on each resource (`link` = exposed streaming,
        `memory` = stages held up by the host memory bus)."""
        out = dict.fromkeys(RESOURCES, 0.0)
        for s in self.stages:
            path = s.decode_path if phase == "decode" else s.prefill_path
            bound = s.bound(phase)
            if bound != "path":
                out[bound] += s.decode_s if phase == "decode" else s.prefill_s
            else:
                out["accelerator"] += path.acc_s
                out["cpu"] += path.cpu_s
                out["transfers"] += path.xfer_s
        if phase == "decode":
            out["accelerator"] += self.draft_step_s
        else:
            out["link"] += self.prefill_start_s
            out["accelerator"] += self.draft_prefill_s
        return out

    def bound(self, phase: str) -> str:
        shares = self.by_resource(phase)
        return max(shares, key=shares.get)


def find_option(options: list[TensorOption], device: str, streamed: bool, rank: int, name: str) -> TensorOption:
    for o in options:
        if o.device == device and o.prefill_streamed == streamed and o.rank == rank:
            return o
    raise PlanError(f"placement.{name}: no option for device={device} prefill_streamed={streamed} rank={rank} "
                    "(a rank the plan does not offer, or a device this tensor cannot use)")


def find_bank_option(options: list[TensorOption], device: str, streamed: bool, gpu_experts: int,
                     name: str) -> TensorOption:
    """The option of an expert bank with `gpu_experts` resident (the nearest offered count);
    the host part's prefill copied up when `streamed`."""
    if device == "stream":
        matching = [o for o in options if o.device == "stream"]
    else:
        matching = [o for o in options if o.device != "stream"
                    and (o.prefill_streamed == streamed or o.gpu_experts == max(p.gpu_experts for p in options))]
    if not matching:
        raise PlanError(f"placement.{name}: no option for an expert bank on {device}")
    return min(matching, key=lambda o: (abs(o.gpu_experts - gpu_experts), o.prefill_streamed != streamed))


def find_kv_option(options: list[KVOption], host_fraction: float) -> KVOption:
    return min(options, key=lambda o: abs(o.host_fraction - host_fraction))


def chosen_options(tables: OptionTables, placement: Placement) -> tuple[dict[str, TensorOption], list[KVOption]]:
    tensor = {}
    spec = tables.scenario.spec
    for name, options in tables.tensor.items():
        device = placement.device(name)
        bank = spec.by_name[name]
        if bank.experts:
            tensor[name] = find_bank_option(options, device, placement.streams_for_prefill(name),
                                            placement.experts_on_gpu(bank), name)
            continue
        tensor[name] = find_option(options, device, placement.streams_for_prefill(name),
                                   placement.rank(name) if device != "cpu" else 0, name)
    kv = [find_kv_option(tables.kv, c) for c in placement.kv_host_fraction]
    return tensor, kv


def predict(tables: OptionTables, tensor: dict[str, TensorOption], kv: list[KVOption]) -> Prediction:
    """Aggregate chosen options into a Prediction (the same sums the ILP encodes)."""
    scn, stages = tables.scenario, tables.stages
    paths_d, paths_p, links_d, links_p, buffers, own_d, own_p = [], [], [], [], [], [], []
    bus_d, bus_p, fetch_d, fetch_p = [], [], [], []
    for st in stages:
        opts = [tensor[t.name] for t in st.tensors]
        pd, pp = tables.fixed_decode[st.name], tables.fixed_prefill[st.name]
        for o in opts:
            pd, pp = pd + o.decode, pp + o.prefill
        if st.layer is not None:
            pd, pp = pd + kv[st.layer].decode, pp + kv[st.layer].prefill
        paths_d.append(pd)
        paths_p.append(pp)
        links_d.append(sum(o.decode_link_s for o in opts))
        links_p.append(sum(o.prefill_link_s for o in opts))
        # Activations this stage sends up share the h2d link with the next stage's prefetch.
        own_d.append(sum(o.decode_act_h2d_s for o in opts)
                     + (kv[st.layer].decode_act_h2d_s if st.layer is not None else 0.0))
        own_p.append(sum(o.prefill_act_h2d_s for o in opts))
        buffers.append(sum(o.buffer_bytes for o in opts))
        bus_d.append(sum(o.decode_bus_s for o in opts) + (kv[st.layer].decode_bus_s if st.layer is not None else 0.0))
        bus_p.append(sum(o.prefill_bus_s for o in opts))
        fetch_d.append(sum(o.decode_fetch_bus_s for o in opts))
        fetch_p.append(sum(o.prefill_fetch_bus_s for o in opts))
    n = len(stages)
    # Compute slows while the next stage's weights stream in beside it (loopback, membus.py).
    for i in range(n):
        slow_d = sum(tensor[t.name].decode_fetch_slow_s for t in stages[(i + 1) % n].tensors)
        slow_p = sum(tensor[t.name].prefill_fetch_slow_s for t in stages[i + 1].tensors) if i + 1 < n else 0.0
        paths_d[i] = paths_d[i] + PathCost(acc_s=slow_d)
        paths_p[i] = paths_p[i] + PathCost(acc_s=slow_p)
    # Decode is cyclic: while stage s computes, stage s+1 (the head wraps to layer 0) streams in.
    times = tuple(StageTime(st.name, paths_d[i], links_d[(i + 1) % n] + own_d[i], paths_p[i],
                            (links_p[i + 1] if i + 1 < n else 0.0) + own_p[i],
                            bus_d[i] + fetch_d[(i + 1) % n], bus_p[i] + (fetch_p[i + 1] if i + 1 < n else 0.0))
                  for i, st in enumerate(stages))
    vram, host = memory_use(tables, tensor, kv, max(buffers, default=0))
    recov = [o.recovered for o in tensor.values() if scn.spec.quantization and o.device != "cpu"]
    quantized = [t for t in scn.spec.tensors() if t.group in ("attn", "mlp")]
    recovered = sum(recov) / len(quantized) if scn.spec.quantization and quantized else 0.0
    return Prediction(times, links_p[0], draft_step_s(scn), draft_prefill_s(scn), scn.expected_tokens,
                      scn.workload.batch, scn.decode_steps, vram, host, recovered)


def memory_use(tables: OptionTables, tensor: dict[str, TensorOption], kv: list[KVOption],
               largest_buffer_bytes: int) -> tuple[MemoryUse, MemoryUse]:
    scn = tables.scenario
    profile = scn.profile
    any_cpu = any(o.device == "cpu" for o in tensor.values()) or any(o.host_fraction > 0 for o in kv)
    vram = MemoryUse(
        weights_bytes=sum(o.vram_bytes for o in tensor.values()) + scn.spec.norm_bytes,
        kv_bytes=sum(o.vram_bytes for o in kv),
        buffer_bytes=2 * largest_buffer_bytes,
        workspace_bytes=acc_workspace_bytes(scn),
        draft_bytes=draft_vram_bytes(scn),
        compensation_bytes=0,
        reserve_bytes=profile.reserve_bytes + profile.accelerator.used_by_others_bytes,
        capacity_bytes=profile.vram_usable_bytes)
    host = MemoryUse(
        weights_bytes=sum(o.host_bytes for o in tensor.values()),
        kv_bytes=sum(o.host_bytes for o in kv),
        buffer_bytes=host_staging_bytes(scn) if any_cpu else 0,
        workspace_bytes=0, draft_bytes=0,
        compensation_bytes=sum(o.comp_bytes for o in tensor.values()),
        reserve_bytes=profile.host_reserve_bytes,
        capacity_bytes=profile.host_usable_bytes)
    return vram, host


def evaluate(scn: Scenario, placement: Placement, tables: OptionTables | None = None) -> Prediction:
    check_placement(scn.spec, placement)
    tables = tables or option_tables(scn)
    tensor, kv = chosen_options(tables, placement)
    return predict(tables, tensor, kv)
