"""Discrete-event simulation of a plan: every op, weight copy and activation transfer as an
event on the resources that really run concurrently (DESIGN §4, "The simulator").

Resources (planner/simulate/events.py): `accelerator` (one in-order stream), the `h2d` and
`d2h` link directions (each serves transfers in the order they become ready, so an
activation queues behind weight copies already issued), `cpu` (`cpu_workers` threads) and
`memory`, the host memory bus. Ops run in execution order, each after the one before
(elementwise, q, k, v, attention, o, gate, up, down; the head is lm_head, final norm and
argmax, then the next step's draft forwards and embedding); hybrid attention and
compensation branches run their host side concurrently and join before the next op.

What the stage rule (planner/cost/stage.py) charges a stage beyond its own ops is taken
from it, as the ILP counts it: the memory bus as one `memory` event per stage, from the
stage's start, lasting its reads plus the traffic of the copies prefetched beside it (the
next stage waits for it); and the compute a stage loses while the next stage's weights
copy in (loopback) as one accelerator event at its end.

Streaming: a stage's weights are copied into one of `buffers` slots; the stage's first op
waits for its whole copy, and a copy starts once its slot is free (the stage that last used
it has finished). With `prefetch="next-stage"` (the ILP's model) every stage takes the next
slot in turn: 2 buffers reproduce the ILP's per-stage max over compute, next copy and
memory bus, and 1 buffer never beats it. With `"next-streamed"` only stages that stream
take slots, as executor/streams.py does, so copies run ahead across resident stages.
`copy_chunk_bytes` splits copies into pieces issued one after another, letting activation
transfers through between pieces.

Where it differs from the ILP's sum, and why: activations of host matmuls, hybrid attention
and compensation queue behind weight copies on the link (the ILP adds their time to the link
operand); draft forwards run beside the first layer's copy (the ILP adds them after the
stage max); the memory bus is a per-stage budget, not bandwidth shared event by event (no
measured figure says how a copy and a matmul divide it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

from planner.cost.evaluate import Prediction, chosen_options, find_option, option_tables, predict
from planner.cost.attention import attention_decode_parts
from planner.cost.moe import bank_parts
from planner.cost.options import Scenario, activation_transfer_s, compensation_branch, matmul_rows
from planner.cost.roofline import PathCost, h2d_s
from planner.errors import OffplanError
from planner.hardware.profile import HardwareProfile
from planner.model.placement import Placement, check_placement
from planner.model.spec import TensorSpec
from planner.plan.record import Plan
from planner.simulate.events import KINDS, RESOURCES, STREAM_PREFIX, Event, kind_of
from planner.simulate.schedule import Op, Step, Timeline, Unit, instantiate, schedule

PREFETCH_MODES = ("next-stage", "next-streamed")


class SimulationError(OffplanError):
    """A simulation option is out of range."""


@dataclass(frozen=True)
class SimResult:
    events: tuple[Event, ...]  # prefill from t=0, then decode steps back to back
    decode_step_s: float  # steady state
    prefill_s: float
    busy_fraction: dict[str, float]  # resource -> share of the steady decode step it is busy
    critical_path: tuple[str, ...]  # event names along the critical path of one decode step
    ilp_decode_step_s: float
    ilp_prefill_s: float
    per_stage_diff_s: tuple[tuple[str, float], ...]  # stage -> simulated minus ILP (decode)
    critical_by_kind_s: dict[str, float]  # seconds of that critical path per event kind
    step_starts_s: tuple[float, ...]  # start of layer 0 of decode steps 0..n (window k = [s_k, s_k+1))
    buffers: int = 2
    cpu_workers: int = 1
    prefetch: str = "next-stage"
    copy_chunk_bytes: int = 0

    @property
    def decode_bound(self) -> str:
        """The event kind holding most of the decode step's critical path."""
        return max(self.critical_by_kind_s, key=self.critical_by_kind_s.get)


class _Builder:
    """Turns the chosen options of a plan into op templates, phase by phase."""

    def __init__(self, scn: Scenario, placement: Placement, chunk_bytes: int):
        self.scn, self.chunk_bytes = scn, chunk_bytes
        self.tables = option_tables(scn)
        self.tensor, self.kv = chosen_options(self.tables, placement)
        self.prediction = predict(self.tables, self.tensor, self.kv)
        self.sums = {(st.name, ph): st.phase(ph) for st in self.prediction.stages for ph in ("decode", "prefill")}

    def rule_parts(self, stage: str, phase: str) -> tuple[list[Step], Op | None]:
        """What the stage rule (planner/cost/stage.py) charges a stage beyond its own ops: the
        compute it loses while the following stage's weights copy in (one accelerator op at
        its end) and its memory-bus time (one op spanning the stage, as the ILP counts it)."""
        summed = self.sums[(stage, phase)]
        slow_s, bus_s = summed.lagged_s("path"), summed.operand_s("memory")
        steps = [((Op("accelerator", f"{stage} copy slowdown", slow_s, stage, phase),),)] if slow_s > 0 else []
        return steps, (Op("memory", f"{stage} memory bus", bus_s, stage, phase) if bus_s > 0 else None)

    def tensor_steps(self, t: TensorSpec, phase: str, stage: str) -> list[Step]:
        opt = self.tensor[t.name]
        cost: PathCost = getattr(opt, phase)
        op = partial(Op, stage=stage, phase=phase)
        on_acc = opt.device != "cpu" or (phase == "prefill" and opt.prefill_streamed)
        if t.group == "embed":
            if on_acc:
                return [((op("accelerator", t.name, cost.acc_s),),)]
            return [((op("cpu", t.name, cost.cpu_s), op("h2d", f"{t.name} rows", cost.xfer_s)),)]
        rows = matmul_rows(self.scn, t, phase)
        if t.experts and opt.device == "cpu" and not (phase == "prefill" and opt.prefill_streamed):
            # a split bank: resident experts on the accelerator beside the host worker's
            acc_s, down_s, cpu_s, up_s = bank_parts(self.scn, t, opt.gpu_experts, rows)
            host = (op("d2h", f"{t.name} x", down_s), op("cpu", t.name, cpu_s), op("h2d", f"{t.name} out", up_s))
            return [((op("accelerator", t.name, acc_s),), host) if opt.gpu_experts else (host,)]
        down_s, up_s = activation_transfer_s(self.scn, t, rows)
        if not on_acc:
            return [((op("d2h", f"{t.name} x", down_s), op("cpu", t.name, cost.cpu_s),
                      op("h2d", f"{t.name} out", up_s)),)]
        if opt.rank == 0:
            return [((op("accelerator", t.name, cost.acc_s),),)]
        plain = getattr(find_option(self.tables.tensor[t.name], opt.device, False, 0, t.name), phase)
        branch = compensation_branch(self.scn, t, opt.rank, rows)
        steps: list[Step] = [((op("accelerator", t.name, plain.acc_s),),
                              (op("d2h", f"{t.name} x", down_s),
                               op("cpu", f"{t.name} branch r{opt.rank}", branch.cpu_s),
                               op("h2d", f"{t.name} correction", up_s)))]
        handoff_s = self.scn.profile.host.task_overhead_s
        if handoff_s > 0:  # handing the branch to the worker and joining it, after both
            steps.append(((op("cpu", f"{t.name} hand-off", handoff_s),),))
        return steps

    def attention_steps(self, layer: int, phase: str, stage: str) -> list[Step]:
        op = partial(Op, stage=stage, phase=phase)
        name, kv = f"layers.{layer}.attention", self.kv[layer]
        if phase == "prefill":  # on the accelerator, then the host share of the new K/V goes down
            steps = [((op("accelerator", name, kv.prefill.acc_s),),)]
            return steps + ([((op("d2h", f"layers.{layer}.kv to host", kv.prefill.xfer_s),),)]
                            if kv.prefill.xfer_s > 0 else [])
        p = attention_decode_parts(self.scn, kv.host_fraction)
        if kv.host_fraction == 0:
            return [((op("accelerator", name, p.device_s),),)]
        host = (op("d2h", f"{name} q", p.q_down_s), op("cpu", f"{name} host", p.host_s),
                op("h2d", f"{name} O,L", p.out_up_s))
        if p.merge_s == 0:  # every key on the host: no device part, no merge
            return [(host,)]
        return [((op("accelerator", name, p.device_s),), host), ((op("accelerator", f"{name} merge", p.merge_s),),)]

    def copies(self, tensors, phase: str, stage: str) -> tuple[Op, ...]:
        """Weight copies of a stage: one per streamed tensor, or `chunk_bytes` pieces of it."""
        link, out = "decode_link_s" if phase == "decode" else "prefill_link_s", []
        for t in tensors:
            whole_s = getattr(self.tensor[t.name], link)
            if whole_s <= 0:
                continue
            n = -(-t.n_bytes // self.chunk_bytes) if self.chunk_bytes else 1
            if n == 1:
                out.append(Op("h2d", STREAM_PREFIX + t.name, whole_s, stage, phase))
                continue
            for k in range(n):
                size = min(self.chunk_bytes, t.n_bytes - k * self.chunk_bytes)
                out.append(Op("h2d", f"{STREAM_PREFIX}{t.name} [{k + 1}/{n}]", h2d_s(self.scn.profile, size),
                               stage, phase))
        return tuple(out)

    def layer_unit(self, layer: int, phase: str) -> Unit:
        stage, tensors = f"layer {layer}", self.scn.spec.layer_tensors(layer)
        fixed = (self.tables.fixed_decode if phase == "decode" else self.tables.fixed_prefill)[stage]
        steps: list[Step] = [((Op("accelerator", f"layers.{layer}.elementwise", fixed.acc_s, stage, phase),),)]
        for t in tensors:
            if t.kind == "o_proj":
                steps += self.attention_steps(layer, phase, stage)
            steps += self.tensor_steps(t, phase, stage)
        lagged, memory = self.rule_parts(stage, phase)
        return Unit(self.copies(tensors, phase, stage), tuple(steps + lagged), memory)

    def head_tail(self, phase: str) -> Unit:
        """The head after the last layer: lm_head, final norm and argmax (the next step's
        draft forwards and embedding are appended by `units`)."""
        head = self.tables.stages[-1]
        fixed = (self.tables.fixed_decode if phase == "decode" else self.tables.fixed_prefill)["head"]
        steps = [s for t in head.tensors if t.group == "head" for s in self.tensor_steps(t, phase, "head")]
        steps.append(((Op("accelerator", "norm+argmax", fixed.acc_s, "head", phase),),))
        lagged, memory = self.rule_parts("head", phase)
        return Unit(self.copies(head.tensors, phase, "head"), tuple(steps + lagged), memory)

    def step_start(self, phase: str) -> list[Step]:
        """Draft forwards (decode) or the draft's prefill, then the embedding lookup."""
        pred, steps = self.prediction, []
        gamma = self.scn.gamma if self.scn.draft is not None else 0
        if phase == "decode" and gamma:
            steps += [((Op("accelerator", f"draft forward {i + 1}/{gamma}", pred.draft_step_s / gamma,
                            "draft", "draft"),),) for i in range(gamma)]
        if phase == "prefill" and pred.draft_prefill_s > 0:
            steps.append(((Op("accelerator", "draft prefill", pred.draft_prefill_s, "draft", "draft"),),))
        embed = [t for t in self.tables.stages[-1].tensors if t.group == "embed"]
        return steps + [s for t in embed for s in self.tensor_steps(t, phase, "head")]

    def units(self, decode_steps: int) -> tuple[list[Unit], int, list[int]]:
        """Prefill then decode steps 0..decode_steps, as one sequence of units; also the index
        of the last prefill unit and of each decode step's layer-0 unit."""
        layers = {ph: [self.layer_unit(i, ph) for i in range(self.scn.spec.layers)] for ph in ("prefill", "decode")}
        tails = {ph: self.head_tail(ph) for ph in ("prefill", "decode")}
        decode_start = self.step_start("decode")
        units = [Unit((), tuple(self.step_start("prefill"))), *layers["prefill"]]
        prefill_last, anchors = len(units), []
        units.append(replace(tails["prefill"], steps=tails["prefill"].steps + tuple(decode_start)))
        for k in range(decode_steps + 1):
            anchors.append(len(units))
            units += layers["decode"]
            tail = tails["decode"]
            units.append(replace(tail, steps=tail.steps + tuple(decode_start if k < decode_steps else [])))
        return units, prefill_last, anchors


# ---- reading the timeline -------------------------------------------------------------------

def _clipped_s(tl: Timeline, i: int, lo: float, hi: float) -> float:
    return max(0.0, min(tl.end[i], hi) - max(tl.start[i], lo))


def _per_stage_s(tl: Timeline, steps: list[list[int]], window_end: float) -> dict[str, float]:
    """Time from the start of each step to the start of the next, summed by stage."""
    starts = [min(tl.start[i] for i in ids) for ids in steps] + [window_end]
    out: dict[str, float] = {}
    for k, ids in enumerate(steps):
        stage = tl.ops[ids[0]].stage
        out[stage] = out.get(stage, 0.0) + starts[k + 1] - starts[k]
    return out


def _critical_path(tl: Timeline, anchor: int, lo: float, hi: float) -> tuple[list[int], dict[str, float]]:
    path, by_kind = [], dict.fromkeys(KINDS, 0.0)
    i = tl.binding[anchor]
    while i >= 0 and tl.end[i] > lo:
        if tl.end[i] > tl.start[i]:
            path.append(i)
            by_kind[kind_of(tl.ops[i].resource, tl.ops[i].name)] += _clipped_s(tl, i, lo, hi)
        i = tl.binding[i]
    return path[::-1], by_kind


def simulate_plan(plan: Plan, profile: HardwareProfile | None = None, buffers: int = 2, cpu_workers: int = 1,
                  decode_steps: int = 3, prefetch: str = "next-stage", copy_chunk_bytes: int = 0) -> SimResult:
    """Simulate prefill and `decode_steps` decode steps of `plan` (on `profile`, default the plan's).
    `copy_chunk_bytes` > 0 copies weights in pieces of that size, issued one after another."""
    for name, value, least in (("buffers", buffers, 1), ("cpu_workers", cpu_workers, 1),
                               ("decode_steps", decode_steps, 1), ("copy_chunk_bytes", copy_chunk_bytes, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SimulationError(f"{name}: must be a whole number of at least {least}, got {value!r}")
    if prefetch not in PREFETCH_MODES:
        raise SimulationError(f"prefetch: unknown {prefetch!r}; expected one of {', '.join(PREFETCH_MODES)}")
    check_placement(plan.model, plan.placement)
    builder = _Builder(plan.scenario(profile), plan.placement, copy_chunk_bytes)
    units, prefill_last, anchors = builder.units(decode_steps)
    ops, deps, steps_of = instantiate(units, buffers, prefetch, copy_chunk_bytes > 0)
    tl = schedule(ops, deps, cpu_workers)
    prefill_s = max(tl.end[i] for ids in steps_of[prefill_last] for i in ids if ops[i].phase == "prefill")
    return SimResult(**_read_decode(tl, steps_of, anchors, builder.prediction, cpu_workers),
                     prefill_s=prefill_s, ilp_prefill_s=builder.prediction.prefill_s, buffers=buffers,
                     cpu_workers=cpu_workers, prefetch=prefetch, copy_chunk_bytes=copy_chunk_bytes)


def _read_decode(tl: Timeline, steps_of: list[list[list[int]]], anchors: list[int], pred: Prediction,
                 cpu_workers: int) -> dict:
    """Step time, per-stage times, busy shares and critical path of the last simulated step,
    the window from layer 0 of step n-1 to layer 0 of step n; events up to its end."""
    s = [min(tl.start[i] for i in steps_of[u][0]) for u in anchors]
    n = len(anchors) - 1
    lo, hi = s[n - 1], s[n]
    window = [ids for u in range(anchors[n - 1], anchors[n]) for ids in steps_of[u]]
    sim_stage = _per_stage_s(tl, window, hi)
    ilp_stage = {st.name: st.decode_s for st in pred.stages}
    if pred.draft_step_s > 0:
        ilp_stage["draft"] = pred.draft_step_s
    path, by_kind = _critical_path(tl, min(steps_of[anchors[n]][0], key=lambda i: tl.start[i]), lo, hi)
    busy = {}
    for r in RESOURCES:
        total = sum(_clipped_s(tl, i, lo, hi) for i, op in enumerate(tl.ops) if op.resource == r)
        busy[r] = total / ((hi - lo) * (cpu_workers if r == "cpu" else 1)) if hi > lo else 0.0
    events = [Event(op.resource, op.name, tl.start[i], tl.end[i], op.stage, op.phase)
              for i, op in enumerate(tl.ops) if tl.end[i] > tl.start[i] and tl.start[i] < hi]
    return dict(
        events=tuple(sorted(events, key=lambda e: (e.start_s, RESOURCES.index(e.resource)))),
        decode_step_s=(s[n] - s[1]) / (n - 1) if n >= 2 else s[1] - s[0],
        busy_fraction=busy, critical_path=tuple(tl.ops[i].name for i in path),
        ilp_decode_step_s=pred.decode_step_s,
        per_stage_diff_s=tuple((name, sim_stage.get(name, 0.0) - ilp) for name, ilp in ilp_stage.items()),
        critical_by_kind_s=by_kind, step_starts_s=tuple(s))
