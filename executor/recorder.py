"""Measured timeline of a run, in the simulator's event format (planner.simulate.engine.Event), so
`offplan run --trace` and `offplan simulate --trace` open side by side in Perfetto.

Events are wall-clock intervals relative to the recorder's start. On the loopback device
every interval is exact; on CUDA the accelerator intervals are taken after a synchronize
(per-layer hooks) and weight copies are not recorded (their events are asynchronous)."""

from __future__ import annotations

import threading
import time

from planner.simulate.engine import Event

MAX_EVENTS = 200_000  # keeps a long run's trace file reasonable; later events are dropped


class Recorder:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.events: list[Event] = []
        self.phase = "prefill"
        self.dropped = 0
        self._lock = threading.Lock()  # the copy thread records too

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, resource: str, name: str, start_s: float, end_s: float, stage: str) -> None:
        with self._lock:
            if len(self.events) >= MAX_EVENTS:
                self.dropped += 1
                return
            self.events.append(Event(resource, name, start_s, end_s, stage, self.phase))

    def clear(self) -> None:
        with self._lock:
            self.events.clear()
            self.dropped = 0
            self.t0 = time.perf_counter()
