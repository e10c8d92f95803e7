"""Discrete-event simulation of a plan: every op, weight copy and activation transfer as an
event on the resources that really run concurrently (DESIGN §4, "The simulator").

Resources: `accelerator` (one in-order stream), the `h2d` and `d2h` link directions (each
serves transfers in the order they become ready, so an activation queues behind weight
copies already issued), and `cpu` (`cpu_workers` threads). Ops run in execution order, each
after the one before (elementwise, q, k, v, attention, o, gate, up, down; the head is
lm_head, final norm and argmax, then the next step's draft forwards and embedding); hybrid
attention and compensation branches run their host side concurrently and join before the
next op, so at most one host task runs at a time in today's op graph.

Streaming: a stage's weights are copied into one of `buffers` slots; the stage's first op
waits for its whole copy, and a copy starts once its slot is free (the stage that last used
it has finished). With `prefetch="next-stage"` (DESIGN §4, the ILP's model) every stage
takes the next slot in turn: 2 buffers reproduce the ILP's per-stage max(compute, next
copy) and 1 buffer never beats it. With `"next-streamed"` only stages that stream take
slots, as executor/streams.py does, so copies run ahead across resident stages.
`copy_chunk_bytes` splits copies into pieces issued one after another, letting activation
transfers through between pieces.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import partial

from planner.cost.options import Scenario, activation_transfer_s, attention_decode_parts, compensation_branch, matmul_rows
from planner.errors import OffplanError
from planner.hardware.profile import HardwareProfile
from planner.model.placement import Placement, check_placement
from planner.plan.record import Plan
from planner.cost.evaluate import Prediction, chosen_options, find_option, option_tables, predict
from planner.cost.moe import bank_parts
from planner.cost.roofline import PathCost, h2d_s
from planner.model.spec import TensorSpec

RESOURCES = ("accelerator", "h2d", "d2h", "cpu")
PHASES = ("prefill", "decode", "draft")
PREFETCH_MODES = ("next-stage", "next-streamed")
STREAM_PREFIX = "stream "  # event names of weight copies: "stream layers.3.mlp.up_proj"
KINDS = ("compute", "stream", "transfer", "cpu")


class SimulationError(OffplanError):
    """A simulation option is out of range."""


@dataclass(frozen=True)
class Event:
    resource: str  # accelerator | h2d | d2h | cpu
    name: str
    start_s: float
    end_s: float
    stage: str  # "layer 3", "head", "draft"
    phase: str  # prefill | decode | draft


def event_kind(event: Event) -> str:
    """compute | stream | transfer | cpu: what an event spends its resource on."""
    return _kind(event.resource, event.name)


def _kind(resource: str, name: str) -> str:
    if resource == "accelerator":
        return "compute"
    if resource == "cpu":
        return "cpu"
    return "stream" if name.startswith(STREAM_PREFIX) else "transfer"


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


# ---- cost pieces cost.py only exposes merged (they belong there) ---------------------------

# ---- op templates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Op:
    resource: str
    name: str
    duration_s: float
    stage: str
    phase: str


Step = tuple[tuple[_Op, ...], ...]  # concurrent branches, each a chain; the next step waits for all


@dataclass(frozen=True)
class _Unit:
    """One slot of the prefetch schedule: the weight copies it waits for, then its steps."""

    copies: tuple[_Op, ...]
    steps: tuple[Step, ...]


class _Builder:
    """Turns the chosen options of a plan into op templates, phase by phase."""

    def __init__(self, scn: Scenario, placement: Placement, chunk_bytes: int):
        self.scn, self.chunk_bytes = scn, chunk_bytes
        self.tables = option_tables(scn)
        self.tensor, self.kv = chosen_options(self.tables, placement)
        self.prediction = predict(self.tables, self.tensor, self.kv)

    def tensor_steps(self, t: TensorSpec, phase: str, stage: str) -> list[Step]:
        opt = self.tensor[t.name]
        cost: PathCost = getattr(opt, phase)
        op = partial(_Op, stage=stage, phase=phase)
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
        op = partial(_Op, stage=stage, phase=phase)
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

    def copies(self, tensors, phase: str, stage: str) -> tuple[_Op, ...]:
        """Weight copies of a stage: one per streamed tensor, or `chunk_bytes` pieces of it."""
        link, out = "decode_link_s" if phase == "decode" else "prefill_link_s", []
        for t in tensors:
            whole_s = getattr(self.tensor[t.name], link)
            if whole_s <= 0:
                continue
            n = -(-t.n_bytes // self.chunk_bytes) if self.chunk_bytes else 1
            if n == 1:
                out.append(_Op("h2d", STREAM_PREFIX + t.name, whole_s, stage, phase))
                continue
            for k in range(n):
                size = min(self.chunk_bytes, t.n_bytes - k * self.chunk_bytes)
                out.append(_Op("h2d", f"{STREAM_PREFIX}{t.name} [{k + 1}/{n}]", h2d_s(self.scn.profile, size),
                               stage, phase))
        return tuple(out)

    def layer_unit(self, layer: int, phase: str) -> _Unit:
        stage, tensors = f"layer {layer}", self.scn.spec.layer_tensors(layer)
        fixed = (self.tables.fixed_decode if phase == "decode" else self.tables.fixed_prefill)[stage]
        steps: list[Step] = [((_Op("accelerator", f"layers.{layer}.elementwise", fixed.acc_s, stage, phase),),)]
        for t in tensors:
            if t.kind == "o_proj":
                steps += self.attention_steps(layer, phase, stage)
            steps += self.tensor_steps(t, phase, stage)
        return _Unit(self.copies(tensors, phase, stage), tuple(steps))

    def head_tail(self, phase: str) -> tuple[tuple[_Op, ...], list[Step]]:
        """Copies and steps of the head after the last layer: lm_head, final norm and argmax."""
        head = self.tables.stages[-1]
        fixed = (self.tables.fixed_decode if phase == "decode" else self.tables.fixed_prefill)["head"]
        steps = [s for t in head.tensors if t.group == "head" for s in self.tensor_steps(t, phase, "head")]
        steps.append(((_Op("accelerator", "norm+argmax", fixed.acc_s, "head", phase),),))
        return self.copies(head.tensors, phase, "head"), steps

    def step_start(self, phase: str) -> list[Step]:
        """Draft forwards (decode) or the draft's prefill, then the embedding lookup."""
        pred, steps = self.prediction, []
        gamma = self.scn.gamma if self.scn.draft is not None else 0
        if phase == "decode" and gamma:
            steps += [((_Op("accelerator", f"draft forward {i + 1}/{gamma}", pred.draft_step_s / gamma,
                            "draft", "draft"),),) for i in range(gamma)]
        if phase == "prefill" and pred.draft_prefill_s > 0:
            steps.append(((_Op("accelerator", "draft prefill", pred.draft_prefill_s, "draft", "draft"),),))
        embed = [t for t in self.tables.stages[-1].tensors if t.group == "embed"]
        return steps + [s for t in embed for s in self.tensor_steps(t, phase, "head")]

    def units(self, decode_steps: int) -> tuple[list[_Unit], int, list[int]]:
        """Prefill then decode steps 0..decode_steps, as one sequence of units; also the index
        of the last prefill unit and of each decode step's layer-0 unit."""
        layers = {ph: [self.layer_unit(i, ph) for i in range(self.scn.spec.layers)] for ph in ("prefill", "decode")}
        tails = {ph: self.head_tail(ph) for ph in ("prefill", "decode")}
        decode_start = self.step_start("decode")
        units = [_Unit((), tuple(self.step_start("prefill"))), *layers["prefill"]]
        prefill_last, anchors = len(units), []
        copies, steps = tails["prefill"]
        units.append(_Unit(copies, tuple(steps + decode_start)))
        for k in range(decode_steps + 1):
            anchors.append(len(units))
            units += layers["decode"]
            copies, steps = tails["decode"]
            units.append(_Unit(copies, tuple(steps + (decode_start if k < decode_steps else []))))
        return units, prefill_last, anchors


# ---- the scheduler ---------------------------------------------------------------------------

@dataclass
class _Timeline:
    ops: list[_Op]
    start: list[float]
    end: list[float]
    binding: list[int]  # the task whose end let this one start (-1: none)


def _instantiate(units: list[_Unit], buffers: int, prefetch: str, chained_copies: bool):
    """Tasks with dependencies; per unit the task ids of each step (in program order).
    Chained copies are issued one after another, so activation transfers slip in between."""
    ops, deps, steps_of, unit_end, last_copy = [], [], [], [], []
    streamed = [i for i, u in enumerate(units) if u.copies] if prefetch == "next-streamed" else list(range(len(units)))
    slot_after = {u: streamed[k - buffers] for k, u in enumerate(streamed) if k >= buffers}
    prev, last_acc = [], -1

    def add(op: _Op, on: list[int]) -> int:
        nonlocal last_acc
        ops.append(op)
        deps.append(on + ([last_acc] if op.resource == "accelerator" and last_acc >= 0 else []))
        if op.resource == "accelerator":
            last_acc = len(ops) - 1
        return len(ops) - 1

    for i, unit in enumerate(units):
        free = unit_end[slot_after[i]] if i in slot_after else []
        copy_ids = []
        for op in unit.copies:
            copy_ids.append(add(op, list(free) + last_copy))
            last_copy = [copy_ids[-1]] if chained_copies else []
        steps, first = [], True
        for step in unit.steps:
            ids, join = [], []
            for branch in step:
                on = prev + (copy_ids if first else [])
                for op in branch:
                    on = [add(op, on)]
                    ids.append(on[0])
                join += on
            steps.append(ids)
            prev, first = join, False
        steps_of.append(steps)
        unit_end.append(prev)
    return ops, deps, steps_of


def _schedule(ops: list[_Op], deps: list[list[int]], cpu_workers: int) -> _Timeline:
    """Event-driven list scheduling: each resource serves its ready tasks in order of readiness."""
    n = len(ops)
    start, end, binding = [0.0] * n, [0.0] * n, [-1] * n
    ready_at, last_dep, waiting = [0.0] * n, [-1] * n, [len(d) for d in deps]
    dependents: list[list[int]] = [[] for _ in range(n)]
    for i, ds in enumerate(deps):
        for d in ds:
            dependents[d].append(i)
    queues = {r: [] for r in RESOURCES}
    idle = {r: [(w, -1) for w in range(cpu_workers if r == "cpu" else 1)] for r in RESOURCES}
    for i in range(n):
        if not waiting[i]:
            heapq.heappush(queues[ops[i].resource], (0.0, i))
    running: list[tuple[float, int, int]] = []
    now, done = 0.0, 0
    while done < n:
        for r, queue in queues.items():
            while queue and idle[r]:
                ready, i = heapq.heappop(queue)
                worker, previous = idle[r].pop()
                start[i], end[i] = now, now + ops[i].duration_s
                binding[i] = last_dep[i] if ready >= now else previous
                heapq.heappush(running, (end[i], i, worker))
        now = running[0][0]
        while running and running[0][0] <= now:
            _, i, worker = heapq.heappop(running)
            idle[ops[i].resource].append((worker, i))
            done += 1
            for j in dependents[i]:
                waiting[j] -= 1
                if end[i] >= ready_at[j]:
                    ready_at[j], last_dep[j] = end[i], i
                if not waiting[j]:
                    heapq.heappush(queues[ops[j].resource], (ready_at[j], j))
    return _Timeline(ops, start, end, binding)


# ---- reading the timeline -------------------------------------------------------------------

def _clipped_s(tl: _Timeline, i: int, lo: float, hi: float) -> float:
    return max(0.0, min(tl.end[i], hi) - max(tl.start[i], lo))


def _per_stage_s(tl: _Timeline, steps: list[list[int]], window_end: float) -> dict[str, float]:
    """Time from the start of each step to the start of the next, summed by stage."""
    starts = [min(tl.start[i] for i in ids) for ids in steps] + [window_end]
    out: dict[str, float] = {}
    for k, ids in enumerate(steps):
        stage = tl.ops[ids[0]].stage
        out[stage] = out.get(stage, 0.0) + starts[k + 1] - starts[k]
    return out


def _critical_path(tl: _Timeline, anchor: int, lo: float, hi: float) -> tuple[list[int], dict[str, float]]:
    path, by_kind = [], dict.fromkeys(KINDS, 0.0)
    i = tl.binding[anchor]
    while i >= 0 and tl.end[i] > lo:
        if tl.end[i] > tl.start[i]:
            path.append(i)
            by_kind[_kind(tl.ops[i].resource, tl.ops[i].name)] += _clipped_s(tl, i, lo, hi)
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
    ops, deps, steps_of = _instantiate(units, buffers, prefetch, copy_chunk_bytes > 0)
    tl = _schedule(ops, deps, cpu_workers)
    prefill_s = max(tl.end[i] for ids in steps_of[prefill_last] for i in ids if ops[i].phase == "prefill")
    return SimResult(**_read_decode(tl, steps_of, anchors, builder.prediction, cpu_workers),
                     prefill_s=prefill_s, ilp_prefill_s=builder.prediction.prefill_s, buffers=buffers,
                     cpu_workers=cpu_workers, prefetch=prefetch, copy_chunk_bytes=copy_chunk_bytes)


def _read_decode(tl: _Timeline, steps_of: list[list[list[int]]], anchors: list[int], pred: Prediction,
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
