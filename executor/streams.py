"""Devices, transfers and the double-buffered prefetch engine.

Everything CUDA-specific (pinned memory, a side stream, events) is in the few small
functions and branches below, each with a CPU twin used by the loopback profile (the CPU
plays the accelerator, DESIGN §6): there the "link" is a real copy between separate
buffers, done by a copy thread, so streaming overlaps compute as it would over PCIe.

PyTorch semantics relied on (CUDA): a copy issued on a side stream with `non_blocking=True`
from pinned memory runs asynchronously; `Event.record(stream)` marks its completion;
`current_stream().wait_event(e)` makes later compute wait for it without blocking the host;
the copy stream waits for an event recorded on the compute stream before it overwrites a
buffer slot that compute may still be reading.
"""

from __future__ import annotations

import threading
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

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host-memory copy of `tensor` (page-locked on CUDA, so h2d copies can be async)."""
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.host, pin_memory=self.cuda)
        out.copy_(tensor)
        return out

    def host_resident(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` itself when it already is in host memory fit for async copies (any host
        tensor on the loopback, a pinned one on CUDA), else a host_copy: no second copy of
        weights that are already where they must be."""
        if tensor.device == self.host and (not self.cuda or tensor.is_pinned()):
            return tensor
        return self.host_copy(tensor)


def to_host(x: torch.Tensor, devices: Devices) -> torch.Tensor:
    """Device-to-host copy of an activation. CPU twin: a real copy into a fresh buffer, so
    the loopback run pays for the transfer the plan charges for."""
    if devices.cuda:
        return x.to(devices.host)  # synchronous: the host needs the values now
    return x.clone()


def to_accelerator(x: torch.Tensor, devices: Devices) -> torch.Tensor:
    if devices.cuda:
        return x.pin_memory().to(devices.accelerator, non_blocking=True)
    return x.clone()


def _pieces(dst: torch.Tensor, src: torch.Tensor):
    """(dst, src) flat views of at most COPY_PIECE_BYTES each (both contiguous, same size)."""
    flat_dst, flat_src = dst.view(-1), src.view(-1)
    step = max(COPY_PIECE_BYTES // src.element_size(), 1)
    for start in range(0, flat_src.numel(), step):
        yield flat_dst[start:start + step], flat_src[start:start + step]


def _aligned(tensor: torch.Tensor) -> int:
    """Bytes `tensor` takes in a slot: its size rounded up to _ALIGN_BYTES."""
    return -(-tensor.numel() * tensor.element_size() // _ALIGN_BYTES) * _ALIGN_BYTES


class _CudaCopier:
    """Copies on a side stream; completion and slot reuse ordered by events."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.device = device

    def issue(self, jobs: list[tuple[torch.Tensor, torch.Tensor]], label: str = "") -> torch.cuda.Event:
        freed = torch.cuda.Event()
        freed.record(torch.cuda.current_stream(self.device))  # compute up to here is done with the slot
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(freed)
            for dst, src in jobs:
                for dst_piece, src_piece in _pieces(dst, src):
                    dst_piece.copy_(src_piece, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    @staticmethod
    def wait(handle: torch.cuda.Event) -> None:
        torch.cuda.current_stream().wait_event(handle)

    def close(self) -> None:
        self.stream.synchronize()


class _ThreadCopier:
    """CPU twin: one copy thread; the stage that needs a slot waits for its future."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offplan-prefetch")
        self.busy_s = 0.0
        self.lock = threading.Lock()
        self.recorder = None  # executor.recorder.Recorder when tracing

    def _run(self, jobs: list[tuple[torch.Tensor, torch.Tensor]], label: str) -> None:
        start = time.perf_counter()
        began = self.recorder.now() if self.recorder else 0.0
        for dst, src in jobs:
            dst.copy_(src)
        with self.lock:
            self.busy_s += time.perf_counter() - start
        if self.recorder:
            self.recorder.add("h2d", f"stream {label}", began, self.recorder.now(), label)

    def issue(self, jobs: list[tuple[torch.Tensor, torch.Tensor]], label: str = "") -> Future:
        return self.pool.submit(self._run, jobs, label)

    @staticmethod
    def wait(handle: Future) -> None:
        handle.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class PrefetchEngine:
    """Double-buffered streaming of weights, stage by stage (stage = layer; the last stage is
    the head). Entering stage s waits for its copy and issues the copy of the next stage
    that streams anything into the other buffer slot, so the copy of s+1 overlaps compute of s.
    Decode is cyclic: the head prefetches layer 0 of the next step.

    A streamed tensor is a tuple of host tensors copied as they are: a float weight (one
    tensor), or a quantized one's packed codes, scales and zero points, so the link carries
    exactly the bytes the host holds."""

    def __init__(self, devices: Devices):
        self.devices = devices
        self.phase = "decode"
        self._sources: dict[str, tuple[torch.Tensor, ...]] = {}  # tensor name -> its host tensors
        self._stage_members: dict[str, dict[int, list[str]]] = {"prefill": {}, "decode": {}}
        self._slots: list[torch.Tensor] = []  # two flat uint8 buffers on the accelerator
        self._views: dict[str, tuple[torch.Tensor, ...]] = {}  # tensor name -> views in its slot
        self._pending: dict[int, tuple[object, int]] = {}  # stage -> (copy handle, bytes)
        self._next_slot = 0
        self._copier = _CudaCopier(devices.accelerator) if devices.cuda else _ThreadCopier()
        self.bytes_copied = 0
        self.wait_s = 0.0  # compute time lost waiting for copies
        self.stage_names: dict[int, str] = {}  # stage index -> "layer 3" / "head", for traces

    def set_recorder(self, recorder) -> None:
        if isinstance(self._copier, _ThreadCopier):
            self._copier.recorder = recorder

    # ---- set-up ------------------------------------------------------------------------------
    def register(self, name: str, stage: int, host_tensors: tuple[torch.Tensor, ...],
                 phases: tuple[str, ...]) -> None:
        """Stream `host_tensors` (contiguous, in host memory) of tensor `name` for `stage`."""
        self._sources[name] = tuple(host_tensors)
        for phase in phases:
            self._stage_members[phase].setdefault(stage, []).append(name)

    def _stage_bytes(self, names: list[str]) -> int:
        return sum(_aligned(t) for name in names for t in self._sources[name])

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
            for handle, _ in self._pending.values():
                self._copier.wait(handle)
            self._pending.clear()
            self.phase = phase
        stages = self.stages
        if stages and stages[0] not in self._pending:
            self._issue(stages[0])

    def enter(self, stage: int) -> None:
        members = self._stage_members[self.phase]
        if stage in members:
            if stage not in self._pending:  # not prefetched (first pass after a phase change)
                self._issue(stage)
            start = time.perf_counter()
            handle, n_bytes = self._pending.pop(stage)
            self._copier.wait(handle)
            self.wait_s += time.perf_counter() - start
            self.bytes_copied += n_bytes  # counted when used: a last, unused prefetch is not
        nxt = self._following(stage)
        if nxt is not None and nxt not in self._pending:
            self._issue(nxt)

    def _following(self, stage: int) -> int | None:
        stages = self.stages
        later = [s for s in stages if s > stage]
        if later:
            return later[0]
        return stages[0] if stages and self.phase == "decode" else None

    def _issue(self, stage: int) -> None:
        slot = self._slots[self._next_slot]
        self._next_slot = 1 - self._next_slot
        jobs, offset, n_total = [], 0, 0
        for name in self._stage_members[self.phase][stage]:
            views = []
            for src in self._sources[name]:
                n_bytes = src.numel() * src.element_size()
                view = slot[offset:offset + n_bytes].view(src.dtype).view(src.shape)
                views.append(view)
                jobs.append((view, src))
                offset += _aligned(src)
                n_total += n_bytes
            self._views[name] = tuple(views)
        self._pending[stage] = (self._copier.issue(jobs, self.stage_names.get(stage, f"stage {stage}")), n_total)

    def views(self, name: str) -> tuple[torch.Tensor, ...]:
        """Tensor `name`'s host tensors as copied into the current stage's slot (same order)."""
        return self._views[name]

    @property
    def copy_busy_s(self) -> float:
        return getattr(self._copier, "busy_s", 0.0)

    def reset_counters(self) -> None:
        self.bytes_copied = 0
        self.wait_s = 0.0
        if isinstance(self._copier, _ThreadCopier):
            self._copier.busy_s = 0.0

    def close(self) -> None:
        for handle, _ in self._pending.values():
            self._copier.wait(handle)
        self._pending.clear()
        self._copier.close()
