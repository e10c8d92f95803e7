"""The simulator's scheduler: op templates grouped into prefetch units, turned into tasks
with dependencies and list-scheduled on the resources (planner/simulate/engine.py builds
the units from a plan and reads the timeline)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from planner.simulate.events import RESOURCES

@dataclass(frozen=True)
class Op:
    resource: str
    name: str
    duration_s: float
    stage: str
    phase: str


Step = tuple[tuple[Op, ...], ...]  # concurrent branches, each a chain; the next step waits for all


@dataclass(frozen=True)
class Unit:
    """One slot of the prefetch schedule: the weight copies it waits for, then its steps;
    `memory` runs on the memory bus from the unit's start, and the next unit waits for it."""

    copies: tuple[Op, ...]
    steps: tuple[Step, ...]
    memory: Op | None = None


@dataclass
class Timeline:
    ops: list[Op]
    start: list[float]
    end: list[float]
    binding: list[int]  # the task whose end let this one start (-1: none)


def instantiate(units: list[Unit], buffers: int, prefetch: str, chained_copies: bool):
    """Tasks with dependencies; per unit the task ids of each step (in program order).
    Chained copies are issued one after another, so activation transfers slip in between."""
    ops, deps, steps_of, unit_end, last_copy = [], [], [], [], []
    streamed = [i for i, u in enumerate(units) if u.copies] if prefetch == "next-streamed" else list(range(len(units)))
    slot_after = {u: streamed[k - buffers] for k, u in enumerate(streamed) if k >= buffers}
    prev, last_acc = [], -1

    def add(op: Op, on: list[int]) -> int:
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
        memory = [add(unit.memory, prev + copy_ids)] if unit.memory is not None else []
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
        prev = prev + memory  # the next stage starts once this one's bus time has passed
        steps_of.append(steps)
        unit_end.append(prev)
    return ops, deps, steps_of


def schedule(ops: list[Op], deps: list[list[int]], cpu_workers: int) -> Timeline:
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
    return Timeline(ops, start, end, binding)


