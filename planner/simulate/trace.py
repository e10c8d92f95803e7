"""Chrome trace (Trace Event Format, JSON object form) writing and reading.

One file format for the simulated timeline and the executor's measured one: complete
events (`ph: "X"`) in microseconds, one process per phase (prefill, decode, draft), one
thread per resource (accelerator, h2d, d2h, cpu; overlapping cpu work gets extra lanes
"cpu #2", ...). Each event's args keep its exact times in seconds, its stage and its
resource, so `read_trace(write_trace(...))` gives back the same events. Opens in
chrome://tracing and https://ui.perfetto.dev.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from planner.errors import OffplanError
from planner.schema import atomic_write
from planner.simulate.engine import SimResult
from planner.simulate.events import PHASES, RESOURCES, Event, event_kind
from planner.plan.record import Plan

US_PER_S = 1e6
SAMPLED_FIRST_STEPS = 8  # long generations: the first steps and the last one are written
_LANE_SEPARATOR = " #"


class TraceError(OffplanError):
    """A trace file is missing or is not a Chrome trace offplan can read."""


def _lanes(events: list[Event]) -> list[int]:
    """Lane of each event within its (phase, resource): the first lane free at its start."""
    lane_ends: dict[tuple[str, str], list[float]] = {}
    lanes = [0] * len(events)
    for i in sorted(range(len(events)), key=lambda k: (events[k].start_s, events[k].end_s)):
        e = events[i]
        ends = lane_ends.setdefault((e.phase, e.resource), [])
        free = next((k for k, end in enumerate(ends) if end <= e.start_s), len(ends))
        if free == len(ends):
            ends.append(0.0)
        ends[free] = e.end_s
        lanes[i] = free
    return lanes


def to_chrome_trace(events, metadata: dict) -> dict:
    """`{"traceEvents": [...], "otherData": metadata}` for chrome://tracing and Perfetto."""
    events = list(events)
    phases = list(PHASES) + sorted({e.phase for e in events} - set(PHASES))
    resources = list(RESOURCES) + sorted({e.resource for e in events} - set(RESOURCES))
    lanes = _lanes(events)
    tids: dict[tuple[str, int], int] = {}
    for e, lane in sorted(zip(events, lanes), key=lambda p: (resources.index(p[0].resource), p[1])):
        tids.setdefault((e.resource, lane), len(tids) + 1)
    out = []
    used = sorted({(phases.index(e.phase) + 1, e.phase) for e in events})
    for pid, phase in used:
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": phase}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for (resource, lane), tid in tids.items():
            label = resource if lane == 0 else f"{resource}{_LANE_SEPARATOR}{lane + 1}"
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": label}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    for e, lane in zip(events, lanes):
        out.append({"name": e.name, "cat": event_kind(e), "ph": "X", "ts": e.start_s * US_PER_S,
                    "dur": (e.end_s - e.start_s) * US_PER_S, "pid": phases.index(e.phase) + 1,
                    "tid": tids[(e.resource, lane)],
                    "args": {"stage": e.stage, "resource": e.resource, "start_s": e.start_s, "end_s": e.end_s}})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": dict(metadata)}


def write_trace(path, events, metadata: dict) -> None:
    """Write a Chrome trace JSON file atomically (never half-written)."""
    text = json.dumps(to_chrome_trace(events, metadata), separators=(",", ":"), default=str)
    atomic_write(path, text)


def read_trace(path) -> tuple[list[Event], dict]:
    """Events and metadata of a Chrome trace written by offplan (or any X events with names
    of processes as phases and threads as resources)."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"{p}: trace file not found")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TraceError(f"{p}: not a JSON trace file; write one with `offplan simulate --trace`") from None
    raw = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(raw, list):
        raise TraceError(f"{p}: no traceEvents list; expected Chrome trace JSON")
    processes, threads = {}, {}
    for ev in raw:
        if isinstance(ev, dict) and ev.get("ph") == "M":
            name = (ev.get("args") or {}).get("name", "")
            if ev.get("name") == "process_name":
                processes[ev.get("pid")] = name
            elif ev.get("name") == "thread_name":
                threads[(ev.get("pid"), ev.get("tid"))] = name.split(_LANE_SEPARATOR)[0]
    events = []
    for k, ev in enumerate(raw):
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        try:
            args = ev.get("args") or {}
            start = float(args["start_s"]) if "start_s" in args else float(ev["ts"]) / US_PER_S
            end = float(args["end_s"]) if "end_s" in args else start + float(ev.get("dur", 0.0)) / US_PER_S
            resource = args.get("resource") or threads.get((ev.get("pid"), ev.get("tid")), str(ev.get("tid")))
            events.append(Event(str(resource), str(ev["name"]), start, end, str(args.get("stage", "")),
                                processes.get(ev.get("pid"), str(ev.get("pid")))))
        except (KeyError, TypeError, ValueError):
            raise TraceError(f"{p}: traceEvents[{k}] lacks a name, ts or dur") from None
    metadata = data.get("otherData", {}) if isinstance(data, dict) else {}
    return events, dict(metadata)


# ---- windows of the simulated timeline -------------------------------------------------------

def decode_step_events(result: SimResult, step: int = -1) -> list[Event]:
    """Events of one simulated decode step (default: the steady-state one, the last), clipped
    to it: work running into the step from the one before shows from the step's start."""
    s = result.step_starts_s
    k = step % (len(s) - 1)
    lo, hi = s[k], s[k + 1]
    return [Event(e.resource, e.name, max(e.start_s, lo), min(e.end_s, hi), e.stage, e.phase)
            for e in result.events if e.start_s < hi and e.end_s > lo]


# ---- the whole workload ------------------------------------------------------------------

def total_decode_steps(plan: Plan) -> int:
    """Verify steps the workload runs after prefill (its first token comes from prefill)."""
    return math.ceil(plan.scenario().decode_steps - 1e-9)


def shown_steps(n_steps: int) -> list[int]:
    """Decode steps written to a whole-workload trace: all, or the first few and the last."""
    if n_steps <= SAMPLED_FIRST_STEPS + 1:
        return list(range(n_steps))
    return list(range(SAMPLED_FIRST_STEPS)) + [n_steps - 1]


def _step_start_s(result: SimResult, k: int) -> float:
    """Start of decode step k: simulated for the first steps, then steady-state steps."""
    s = result.step_starts_s
    last = len(s) - 1
    return s[k] if k <= last else s[last] + (k - last) * (s[last] - s[last - 1])


def whole_workload_events(result: SimResult, plan: Plan) -> list[Event]:
    """Prefill, then every decode step at its place in time; steps beyond those simulated repeat
    the steady-state step. Long generations keep the first steps and the last (see
    `workload_metadata`), so files stay small while the time axis stays true."""
    s = result.step_starts_s
    out = [e for e in result.events if e.start_s < s[0]]
    n_sim = len(s) - 1
    for k in shown_steps(total_decode_steps(plan)):
        src = min(k, n_sim - 1)
        shift = _step_start_s(result, k) - s[src]
        out += [Event(e.resource, e.name, e.start_s + shift, e.end_s + shift, e.stage, e.phase)
                for e in result.events if s[src] <= e.start_s < s[src + 1]]
    return out


def workload_metadata(result: SimResult, plan: Plan) -> dict:
    """What a whole-workload trace contains, for its `otherData`."""
    n = total_decode_steps(plan)
    shown = shown_steps(n)
    meta = {"model": plan.model.name, "profile": plan.profile.name, "strategy": plan.provenance.strategy,
            "buffers": result.buffers, "cpu_workers": result.cpu_workers, "prefetch": result.prefetch,
            "copy_chunk_bytes": result.copy_chunk_bytes,
            "prefill_s": result.prefill_s, "decode_step_s": result.decode_step_s,
            "ilp_prefill_s": result.ilp_prefill_s, "ilp_decode_step_s": result.ilp_decode_step_s,
            "decode_steps": n, "decode_steps_shown": shown,
            "simulated_total_s": _step_start_s(result, n) if n else result.prefill_s}
    if len(shown) < n:
        meta["note"] = (f"decode steps {SAMPLED_FIRST_STEPS}..{n - 2} are omitted; each repeats the "
                        "steady-state step")
    return meta
