"""Group-wise integer weights (int4 packed two per byte, int8) and a Linear that runs on them.

Layout follows torch Linear: a weight W is [out_features, in_features] and groups run along
the input dimension, so each row is cut into `in_features / group_size` groups that each own
one fp16 scale (and, when asymmetric, one fp16 zero point holding an integer code). This is
the byte layout `planner.model.spec.Quantization.bytes_for` charges for.

Codes are always stored unsigned in [0, 2^bits - 1]:
- symmetric:  w ≈ (code - 2^(bits-1)) · scale, scale = absmax / (2^(bits-1) - 1);
- asymmetric: w ≈ (code - zero) · scale, scale = (max - min) / (2^bits - 1), with the range
  widened to include 0 so the zero point is a valid code.
Codes are computed against the stored (fp16) scale, which is rounded *up* to fp16, so every
element's reconstruction error is at most half a step: |w - deq(w)| <= scale / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from planner.errors import SpecError

SUPPORTED_BITS = (4, 8)
_MIN_SCALE = 2.0 ** -24  # smallest positive fp16 (subnormal); keeps all-zero groups finite


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized weight matrix of logical `shape` = (out_features, in_features).

    `data`: uint8 codes, [out, ceil(in/2)] for 4 bits (element 2k in the low nibble, 2k+1 in
    the high nibble) or [out, in] for 8 bits. `scales`: fp16 [out, in/group_size].
    `zeros`: fp16 [out, in/group_size] integer codes when asymmetric, None when symmetric."""

    data: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        """Storage bytes: packed codes + scales (+ zero points)."""
        zero_bytes = 0 if self.zeros is None else self.zeros.numel() * self.zeros.element_size()
        return (self.data.numel() * self.data.element_size()
                + self.scales.numel() * self.scales.element_size() + zero_bytes)

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
                               self.group_size, self.shape)


def check_quant_params(in_features: int, bits: int, group_size: int) -> None:
    """Raise SpecError naming the field when (bits, group_size) cannot quantize this width."""
    if bits not in SUPPORTED_BITS:
        raise SpecError(f"quantization.bits: the executor runs 4 or 8 bits, got {bits}; "
                        f"set bits to 4 or 8")
    if group_size <= 0 or in_features % group_size != 0:
        raise SpecError(f"quantization.group_size: {group_size} does not divide "
                        f"in_features={in_features}; pick a divisor of {in_features} "
                        f"(e.g. 32, 64 or 128)")


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


def _fp16_round_up(x: Tensor) -> Tensor:
    """Round a positive float tensor to the nearest fp16 value that is >= x."""
    h = x.to(torch.float16)
    below = h.to(x.dtype) < x
    # For positive fp16 values the next representable number is the next bit pattern.
    bumped = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(below, bumped, h)


def _work_dtype(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def quantize(w: Tensor, bits: int = 4, group_size: int = 128,
             symmetric: bool = True) -> QuantizedTensor:
    """Quantize a [out, in] weight group-wise along `in`. Error per element <= scale / 2."""
    if w.dim() != 2:
        raise SpecError(f"quantize: weight must be 2-D [out_features, in_features], "
                        f"got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    check_quant_params(in_features, bits, group_size)
    wf = w.detach().to(_work_dtype(w))
    if not torch.isfinite(wf).all():
        raise SpecError("quantize: weight contains NaN or Inf; fix the checkpoint")
    groups = wf.reshape(out_features, in_features // group_size, group_size)  # [out, ng, g]
    top = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        absmax = groups.abs().amax(dim=-1)  # [out, ng]
        scales = _fp16_round_up((absmax / (half - 1)).clamp_min(_MIN_SCALE))
        offset = torch.full_like(absmax, float(half))  # [out, ng]
        zeros = None
    else:
        lo = groups.amin(dim=-1).clamp_max(0.0)  # [out, ng]; range includes 0
        hi = groups.amax(dim=-1).clamp_min(0.0)
        scales = _fp16_round_up(((hi - lo) / top).clamp_min(_MIN_SCALE))
        offset = torch.round(-lo / scales.to(wf.dtype)).clamp(0, top)  # [out, ng] zero codes
        zeros = offset.to(torch.float16)
    if not torch.isfinite(scales).all():
        raise SpecError("quantize: a weight group exceeds the fp16 scale range (|w| > 65504 * "
                        "2^(bits-1)); fix the checkpoint")
    step = scales.to(wf.dtype).unsqueeze(-1)  # [out, ng, 1]
    codes = torch.round(groups / step + offset.unsqueeze(-1)).clamp(0, top)  # [out, ng, g]
    codes = codes.to(torch.uint8).reshape(out_features, in_features)
    data = pack_int4(codes) if bits == 4 else codes.contiguous()
    return QuantizedTensor(data, scales, zeros, bits, group_size, (out_features, in_features))


def unpacked_codes(qt: QuantizedTensor) -> Tensor:
    """The uint8 codes [out, in] of a QuantizedTensor."""
    return unpack_int4(qt.data, qt.shape[1]) if qt.bits == 4 else qt.data


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reconstruct the [out, in] weight in `dtype` (arithmetic in float32, or float64)."""
    out_features, in_features = qt.shape
    work = torch.float64 if dtype == torch.float64 else torch.float32
    codes = unpacked_codes(qt).to(work).reshape(out_features, -1, qt.group_size)  # [out, ng, g]
    if qt.zeros is None:
        offset = torch.full(qt.scales.shape, float(2 ** (qt.bits - 1)), dtype=work,
                            device=codes.device)  # [out, ng]
    else:
        offset = qt.zeros.to(work)
    w = (codes - offset.unsqueeze(-1)) * qt.scales.to(work).unsqueeze(-1)  # [out, ng, g]
    return w.reshape(out_features, in_features).to(dtype)


def quant_matmul(x: Tensor, qt: QuantizedTensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ deq(qt).T + b on the device of qt: the dequantizing matmul of every quantized
    Linear, resident, streamed or host-computed. x [..., in] -> [..., out]; the transient
    [out, in] weight is built in x's dtype and dropped after the call."""
    w = dequantize(qt, x.dtype)  # [out, in]
    return nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


class QuantLinear(nn.Module):
    """y = x @ deq(W).T + b from a QuantizedTensor.

    Memory trade-off (`cache_dequantized`):
    - False (default): only the packed codes + scales stay resident (bits/8 bytes per weight
      plus 2-4 bytes per group); each forward materialises a transient [out, in] weight in
      the input dtype, costing that workspace and a dequantize pass per call.
    - True: the dequantized weight is kept as a buffer in `compute_dtype` (2 bytes per weight
      in fp16, 4 in fp32), which removes the per-call work but gives back the memory saving.
    """

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None = None,
                 cache_dequantized: bool = False, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.bits = qt.bits
        self.group_size = qt.group_size
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
                               (self.out_features, self.in_features))

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The dequantized [out, in] weight in `dtype`."""
        if self.weight_cache is not None:
            return self.weight_cache.to(dtype)
        return dequantize(self.quantized(), dtype)

    def forward(self, x: Tensor) -> Tensor:  # x: [..., in] -> [..., out]
        if self.weight_cache is None:
            return quant_matmul(x, self.quantized(), self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight_cache.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.zeros is None}, cached={self.cache_dequantized}")


def quant_linear_from(linear: nn.Linear, bits: int = 4, group_size: int = 128,
                      symmetric: bool = True, cache_dequantized: bool = False) -> QuantLinear:
    """Quantize an nn.Linear's weight and wrap it (bias kept in the weight's dtype)."""
    qt = quantize(linear.weight, bits, group_size, symmetric)
    return QuantLinear(qt, linear.bias, cache_dequantized, compute_dtype=linear.weight.dtype)
