"""Measured timeline of a run, in the simulator's event format (planner.simulate.events.Event), so
`offplan run --trace` and `offplan simulate --trace` open side by side in Perfetto.

Events are intervals in seconds from the recorder's start. Host-side work (cpu matmuls, the
loopback's copy thread) is timed with the host clock. Accelerator intervals and weight copies
are stamped without synchronising: on CUDA a stamp is a timing event recorded on a stream
(the interval is when that stream ran the work) and is converted to seconds when the run is
over, against a reference event recorded at the start; on the loopback device (the CPU twin)
a stamp is the host clock itself."""

from __future__ import annotations

import threading
import time

import torch

from planner.simulate.events import Event

MAX_EVENTS = 200_000  # keeps a long run's trace file reasonable; later events are dropped


class Recorder:
    def __init__(self, cuda_device: torch.device | None = None):
        self.cuda_device = cuda_device
        self.events: list[Event] = []
        self.phase = "prefill"
        self.dropped = 0
        self._stamped: list[tuple] = []  # (resource, name, start stamp, end stamp, stage, phase)
        self._lock = threading.Lock()  # the copy thread records too
        self._start()

    def _start(self) -> None:
        self._reference = None
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)  # the reference event completes at t0
            self._reference = torch.cuda.Event(enable_timing=True)
            self._reference.record(torch.cuda.current_stream(self.cuda_device))
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def stamp(self) -> float | torch.cuda.Event:
        """A point on the accelerator's timeline: a timing event recorded on the current
        stream (CUDA), or the host clock (loopback, where the accelerator's work is done)."""
        if self.cuda_device is None:
            return self.now()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.cuda_device))
        return event

    def _seconds(self, stamp: float | torch.cuda.Event) -> float:
        if isinstance(stamp, float):
            return stamp
        stamp.synchronize()
        return self._reference.elapsed_time(stamp) / 1e3  # elapsed_time is in milliseconds

    def add(self, resource: str, name: str, start_s: float, end_s: float, stage: str) -> None:
        with self._lock:
            if len(self.events) + len(self._stamped) >= MAX_EVENTS:
                self.dropped += 1
                return
            self.events.append(Event(resource, name, start_s, end_s, stage, self.phase))

    def add_stamped(self, resource: str, name: str, start, end, stage: str) -> None:
        """An interval between two `stamp()`s (or CUDA timing events), resolved by finish()."""
        with self._lock:
            if len(self.events) + len(self._stamped) >= MAX_EVENTS:
                self.dropped += 1
                return
            self._stamped.append((resource, name, start, end, stage, self.phase))

    def finish(self) -> list[Event]:
        """All events, the stamped ones converted to seconds (waits for their stamps)."""
        with self._lock:
            stamped, self._stamped = self._stamped, []
            for resource, name, start, end, stage, phase in stamped:
                self.events.append(Event(resource, name, self._seconds(start), self._seconds(end), stage, phase))
            self.events.sort(key=lambda e: e.start_s)
            return list(self.events)

    def clear(self) -> None:
        with self._lock:
            self.events.clear()
            self._stamped.clear()
            self.dropped = 0
        self._start()
