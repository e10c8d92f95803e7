"""PyTorch's fused quantized matmuls, and the weight layouts they read.

A quantized matrix keeps the bytes `planner.model.spec.Quantization.bytes_for` charges for
(executor/quant.py); packing only reorders them for one kernel, so a packed matrix streams
and sits in memory at the size the plan counts:

- int4, group size 32/64/128/256: codes go through `_convert_weight_to_int4pack_for_cpu`
  (uint8 [out, in/2], an order that depends on the CPU's vector width) or, on CUDA,
  `_convert_weight_to_int4pack` (int32 [out/8, in/(16·tiles), 32, tiles/2]), multiplied by
  `_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm`, which compute
  w = (code - 8) · scale + zero (the formula of `dequantize`) from a bf16 [in/group, out, 2]
  scale-and-zero operand. An asymmetric matrix stores that operand as `scales` (its 4 bytes
  per group are the scale and offset the planner counts; `zeros` is then None); a symmetric
  one stores only its scales, bf16 [in/group, out], and each call pads them with the zero
  half (a transient of 4 bytes per group, ~50 µs per call on a 2816x1024 matrix here:
  asymmetric int4 is the faster format).
- int8, one group per output channel (group size 0): codes become int8 (code - 128), scales
  bf16 [out]; `_weight_int8pack_mm` takes exactly that. An asymmetric matrix adds its offset
  as sum(x) · offset (one [rows, out] product). Group-wise int8 has no fused kernel and stays
  in the "ref" layout (a chunked dequantizing matmul).

Activations enter the kernels in bf16 (CUDA's int4 kernel takes nothing else; the CPU
kernels are vectorised only for bf16) and the result is cast back to the model's dtype.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes the int4 kernels accept (CPU and CUDA)
KERNEL_DTYPE = torch.bfloat16
_CPU_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: out_features % 16 == 0
_CUDA_ROW_MULTIPLE = 8  # _convert_weight_to_int4pack: out_features % 8 == 0
_PACK_CHUNK_ROWS = 512  # rows packed at a time (a multiple of the CPU kernel's 64-row blocks)


def kernel_layout(device: torch.device) -> str:
    """The layout the fused kernels of `device` read: "cuda" or "cpu"."""
    return "cuda" if device.type == "cuda" else "cpu"


def _inner_k_tiles(in_features: int) -> int:
    """The largest tiling (8, 4 or 2) of CUDA's int4 layout that divides the row length."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), 0)


def fused_supported(shape: tuple[int, int], bits: int, group_size: int, layout: str) -> bool:
    """Whether the fused kernel of `layout` takes a matrix of this shape and grouping."""
    out_features, in_features = shape
    if bits == 8:
        return group_size == in_features
    if bits != 4 or group_size not in KERNEL_GROUPS:
        return False
    if layout == "cuda":
        return out_features % _CUDA_ROW_MULTIPLE == 0 and _inner_k_tiles(in_features) > 0
    return out_features % _CPU_ROW_MULTIPLE == 0 and in_features % 2 == 0


def pack(qt, layout: str):
    """`qt` (a "ref" QuantizedTensor) reordered for the fused kernel of `layout`, on the same
    device (a "cuda" pack of a host matrix is converted on the current CUDA device and copied
    back); `qt` itself when that kernel does not take it."""
    from .quant import unpacked_codes  # executor/quant.py imports this module

    if qt.layout == layout or not fused_supported(qt.shape, qt.bits, qt.group_size, layout):
        return qt
    codes = unpacked_codes(qt)  # [out, in] uint8
    if qt.bits == 8:
        data = (codes.to(torch.int16) - 128).to(torch.int8)  # [out, in]
        zeros = None if qt.zeros is None else qt.zeros.reshape(-1).contiguous()
        return replace(qt, data=data, scales=qt.scales.reshape(-1).contiguous(), zeros=zeros, layout=layout)
    data = _pack_int4_cuda(codes) if layout == "cuda" else _pack_int4_cpu(codes)
    if qt.zeros is None:
        return replace(qt, data=data, scales=qt.scales.t().contiguous(), layout=layout)  # [ng, out]
    scale_zero = torch.stack((qt.scales.t(), qt.zeros.t()), dim=-1).contiguous()  # [ng, out, 2]
    return replace(qt, data=data, scales=scale_zero, zeros=None, layout=layout)


def _pack_int4_cpu(codes: Tensor) -> Tensor:
    """[out, in] uint8 codes -> the CPU kernel's uint8 [out, in/2], a block of rows at a time
    (the layout is made of independent 32- or 64-row blocks, so chunks concatenate)."""
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                 codes[start:start + _PACK_CHUNK_ROWS].to(torch.int32), 2)  # [rows, in/2]
             for start in range(0, codes.shape[0], _PACK_CHUNK_ROWS)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _pack_int4_cuda(codes: Tensor) -> Tensor:
    """[out, in] uint8 codes -> CUDA's tiled int32 layout, on the device where `codes` are
    (or the current CUDA device, copied back to the host)."""
    device = codes.device if codes.is_cuda else torch.device("cuda", torch.cuda.current_device())
    on_device = codes.to(device)
    pairs = (on_device[:, ::2] << 4) | on_device[:, 1::2]  # [out, in/2]: even element high
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), _inner_k_tiles(codes.shape[1]))
    return packed.to(codes.device)


def fused_matmul(x: Tensor, qt, bias: Tensor | None) -> Tensor:
    """y = x · deq(W)ᵀ + b through the fused kernel of qt.layout. x [..., in] -> [..., out]."""
    out_features, in_features = qt.shape
    rows = x.reshape(-1, in_features)  # [m, in]
    xk = rows.to(KERNEL_DTYPE).contiguous()  # [m, in] bf16
    if qt.bits == 4:
        scale_zero = qt.scales  # [ng, out, 2] (asymmetric), or [ng, out]: zero half added here
        if scale_zero.dim() == 2:
            scale_zero = torch.nn.functional.pad(scale_zero.unsqueeze(-1), (0, 1))  # [ng, out, 2]
        if qt.layout == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(xk, qt.data, qt.group_size, scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, qt.data, qt.group_size, scale_zero)
        y = y.to(x.dtype)  # [m, out]
    else:
        y = torch.ops.aten._weight_int8pack_mm(xk, qt.data, qt.scales).to(x.dtype)  # [m, out]
        if qt.zeros is not None:  # Σ_k x_k · offset: the asymmetric part of every weight
            offset = rows.float().sum(dim=-1, keepdim=True) * qt.zeros.float()  # [m, out]
            y += offset.to(x.dtype)
    y = y.view(*x.shape[:-1], out_features)
    return y if bias is None else y + bias.to(x.dtype)


def placed_layout(accelerator: torch.device, placement: str, prefill_streamed: bool) -> str:
    """The layout a non-resident matrix keeps in host memory: the accelerator's kernel layout
    when it streams, the CPU's when the host computes it. A host-computed matrix that also
    streams for prefill is read by both; on CUDA the two layouts differ, so it keeps the
    "ref" layout there (chunked dequantizing matmuls on both sides)."""
    accelerator_layout = kernel_layout(accelerator)
    if placement == "stream":
        return accelerator_layout
    if prefill_streamed and accelerator_layout != "cpu":
        return "ref"
    return "cpu"
