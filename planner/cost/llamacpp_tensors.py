"""The weights as llama.cpp holds them: one GGUF tensor per matrix (a layer's experts are one
`ffn_*_exps` tensor), named as in the file, with the storage type the GGUF header gives.

A GgufTensor stands for one or more ModelSpec tensors (`members`: every expert of a layer),
so a llama.cpp placement maps onto an offplan Placement and back. Bytes come from the
tensor's GGML type when it is known (from a GGUF header, or from a llama.cpp file type such
as Q4_K_M, whose per-tensor rules follow llama_tensor_get_type in src/llama-quant.cpp),
else from the ModelSpec's own size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from planner.errors import SpecError
from planner.model.gguf import GGML_TYPES, read_gguf_header
from planner.model.spec import ModelSpec, TensorSpec

BITS_BY_TYPE = {t.name: t.bits_per_weight for t in GGML_TYPES.values()}
# ModelSpec kind -> GGUF tensor kind (llama.cpp's LLM_TENSOR names)
_KINDS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
          "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
          "router": "ffn_gate_inp", "shared_gate_proj": "ffn_gate_shexp", "shared_up_proj": "ffn_up_shexp",
          "shared_down_proj": "ffn_down_shexp", "q_a_proj": "attn_q_a", "q_b_proj": "attn_q_b",
          "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_b_proj": "attn_kv_b"}
# Order of a layer's matrices in llama.cpp's graph (build_attn, then build_ffn / build_moe_ffn);
# "attention" marks where attention over the KV cache runs.
LAYER_ORDER = ("attn_q", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b", "attn_k", "attn_v", "attention", "attn_output", "ffn_gate_inp",
               "ffn_up", "ffn_gate", "ffn_down", "ffn_up_exps", "ffn_gate_exps", "ffn_down_exps",
               "ffn_up_shexp", "ffn_gate_shexp", "ffn_down_shexp")
# llama.cpp file types (LLAMA_FTYPE_*) -> type of the bulk of the matrices
FTYPE_BASE = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K",
              "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q4_K_M": "Q4_K",
              "Q4_K_S": "Q4_K", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL",
              "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K", "MXFP4": "MXFP4"}
# attn_v / ffn_down of the "more bits" layers get this type (llama_tensor_get_type)
_MORE_BITS = {"Q4_K_M": "Q6_K", "Q5_K_M": "Q6_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "Q2_K": "Q3_K"}


@dataclass(frozen=True)
class GgufTensor:
    name: str  # blk.3.ffn_down_exps.weight, output.weight, token_embd.weight
    kind: str  # attn_q, ffn_down_exps, output, token_embd ...
    layer: int | None
    members: tuple[str, ...]  # ModelSpec tensor names
    n_bytes: int
    flops_per_token: float  # of the routed share (experts)
    route_prob: float  # share of tokens that use one expert (1 for dense)
    rows: int  # output features of one matrix (activations coming out)
    cols: int  # input features


def gguf_kind(t: TensorSpec) -> str:
    if t.group == "embed":
        return "token_embd"
    if t.group == "head":
        return "output"
    return _KINDS.get(t.kind, t.kind)


def gguf_name(kind: str, layer: int | None) -> str:
    return f"{kind}.weight" if layer is None else f"blk.{layer}.{kind}.weight"


def _split_bank(spec: ModelSpec, t: TensorSpec) -> list[tuple[str, int, int, float]]:
    """A layer's expert bank as llama.cpp stores it: one tensor per projection holding every
    expert ((kind, rows, cols, share of the bank))."""
    inter = spec.moe.expert_intermediate if spec.moe else t.rows // 3
    if spec.ffn == "plain":
        return [("ffn_up_exps", inter, t.cols, 0.5), ("ffn_down_exps", t.cols, inter, 0.5)]
    return [(f"ffn_{k}_exps", *((t.cols, inter) if k == "down" else (inter, t.cols)), 1 / 3)
            for k in ("up", "gate", "down")]


def gguf_tensors(spec: ModelSpec, types: dict[str, str] | None = None) -> tuple[GgufTensor, ...]:
    """The model's GGUF matrices in execution order (token_embd, layers, output)."""
    types = types or {}
    out = []
    for t in spec.tensors():
        if t.experts:
            parts = _split_bank(spec, t)
        else:
            parts = [(gguf_kind(t), t.rows, t.cols, 1.0)]
        for kind, rows, cols, share in parts:
            name = gguf_name(kind, t.layer)
            params = rows * cols * max(t.experts, 1)
            n_bytes = int(t.n_bytes * share)
            if name in types:
                n_bytes = int(params * BITS_BY_TYPE[types[name]] / 8)
            elif kind == "output" and spec.tied_embeddings and "token_embd.weight" in types:
                n_bytes = int(params * BITS_BY_TYPE[types["token_embd.weight"]] / 8)
            out.append(GgufTensor(name, kind, t.layer, (t.name,), n_bytes, t.flops_per_token * share,
                                  t.route_prob, rows, cols))
    return tuple(sorted(out, key=_execution_key))


def _execution_key(t: GgufTensor) -> tuple:
    if t.layer is None:
        return (0 if t.kind == "token_embd" else 2, 0, 0)
    rank = LAYER_ORDER.index(t.kind) if t.kind in LAYER_ORDER else len(LAYER_ORDER)
    return (1, t.layer, rank)


def types_from_gguf(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name, as the file's header says."""
    header = read_gguf_header(path)
    types = {}
    for info in header["tensors"]:
        ggml = GGML_TYPES.get(info.ggml_type)
        if ggml is not None:
            types[info.name] = ggml.name
    return types


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits(): the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def types_for_ftype(spec: ModelSpec, ftype: str) -> dict[str, str]:
    """Per-tensor types of a file quantized as `ftype` (Q4_K_M, Q8_0, IQ4_XS ...), following
    llama_tensor_get_type: output.weight is Q6_K unless the file is Q8_0 or float; attn_v and
    ffn_down of use_more_bits layers get more bits in the _M / _L mixes."""
    key = ftype.upper()
    if key not in FTYPE_BASE:
        raise SpecError(f"--quant {ftype!r}: unknown llama.cpp file type; known: {', '.join(FTYPE_BASE)}")
    base = FTYPE_BASE[key]
    floats = base in ("F32", "F16", "BF16")
    types = {}
    for t in gguf_tensors(spec):
        kind_type = base
        if t.kind == "output" and not floats and base != "Q8_0":
            kind_type = "Q6_K"
        elif t.layer is not None and key in _MORE_BITS and re.fullmatch(r"attn_v|ffn_down(_exps)?", t.kind):
            kind_type = _MORE_BITS[key] if _more_bits(t.layer, spec.layers) else base
        elif key == "MXFP4" and not t.kind.endswith("_exps") and t.layer is not None:
            kind_type = "Q8_0"  # gpt-oss GGUFs keep attention in 8 bits, experts in MXFP4
        types[t.name] = kind_type
    return types
