"""Low-rank residual compensation of a quantized backbone.

The quantization error of a weight, E = W - deq(Q(W)) ([out, in]), is approximated by
factors A [in, r] and B [r, out] so that for an input x [..., in] the correction
(x @ A) @ B ≈ x @ E.T. The small branch runs on the host CPU in a worker thread while the
accelerator computes x @ deq(W).T; `CompensatedLinear` adds the two.

Factors come from a truncated SVD, either of E.T itself (plain) or, when calibration
inputs are known through their second moment C = E[x xᵀ] ([in, in]), of S·E.T with
S = C^{1/2} (activation-aware): then E‖x (E.T - A B)‖² = Σ_{i>r} σ_i², the tail energy of
the singular values of S·E.T, so the rank that matters is chosen for the inputs that occur.

Two rank tables, both keyed by rank:
- `rank_error_table`: fraction of the quantization output error energy still left at rank
  r, tail(r) / tail(0) (1.0 at rank 0, 0.0 at full rank). The planner's recovered error
  fraction at rank r is 1 - this value.
- `relative_output_error_table`: absolute relative output error sqrt(tail(r) / E‖x W.T‖²),
  i.e. ‖x E_r‖ / ‖x W.T‖ with E_r = E.T - A_r B_r, comparable across tensors.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from planner.errors import PlanError, SpecError

from .quant import QuantizedTensor, QuantLinear, dequantize, quantize

_RIDGE_REL = 1e-10  # ridge added to C's eigenvalues, relative to the largest one


def calibration_second_moment(xs: list[Tensor]) -> Tensor:
    """C = mean over token rows of x xᵀ, float64 [in, in] on the CPU, from inputs [..., in]."""
    if not xs:
        raise SpecError("calibration inputs: the list is empty; pass at least one [tokens, "
                        "in_features] tensor")
    in_features = xs[0].shape[-1]
    acc = torch.zeros(in_features, in_features, dtype=torch.float64)  # [in, in]
    rows = 0
    for x in xs:
        if x.shape[-1] != in_features:
            raise SpecError(f"calibration inputs: last dimension {x.shape[-1]} differs from "
                            f"{in_features}; every input must feed the same layer")
        flat = x.detach().to(device="cpu", dtype=torch.float64).reshape(-1, in_features)
        acc += flat.T @ flat  # [in, in]
        rows += flat.shape[0]
    if rows == 0:
        raise SpecError("calibration inputs: no token rows; pass non-empty tensors")
    return acc / rows


@dataclass(frozen=True, eq=False)
class ResidualSVD:
    """SVD of S·E.T ([in, out]; S = I when plain): u [in, k], sigma [k], vt [k, out] with
    k = min(in, out), `s_inv` [in, in] (None when plain) maps factors back, and
    `output_energy` = E‖x W.T‖² (‖W‖_F² when plain). All float64 on the CPU."""

    u: Tensor
    sigma: Tensor
    vt: Tensor
    s_inv: Tensor | None
    output_energy: float

    @property
    def max_rank(self) -> int:
        return int(self.sigma.numel())

    def tail_energy(self, rank: int) -> float:
        """Σ_{i>rank} σ_i²: expected squared output error left after rank-`rank` correction."""
        return float((self.sigma[rank:] ** 2).sum())


def _sqrt_and_inverse(c: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric PSD square root S of C ([in, in] float64) and its inverse, with a ridge."""
    c = 0.5 * (c + c.T)  # symmetrise rounding noise before eigh
    lam, q = torch.linalg.eigh(c)  # lam [in], q [in, in]
    lam = lam.clamp_min(0.0)
    lam_max = float(lam.max())
    if lam_max <= 0.0:
        raise SpecError("act_second_moment: all zero (calibration inputs were zero); "
                        "collect calibration activations from real prompts")
    root = (lam + _RIDGE_REL * lam_max).sqrt()  # [in]; ridge keeps rank-deficient C invertible
    return (q * root) @ q.T, (q / root) @ q.T


def _check_ranks(ranks: list[int], max_rank: int) -> None:
    for r in ranks:
        if not 0 <= r <= max_rank:
            raise PlanError(f"compensation rank {r} is outside 0..{max_rank} "
                            f"(min(in_features, out_features)); pick a rank in that range")


def residual_svd(w: Tensor, qt: QuantizedTensor,
                 act_second_moment: Tensor | None = None) -> ResidualSVD:
    """Decompose the quantization error of `w` [out, in] once; factors and tables slice it."""
    w64 = w.detach().to(device="cpu", dtype=torch.float64)  # [out, in]
    err_t = (w64 - dequantize(qt.to("cpu"), torch.float64)).T  # [in, out] = E.T
    if act_second_moment is None:
        u, sigma, vt = torch.linalg.svd(err_t, full_matrices=False)
        return ResidualSVD(u, sigma, vt, None, float((w64 ** 2).sum()))
    in_features = w64.shape[1]
    c = act_second_moment.detach().to(device="cpu", dtype=torch.float64)
    if tuple(c.shape) != (in_features, in_features):
        raise SpecError(f"act_second_moment: shape {tuple(c.shape)} does not match "
                        f"[in_features, in_features] = [{in_features}, {in_features}]")
    if not torch.isfinite(c).all():
        raise SpecError("act_second_moment: contains NaN or Inf; recollect calibration inputs")
    s, s_inv = _sqrt_and_inverse(c)
    u, sigma, vt = torch.linalg.svd(s @ err_t, full_matrices=False)  # of S·E.T [in, out]
    output_energy = float(((s @ w64.T) ** 2).sum())  # tr(W C W.T) = E‖x W.T‖²
    return ResidualSVD(u, sigma, vt, s_inv, output_energy)


def factors_from_svd(svd: ResidualSVD, rank: int,
                     dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A [in, rank], B [rank, out] from a ResidualSVD; σ is split evenly between them."""
    _check_ranks([rank], svd.max_rank)
    root = svd.sigma[:rank].sqrt()  # [rank]
    a = svd.u[:, :rank] * root  # [in, rank]
    if svd.s_inv is not None:
        a = svd.s_inv @ a  # back from the whitened input space
    b = root.unsqueeze(1) * svd.vt[:rank]  # [rank, out]
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def residual_factors(w: Tensor, qt: QuantizedTensor, rank: int,
                     act_second_moment: Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A [in, rank], B [rank, out] with (x @ A) @ B ≈ x @ (w - deq(qt)).T, on the CPU."""
    return factors_from_svd(residual_svd(w, qt, act_second_moment), rank, dtype)


def rank_error_table(w: Tensor, qt: QuantizedTensor, ranks: list[int],
                     act_second_moment: Tensor | None = None) -> dict[int, float]:
    """Fraction of the quantization output error left at each rank: tail(r) / tail(0).

    1.0 at rank 0, 0.0 at full rank, non-increasing; 0.0 everywhere when there is no error."""
    svd = residual_svd(w, qt, act_second_moment)
    _check_ranks(ranks, svd.max_rank)
    total = svd.tail_energy(0)
    return {r: (svd.tail_energy(r) / total if total > 0 else 0.0) for r in ranks}


def relative_output_error_table(w: Tensor, qt: QuantizedTensor, ranks: list[int],
                                act_second_moment: Tensor | None = None) -> dict[int, float]:
    """Relative output error ‖x E_r‖ / ‖x W.T‖ = sqrt(tail(r) / E‖x W.T‖²) at each rank."""
    svd = residual_svd(w, qt, act_second_moment)
    _check_ranks(ranks, svd.max_rank)
    if svd.output_energy <= 0:
        return {r: 0.0 for r in ranks}
    return {r: (svd.tail_energy(r) / svd.output_energy) ** 0.5 for r in ranks}


def _cuda_stage_to_host(x: Tensor,
                        stream: "torch.cuda.Stream") -> tuple[Tensor, "torch.cuda.Event"]:
    """Copy x into pinned host memory on a side stream so the accelerator's matmul on the
    current stream is not queued behind it; the returned event marks the copy's end."""
    stream.wait_stream(torch.cuda.current_stream(x.device))  # x must be fully written first
    host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(x, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    x.record_stream(stream)  # keep x's memory from reuse until the side-stream copy ran
    return host, done


def _cpu_stage_to_host(x: Tensor, host_device: torch.device) -> Tensor:
    """CPU twin of _cuda_stage_to_host: a plain (synchronous) copy, or x itself on the host."""
    return x.detach().to(host_device)


def _cuda_to_accelerator(corr: Tensor, like: Tensor) -> Tensor:
    """Pinned, non-blocking copy of the host correction onto the current stream of `like`;
    the caching host allocator keeps the pinned block alive until the copy has run."""
    return corr.to(like.dtype).pin_memory().to(like.device, non_blocking=True)


def _cpu_to_accelerator(corr: Tensor, like: Tensor) -> Tensor:
    """CPU twin of _cuda_to_accelerator."""
    return corr.to(device=like.device, dtype=like.dtype)


def _host_branch(x_host: Tensor, ready: "torch.cuda.Event | None", a: Tensor,
                 b: Tensor) -> tuple[Tensor, float]:
    """Worker body: wait for the staged input, then (x @ A) @ B. Returns (correction, s)."""
    if ready is not None:
        ready.synchronize()  # blocks this worker only, never the accelerator
    start = time.perf_counter()
    with torch.no_grad():
        low = x_host.to(a.dtype) @ a  # [..., r]
        corr = low @ b  # [..., out]
    return corr, time.perf_counter() - start


class CompensatedLinear(nn.Module):
    """QuantLinear on the accelerator plus a host-side low-rank correction run in parallel.

    Inference only (the branch runs without autograd). A and B are plain host tensors, not
    buffers, so `.to(device)` moves only the backbone. The worker thread is created on the
    first forward that needs it and ended by `close()` (or leaving a `with` block); pass
    `pool` to share one worker between layers (then `close()` leaves it running).
    executor/offload.py may replace `quant` by a streamed or host-computed backbone with the
    same call signature; forward, and so the branch's concurrency, stays the same.

    Counters (seconds, cumulative until `reset_timers()`): `host_branch_s` is the host
    compute time of the branch; `wait_s` is how long forward blocked on the branch after
    issuing the accelerator matmul. On the CPU loopback device the matmul is synchronous,
    so `wait_s` is exactly the accelerator's idle time; on CUDA it is an upper bound.
    """

    def __init__(self, quant: QuantLinear, a: Tensor | None = None, b: Tensor | None = None,
                 host_device: str | torch.device = "cpu",
                 pool: ThreadPoolExecutor | None = None):
        super().__init__()
        self.quant = quant
        self.host_device = torch.device(host_device)
        empty = torch.empty(quant.in_features, 0), torch.empty(0, quant.out_features)
        a, b = (empty if a is None else (a, b))
        if a.shape[0] != quant.in_features or b.shape[1] != quant.out_features \
                or a.shape[1] != b.shape[0]:
            raise PlanError(f"compensation factors: A {tuple(a.shape)} and B {tuple(b.shape)} "
                            f"do not fit [in={quant.in_features}, r] x [r, out="
                            f"{quant.out_features}]; rebuild them for this tensor")
        self.a = a.detach().to(self.host_device).contiguous()  # [in, r]
        self.b = b.detach().to(self.host_device).contiguous()  # [r, out]
        self._shared_pool = pool
        self._own_pool: ThreadPoolExecutor | None = None
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.reset_timers()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, bits: int = 4, group_size: int = 128,
                    symmetric: bool = True, act_second_moment: Tensor | None = None,
                    device: str | torch.device | None = None,
                    host_device: str | torch.device = "cpu",
                    factor_dtype: torch.dtype = torch.float32, cache_dequantized: bool = False,
                    pool: ThreadPoolExecutor | None = None) -> "CompensatedLinear":
        """Quantize `linear`, build rank-`rank` factors of its error, place the backbone on
        `device` (default: where `linear` is) and the factors on `host_device`."""
        weight = linear.weight.detach()
        qt = quantize(weight, bits, group_size, symmetric)
        quant = QuantLinear(qt, linear.bias, cache_dequantized, compute_dtype=weight.dtype)
        quant = quant.to(weight.device if device is None else device)
        a, b = residual_factors(weight, qt, rank, act_second_moment, factor_dtype)
        return cls(quant, a, b, host_device, pool)

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def factor_bytes(self) -> int:
        """Host bytes held by A and B."""
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def reset_timers(self) -> None:
        self.host_branch_s = 0.0
        self.wait_s = 0.0
        self.calls = 0

    def _pool(self) -> ThreadPoolExecutor:
        if self._shared_pool is not None:
            return self._shared_pool
        if self._own_pool is None:
            self._own_pool = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="offplan-compensation")
        return self._own_pool

    def _stage(self, x: Tensor) -> tuple[Tensor, "torch.cuda.Event | None"]:
        if x.is_cuda and torch.cuda.is_available() and self.host_device.type == "cpu":
            stream = self._side_streams.get(x.device)
            if stream is None:
                stream = self._side_streams[x.device] = torch.cuda.Stream(device=x.device)
            return _cuda_stage_to_host(x, stream)
        return _cpu_stage_to_host(x, self.host_device), None

    def forward(self, x: Tensor) -> Tensor:  # x: [..., in] -> [..., out]
        if self.rank == 0:
            return self.quant(x)
        x_host, ready = self._stage(x)
        future = self._pool().submit(_host_branch, x_host, ready, self.a, self.b)
        y = self.quant(x)  # [..., out], on the accelerator while the branch runs
        start = time.perf_counter()
        corr, branch_s = future.result()  # [..., out] on the host
        self.wait_s += time.perf_counter() - start
        self.host_branch_s += branch_s
        self.calls += 1
        back = _cuda_to_accelerator if y.is_cuda else _cpu_to_accelerator
        return y + back(corr, y)

    def close(self) -> None:
        """End this module's own worker thread (a shared `pool` is left to its owner)."""
        if self._own_pool is not None:
            self._own_pool.shutdown(wait=True)
            self._own_pool = None

    def __enter__(self) -> "CompensatedLinear":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, host_device={self.host_device}"
