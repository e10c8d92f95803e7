"""Group-wise integer weights (int4 packed two per byte, int8) and a Linear that runs on them.

Layout follows torch Linear: a weight W is [out_features, in_features] and groups run along
the input dimension, so each row is cut into `in_features / group_size` groups that each own
one bf16 scale (and, when asymmetric, one bf16 offset). `group_size` 0 means one group per
row (per output channel). This is the byte layout `planner.model.spec.Quantization.bytes_for`
charges for, and the one PyTorch's fused kernels read (executor/qkernels.py): bf16 because
`_weight_int4pack_mm` wants bf16 on CUDA and the CPU kernels have their vectorised path
only for bf16.

Codes are always stored unsigned in [0, 2^bits - 1]; with mid = 2^(bits-1):
- symmetric:  w ≈ (code - mid) · scale, scale = absmax / (mid - 1);
- asymmetric: w ≈ (code - mid) · scale + offset, scale = (max - min) / (2^bits - 1), the range
  widened to include 0 and offset ≈ min + mid · scale (the fused kernels' float zero point).
Codes are computed against the stored (bf16) scale and offset; the scale is rounded *up*, so
every element's reconstruction error is at most half a step: |w - deq(w)| <= scale / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from planner.errors import SpecError

from . import qkernels

SUPPORTED_BITS = (4, 8)
_MIN_SCALE = 2.0 ** -24  # keeps all-zero groups finite (a bf16 normal number)
SCALE_DTYPE = torch.bfloat16
# The fallback (group sizes the fused kernels do not take) dequantizes this many weights at a
# time: its temporaries are ~14 bytes per weight of one chunk, never of the whole matrix.
DEQUANT_CHUNK_WEIGHTS = 2 ** 18


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized weight matrix of logical `shape` = (out_features, in_features).

    `layout` "ref" (what `quantize` returns): `data` uint8 codes, [out, ceil(in/2)] for 4 bits
    (element 2k in the low nibble, 2k+1 in the high nibble) or [out, in] for 8 bits; `scales`
    bf16 [out, in/group_size]; `zeros` bf16 offsets of the same shape when asymmetric, None when
    symmetric. Layouts "cpu" and "cuda" hold the same bytes in the order a fused kernel reads
    them (executor/qkernels.py)."""

    data: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]
    layout: str = "ref"

    @property
    def symmetric(self) -> bool:
        """No offsets stored (a packed asymmetric int4 keeps them inside `scales`, [ng, out, 2])."""
        return self.zeros is None and self.scales.dim() < 3

    @property
    def nbytes(self) -> int:
        """Storage bytes: packed codes + scales (+ offsets)."""
        return sum(t.numel() * t.element_size() for t in self.storage)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        return self.with_storage(tuple(t.to(device) for t in self.storage))

    @property
    def storage(self) -> tuple[Tensor, ...]:
        """(data, scales) or (data, scales, zeros): the tensors `nbytes` counts, in that order."""
        return (self.data, self.scales) if self.zeros is None else (self.data, self.scales, self.zeros)

    def with_storage(self, storage: tuple[Tensor, ...]) -> "QuantizedTensor":
        """The same layout backed by other tensors of the same shapes and dtypes, in `storage`
        order (a pinned host copy, views into a streaming buffer)."""
        data, scales, *zeros = storage
        return QuantizedTensor(data, scales, zeros[0] if zeros else None, self.bits,
                               self.group_size, self.shape, self.layout)


def check_quant_params(in_features: int, bits: int, group_size: int) -> None:
    """Raise SpecError naming the field when (bits, group_size) cannot quantize this width."""
    if bits not in SUPPORTED_BITS:
        raise SpecError(f"quantization.bits: the executor runs 4 or 8 bits, got {bits}; "
                        f"set bits to 4 or 8")
    if group_size < 0 or (group_size and in_features % group_size != 0):
        raise SpecError(f"quantization.group_size: {group_size} does not divide "
                        f"in_features={in_features}; pick a divisor of {in_features} "
                        f"(e.g. 32, 64 or 128), or 0 for one scale per output channel")


def pack_int4(codes: Tensor) -> Tensor:
    """[rows, cols] uint8 codes in [0, 15] -> [rows, ceil(cols/2)] uint8, two codes per byte."""
    rows, cols = codes.shape
    if cols % 2:
        codes = torch.cat([codes, codes.new_zeros(rows, 1)], dim=1)  # pad nibble, dropped on unpack
    pairs = codes.view(rows, -1, 2)  # [rows, ceil(cols/2), 2]
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_int4(packed: Tensor, cols: int) -> Tensor:
    """Inverse of pack_int4: [rows, ceil(cols/2)] uint8 -> [rows, cols] uint8 codes."""
    low = packed & 0x0F
    high = packed >> 4
    codes = torch.stack([low, high], dim=-1).view(packed.shape[0], -1)  # [rows, 2*ceil(cols/2)]
    return codes[:, :cols].contiguous()


def _round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round a positive float tensor to the nearest `dtype` value (bf16 / fp16) that is >= x."""
    h = x.to(dtype)
    below = h.to(x.dtype) < x
    # For positive values the next representable number is the next bit pattern.
    bumped = (h.view(torch.int16) + 1).view(dtype)
    return torch.where(below, bumped, h)


def _work_dtype(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def quantize(w: Tensor, bits: int = 4, group_size: int = 128,
             symmetric: bool = True) -> QuantizedTensor:
    """Quantize a [out, in] weight group-wise along `in` (group_size 0: per output channel).
    Error per element <= scale / 2."""
    if w.dim() != 2:
        raise SpecError(f"quantize: weight must be 2-D [out_features, in_features], "
                        f"got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    check_quant_params(in_features, bits, group_size)
    group_size = group_size or in_features
    wf = w.detach().to(_work_dtype(w))
    if not torch.isfinite(wf).all():
        raise SpecError("quantize: weight contains NaN or Inf; fix the checkpoint")
    groups = wf.reshape(out_features, in_features // group_size, group_size)  # [out, ng, g]
    top, mid = 2 ** bits - 1, 2 ** (bits - 1)
    if symmetric:
        absmax = groups.abs().amax(dim=-1)  # [out, ng]
        scales = _round_up((absmax / (mid - 1)).clamp_min(_MIN_SCALE), SCALE_DTYPE)
        zeros = None
        offset = torch.zeros_like(absmax)  # [out, ng]
    else:
        lo = groups.amin(dim=-1).clamp_max(0.0)  # [out, ng]; range includes 0
        hi = groups.amax(dim=-1).clamp_min(0.0)
        scales = _round_up(((hi - lo) / top).clamp_min(_MIN_SCALE), SCALE_DTYPE)
        # |lo + mid·scale| <= mid·scale, so rounding the offset to bf16 moves it by at most
        # mid·scale/256 <= scale/2: the codes below still cover [lo, hi].
        zeros = (lo + mid * scales.to(wf.dtype)).to(SCALE_DTYPE)  # [out, ng]
        offset = zeros.to(wf.dtype)
    if not torch.isfinite(scales).all():
        raise SpecError("quantize: a weight group exceeds the bf16 scale range; fix the checkpoint")
    step = scales.to(wf.dtype).unsqueeze(-1)  # [out, ng, 1]
    codes = torch.round((groups - offset.unsqueeze(-1)) / step + mid).clamp(0, top)  # [out, ng, g]
    codes = codes.to(torch.uint8).reshape(out_features, in_features)
    data = pack_int4(codes) if bits == 4 else codes.contiguous()
    return QuantizedTensor(data, scales, zeros, bits, group_size, (out_features, in_features))


def unpacked_codes(qt: QuantizedTensor) -> Tensor:
    """The uint8 codes [out, in] of a QuantizedTensor in the "ref" layout."""
    _check_ref(qt)
    return unpack_int4(qt.data, qt.shape[1]) if qt.bits == 4 else qt.data


def _check_ref(qt: QuantizedTensor) -> None:
    if qt.layout != "ref":
        raise ValueError(f"a QuantizedTensor packed for the {qt.layout} kernel has no plain codes; "
                         "dequantize the one `quantize` returned")


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reconstruct the [out, in] weight in `dtype` (arithmetic in float32, or float64)."""
    out_features, in_features = qt.shape
    work = torch.float64 if dtype == torch.float64 else torch.float32
    codes = unpacked_codes(qt).to(work).reshape(out_features, -1, qt.group_size)  # [out, ng, g]
    w = (codes - 2 ** (qt.bits - 1)) * qt.scales.to(work).unsqueeze(-1)  # [out, ng, g]
    if qt.zeros is not None:
        w += qt.zeros.to(work).unsqueeze(-1)
    return w.reshape(out_features, in_features).to(dtype)


def _row_slice(qt: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Rows start..stop-1 of a "ref" QuantizedTensor (views, no copy)."""
    return QuantizedTensor(qt.data[start:stop], qt.scales[start:stop],
                           None if qt.zeros is None else qt.zeros[start:stop], qt.bits,
                           qt.group_size, (stop - start, qt.shape[1]))


def quant_matmul(x: Tensor, qt: QuantizedTensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ deq(qt).T + b on the device of qt: the matmul of every quantized Linear,
    resident, streamed or host-computed. x [..., in] -> [..., out]. Packed layouts run
    PyTorch's fused kernel; the "ref" layout (group sizes those kernels do not take)
    dequantizes DEQUANT_CHUNK_WEIGHTS weights at a time into the output's columns."""
    if qt.layout != "ref":
        return qkernels.fused_matmul(x, qt, bias)
    out_features, in_features = qt.shape
    rows = max(1, DEQUANT_CHUNK_WEIGHTS // in_features)
    out = x.new_empty(*x.shape[:-1], out_features)  # [..., out]
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        w = dequantize(_row_slice(qt, start, stop), x.dtype)  # [rows, in]
        out[..., start:stop] = nn.functional.linear(x, w)
    return out if bias is None else out + bias.to(x.dtype)


class QuantLinear(nn.Module):
    """y = x @ deq(W).T + b from a QuantizedTensor.

    On its first forward the packed weight is rearranged, in place and at the same size, into
    the layout of the fused kernel of the device it runs on (executor/qkernels.py), when that
    kernel takes its shape and group size. Memory trade-off (`cache_dequantized`):
    - False (default): only the packed codes + scales stay resident (bits/8 bytes per weight
      plus 2-4 bytes per group); the fused kernel reads them directly.
    - True: the dequantized weight is kept as a buffer in `compute_dtype` (2 bytes per weight
      in bf16, 4 in fp32): float matmul speed and numerics, no memory saving.
    """

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None = None,
                 cache_dequantized: bool = False, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.bits = qt.bits
        self.group_size = qt.group_size
        self.layout = qt.layout
        self.cache_dequantized = cache_dequantized
        self.register_buffer("qdata", qt.data)
        self.register_buffer("scales", qt.scales)
        self.register_buffer("zeros", qt.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))
        cached = dequantize(qt, compute_dtype) if cache_dequantized else None
        self.register_buffer("weight_cache", cached, persistent=False)

    def quantized(self) -> QuantizedTensor:
        """The QuantizedTensor backed by this module's (possibly moved) buffers."""
        return QuantizedTensor(self.qdata, self.scales, self.zeros, self.bits, self.group_size,
                               (self.out_features, self.in_features), self.layout)

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The dequantized [out, in] weight in `dtype` (before the first forward packed it)."""
        if self.weight_cache is not None:
            return self.weight_cache.to(dtype)
        return dequantize(self.quantized(), dtype)

    def pack_for(self, device: torch.device) -> None:
        """Rearrange the buffers for the fused kernel of `device` (no-op when packed already
        or when the kernel does not take this shape)."""
        if self.layout == "ref":
            self.pack_to(qkernels.kernel_layout(device))

    def pack_to(self, layout: str) -> None:
        """Rearrange the buffers, at the same size, into `layout` ("cpu", "cuda" or "ref")."""
        if self.layout == layout or layout == "ref":
            return
        packed = qkernels.pack(self.quantized(), layout)
        self.qdata, self.scales, self.zeros = packed.data, packed.scales, packed.zeros
        self.layout = packed.layout

    def forward(self, x: Tensor) -> Tensor:  # x: [..., in] -> [..., out]
        if self.weight_cache is None:
            self.pack_for(x.device)
            return quant_matmul(x, self.quantized(), self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight_cache.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, layout={self.layout}, "
                f"symmetric={self.quantized().symmetric}, cached={self.cache_dequantized}")


def quant_linear_from(linear: nn.Linear, bits: int = 4, group_size: int = 128,
                      symmetric: bool = True, cache_dequantized: bool = False) -> QuantLinear:
    """Quantize an nn.Linear's weight and wrap it (bias kept in the weight's dtype)."""
    qt = quantize(linear.weight, bits, group_size, symmetric)
    return QuantLinear(qt, linear.bias, cache_dequantized, compute_dtype=linear.weight.dtype)
