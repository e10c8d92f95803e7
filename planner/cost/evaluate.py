"""Score a fixed placement with the cost model: step times, bounds, memory per device.

`evaluate` is what `solve` reports for the ILP's answer and for every baseline, what the
executor compares its measurements with, and what brute-force tests enumerate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from planner.cost.attention import kv_options
from planner.cost.moe import routing_shares
from planner.cost.options import KVOption, Scenario, TensorOption, head_fixed, layer_fixed, tensor_options
from planner.cost.terms import (acc_workspace_bytes, draft_prefill_s, draft_step_s, draft_vram_bytes,
                         host_staging_bytes)
from planner.errors import PlanError
from planner.model.placement import Placement, check_placement
from planner.cost.roofline import PathCost
from planner.cost.stage import OFFPLAN_RULE, PHASES, Item, StageRule, StageSum, stage_sum, start_s, term_sums
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
    rule: StageRule = OFFPLAN_RULE  # how stages overlap their work (planner/cost/stage.py)


def option_tables(scn: Scenario, rule: StageRule = OFFPLAN_RULE) -> OptionTables:
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
    return OptionTables(scn, stages, tensor, kv_options(scn), fixed_decode, fixed_prefill, rule)


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
    """One stage's time in both phases, summed by the stage rule (planner/cost/stage.py)."""

    name: str
    decode: StageSum
    prefill: StageSum

    @classmethod
    def of_paths(cls, name: str, decode: PathCost, prefill: PathCost) -> "StageTime":
        """A stage that is only a compute path in each phase (nothing prefetched beside it)."""
        def summed(phase: str, path: PathCost) -> StageSum:
            return stage_sum(OFFPLAN_RULE, phase, term_sums(OFFPLAN_RULE, phase, [path]), None, path.hidden_cpu_s)
        return cls(name, summed("decode", decode), summed("prefill", prefill))

    def phase(self, phase: str) -> StageSum:
        return self.decode if phase == "decode" else self.prefill

    @property
    def decode_s(self) -> float:
        return self.decode.total_s

    @property
    def prefill_s(self) -> float:
        return self.prefill.total_s

    @property
    def decode_path(self) -> PathCost:
        return self.decode.path

    @property
    def prefill_path(self) -> PathCost:
        return self.prefill.path

    @property
    def decode_link_s(self) -> float:
        """h2d link: prefetch of the next stage + this stage's activations going up."""
        return self.decode.operand_s("link")

    @property
    def prefill_link_s(self) -> float:
        return self.prefill.operand_s("link")

    @property
    def decode_bus_s(self) -> float:
        """Host memory bus: this stage's reads + prefetch of the next stage."""
        return self.decode.operand_s("memory")

    @property
    def prefill_bus_s(self) -> float:
        return self.prefill.operand_s("memory")

    def bound(self, phase: str) -> str:
        """What sets this stage's time: `path` (compute and transfers), `link` or `memory`."""
        return self.phase(phase).bound


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
            for resource, seconds in s.phase(phase).by_resource().items():
                out[resource] += seconds
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


def stage_items(tables: OptionTables, stage: Stage, tensor: dict[str, TensorOption],
                kv: list[KVOption], phase: str) -> list[Item]:
    """What a stage is made of: its fixed work, its tensors' options, its layer's KV option."""
    fixed = (tables.fixed_decode if phase == "decode" else tables.fixed_prefill)[stage.name]
    items: list[Item] = [fixed, *(tensor[t.name] for t in stage.tensors)]
    return items + ([kv[stage.layer]] if stage.layer is not None else [])


def predict(tables: OptionTables, tensor: dict[str, TensorOption], kv: list[KVOption]) -> Prediction:
    """Aggregate chosen options into a Prediction: the stage rule of planner/cost/stage.py
    over every stage, as the ILP encodes it."""
    scn, stages, rule = tables.scenario, tables.stages, tables.rule
    n = len(stages)
    sums, hidden = {}, {}
    for phase in PHASES:
        items = [stage_items(tables, st, tensor, kv, phase) for st in stages]
        sums[phase] = [term_sums(rule, phase, its) for its in items]
        hidden[phase] = [sum(getattr(i, phase).hidden_cpu_s for i in its if not isinstance(i, PathCost))
                         for its in items]

    def summed(i: int, phase: str) -> StageSum:
        nxt = rule.following(i, n, phase)
        return stage_sum(rule, phase, sums[phase][i], sums[phase][nxt] if nxt is not None else None,
                         hidden[phase][i])

    times = tuple(StageTime(st.name, summed(i, "decode"), summed(i, "prefill")) for i, st in enumerate(stages))
    buffers = [sum(tensor[t.name].buffer_bytes for t in st.tensors) for st in stages]
    vram, host = memory_use(tables, tensor, kv, max(buffers, default=0))
    recov = [o.recovered for o in tensor.values() if scn.spec.quantization and o.device != "cpu"]
    quantized = [t for t in scn.spec.tensors() if t.group in ("attn", "mlp")]
    recovered = sum(recov) / len(quantized) if scn.spec.quantization and quantized else 0.0
    return Prediction(times, start_s(rule, "prefill", sums["prefill"][0]), draft_step_s(scn),
                      draft_prefill_s(scn), scn.expected_tokens, scn.workload.batch, scn.decode_steps, vram, host,
                      recovered)


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
