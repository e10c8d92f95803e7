"""The exact weight inventory of a ModelSpec: every matrix, in execution order.

Names follow Hugging Face module paths without the `model.` prefix and the `.weight` suffix
(`layers.3.self_attn.q_proj`, `layers.3.mlp.down_proj`, `embed_tokens`, `lm_head`). Routed
experts are one bank per layer (`layers.3.mlp.experts`), as GGUF stores them (`ffn_*_exps`)
and as runtimes dispatch them (one grouped matmul per layer); the planner decides how many of
a bank's experts live on the accelerator, not where each expert matrix goes. The router is
`layers.3.mlp.gate`, shared experts `layers.3.mlp.shared_experts.{gate,up,down}_proj`; the
export maps these onto each family's own module names.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from planner.model.spec import ModelSpec, TensorSpec

GATED_KINDS = ("gate_proj", "up_proj", "down_proj")
PLAIN_KINDS = ("up_proj", "down_proj")
# Families whose attention output projection carries a bias when attention_bias is set.
O_BIAS_FAMILIES = ("llama", "gpt_oss", "qwen3", "qwen3_moe")


def _matrix(spec: ModelSpec, name: str, layer: int | None, kind: str, group: str, rows: int, cols: int,
            bias: bool = False, quantizable: bool = True) -> TensorSpec:
    from planner.model.spec import TensorSpec
    n_bytes = spec.matrix_bytes(rows, cols, quantizable, kind)
    if bias:
        n_bytes += bias_bytes(spec, rows)
    return TensorSpec(name, layer, kind, group, rows, cols, n_bytes, 2.0 * rows * cols)


def bias_bytes(spec: ModelSpec, n: int) -> int:
    """`n` bias values: in the model dtype, or as the file stores them (GGUF: F32)."""
    bits = spec.weight_bits.get("bias")
    return int(round(n * bits / 8)) if bits is not None else n * spec.weight_elt_bytes


def iter_tensors(spec: ModelSpec) -> Iterator[TensorSpec]:
    from planner.model.spec import TensorSpec
    h = spec.hidden
    embed_bytes = spec.matrix_bytes(spec.vocab, h, False, "embed_tokens")
    yield TensorSpec("embed_tokens", None, "embed_tokens", "embed", spec.vocab, h,
                     0 if spec.tied_embeddings else embed_bytes, 0.0)
    for layer in range(spec.layers):
        yield from (_mla_tensors(spec, layer) if spec.mla is not None else _gqa_tensors(spec, layer))
        if spec.is_moe_layer(layer):
            yield from _moe_tensors(spec, layer)
        else:
            yield from _dense_mlp(spec, layer, f"layers.{layer}.mlp", "", spec.intermediate)
    # A tied head is the embedding matrix: it has the embedding's storage type.
    bits_kind = "embed_tokens" if spec.tied_embeddings and "lm_head" not in spec.weight_bits else "lm_head"
    yield TensorSpec("lm_head", None, "lm_head", "head", spec.vocab, h,
                     spec.matrix_bytes(spec.vocab, h, False, bits_kind), 2.0 * spec.vocab * h)


def _gqa_tensors(spec: ModelSpec, layer: int) -> Iterator[TensorSpec]:
    h, hd, base = spec.hidden, spec.head_dim, f"layers.{layer}.self_attn"
    shapes = (("q_proj", spec.heads * hd, h), ("k_proj", spec.kv_heads * hd, h),
              ("v_proj", spec.kv_heads * hd, h), ("o_proj", h, spec.heads * hd))
    for kind, rows, cols in shapes:
        bias = spec.attention_bias and (kind != "o_proj" or spec.family in O_BIAS_FAMILIES)
        yield _matrix(spec, f"{base}.{kind}", layer, kind, "attn", rows, cols, bias)


def _mla_tensors(spec: ModelSpec, layer: int) -> Iterator[TensorSpec]:
    """DeepSeek's latent attention: a low-rank query path, one down-projection to the KV latent
    plus the shared rotary key, one up-projection to per-head keys (no rope part) and values."""
    m, h, heads, base = spec.mla, spec.hidden, spec.heads, f"layers.{layer}.self_attn"
    assert m is not None
    if m.q_lora_rank:
        yield _matrix(spec, f"{base}.q_a_proj", layer, "q_a_proj", "attn", m.q_lora_rank, h)
        yield _matrix(spec, f"{base}.q_b_proj", layer, "q_b_proj", "attn", heads * m.qk_head_dim, m.q_lora_rank)
    else:
        yield _matrix(spec, f"{base}.q_proj", layer, "q_proj", "attn", heads * m.qk_head_dim, h)
    yield _matrix(spec, f"{base}.kv_a_proj_with_mqa", layer, "kv_a_proj_with_mqa", "attn",
                  m.kv_lora_rank + m.qk_rope_head_dim, h)
    yield _matrix(spec, f"{base}.kv_b_proj", layer, "kv_b_proj", "attn",
                  heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    yield _matrix(spec, f"{base}.o_proj", layer, "o_proj", "attn", h, heads * m.v_head_dim)


def _dense_mlp(spec: ModelSpec, layer: int, base: str, kind_prefix: str, inter: int) -> Iterator[TensorSpec]:
    h = spec.hidden
    for kind in (PLAIN_KINDS if spec.ffn == "plain" else GATED_KINDS):
        rows, cols = (h, inter) if kind == "down_proj" else (inter, h)
        yield _matrix(spec, f"{base}.{kind}", layer, kind_prefix + kind, "mlp", rows, cols)


def _moe_tensors(spec: ModelSpec, layer: int) -> Iterator[TensorSpec]:
    from planner.model.spec import TensorSpec
    moe, h, base = spec.moe, spec.hidden, f"layers.{layer}.mlp"
    assert moe is not None
    # Group `router`: kept in the model dtype (quantizers leave it), never compensated.
    router = _matrix(spec, f"{base}.gate", layer, "router", "router", moe.experts, h, quantizable=False)
    if moe.router_bias:
        # gpt-oss: a router bias in the model dtype; DeepSeek-V3 / GLM-4.5: a routing-score
        # correction kept in fp32 (e_score_correction_bias).
        extra = bias_bytes(spec, moe.experts) if spec.family == "gpt_oss" else 4 * moe.experts
        router = replace(router, n_bytes=router.n_bytes + extra)
    yield router
    per_expert = 2 if spec.ffn == "plain" else 3
    rows = per_expert * moe.expert_intermediate
    n_bytes = spec.matrix_bytes(rows * moe.experts, h, True, "experts")
    if moe.expert_bias:  # gate/up biases (2 x intermediate) and the down bias (hidden) per expert
        n_bytes += bias_bytes(spec, moe.experts * ((per_expert - 1) * moe.expert_intermediate + h))
    prob = moe.active / moe.experts
    yield TensorSpec(f"{base}.experts", layer, "experts", "experts", rows, h, n_bytes,
                     2.0 * rows * h * moe.active, prob, moe.experts)
    if moe.shared_intermediate:
        yield from _dense_mlp(spec, layer, f"{base}.shared_experts", "shared_", moe.shared_intermediate)
