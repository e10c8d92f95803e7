"""ModelSpec from a GGUF header: llama (and Mixtral), qwen2, qwen3, qwen3moe, gpt-oss,
deepseek2 (DeepSeek-V2/V3, Kimi-K2), glm4moe and gemma3, with each tensor kind's stored size
taken from the types the header gives (Q6_K output, MXFP4 experts, Q4_K body, ...).

Metadata keys are those llama.cpp's converter writes (`{arch}.expert_count`,
`{arch}.leading_dense_block_count`, `{arch}.attention.kv_lora_rank`, ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType

from planner.errors import SpecError
from planner.model.gguf import GGML_TYPES, SkippedArray, TensorInfo, read_gguf_header
from planner.model.spec import MLA, MoE, ModelSpec, Quantization, RopeScaling

# general.architecture -> ModelSpec family (llama with experts is Mixtral)
ARCH_FAMILIES = MappingProxyType({"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
                                  "gpt-oss": "gpt_oss", "deepseek2": "deepseek_v3", "glm4moe": "glm4_moe",
                                  "gemma3": "gemma3"})
SUPPORTED_ARCHS = tuple(ARCH_FAMILIES)
QUANT_BITS = (2, 3, 4, 5, 6, 8)  # the widths Quantization accepts
GGUF_GROUP_WEIGHTS = 32  # ModelSpec groups: one fp16 scale per 32 weights = 0.5 bits per weight
_FLOAT_DTYPES = MappingProxyType({"F32": "fp32", "F16": "fp16", "BF16": "bf16"})
# Gemma 3: five sliding-window layers per global one (llama.cpp sets this pattern in code).
GEMMA3_FULL_EVERY = 6
# llama.cpp tensor base name -> ModelSpec tensor kind (planner/model/inventory.py)
GGUF_KINDS = MappingProxyType({
    "token_embd": "embed_tokens", "output": "lm_head", "attn_q": "q_proj", "attn_k": "k_proj",
    "attn_v": "v_proj", "attn_output": "o_proj", "attn_q_a": "q_a_proj", "attn_q_b": "q_b_proj",
    "attn_kv_a_mqa": "kv_a_proj_with_mqa", "attn_kv_b": "kv_b_proj", "attn_k_b": "kv_b_proj",
    "attn_v_b": "kv_b_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
    "ffn_gate_inp": "router", "ffn_gate_exps": "experts", "ffn_up_exps": "experts",
    "ffn_down_exps": "experts", "ffn_gate_shexp": "shared_gate_proj", "ffn_up_shexp": "shared_up_proj",
    "ffn_down_shexp": "shared_down_proj"})
_TENSOR_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.weight$")


def spec_from_gguf(path: str | Path) -> ModelSpec:
    """ModelSpec for a GGUF file of a supported architecture, read from its header only."""
    return spec_from_header(read_gguf_header(path), Path(path).stem, str(path))


def spec_from_header(header: dict, default_name: str, where: str = "GGUF file") -> ModelSpec:
    """ModelSpec from a `read_gguf_header` result; `where` prefixes error messages."""
    meta, tensors = header["metadata"], header["tensors"]
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise SpecError(f"{where}: general.architecture {arch!r} is not supported; "
                        f"offplan reads GGUF files of {', '.join(SUPPORTED_ARCHS)}")

    def number(key: str, required: bool = False, kind: type = int):
        return _meta_number(meta, f"{arch}.{key}", where, required, kind)

    names = {t.name for t in tensors}
    heads = number("attention.head_count", required=True)
    layers = number("block_count", required=True) - (number("nextn_predict_layers") or 0)
    dtype, quantization, _ = weight_format(tensors, where)
    fields = dict(
        name=str(meta.get("general.name") or default_name), family=ARCH_FAMILIES[arch],
        layers=layers, hidden=number("embedding_length", required=True),
        intermediate=number("feed_forward_length") or number("expert_feed_forward_length", required=True),
        heads=heads, kv_heads=number("attention.head_count_kv") or heads,
        vocab=_vocab(meta, tensors, arch, where), tied_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names, dtype=dtype, quantization=quantization,
        qk_norm="blk.0.attn_q_norm.weight" in names, attention_sinks="blk.0.attn_sinks.weight" in names,
        weight_bits=kind_bits(tensors, layers))
    fields.update(_attention_fields(arch, number, names, heads, where))
    fields.update(_moe_fields(arch, number, names, fields["intermediate"]))
    optional = (("max_context", number("context_length")),
                ("rope_theta", number("rope.freq_base", kind=float)),
                ("rms_eps", number("attention.layer_norm_rms_epsilon", kind=float)))
    fields.update((name, value) for name, value in optional if value is not None)
    factor = number("rope.scaling.factor", kind=float)
    if meta.get(f"{arch}.rope.scaling.type") == "linear" and factor and arch in ("llama", "qwen2", "qwen3"):
        fields["rope_scaling"] = RopeScaling(kind="linear", factor=factor)
    if arch == "gemma3":
        fields["ffn"] = "geglu"
    try:
        return ModelSpec(**fields)
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _attention_fields(arch: str, number, names: set[str], heads: int, where: str) -> dict:
    key_dim, value_dim = number("attention.key_length"), number("attention.value_length")
    if arch == "deepseek2":
        rope = number("rope.dimension_count", required=True)
        # MLA-converted files store the latent sizes in key_length and the per-head ones in *_mla.
        qk_dim = number("attention.key_length_mla") or key_dim
        v_dim = number("attention.value_length_mla") or value_dim
        mla = MLA(q_lora_rank=number("attention.q_lora_rank") or 0,
                  kv_lora_rank=number("attention.kv_lora_rank", required=True),
                  qk_nope_head_dim=qk_dim - rope, qk_rope_head_dim=rope, v_head_dim=v_dim)
        return {"mla": mla, "head_dim": qk_dim, "kv_heads": heads}
    if key_dim and value_dim and key_dim != value_dim:
        raise SpecError(f"{where}: {arch}.attention.key_length {key_dim} differs from value_length "
                        f"{value_dim}; offplan needs one head size")
    fields = {"head_dim": key_dim or 0}
    window = number("attention.sliding_window")
    if arch in ("gpt-oss", "gemma3") and window:
        fields.update(sliding_window=window, full_every=2 if arch == "gpt-oss" else GEMMA3_FULL_EVERY)
    return fields


def _moe_fields(arch: str, number, names: set[str], intermediate: int) -> dict:
    experts = number("expert_count") or 0
    if not experts:
        return {}
    inter = number("expert_feed_forward_length") or intermediate
    shared = (number("expert_shared_count") or 0) * inter
    if "blk.0.ffn_up_shexp.weight" in names and not shared:  # one shared expert of its own width
        shared = number("expert_shared_feed_forward_length") or inter
    dense_first = number("leading_dense_block_count") or 0
    first_moe = f"blk.{dense_first}"
    moe = MoE(experts=experts, active=number("expert_used_count", required=True), expert_intermediate=inter,
              shared_intermediate=shared, dense_first=dense_first,
              router_bias=f"{first_moe}.ffn_gate_inp.bias" in names or f"{first_moe}.exp_probs_b.bias" in names,
              expert_bias=f"{first_moe}.ffn_down_exps.bias" in names)
    fields: dict = {"moe": moe}
    if arch == "llama":
        fields["family"] = "mixtral"
    return fields


def kind_bits(tensors: tuple[TensorInfo, ...], layers: int) -> dict[str, float]:
    """Stored bits per weight (scales included) of each tensor kind, averaged over the layers
    that run (`blk.N` with N < layers; a multi-token-prediction layer is left out). A kind's
    bytes are then exact in total, even where a quantization mix varies it by layer. Biases
    of weight matrices (kept in F32) are `bias`."""
    bits: dict[str, float] = {}
    weights: dict[str, int] = {}
    for t in tensors:
        match = _TENSOR_NAME.match(t.name)
        ggml = GGML_TYPES.get(t.ggml_type)
        if t.name.endswith(".bias") and ggml is not None:
            match = _TENSOR_NAME.match(t.name[: -len("bias")] + "weight")
            if match is not None and match.group(2) in GGUF_KINDS:
                bits["bias"] = bits.get("bias", 0.0) + t.n_elements * ggml.bits_per_weight
                weights["bias"] = weights.get("bias", 0) + t.n_elements
            continue
        if match is None or ggml is None or match.group(2) not in GGUF_KINDS:
            continue
        if match.group(1) is not None and int(match.group(1)) >= layers:
            continue
        kind = GGUF_KINDS[match.group(2)]
        bits[kind] = bits.get(kind, 0.0) + t.n_elements * ggml.bits_per_weight
        weights[kind] = weights.get(kind, 0) + t.n_elements
    return {kind: bits[kind] / weights[kind] for kind in bits if weights[kind]}


def _meta_number(meta: dict, key: str, where: str, required: bool, kind: type) -> int | float | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise SpecError(f"{where}: GGUF metadata key {key!r} is missing; the file does not describe "
                            "a complete model")
        return None
    if isinstance(value, (tuple, SkippedArray)):
        raise SpecError(f"{where}: GGUF metadata key {key!r} holds {len(value)} per-layer values; "
                        "offplan needs one value for all layers")
    wrong_kind = kind is int and isinstance(value, float)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or wrong_kind:
        raise SpecError(f"{where}: GGUF metadata key {key!r} must be a number, got {value!r}")
    return kind(value)


def _vocab(meta: dict, tensors: tuple[TensorInfo, ...], arch: str, where: str) -> int:
    vocab = _meta_number(meta, f"{arch}.vocab_size", where, False, int)
    if vocab:
        return vocab
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (tuple, SkippedArray)) and len(tokens):
        return len(tokens)
    embed = [t for t in tensors if t.name == "token_embd.weight" and len(t.dims) == 2]
    if embed:
        return embed[0].dims[1]  # GGML order: (hidden, vocab)
    raise SpecError(f"{where}: cannot tell the vocabulary size: no {arch}.vocab_size, "
                    "tokenizer.ggml.tokens or token_embd.weight")


def weight_format(tensors: tuple[TensorInfo, ...],
                  where: str = "GGUF file") -> tuple[str, Quantization | None, float]:
    """(dtype, quantization, average bits per weight) of the `blk.*` weight matrices.

    Float files map to their dtype (the one holding most weights). Quantized files map to
    Quantization(bits, group_size=32, symmetric), the allowed width nearest to the file's
    average bits per weight minus 0.5 (Q4_0/Q4_K -> 4, Q6_K -> 6, Q8_0 -> 8, a Q4_K_M mix -> 4):
    the cost model reads it as the weights' storage format. Sizes come from `kind_bits`, each
    tensor kind with its own stored type; norms and the KV cache use fp16 (GGUF keeps norms in
    F32 and llama.cpp's KV cache defaults to F16)."""
    matrices = [t for t in tensors
                if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.dims) >= 2]
    if not matrices:
        raise SpecError(f"{where}: no blk.*.weight matrices among the tensor infos; "
                        "cannot tell the weight format")
    weights_by_type: dict[str, int] = {}
    total_bits = 0.0
    for t in matrices:
        ggml = GGML_TYPES.get(t.ggml_type)
        if ggml is None:
            raise SpecError(f"{where}: tensor {t.name!r} has ggml type {t.ggml_type}, "
                            "which offplan does not know")
        weights_by_type[ggml.name] = weights_by_type.get(ggml.name, 0) + t.n_elements
        total_bits += t.n_elements * ggml.bits_per_weight
    bits_per_weight = total_bits / max(sum(weights_by_type.values()), 1)
    if all(name in _FLOAT_DTYPES for name in weights_by_type):
        return _FLOAT_DTYPES[max(weights_by_type, key=weights_by_type.get)], None, bits_per_weight
    return "fp16", quantization_for_bits(bits_per_weight), bits_per_weight


def quantization_for_bits(bits_per_weight: float) -> Quantization:
    """Nearest Quantization (group 32, symmetric) to an average stored bits per weight."""
    payload_bits = bits_per_weight - 16 / GGUF_GROUP_WEIGHTS
    bits = min(QUANT_BITS, key=lambda b: (abs(b - payload_bits), -b))
    return Quantization(bits=bits, group_size=GGUF_GROUP_WEIGHTS, symmetric=True)
