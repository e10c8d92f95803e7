"""Family-specific fields of a Hugging Face config.json: experts, latent attention, q/k norms,
sliding windows, sinks, expert quantization. `family_fields` returns the ModelSpec keyword
arguments that differ from the plain Llama reading in hfconfig.py.

Key names are those of the transformers configuration classes (Qwen3Config, Qwen3MoeConfig,
GptOssConfig, DeepseekV3Config, DeepseekV2Config, Glm4MoeConfig, Gemma3TextConfig,
MixtralConfig). Kimi-K2 ships DeepSeek-V3's architecture under model_type `kimi_k2`.
"""

from __future__ import annotations

from typing import Any

from planner.errors import SpecError
from planner.model.spec import MLA, MoE

# config.json model_type -> ModelSpec family
FAMILY_OF = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "mixtral": "mixtral",
             "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "gpt_oss": "gpt_oss",
             "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3",
             "glm4_moe": "glm4_moe", "gemma3": "gemma3", "gemma3_text": "gemma3"}
# Families offplan's own executor builds (executor/model.py); the others are planned and exported.
RUNNABLE_FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "qwen3", "qwen3_moe")
# MXFP4 (OCP microscaling): 4-bit E2M1 values with one 8-bit E8M0 scale per 32 = 4.25 bits.
MXFP4_BITS = 4.25


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's multimodal config nests the language model under `text_config`; the vision
    tower is left out (text generation does not load it; llama.cpp keeps it in an mmproj file)."""
    if config.get("model_type") == "gemma3":
        inner = config.get("text_config")
        if not isinstance(inner, dict):
            raise SpecError("config.json text_config: a gemma3 config needs the language model's "
                            "text_config object")
        merged = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
        merged.update(inner)
        merged["model_type"] = "gemma3"
        merged.setdefault("tie_word_embeddings", True)
        return merged
    return config


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _count(config: dict[str, Any], *keys: str, default: int | None = None, allow_zero: bool = False) -> int:
    value = _get(config, *keys, default=default)
    if value is None:
        raise SpecError(f"config.json: missing field {keys[0]!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise SpecError(f"config.json {keys[0]}: must be a positive whole number, got {value!r}")
    return value


def sliding_fields(config: dict[str, Any], family: str) -> dict[str, Any]:
    """(sliding_window, full_every) from `layer_types` or Gemma's `sliding_window_pattern`.
    Qwen and Mistral configs carry a `sliding_window` their models do not use
    (use_sliding_window false, or a null window): only layer types decide."""
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if family == "gemma3" and not types:
        pattern = _count(config, "sliding_window_pattern", default=6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(_count(config, "num_hidden_layers"))]
    if family == "gpt_oss" and not types:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                 for i in range(_count(config, "num_hidden_layers"))]
    if not types or "sliding_attention" not in types or not window:
        return {}
    if not isinstance(types, list) or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise SpecError("config.json layer_types: expected a list of 'sliding_attention' / 'full_attention'")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    every = full[0] + 1 if full else 0
    expected = [i for i in range(len(types)) if every and (i + 1) % every == 0]
    if full != expected:
        raise SpecError("config.json layer_types: offplan needs full-attention layers at a fixed period "
                        f"(every k-th layer); got full layers at {full[:6]}...")
    return {"sliding_window": _count(config, "sliding_window"), "full_every": every}


def _moe(config: dict[str, Any], family: str) -> MoE | None:
    if family == "mixtral":
        return MoE(experts=_count(config, "num_local_experts"), active=_count(config, "num_experts_per_tok"),
                   expert_intermediate=_count(config, "intermediate_size"))
    if family == "qwen3_moe":
        if config.get("mlp_only_layers") or _get(config, "decoder_sparse_step", default=1) != 1:
            raise SpecError("config.json mlp_only_layers / decoder_sparse_step: offplan needs every layer "
                            "to be a mixture-of-experts layer")
        return MoE(experts=_count(config, "num_experts", "num_local_experts"), active=_count(config, "num_experts_per_tok"),
                   expert_intermediate=_count(config, "moe_intermediate_size"),
                   norm_topk=bool(config.get("norm_topk_prob", False)))
    if family == "gpt_oss":
        return MoE(experts=_count(config, "num_local_experts"),
                   active=_count(config, "num_experts_per_tok", "experts_per_token"),
                   expert_intermediate=_count(config, "intermediate_size"), router_bias=True, expert_bias=True)
    if family in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        if _get(config, "moe_layer_freq", default=1) != 1:
            raise SpecError("config.json moe_layer_freq: offplan needs every layer after the dense ones "
                            "to be a mixture-of-experts layer (moe_layer_freq 1)")
        inter = _count(config, "moe_intermediate_size")
        shared = _count(config, "n_shared_experts", default=0, allow_zero=True)
        # DeepSeek-V3 and GLM-4.5 correct routing scores with a learned per-expert bias.
        score_bias = family != "deepseek_v2" or config.get("topk_method") == "noaux_tc"
        return MoE(experts=_count(config, "n_routed_experts"), active=_count(config, "num_experts_per_tok"),
                   expert_intermediate=inter, shared_intermediate=shared * inter,
                   dense_first=_count(config, "first_k_dense_replace", default=0, allow_zero=True),
                   router_bias=score_bias)
    return None


def _mla(config: dict[str, Any]) -> MLA:
    return MLA(q_lora_rank=_count(config, "q_lora_rank", default=0, allow_zero=True),
               kv_lora_rank=_count(config, "kv_lora_rank"), qk_nope_head_dim=_count(config, "qk_nope_head_dim"),
               qk_rope_head_dim=_count(config, "qk_rope_head_dim"), v_head_dim=_count(config, "v_head_dim"))


def family_fields(config: dict[str, Any], family: str) -> dict[str, Any]:
    """ModelSpec keyword arguments particular to `family`."""
    fields: dict[str, Any] = {"moe": _moe(config, family)}
    fields.update(sliding_fields(config, family))
    if family in ("qwen3", "qwen3_moe", "gemma3"):
        fields["qk_norm"] = True
    if family == "glm4_moe":
        fields["qk_norm"] = bool(config.get("use_qk_norm", False))
    if family in ("qwen3", "qwen3_moe", "gpt_oss", "glm4_moe"):
        fields["attention_bias"] = bool(config.get("attention_bias", family == "gpt_oss"))
    if family == "gpt_oss":
        fields["attention_sinks"] = True
        q = config.get("quantization_config")
        if isinstance(q, dict) and q.get("quant_method") == "mxfp4":
            fields["weight_bits"] = {"experts": MXFP4_BITS}
    if family == "gemma3":
        fields["ffn"] = "geglu"
    if family in ("deepseek_v2", "deepseek_v3"):
        mla = _mla(config)
        fields["mla"] = mla
        fields["head_dim"] = mla.qk_head_dim
    return fields


def check_activation(config: dict[str, Any], family: str) -> None:
    act = _get(config, "hidden_activation", "hidden_act", default="silu")
    allowed = ("gelu_pytorch_tanh", "gelu") if family == "gemma3" else ("silu",)
    if act not in allowed:
        raise SpecError(f"config.json hidden_act: {act!r} is not supported for {family}; "
                        f"expected {' or '.join(allowed)}")
