"""The terms of a stage and the rule that sums them, declared once (DESIGN §4).

A *stage* is one decoder layer, or the head (embedding, final norm, lm_head). In each phase
(a decode step, the prefill) a stage lasts the longest of three *operands*:

- `path`: its compute path (accelerator, host, activation transfers waited for, in program
  order) plus the compute it loses while the next stage's weights copy in beside it;
- `link`: the host-to-device link: the next stage's weights, prefetched while this stage
  computes, and the activations this stage sends up;
- `memory`: the host memory bus: this stage's reads and the traffic of that prefetch.

Each addend of an operand is a `Term`: what it costs (seconds read off an item's option),
the phase, the operand it joins, the stage it is charged to (`lag` 0: the stage holding the
item; 1: the stage before it, during which the item is prefetched) and the resource it
occupies. A stage's items are its tensors' options, its layer's KV option and its fixed
element-wise work (a PathCost).

Consumers, each reading this table and nothing else about how a stage sums:
planner/cost/evaluate.py (numbers), planner/solve/ilp.py (linear expressions over the
option variables), planner/cost/compensation.py (what the branches add) and
planner/simulate/engine.py (the memory operand and the lagged compute as stage events).

A `StageRule` is the data the rule takes: the terms, the phases that wrap around (decode: the
head is followed by layer 0 of the next step) and what the first stage waits for before a
phase that does not wrap starts. A runtime's overlap behaviour is a rule, derived from its
description (planner/cost/runtime.py) by `rule_for`: offplan's executor overlaps copies with
compute (`OFFPLAN_RULE`); a runtime that copies host-held weights for prompt batches one
layer at a time before computing (llama.cpp) gets the prefill `prefetch` term on its own
stage's path (`operand="path", lag=0`). A new cost term is one more `Term` below (and its
field on the options); a new overlap rule is a new `StageRule`, not a branch in the code
that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

from planner.cost.options import KVOption, TensorOption
from planner.cost.roofline import PathCost
from planner.cost.runtime import Runtime

PHASES = ("decode", "prefill")
OPERANDS = ("path", "link", "memory")  # in this order: ties go to the earlier one
Item = TensorOption | KVOption | PathCost  # PathCost: a stage's fixed element-wise work


@dataclass(frozen=True)
class Term:
    """One addend of a stage's time. `tensor`, `kv`, `fixed` read its seconds off a tensor
    option, a KV option or the fixed work (None: that kind of item never pays it)."""

    name: str
    phase: str  # decode | prefill
    operand: str  # path | link | memory
    lag: int  # 0: charged to the item's own stage; 1: to the stage before it
    resource: str  # accelerator | cpu | transfers | link | memory (Prediction.by_resource)
    tensor: Callable[[TensorOption], float] | None = None
    kv: Callable[[KVOption], float] | None = None
    fixed: Callable[[PathCost], float] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.phase, self.name

    def of(self, item: Item) -> float:
        read = self.fixed if isinstance(item, PathCost) else self.kv if isinstance(item, KVOption) else self.tensor
        return read(item) if read is not None else 0.0


def _phase_terms(phase: str, path: Callable, link: Callable, act_up: Callable, bus: Callable, fetch_bus: Callable,
                 slow: Callable, kv_act_up: Callable | None, kv_bus: Callable | None) -> tuple[Term, ...]:
    def on(resource: str):
        return lambda item: getattr(path(item), resource)

    return (
        Term("accelerator", phase, "path", 0, "accelerator", on("acc_s"), on("acc_s"), lambda p: p.acc_s),
        Term("host compute", phase, "path", 0, "cpu", on("cpu_s"), on("cpu_s"), lambda p: p.cpu_s),
        Term("transfers on the path", phase, "path", 0, "transfers", on("xfer_s"), on("xfer_s"), lambda p: p.xfer_s),
        Term("copy slowdown", phase, "path", 1, "accelerator", slow),
        Term("prefetch", phase, "link", 1, "link", link),
        Term("activations up", phase, "link", 0, "link", act_up, kv_act_up),
        Term("memory reads", phase, "memory", 0, "memory", bus, kv_bus),
        Term("prefetch traffic", phase, "memory", 1, "memory", fetch_bus),
    )


TERMS: tuple[Term, ...] = (
    *_phase_terms("decode", lambda o: o.decode, lambda o: o.decode_link_s, lambda o: o.decode_act_h2d_s,
                  lambda o: o.decode_bus_s, lambda o: o.decode_fetch_bus_s, lambda o: o.decode_fetch_slow_s,
                  lambda o: o.decode_act_h2d_s, lambda o: o.decode_bus_s),
    # Prefill attention sends nothing up and reads the fresh K/V on the accelerator.
    *_phase_terms("prefill", lambda o: o.prefill, lambda o: o.prefill_link_s, lambda o: o.prefill_act_h2d_s,
                  lambda o: o.prefill_bus_s, lambda o: o.prefill_fetch_bus_s, lambda o: o.prefill_fetch_slow_s,
                  None, None),
)


@dataclass(frozen=True)
class StageRule:
    """How a runtime overlaps a stage's work: the data the stage-sum rule takes."""

    name: str
    terms: tuple[Term, ...]
    cyclic_phases: tuple[str, ...]  # the last stage is followed by the first (the next step)
    start_operands: tuple[str, ...]  # of the first stage's lagged terms, what a non-cyclic phase waits for

    def phase_terms(self, phase: str) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.phase == phase)

    def term(self, phase: str, name: str) -> Term:
        return next(t for t in self.terms if t.key == (phase, name))

    def following(self, i: int, n: int, phase: str) -> int | None:
        """The stage after stage i of n in `phase` (None: the phase ends with it)."""
        if i + 1 < n:
            return i + 1
        return 0 if phase in self.cyclic_phases else None


# offplan's executor: a copy thread prefetches the next stage into a second buffer while the
# current one computes, through decode steps back to back; prefill waits for the first
# stage's copy only (its bus traffic and the compute it slows are left out: nothing runs yet).
OFFPLAN_RULE = StageRule("offplan", TERMS, cyclic_phases=("decode",), start_operands=("link",))


def rule_for(runtime: Runtime) -> StageRule:
    """The stage rule of `runtime`: a prefill copy that precedes its compute instead of
    overlapping the stage before is charged to its own stage's path."""
    if runtime.prefill_copy_overlapped:
        return OFFPLAN_RULE if runtime.name == OFFPLAN_RULE.name else replace(OFFPLAN_RULE, name=runtime.name)
    terms = tuple(replace(t, operand="path", lag=0) if t.key == ("prefill", "prefetch") else t
                  for t in OFFPLAN_RULE.terms)
    return StageRule(runtime.name, terms, OFFPLAN_RULE.cyclic_phases, ())


def term_sums(rule: StageRule, phase: str, items: Iterable[Item]) -> dict[Term, float]:
    """Seconds of every term of `phase` over one stage's items."""
    items = list(items)
    return {t: sum(t.of(item) for item in items) for t in rule.phase_terms(phase)}


@dataclass(frozen=True)
class StageSum:
    """One stage in one phase: the seconds of every term charged to it (its own items' lag-0
    terms and the following stage's lag-1 terms), and the max over operands."""

    terms: tuple[tuple[Term, float], ...]
    hidden_cpu_s: float = 0.0  # host work overlapped with accelerator work: on no operand

    def operand_s(self, operand: str) -> float:
        return sum(s for t, s in self.terms if t.operand == operand)

    def lagged_s(self, operand: str) -> float:
        """What the following stage's items add to `operand` (prefetch, its traffic, slowdown)."""
        return sum(s for t, s in self.terms if t.operand == operand and t.lag == 1)

    @property
    def total_s(self) -> float:
        return max(self.operand_s(op) for op in OPERANDS)

    @property
    def bound(self) -> str:
        """The operand that sets the stage's time (the first of OPERANDS on a tie)."""
        values = [self.operand_s(op) for op in OPERANDS]
        return OPERANDS[values.index(max(values))]

    @property
    def path(self) -> PathCost:
        by = {r: sum(s for t, s in self.terms if t.operand == "path" and t.resource == r)
              for r in ("accelerator", "cpu", "transfers")}
        return PathCost(by["accelerator"], by["cpu"], by["transfers"], self.hidden_cpu_s)

    def by_resource(self) -> dict[str, float]:
        """The stage's time spent per resource: the terms of the operand that bounds it."""
        out: dict[str, float] = {}
        for t, s in self.terms:
            if t.operand == self.bound:
                out[t.resource] = out.get(t.resource, 0.0) + s
        return out


def stage_sum(rule: StageRule, phase: str, own: dict[Term, float], following: dict[Term, float] | None,
              hidden_cpu_s: float = 0.0) -> StageSum:
    """The rule: lag-0 terms from the stage's own items, lag-1 terms from the following
    stage's (none when the phase ends with this stage)."""
    terms = [(t, own[t]) for t in rule.phase_terms(phase) if t.lag == 0]
    if following is not None:
        terms += [(t, following[t]) for t in rule.phase_terms(phase) if t.lag == 1]
    return StageSum(tuple(terms), hidden_cpu_s)


def start_s(rule: StageRule, phase: str, first: dict[Term, float]) -> float:
    """What a phase that does not wrap around waits for before its first stage."""
    if phase in rule.cyclic_phases:
        return 0.0
    return max((sum(first[t] for t in rule.phase_terms(phase) if t.lag == 1 and t.operand == op)
                for op in rule.start_operands), default=0.0)
