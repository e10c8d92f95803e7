"""Devices and the double-buffered prefetch engine (host buffers: executor/hostmem.py).

Everything CUDA-specific (a side stream, events) is in _CudaCopier, whose CPU twin
_ThreadCopier serves the loopback profile (the CPU plays the accelerator, DESIGN §6): there
the "link" is a real copy between separate buffers, done by a copy thread, so streaming
overlaps compute as it would over PCIe.

PyTorch semantics relied on (CUDA): a copy issued on a side stream with `non_blocking=True`
from page-locked memory runs asynchronously; `Event.record(stream)` marks its completion;
`current_stream().wait_event(e)` makes later compute wait for it without blocking the host;
the copy stream waits for an event recorded on the compute stream before it overwrites a
buffer slot that compute may still be reading; `elapsed_time` between two timing events
(both completed) gives the device time between them.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

_ALIGN_BYTES = 256  # slot offsets aligned for vectorised copies and matmuls
# Weight copies are issued in pieces this large so that small activation copies on the
# compute stream can use the h2d link between them instead of waiting for a whole layer
# (the simulator shows whole-tensor copies make cpu-computed layers pay compute + copy).
COPY_PIECE_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Devices:
    accelerator: torch.device
    host: torch.device

    @property
    def cuda(self) -> bool:
        return self.accelerator.type == "cuda"

    @staticmethod
    def detect() -> "Devices":
        if torch.cuda.is_available():
            return Devices(torch.device("cuda", torch.cuda.current_device()), torch.device("cpu"))
        return Devices(torch.device("cpu"), torch.device("cpu"))


def _pieces(dst: torch.Tensor, src: torch.Tensor):
    """(dst, src) flat views of at most COPY_PIECE_BYTES each (both contiguous, same size)."""
    flat_dst, flat_src = dst.view(-1), src.view(-1)
    step = max(COPY_PIECE_BYTES // src.element_size(), 1)
    for start in range(0, flat_src.numel(), step):
        yield flat_dst[start:start + step], flat_src[start:start + step]


def aligned_bytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` takes in a slot: its size rounded up to _ALIGN_BYTES."""
    return -(-tensor.numel() * tensor.element_size() // _ALIGN_BYTES) * _ALIGN_BYTES


class _CudaCopier:
    """Copies on a side stream. Each copy waits for an event recorded on the compute stream
    when it is issued (compute queued so far may still read the slot it overwrites) and is
    bracketed by two timing events on the copy stream: the second orders compute after it,
    both give the copy's duration on the device's clock."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.device = device
        self.recorder = None  # executor.recorder.Recorder when tracing

    def issue(self, jobs: list[tuple[torch.Tensor, torch.Tensor]], label: str = "") -> _CudaCopy:
        freed = torch.cuda.Event()
        freed.record(torch.cuda.current_stream(self.device))  # compute up to here is done with the slot
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(freed)
            start.record(self.stream)
            for dst, src in jobs:
                for dst_piece, src_piece in _pieces(dst, src):
                    dst_piece.copy_(src_piece, non_blocking=True)  # src is page-locked: asynchronous
            done.record(self.stream)
        if self.recorder is not None:
            self.recorder.add_stamped("h2d", f"stream {label}", start, done, label)
        return _CudaCopy(start, done)

    def wait(self, handle: _CudaCopy) -> torch.cuda.Event:
        """Later work on the compute stream waits for the copy; the host does not. Returns a
        timing event marking when the compute stream reached the wait."""
        compute = torch.cuda.current_stream(self.device)
        arrived = torch.cuda.Event(enable_timing=True)
        arrived.record(compute)
        compute.wait_event(handle.done)
        return arrived

    @staticmethod
    def stalled_s(handle: _CudaCopy, arrived: torch.cuda.Event) -> float:
        """How long compute stood still at the wait: from reaching it to the copy's end (0
        when the copy was done first). elapsed_time needs both events completed."""
        handle.done.synchronize()
        arrived.synchronize()
        return max(arrived.elapsed_time(handle.done) / 1e3, 0.0)

    @staticmethod
    def seconds(handle: _CudaCopy) -> float:
        """The copy's duration between its events (waits for the copy to finish)."""
        handle.done.synchronize()
        return handle.start.elapsed_time(handle.done) / 1e3  # elapsed_time is in milliseconds

    def close(self) -> None:
        self.stream.synchronize()


@dataclass(frozen=True, eq=False)
class _CudaCopy:
    start: torch.cuda.Event
    done: torch.cuda.Event


class _ThreadCopier:
    """CPU twin: one copy thread runs the copies in the order issued (as a stream does); the
    stage that needs a slot waits for its future, whose result is the copy's duration."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offplan-prefetch")
        self.recorder = None  # executor.recorder.Recorder when tracing

    @staticmethod
    def copy(jobs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for dst, src in jobs:
            dst.copy_(src)

    def _run(self, jobs: list[tuple[torch.Tensor, torch.Tensor]], label: str) -> float:
        began = self.recorder.now() if self.recorder else 0.0
        start = time.perf_counter()
        self.copy(jobs)
        seconds = time.perf_counter() - start
        if self.recorder:
            self.recorder.add("h2d", f"stream {label}", began, self.recorder.now(), label)
        return seconds

    def issue(self, jobs: list[tuple[torch.Tensor, torch.Tensor]], label: str = "") -> Future:
        return self.pool.submit(self._run, jobs, label)

    @staticmethod
    def wait(handle: Future) -> float:
        """Blocks until the copy is done (compute runs on this thread); returns the time."""
        start = time.perf_counter()
        handle.result()
        return time.perf_counter() - start

    @staticmethod
    def stalled_s(handle: Future, waited: float) -> float:
        return waited

    @staticmethod
    def seconds(handle: Future) -> float:
        return handle.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


@dataclass(frozen=True, eq=False)
class _Issued:
    """One stage's weights issued into a buffer slot: compute may use `views` once the copy
    behind `handle` has completed."""

    slot: int
    handle: object  # _CudaCopy or Future
    n_bytes: int
    views: dict[str, tuple[torch.Tensor, ...]]  # tensor name -> its tensors in the slot


class PrefetchEngine:
    """Double-buffered streaming of weights, stage by stage (stage = layer; the last stage is
    the head). Entering stage s waits for its copy and issues the copy of the next stage that
    streams anything into the other buffer slot, so the copy of s+1 overlaps compute of s.
    Decode is cyclic: the head prefetches layer 0 of the next step; a decode that streams one
    stage only prefetches that stage's next use into the other slot.

    Two rules make this safe for any number of streamed stages:
    - a stage's views are handed to compute when the stage is entered, after waiting for its
      copy (never when the copy is issued);
    - a copy never targets the slot compute reads now (the entered stage's); on CUDA it also
      waits for compute issued before it, which may still read the slot it overwrites.
    The slots live as long as the engine, so no cross-stream free can happen while a copy runs.

    A streamed tensor is a tuple of host tensors copied as they are: a float weight (one
    tensor), or a quantized one's packed codes, scales and zero points, so the link carries
    exactly the bytes the host holds."""

    def __init__(self, devices: Devices):
        self.devices = devices
        self.phase = "decode"
        self._sources: dict[str, tuple[torch.Tensor, ...]] = {}  # tensor name -> its host tensors
        self._stage_members: dict[str, dict[int, list[str]]] = {"prefill": {}, "decode": {}}
        self._slots: list[torch.Tensor] = []  # two flat uint8 buffers on the accelerator
        self._views: dict[str, tuple[torch.Tensor, ...]] = {}  # views of the entered stages
        self._pending: dict[int, _Issued] = {}  # stage -> its issued, not yet entered copy
        self._active_slot: int | None = None  # the slot of the stage entered last
        self._used: list[object] = []  # handles of the copies compute used, for their durations
        self._copier = _CudaCopier(devices.accelerator) if devices.cuda else _ThreadCopier()
        self.bytes_copied = 0
        self._waits: list[tuple[object, object]] = []  # (copy handle, wait record), for wait_s
        self.stage_names: dict[int, str] = {}  # stage index -> "layer 3" / "head", for traces

    def set_recorder(self, recorder) -> None:
        self._copier.recorder = recorder

    # ---- set-up ------------------------------------------------------------------------------
    def register(self, name: str, stage: int, host_tensors: tuple[torch.Tensor, ...],
                 phases: tuple[str, ...]) -> None:
        """Stream `host_tensors` (contiguous, in host memory) of tensor `name` for `stage`."""
        self._sources[name] = tuple(host_tensors)
        for phase in phases:
            self._stage_members[phase].setdefault(stage, []).append(name)

    def _stage_bytes(self, names: list[str]) -> int:
        return sum(aligned_bytes(t) for name in names for t in self._sources[name])

    def allocate(self) -> None:
        largest = max((self._stage_bytes(names) for stages in self._stage_members.values()
                       for names in stages.values()), default=0)
        self._slots = [torch.empty(largest, dtype=torch.uint8, device=self.devices.accelerator)
                       for _ in range(2)] if largest else []

    @property
    def buffer_bytes(self) -> int:
        return sum(s.numel() for s in self._slots)

    @property
    def stages(self) -> list[int]:
        return sorted(self._stage_members[self.phase])

    # ---- running -----------------------------------------------------------------------------
    def begin(self, phase: str) -> None:
        """Start a forward pass: drain copies of the previous phase, prefetch the first stage."""
        if phase != self.phase:
            for issued in self._pending.values():
                self._copier.wait(issued.handle)
            self._pending.clear()
            self.phase = phase
        stages = self.stages
        if stages and stages[0] not in self._pending:
            self._issue(stages[0])

    def enter(self, stage: int) -> None:
        """Stage `stage` starts computing: hand it its weights, prefetch the next stage."""
        if stage in self._stage_members[self.phase]:
            issued = self._pending.pop(stage, None)
            if issued is None:  # not prefetched (first pass after a phase change)
                issued = self._issue(stage)
                del self._pending[stage]
            self._waits.append((issued.handle, self._copier.wait(issued.handle)))
            self._active_slot = issued.slot
            self._views.update(issued.views)
            self._used.append(issued.handle)
            self.bytes_copied += issued.n_bytes  # counted when used: a last, unused prefetch is not
        nxt = self._following(stage)
        if nxt is not None and nxt not in self._pending:
            self._issue(nxt)

    def _following(self, stage: int) -> int | None:
        stages = self.stages
        later = [s for s in stages if s > stage]
        if later:
            return later[0]
        return stages[0] if stages and self.phase == "decode" else None

    def _issue(self, stage: int) -> _Issued:
        """Copy `stage`'s weights into the slot compute is not reading."""
        slot_index = 0 if self._active_slot is None else 1 - self._active_slot
        for other in [s for s, issued in self._pending.items() if issued.slot == slot_index]:
            del self._pending[other]  # overwritten below (copies run in issue order); re-issued when entered
        slot = self._slots[slot_index]
        jobs, views, offset, n_total = [], {}, 0, 0
        for name in self._stage_members[self.phase][stage]:
            tensors = []
            for src in self._sources[name]:
                n_bytes = src.numel() * src.element_size()
                view = slot[offset:offset + n_bytes].view(src.dtype).view(src.shape)
                tensors.append(view)
                jobs.append((view, src))
                offset += aligned_bytes(src)
                n_total += n_bytes
            views[name] = tuple(tensors)
        handle = self._copier.issue(jobs, self.stage_names.get(stage, f"stage {stage}"))
        issued = _Issued(slot_index, handle, n_total, views)
        self._pending[stage] = issued
        return issued

    def views(self, name: str) -> tuple[torch.Tensor, ...]:
        """Tensor `name`'s host tensors as copied into its entered stage's slot (same order)."""
        return self._views[name]

    @property
    def copy_busy_s(self) -> float:
        """Seconds the copies compute used took, each timed on the copy's own clock (CUDA
        events on the copy stream; the copy thread's clock on the loopback). Reading it waits
        for those copies, so read it after the measured steps."""
        return sum(self._copier.seconds(handle) for handle in self._used)

    @property
    def wait_s(self) -> float:
        """Seconds compute stood still waiting for streamed weights: on CUDA from events (the
        compute stream reaching a wait, the copy ending), on the loopback the compute thread's
        clock. Like copy_busy_s, read it after the measured steps."""
        return sum(self._copier.stalled_s(handle, record) for handle, record in self._waits)

    def reset_counters(self) -> None:
        self.bytes_copied = 0
        self._used = []
        self._waits = []

    def close(self) -> None:
        for issued in self._pending.values():
            self._copier.wait(issued.handle)
        self._pending.clear()
        self._copier.close()
