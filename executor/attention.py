"""Hybrid attention: a KV cache split between host memory and the accelerator (DESIGN §3).

The oldest `host_tokens` token slots of a layer's KV cache live in host memory, the rest on the
accelerator. Attention over each part is computed where the part lives, concurrently, and the
two partial results are merged exactly with their log-sum-exps:

    L = logaddexp(L_g, L_c),   O = exp(L_g - L) · O_g + exp(L_c - L) · O_c

Only q (device -> host), O_c and L_c (host -> device) cross the link per call; new K/V that land
in host slots are copied down once when they are written.

Causality: the cache holds tokens at absolute positions 0..length-1; a call with t new tokens
places them at length..length+t-1 and new token i sees positions 0..length_before+i. For a
block of keys that starts at absolute position p0, that is `causal_offset = length_before - p0`
(key j of the block is visible to query i iff j <= causal_offset + i), so a block can be fully
visible, partly visible, or invisible to some queries (lse = -inf, output 0, weight 0 in the
merge) — which happens when a prefill straddles the host/device boundary.

On a machine without CUDA both `device` and `host_device` are the CPU (the loopback profile,
DESIGN §6): the split, the worker thread, the staging copies and the merge all still run.
CUDA-only pieces (pinned allocation, non_blocking copies, event sync, event timing) are the
small `_cuda`-guarded functions below, each with a CPU twin.
"""

from __future__ import annotations

import math
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from planner.errors import PlanError

from . import kvlink

_NEG_INF = float("-inf")
_TINY = 1e-30  # clamps an all-zero softmax denominator; its numerator is 0 too, so the row is 0
_THREAD_PREFIX = "offplan-kv-host"
# Attention scores (fp32) that may exist at once: 8 MiB. A prefill of t tokens over s keys
# runs in query chunks of SCORE_CHUNK_ELEMENTS / (batch · heads · s) tokens instead of building
# the whole [batch, heads, t, s] matrix (1 GiB per layer for 32 heads at t = s = 2048).
SCORE_CHUNK_ELEMENTS = 2 ** 21


def split_tokens(host_fraction: float, max_tokens: int) -> int:
    """Host token slots for a plan's per-layer KV fraction `c_l` of a cache of `max_tokens`.

    Rounds up: host slots = ceil(c_l · max_tokens) (with a 1e-9 tolerance, so 0.3 · 10 is 3),
    device slots = the floor of the rest, so the accelerator never holds more KV than the plan
    charged it for (the accelerator is the scarce memory)."""
    if isinstance(host_fraction, bool) or not isinstance(host_fraction, (int, float)) \
            or not 0.0 <= float(host_fraction) <= 1.0:
        raise PlanError(f"kv host fraction: must be a number in [0, 1], got {host_fraction!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise PlanError(f"max_tokens: must be a non-negative integer, got {max_tokens!r}")
    return min(max_tokens, max(0, math.ceil(float(host_fraction) * max_tokens - 1e-9)))


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are kept in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_chunk_tokens(batch: int, heads: int, keys: int) -> int:
    """Queries attended at a time so that one chunk's scores hold at most SCORE_CHUNK_ELEMENTS."""
    return max(1, SCORE_CHUNK_ELEMENTS // max(batch * heads * keys, 1))


def attention_workspace_bytes(batch: int, heads: int, tokens: int, keys: int,
                              dtype: torch.dtype) -> int:
    """Peak temporaries of attention_with_lse of `tokens` queries over `keys` keys, beyond its
    inputs and outputs: one query chunk's scores in the accumulation dtype, plus their softmax
    numerators cast to V's dtype when that differs (the matmul's [.., d] outputs are small)."""
    acc = _accumulate_dtype(dtype).itemsize
    rows = min(attention_chunk_tokens(batch, heads, keys), tokens)
    per_score = acc + (dtype.itemsize if dtype.itemsize != acc else 0)
    return rows * batch * heads * keys * per_score


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor,
                       causal_offset: int | None) -> tuple[Tensor, Tensor]:
    """Attention of `q` over one block of keys, with the log-sum-exp of its scaled scores.

    q: [batch, heads, t, head_dim]; k, v: [batch, kv_heads, s, head_dim], heads a multiple of
    kv_heads (head h reads kv head h // (heads / kv_heads)). Key j is visible to query i iff
    j <= causal_offset + i; None makes every key visible. Returns out [batch, heads, t, head_dim]
    in q's dtype and lse [batch, heads, t] in float32 (float64 for float64 inputs). A query
    that sees no key gets out = 0 and lse = -inf (no NaN).

    Queries are independent, so a long prefill runs in query chunks of
    `attention_chunk_tokens` and no more than SCORE_CHUNK_ELEMENTS scores exist at once: the
    workspace is bounded whatever the prompt length (exact, no merge needed)."""
    batch, heads, t, head_dim = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    acc = _accumulate_dtype(q.dtype)
    if s == 0:
        return (torch.zeros_like(q),
                torch.full((batch, heads, t), _NEG_INF, dtype=acc, device=q.device))
    chunk = attention_chunk_tokens(batch, heads, s)
    if chunk >= t:
        return _attention_block(q, k, v, causal_offset)
    out = torch.empty_like(q)  # [b, heads, t, d]
    lse = torch.empty((batch, heads, t), dtype=acc, device=q.device)
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        offset = None if causal_offset is None else causal_offset + start
        out[:, :, start:stop], lse[:, :, start:stop] = _attention_block(q[:, :, start:stop], k, v, offset)
    return out, lse


def _attention_block(q: Tensor, k: Tensor, v: Tensor,
                     causal_offset: int | None) -> tuple[Tensor, Tensor]:
    """attention_with_lse over all of q at once (scores [b, kv_heads, group*t, s] in memory)."""
    batch, heads, t, head_dim = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    group = heads // kv_heads
    acc = _accumulate_dtype(q.dtype)
    # GQA without repeating K/V: the group's queries become extra rows of one matmul per kv head.
    q_rows = q.reshape(batch, kv_heads, group * t, head_dim)  # [b, kv_heads, group*t, d]
    scores = torch.matmul(q_rows, k.transpose(-1, -2)).to(acc)  # [b, kv_heads, group*t, s]
    scores.mul_(1.0 / math.sqrt(head_dim))
    if causal_offset is not None:
        first_masked = max(causal_offset + 1, 0)  # keys before this are visible to every query
        if first_masked < s:
            limit = torch.arange(causal_offset, causal_offset + t, device=q.device)  # [t]
            cols = torch.arange(first_masked, s, device=q.device)  # [s - first_masked]
            hidden = cols.unsqueeze(0) > limit.unsqueeze(1)  # [t, s - first_masked]
            per_query = scores.view(batch, kv_heads, group, t, s)  # [b, kv_heads, group, t, s]
            per_query[..., first_masked:].masked_fill_(hidden, _NEG_INF)
    row_max = scores.amax(dim=-1, keepdim=True)  # [b, kv_heads, group*t, 1]
    row_max.masked_fill_(torch.isneginf(row_max), 0.0)  # rows with no visible key: exp(-inf) = 0
    probs = scores.sub_(row_max).exp_()  # unnormalised softmax, [b, kv_heads, group*t, s]
    denom = probs.sum(dim=-1)  # [b, kv_heads, group*t]
    lse = denom.log().add_(row_max.squeeze(-1))  # log(0) = -inf for rows with no visible key
    out = torch.matmul(probs.to(v.dtype), v).to(acc)  # [b, kv_heads, group*t, d]
    out.div_(denom.clamp_min(_TINY).unsqueeze(-1))
    return (out.to(q.dtype).view(batch, heads, t, head_dim),
            lse.view(batch, heads, t))


def merge_partials(o_a: Tensor, lse_a: Tensor, o_b: Tensor,
                   lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact merge of two partial attentions over disjoint key blocks.

    o_*: [batch, heads, t, head_dim]; lse_*: [batch, heads, t]. L = logaddexp(L_a, L_b),
    O = exp(L_a - L)·O_a + exp(L_b - L)·O_b, computed in lse's dtype. A side with lse = -inf
    gets weight 0; rows where both sides are -inf give O = 0 and L = -inf."""
    lse = torch.logaddexp(lse_a, lse_b)  # [b, heads, t]
    shift = lse.masked_fill(torch.isneginf(lse), 0.0)  # avoids -inf - -inf = NaN
    w_a = torch.exp(lse_a - shift).unsqueeze(-1)  # [b, heads, t, 1]
    w_b = torch.exp(lse_b - shift).unsqueeze(-1)
    out = w_a * o_a.to(lse.dtype) + w_b * o_b.to(lse.dtype)  # [b, heads, t, head_dim]
    return out.to(o_a.dtype), lse


@dataclass(frozen=True, eq=False)
class _HostJob:
    """One call's work for the host worker; every tensor is in (pinned) host memory."""

    q: Tensor  # [batch, heads, t, head_dim]
    k_new: Tensor | None  # [batch, kv_heads, n_host, head_dim], new tokens for host slots
    v_new: Tensor | None
    start: int  # cache length before the call = absolute position of the first new token
    host_keys: int  # host slots holding tokens after the call
    ready: torch.cuda.Event | None  # the d2h copies above have landed once this completes
    out: Tensor  # [batch, heads, t, head_dim], O_c is written here
    lse: Tensor  # [batch, heads, t], L_c is written here


class HybridKVCache(nn.Module):
    """A layer's KV cache with its oldest `host_tokens` slots in host memory (drop-in for the
    model's KVCache: `length`, `attend(q, k, v)`, `truncate(length)`).

    `cpu_threads`: intra-op threads of the host worker (torch.set_num_threads inside the worker;
    per thread on the OpenMP build); None keeps torch's default. `timed`: accumulate the timing
    counters (on CUDA this waits for the timing events once per call). Counters, in seconds and
    reset by `reset_timings()`: `device_s` (device KV write + attention), `host_s` (host KV write
    + attention, in the worker), `merge_s` (copy of O_c, L_c up + merge), `total_s` (whole
    call, wall clock), and `calls`. Call `close()` (or use `with`) to stop the worker thread."""

    def __init__(self, batch: int, max_tokens: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None, host_tokens: int = 0,
                 host_device: torch.device | str = "cpu", cpu_threads: int | None = None,
                 timed: bool = True):
        super().__init__()
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PlanError(f"{name}: must be a positive integer, got {value!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise PlanError(f"max_tokens: must be a non-negative integer, got {max_tokens!r}")
        if isinstance(host_tokens, bool) or not isinstance(host_tokens, int) \
                or not 0 <= host_tokens <= max_tokens:
            raise PlanError(f"host_tokens: must be an integer in [0, max_tokens={max_tokens}], "
                            f"got {host_tokens!r}; derive it with split_tokens(fraction, max_tokens)")
        if cpu_threads is not None and (isinstance(cpu_threads, bool)
                                        or not isinstance(cpu_threads, int) or cpu_threads <= 0):
            raise PlanError(f"cpu_threads: must be a positive integer or None, got {cpu_threads!r}")
        self.batch, self.max_tokens, self.kv_heads, self.head_dim = batch, max_tokens, kv_heads, head_dim
        self.dtype = dtype
        # None means torch's default device, as for the model's own KVCache.
        self.device = torch.device(device) if device is not None else torch.empty(0).device
        self.host_device = torch.device(host_device)
        self.host_tokens, self.device_tokens = host_tokens, max_tokens - host_tokens
        self.cpu_threads, self.timed = cpu_threads, timed
        self._cuda = kvlink.is_cuda(self.device)
        self._pin = self._cuda and self.host_device.type == "cpu"
        host_shape = (batch, kv_heads, host_tokens, head_dim)
        host_numel = math.prod(host_shape)
        # Plain attributes, not registered buffers: model.to(device) must not move the host part.
        # Not page-locked: no async copy reads or writes it (the prefill's d2h into it is
        # synchronous), and pin_memory would round each block up to a power of two.
        self._host_k = kvlink.alloc_host(host_numel, dtype, self.host_device, False).view(host_shape)
        self._host_v = kvlink.alloc_host(host_numel, dtype, self.host_device, False).view(host_shape)
        dev_shape = (batch, kv_heads, self.device_tokens, head_dim)
        self._dev_k = torch.empty(dev_shape, dtype=dtype, device=self.device)
        self._dev_v = torch.empty(dev_shape, dtype=dtype, device=self.device)
        self._length = 0
        self._staging: dict[str, Tensor] = {}  # grow-only flat buffers reused across calls
        self._pool: ThreadPoolExecutor | None = None
        self._pool_finalizer: weakref.finalize | None = None
        self.reset_timings()

    @property
    def length(self) -> int:
        return self._length

    def reset_timings(self) -> None:
        self.device_s = self.host_s = self.merge_s = self.total_s = 0.0
        self.calls = 0

    def truncate(self, length: int) -> None:
        """Drops tokens >= length, on either side of the host/device boundary."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self._length:
            raise ValueError(f"truncate: length must be in [0, {self._length}], got {length!r}")
        self._length = length

    def close(self) -> None:
        """Stops and joins the host worker thread; a later `attend` starts a new one."""
        if self._pool is not None:
            self._pool_finalizer.detach()
            self._pool.shutdown(wait=True)
            self._pool, self._pool_finalizer = None, None

    def __enter__(self) -> HybridKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        return (f"batch={self.batch}, max_tokens={self.max_tokens}, host_tokens={self.host_tokens}, "
                f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, device={self.device}, "
                f"host_device={self.host_device}")

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            init, args = ((torch.set_num_threads, (self.cpu_threads,))
                          if self.cpu_threads is not None else (None, ()))
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=_THREAD_PREFIX,
                                            initializer=init, initargs=args)
            # Joins nothing, but stops the thread if the cache is dropped without close().
            self._pool_finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, on_host: bool) -> Tensor:
        """A contiguous view of a reusable staging buffer (pinned on the host side under CUDA)."""
        numel = math.prod(shape)
        buf = self._staging.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = (kvlink.alloc_host(numel, dtype, self.host_device, self._pin) if on_host
                   else torch.empty(numel, dtype=dtype, device=self.device))
            self._staging[name] = buf
        return buf[:numel].view(shape)

    def _check(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        expected = (self.batch, self.kv_heads, q.shape[2] if q.dim() == 4 else -1, self.head_dim)
        if q.dim() != 4 or tuple(k.shape) != expected or tuple(v.shape) != expected \
                or q.shape[0] != self.batch or q.shape[3] != self.head_dim \
                or q.shape[1] % self.kv_heads != 0:
            raise ValueError(f"attend: expected q [{self.batch}, n*{self.kv_heads}, t, {self.head_dim}] "
                             f"and k, v {list(expected)}, got {list(q.shape)}, {list(k.shape)}, "
                             f"{list(v.shape)}")

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [batch, heads, t, head_dim] (RoPE applied); k, v: [batch, kv_heads, t, head_dim], the
        new tokens at positions length..length+t-1. Appends k/v and returns the causal attention
        output [batch, heads, t, head_dim] over all cached tokens."""
        call_start = time.perf_counter()
        self._check(q, k, v)
        t = q.shape[2]
        start, end = self._length, self._length + t
        if end > self.max_tokens:
            raise ValueError(f"attend: {end} tokens exceed the cache's max_tokens={self.max_tokens}")
        n_host = min(max(self.host_tokens - start, 0), t)  # new tokens that land in host slots
        host_keys = min(end, self.host_tokens)
        device_keys = max(end - self.host_tokens, 0)
        if start == 0 and t > 1 and host_keys > 0:
            out = self._prefill(q, k, v, n_host, device_keys)
        elif host_keys == 0:
            out = self._device_part(q, k, v, start, n_host, device_keys)[0]
        elif device_keys == 0:
            out = self._host_only(q, k, v, start, n_host, host_keys)
        else:
            out = self._split(q, k, v, start, n_host, host_keys, device_keys)
        self._length = end
        if self.timed:
            self.total_s += time.perf_counter() - call_start
            self.calls += 1
        return out

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, n_host: int, device_keys: int) -> Tensor:
        """A prefill from an empty cache: every key is fresh on the accelerator, so attention runs
        there in one piece; the host slots' K/V are then copied down (d2h) once."""
        clock_start = kvlink.clock(self.device, self._cuda) if self.timed else 0.0
        out, _ = attention_with_lse(q, k, v, causal_offset=0)  # [b, heads, t, hd]
        if device_keys:
            self._dev_k[:, :, :device_keys].copy_(k[:, :, n_host:])
            self._dev_v[:, :, :device_keys].copy_(v[:, :, n_host:])
        kvlink.copy(self._host_k[:, :, :n_host], k[:, :, :n_host], self._cuda)
        kvlink.copy(self._host_v[:, :, :n_host], v[:, :, :n_host], self._cuda)
        if self.timed:
            self.device_s += kvlink.elapsed_s(clock_start, kvlink.clock(self.device, self._cuda))
        return out

    def _device_part(self, q: Tensor, k: Tensor, v: Tensor, start: int, n_host: int,
                     device_keys: int) -> tuple[Tensor, Tensor]:
        clock_start = kvlink.clock(self.device, self._cuda) if self.timed else 0.0
        first_slot = max(start, self.host_tokens) - self.host_tokens
        self._dev_k[:, :, first_slot:device_keys].copy_(k[:, :, n_host:])
        self._dev_v[:, :, first_slot:device_keys].copy_(v[:, :, n_host:])
        out, lse = attention_with_lse(q, self._dev_k[:, :, :device_keys], self._dev_v[:, :, :device_keys],
                                      causal_offset=start - self.host_tokens)
        if self.timed:
            self.device_s += kvlink.elapsed_s(clock_start, kvlink.clock(self.device, self._cuda))
        return out, lse

    def _stage_host(self, q: Tensor, k: Tensor, v: Tensor, start: int, n_host: int,
                    host_keys: int) -> _HostJob:
        """Queues the d2h copies of q and of the new host-slot K/V for the worker."""
        batch, heads, t, head_dim = q.shape
        q_h = self._buffer("q_host", tuple(q.shape), q.dtype, on_host=True)
        kvlink.copy(q_h, q, self._cuda)
        k_h = v_h = None
        if n_host > 0:
            new_shape = (batch, self.kv_heads, n_host, head_dim)
            k_h = self._buffer("k_host", new_shape, self.dtype, on_host=True)
            v_h = self._buffer("v_host", new_shape, self.dtype, on_host=True)
            kvlink.copy(k_h, k[:, :, :n_host], self._cuda)
            kvlink.copy(v_h, v[:, :, :n_host], self._cuda)
        o_h = self._buffer("o_host", tuple(q.shape), q.dtype, on_host=True)
        lse_h = self._buffer("lse_host", (batch, heads, t), _accumulate_dtype(q.dtype), on_host=True)
        return _HostJob(q_h, k_h, v_h, start, host_keys, kvlink.ready_marker(self.device, self._cuda), o_h, lse_h)

    def _host_job(self, job: _HostJob) -> float:
        """Runs on the worker thread: writes the new host-slot K/V, attends over the host part
        into job.out / job.lse (read by the h2d copy). Returns its compute time in seconds."""
        kvlink.wait_ready(job.ready)
        begin = time.perf_counter()
        if job.k_new is not None:
            end = job.start + job.k_new.shape[2]
            self._host_k[:, :, job.start:end].copy_(job.k_new)
            self._host_v[:, :, job.start:end].copy_(job.v_new)
        out, lse = attention_with_lse(job.q, self._host_k[:, :, :job.host_keys],
                                      self._host_v[:, :, :job.host_keys], causal_offset=job.start)
        job.out.copy_(out)
        job.lse.copy_(lse)
        return time.perf_counter() - begin

    def _host_only(self, q: Tensor, k: Tensor, v: Tensor, start: int, n_host: int,
                   host_keys: int) -> Tensor:
        # Nothing on the device to overlap with, so the host part runs inline; only O_c goes up.
        job = self._stage_host(q, k, v, start, n_host, host_keys)
        host_s = self._host_job(job)
        out = torch.empty(q.shape, dtype=q.dtype, device=self.device)
        kvlink.copy(out, job.out, self._cuda)
        if self.timed:
            self.host_s += host_s
        return out

    def _split(self, q: Tensor, k: Tensor, v: Tensor, start: int, n_host: int, host_keys: int,
               device_keys: int) -> Tensor:
        job = self._stage_host(q, k, v, start, n_host, host_keys)
        future = self._executor().submit(self._host_job, job)
        o_g, lse_g = self._device_part(q, k, v, start, n_host, device_keys)
        host_s = future.result()
        clock_start = kvlink.clock(self.device, self._cuda) if self.timed else 0.0
        o_c = self._buffer("o_dev", tuple(q.shape), q.dtype, on_host=False)
        lse_c = self._buffer("lse_dev", tuple(lse_g.shape), lse_g.dtype, on_host=False)
        kvlink.copy(o_c, job.out, self._cuda)
        kvlink.copy(lse_c, job.lse, self._cuda)
        out = merge_partials(o_g, lse_g, o_c, lse_c)[0]
        if self.timed:
            self.host_s += host_s
            self.merge_s += kvlink.elapsed_s(clock_start, kvlink.clock(self.device, self._cuda))
        return out
