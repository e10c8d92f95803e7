"""ModelSpec from a Hugging Face `config.json` (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral,
gpt-oss, DeepSeek-V2/V3, Kimi-K2, GLM-4.5, Gemma 3); family-specific keys in hf_families.py.

Reads both the classic layout (`rope_theta` + `rope_scaling`, `torch_dtype`) and the newer one
(`rope_parameters` holding `rope_theta` and `rope_type`, `dtype`). Pure Python: no torch.
Every problem raises SpecError with one line naming the config key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planner.errors import SpecError
from planner.model.hf_families import FAMILY_OF, RUNNABLE_FAMILIES, check_activation, family_fields, text_config
from planner.model.spec import ModelSpec, Quantization, RopeScaling

SUPPORTED_MODEL_TYPES = tuple(FAMILY_OF)

# Values the Hugging Face config classes use when a key is absent from config.json.
_DEFAULT_RMS_EPS = {"llama": 1e-6, "mistral": 1e-6, "qwen2": 1e-6, "mixtral": 1e-5, "qwen3": 1e-6,
                    "qwen3_moe": 1e-6, "gpt_oss": 1e-5, "deepseek_v2": 1e-6, "deepseek_v3": 1e-6,
                    "glm4_moe": 1e-5, "gemma3": 1e-6}
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "mixtral": 131072,
                          "qwen3": 32768, "qwen3_moe": 32768, "gpt_oss": 131072, "deepseek_v2": 2048,
                          "deepseek_v3": 4096, "glm4_moe": 131072, "gemma3": 131072}
_DEFAULT_ROPE_THETA = 10000.0

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
           "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
# Absent dtype: Llama-family checkpoints are published in bf16.
_DEFAULT_DTYPE = "bf16"


def load_hf_config(path: str | Path, name: str | None = None) -> ModelSpec:
    """ModelSpec from `path`: a config.json file or a directory holding one.

    `name` defaults to the directory name of the checkpoint."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise SpecError(f"{config_path}: no such file; "
                        "pass a config.json or a checkpoint directory holding one")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SpecError(f"{config_path}: expected a JSON object at the top level")
    return spec_from_hf_config(config, name or config_path.parent.name or "model")


def spec_from_hf_config(config: dict[str, Any], name: str) -> ModelSpec:
    """Translate a Hugging Face config dict into a ModelSpec named `name`."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SpecError(f"config.json model_type: {model_type!r} is not supported; "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    config = text_config(config)
    family = FAMILY_OF[model_type]
    check_activation(config, family)
    if config.get("mlp_bias"):
        raise SpecError("config.json mlp_bias: biases on the MLP projections are not supported; "
                        "expected false")
    heads = _int(config, "num_attention_heads")
    rope_theta, rope_scaling = _rope(config, strict=family in RUNNABLE_FAMILIES)
    fields: dict[str, Any] = dict(
        name=name,
        family=family,
        layers=_int(config, "num_hidden_layers"),
        hidden=_int(config, "hidden_size"),
        intermediate=_int(config, "intermediate_size"),
        heads=heads,
        kv_heads=_int(config, "num_key_value_heads", default=heads),
        vocab=_int(config, "vocab_size"),
        head_dim=_int(config, "head_dim", default=0),
        tied_embeddings=_bool(config, "tie_word_embeddings", default=False),
        attention_bias=_attention_bias(config, family),
        ffn="swiglu",
        dtype=_dtype(config),
        quantization=_quantization(config),
        max_context=_int(config, "max_position_embeddings", default=_DEFAULT_MAX_POSITIONS[family]),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_eps=_float(config, "rms_norm_eps", default=_DEFAULT_RMS_EPS[family]),
    )
    fields.update(family_fields(config, family))
    return ModelSpec(**fields)


# ---- field readers ----------------------------------------------------------------------------

def _int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise SpecError(f"config.json: missing field {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"config.json {key}: must be a positive whole number, got {value!r}")
    return value


def _float(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise SpecError(f"config.json {key}: must be a positive number, got {value!r}")
    return float(value)


def _bool(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"config.json {key}: must be true or false, got {value!r}")
    return value


def _attention_bias(config: dict[str, Any], family: str) -> bool:
    """Qwen2 always has q/k/v biases; Llama has them (and on o_proj) when attention_bias is set;
    Mistral and Mixtral never have them."""
    if family == "qwen2":
        return True
    if family == "llama":
        return _bool(config, "attention_bias", default=False)
    return False


def _dtype(config: dict[str, Any]) -> str:
    value = config.get("torch_dtype", config.get("dtype"))
    if value is None:
        return _DEFAULT_DTYPE
    if value not in _DTYPES:
        raise SpecError(f"config.json torch_dtype: {value!r} is not supported; "
                        "expected bfloat16, float16 or float32")
    return _DTYPES[value]


def _rope(config: dict[str, Any], strict: bool = True) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from `rope_parameters` (newer layout) or `rope_theta` + `rope_scaling`.

    Only the executor uses rotary details: with `strict` false (families that are planned, not
    run) partial rotary dimensions and other scaling types (YaRN) are accepted and dropped."""
    params = config.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params, key = config.get("rope_scaling"), "rope_scaling"
    if params is not None and not isinstance(params, dict):
        raise SpecError(f"config.json {key}: expected an object or null, got {params!r}")
    params = params or {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    theta = _float({"rope_theta": theta}, "rope_theta", default=_DEFAULT_ROPE_THETA)
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and strict:
        raise SpecError(f"config.json partial_rotary_factor: {partial!r} is not supported; expected 1.0")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("llama3", "linear") and not strict:
        return theta, None
    if kind not in ("llama3", "linear"):
        raise SpecError(f"config.json {key}.rope_type: {kind!r} is not supported; "
                        "supported: default, linear, llama3")
    factor = _float(params, "factor", default=0.0)
    if factor == 0.0:
        raise SpecError(f"config.json {key}: missing field 'factor'")
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=factor)
    original = params.get("original_max_position_embeddings", config.get("max_position_embeddings"))
    return theta, RopeScaling(
        kind="llama3", factor=factor,
        low_freq_factor=_float(params, "low_freq_factor", default=1.0),
        high_freq_factor=_float(params, "high_freq_factor", default=4.0),
        original_max_position=_int({"original_max_position_embeddings": original},
                                   "original_max_position_embeddings"),
    )


def _quantization(config: dict[str, Any]) -> Quantization | None:
    """GPTQ / AWQ style `quantization_config` (bits, group_size, sym or zero_point);
    bitsandbytes 4-bit maps to 4 bits in blocks of 64 with absmax (symmetric) scales."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise SpecError(f"config.json quantization_config: expected an object, got {q!r}")
    if q.get("load_in_4bit"):
        return Quantization(bits=4, group_size=64, symmetric=True)
    if q.get("load_in_8bit"):
        return Quantization(bits=8, group_size=_int(config, "hidden_size"), symmetric=True)
    method = q.get("quant_method")
    if method == "mxfp4":  # gpt-oss: the experts only (weight_bits, hf_families.py)
        return None
    if method == "fp8":
        # Block-wise fp8 (DeepSeek-V3): 8-bit weights and one fp32 scale per block; the scale
        # stream is 32 bits per block, as one fp16 scale per half-block counts it.
        block = q.get("weight_block_size") or [128, 128]
        return Quantization(bits=8, group_size=max(int(block[0]) * int(block[1]) // 2, 1), symmetric=True)
    if "bits" not in q:
        method = q.get("quant_method", "unknown")
        raise SpecError(f"config.json quantization_config: quant_method {method!r} has no 'bits'; "
                        "supported: GPTQ/AWQ-style configs with bits and group_size")
    bits = q["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise SpecError(f"config.json quantization_config.bits: must be a whole number, got {bits!r}")
    group_size = q.get("group_size", 128)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise SpecError("config.json quantization_config.group_size: must be positive or -1, "
                        f"got {group_size!r}")
    if group_size == -1:
        # One scale per output row: a group spans the whole input dimension (hidden for most tensors).
        group_size = _int(config, "hidden_size")
    if "sym" in q:
        symmetric = bool(q["sym"])
    else:
        symmetric = not bool(q.get("zero_point", False))
    return Quantization(bits=bits, group_size=group_size, symmetric=symmetric)


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def hf_config_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """The config.json a Hugging Face checkpoint of `spec` carries (classic layout, which every
    transformers version reads). Inverse of `spec_from_hf_config` up to the spec's name."""
    if spec.family not in _ARCHITECTURES:
        raise SpecError(f"family: offplan writes Hugging Face configs of {', '.join(_ARCHITECTURES)}, "
                        f"not {spec.family}")
    if spec.ffn != "swiglu":
        raise SpecError(f"ffn: {spec.ffn!r} has no Hugging Face {spec.family} equivalent; "
                        "only 'swiglu' models can be written as a Hugging Face config")
    if spec.family == "qwen2" and not spec.attention_bias:
        raise SpecError("attention_bias: qwen2 models always have q/k/v biases; set attention_bias: true")
    if spec.family in ("mistral", "mixtral") and spec.attention_bias:
        raise SpecError(f"attention_bias: {spec.family} models have no attention biases; "
                        "set attention_bias: false or family: llama")
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[spec.family]],
        "model_type": spec.family,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_context,
        "rms_norm_eps": spec.rms_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": _rope_scaling_dict(spec.rope_scaling),
        "tie_word_embeddings": spec.tied_embeddings,
        "torch_dtype": _DTYPE_NAMES[spec.dtype],
    }
    if spec.family == "llama":
        config["attention_bias"] = spec.attention_bias
        config["mlp_bias"] = False
    if spec.family in ("qwen3", "qwen3_moe"):
        config["attention_bias"] = spec.attention_bias
    if spec.family == "mixtral" and spec.moe is not None:
        config["num_local_experts"] = spec.moe.experts
        config["num_experts_per_tok"] = spec.moe.active
        config["intermediate_size"] = spec.moe.expert_intermediate
    if spec.family == "qwen3_moe" and spec.moe is not None:
        config.update(num_experts=spec.moe.experts, num_experts_per_tok=spec.moe.active,
                      moe_intermediate_size=spec.moe.expert_intermediate, norm_topk_prob=spec.moe.norm_topk,
                      decoder_sparse_step=1, mlp_only_layers=[])
    if spec.quantization is not None:
        q = spec.quantization
        config["quantization_config"] = {"quant_method": "gptq", "bits": q.bits,
                                         "group_size": q.group_size, "sym": q.symmetric}
    return config


def _rope_scaling_dict(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    return {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position}
