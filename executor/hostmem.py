"""Host memory the link copies from: streamed weights in one page-locked pool, and one
staging buffer for activations going up.

Why one pool: `torch.empty(..., pin_memory=True)` goes through PyTorch's caching host
allocator, which rounds every block up to a power of two (a 5 GiB tensor pins 8 GiB) and
keeps it cached. Here the pool is one ordinary host allocation of exactly the bytes that
stream, page-locked in place with `cudaHostRegister` (and unlocked with `cudaHostUnregister`
before it is freed); CUDA copies from registered memory are asynchronous like from
`pin_memory` blocks. `cpu` weights are never page-locked: the link does not read them.

CUDA-only calls are the `_cuda_*` functions and `Uplink._cuda_send`; their CPU twins (the
loopback profile) keep the pool in plain host memory, so it takes the same bytes on both.
"""

from __future__ import annotations

import os
import weakref

import torch

from .streams import Devices, aligned_bytes

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _cuda_ok(result) -> bool:
    """cudart bindings return a cudaError enum (success is 0)."""
    return int(getattr(result, "value", result)) == 0


def _cuda_register(region: torch.Tensor) -> None:
    """Page-lock `region` (page-aligned, contiguous uint8) in place."""
    result = torch.cuda.cudart().cudaHostRegister(region.data_ptr(), region.numel(), 0)
    if not _cuda_ok(result):
        raise RuntimeError(f"cudaHostRegister of {region.numel()} bytes failed ({result}): "
                           "not enough lockable host memory (see `ulimit -l`)")


def _cuda_unregister(allocation: torch.Tensor, address: int) -> None:
    """Undo _cuda_register; `allocation` is passed only to keep the memory alive until now."""
    torch.cuda.cudart().cudaHostUnregister(address)


class PageLocked:
    """A flat uint8 host buffer of `n_bytes`, page-locked on CUDA (CPU twin: plain memory).
    `close()` (or garbage collection) unlocks it; views taken from `buffer` stay valid."""

    def __init__(self, n_bytes: int, cuda: bool):
        self.n_bytes = n_bytes
        self._finalizer = None
        if not cuda or n_bytes == 0:
            self.buffer = torch.empty(n_bytes, dtype=torch.uint8)
            return
        locked = -(-n_bytes // _PAGE_BYTES) * _PAGE_BYTES  # whole pages, inside the allocation
        allocation = torch.empty(locked + _PAGE_BYTES, dtype=torch.uint8)
        start = -allocation.data_ptr() % _PAGE_BYTES
        region = allocation[start:start + locked]
        _cuda_register(region)
        self._finalizer = weakref.finalize(self, _cuda_unregister, allocation, region.data_ptr())
        self.buffer = region[:n_bytes]

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


class HostPool:
    """Streamed tensors packed into one PageLocked buffer at 256-byte aligned offsets."""

    def __init__(self, tensors: list[torch.Tensor], devices: Devices):
        self.n_bytes = sum(aligned_bytes(t) for t in tensors)
        self._memory = PageLocked(self.n_bytes, devices.cuda)
        self._offset = 0

    def carve(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` in the pool (same shape and dtype)."""
        n_bytes = tensor.numel() * tensor.element_size()
        flat = self._memory.buffer[self._offset:self._offset + n_bytes]
        view = flat.view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        self._offset += aligned_bytes(tensor)
        return view

    def contains(self, tensor: torch.Tensor) -> bool:
        base = self._memory.buffer.data_ptr()
        return base <= tensor.data_ptr() < base + max(self.n_bytes, 1)

    def close(self) -> None:
        self._memory.close()


class Uplink:
    """Activations computed on the host, sent to the accelerator through one staging buffer
    (page-locked on CUDA, grown to the largest activation sent). CPU twin: a real copy into
    a fresh tensor, so the loopback run pays for the transfer the plan charges for; it
    counts the staging buffer CUDA would have needed."""

    def __init__(self, devices: Devices):
        self.devices = devices
        self._staging: PageLocked | None = None
        self._sent = None  # CUDA event: the last upload has read the staging buffer
        self._largest_bytes = 0

    @property
    def staging_bytes(self) -> int:
        """Bytes of the staging buffer: the largest activation sent so far."""
        return self._largest_bytes

    def send(self, x: torch.Tensor) -> torch.Tensor:
        self._largest_bytes = max(self._largest_bytes, x.numel() * x.element_size())
        if not self.devices.cuda:
            return x.clone()
        return self._cuda_send(x)

    def _cuda_send(self, x: torch.Tensor) -> torch.Tensor:
        n_bytes = x.numel() * x.element_size()
        if self._sent is not None:
            self._sent.synchronize()  # done already in practice: compute has used it since
        if self._staging is None or self._staging.n_bytes < n_bytes:
            if self._staging is not None:
                self._staging.close()
            self._staging = PageLocked(n_bytes, cuda=True)
        staged = self._staging.buffer[:n_bytes].view(x.dtype).view(x.shape)
        staged.copy_(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=self.devices.accelerator)
        out.copy_(staged, non_blocking=True)  # on the compute stream: its next kernels wait
        self._sent = torch.cuda.Event()
        self._sent.record(torch.cuda.current_stream(self.devices.accelerator))
        return out

    def close(self) -> None:
        if self._staging is not None:
            if self._sent is not None:
                self._sent.synchronize()
            self._staging.close()


def to_host(x: torch.Tensor, devices: Devices) -> torch.Tensor:
    """Device-to-host copy of an activation the host needs now: synchronous on CUDA, into
    ordinary host memory. CPU twin: a real copy into a fresh buffer."""
    if devices.cuda:
        return x.to(devices.host)
    return x.clone()


def on_host(tensor: torch.Tensor, devices: Devices) -> torch.Tensor:
    """`tensor` itself when it is in host memory (no second copy), else a host copy."""
    return tensor if tensor.device == devices.host else tensor.to(devices.host)
