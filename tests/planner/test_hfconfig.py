"""planner.model.hfconfig: Hugging Face config.json -> ModelSpec, on configs of published models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from planner.errors import SpecError
from planner.model.hfconfig import hf_config_from_spec, load_hf_config, spec_from_hf_config
from planner.model.spec import Quantization, RopeScaling

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}

QWEN25_32B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 27648, "max_position_embeddings": 131072, "max_window_layers": 64,
    "model_type": "qwen2", "num_attention_heads": 40, "num_hidden_layers": 64,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}

QWEN25_05B = dict(QWEN25_32B, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                  num_hidden_layers=24, num_key_value_heads=2, tie_word_embeddings=True,
                  vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-06)

MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}

MIXTRAL_8X7B = dict(MISTRAL_7B, architectures=["MixtralForCausalLM"], model_type="mixtral",
                    num_experts_per_tok=2, num_local_experts=8, rope_theta=1000000.0,
                    sliding_window=None, router_aux_loss_coef=0.02)


def total_params(spec) -> int:
    """Weight matrices plus RMSNorm vectors (ModelSpec.params counts matrices only)."""
    return spec.params + (2 * spec.layers + 1) * spec.hidden


def test_llama_31_8b() -> None:
    spec = spec_from_hf_config(LLAMA_31_8B, "llama-3.1-8b")
    assert (spec.family, spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.head_dim) == \
        ("llama", 32, 4096, 32, 8, 128)
    assert spec.dtype == "bf16" and spec.rms_eps == 1e-5 and spec.max_context == 131072
    assert spec.rope_theta == 500000.0
    assert spec.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert not spec.tied_embeddings and not spec.attention_bias and spec.moe is None
    assert total_params(spec) == pytest.approx(8.03e9, rel=0.003)


def test_qwen25_32b_has_qkv_bias() -> None:
    spec = spec_from_hf_config(QWEN25_32B, "qwen2.5-32b")
    assert spec.attention_bias and spec.family == "qwen2" and spec.head_dim == 128
    assert spec.rope_scaling is None and spec.rope_theta == 1e6
    q = spec.by_name["layers.0.self_attn.q_proj"]
    assert q.n_bytes == 5120 * 5120 * 2 + 5120 * 2  # bf16 weight + bias
    assert total_params(spec) == pytest.approx(32.76e9, rel=0.005)


def test_qwen25_05b_tied() -> None:
    spec = spec_from_hf_config(QWEN25_05B, "qwen2.5-0.5b")
    assert spec.tied_embeddings and spec.by_name["embed_tokens"].n_bytes == 0
    # 494M parameters, with the tied embedding counted once.
    once = total_params(spec)
    assert once == pytest.approx(0.494e9, rel=0.005)


def test_mistral_7b() -> None:
    spec = spec_from_hf_config(MISTRAL_7B, "mistral-7b")
    assert spec.family == "mistral" and spec.rope_theta == 10000.0 and not spec.attention_bias
    assert total_params(spec) == pytest.approx(7.24e9, rel=0.003)


def test_mixtral_moe() -> None:
    spec = spec_from_hf_config(MIXTRAL_8X7B, "mixtral")
    assert spec.moe is not None
    assert (spec.moe.experts, spec.moe.active, spec.moe.expert_intermediate) == (8, 2, 14336)
    assert total_params(spec) == pytest.approx(46.7e9, rel=0.003)


def test_new_layout_rope_parameters_and_dtype() -> None:
    config = dict(LLAMA_31_8B, dtype="float16", rope_parameters=dict(
        LLAMA_31_8B["rope_scaling"], rope_theta=250000.0))
    del config["torch_dtype"], config["rope_theta"], config["rope_scaling"]
    spec = spec_from_hf_config(config, "x")
    assert spec.dtype == "fp16" and spec.rope_theta == 250000.0
    assert spec.rope_scaling.kind == "llama3" and spec.rope_scaling.original_max_position == 8192


def test_linear_rope_and_legacy_type_key() -> None:
    config = dict(MISTRAL_7B, rope_scaling={"type": "linear", "factor": 4.0})
    assert spec_from_hf_config(config, "x").rope_scaling == RopeScaling(kind="linear", factor=4.0)


def test_defaults_for_absent_optional_fields() -> None:
    config = {k: v for k, v in MISTRAL_7B.items()
              if k not in ("num_key_value_heads", "rope_theta", "torch_dtype", "rms_norm_eps",
                           "max_position_embeddings", "tie_word_embeddings")}
    spec = spec_from_hf_config(config, "x")
    assert spec.kv_heads == spec.heads == 32
    assert (spec.rope_theta, spec.dtype, spec.rms_eps, spec.tied_embeddings) == (10000.0, "bf16", 1e-6, False)


def test_explicit_head_dim() -> None:
    spec = spec_from_hf_config(dict(MISTRAL_7B, head_dim=64), "x")
    assert spec.head_dim == 64 and spec.by_name["layers.0.self_attn.q_proj"].rows == 32 * 64


@pytest.mark.parametrize("qconfig, expected", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False},
     Quantization(4, 128, True)),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
     Quantization(4, 64, False)),
    ({"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True}, Quantization(8, 4096, True)),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, Quantization(4, 64, True)),
])
def test_quantization_config(qconfig, expected) -> None:
    spec = spec_from_hf_config(dict(LLAMA_31_8B, quantization_config=qconfig), "q")
    assert spec.quantization == expected
    assert spec.weight_bytes < spec_from_hf_config(LLAMA_31_8B, "x").weight_bytes * 0.6


@pytest.mark.parametrize("config", [LLAMA_31_8B, QWEN25_05B, MISTRAL_7B, MIXTRAL_8X7B])
def test_round_trip_through_hf_config(config) -> None:
    spec = spec_from_hf_config(config, "m")
    assert spec_from_hf_config(hf_config_from_spec(spec), "m") == spec


def test_load_from_directory_and_file(tmp_path) -> None:
    (tmp_path / "Llama-3.1-8B").mkdir()
    path = tmp_path / "Llama-3.1-8B" / "config.json"
    path.write_text(json.dumps(LLAMA_31_8B))
    assert load_hf_config(path.parent).name == "Llama-3.1-8B"
    assert load_hf_config(path, name="mine") == spec_from_hf_config(LLAMA_31_8B, "mine")


# ---- errors ------------------------------------------------------------------------------------

def test_unsupported_model_type_names_supported_ones() -> None:
    with pytest.raises(SpecError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, mixtral"):
        spec_from_hf_config(dict(LLAMA_31_8B, model_type="gpt2"), "x")


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "vocab_size"])
def test_missing_required_field(field) -> None:
    config = {k: v for k, v in LLAMA_31_8B.items() if k != field}
    with pytest.raises(SpecError, match=f"missing field '{field}'"):
        spec_from_hf_config(config, "x")


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "4096"}, "hidden_size: must be a positive whole number"),
    ({"num_key_value_heads": 0}, "num_key_value_heads: must be a positive"),
    ({"torch_dtype": "int8"}, "torch_dtype: 'int8' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act: 'gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, "missing field 'factor'"),
    ({"quantization_config": {"quant_method": "hqq"}}, "'hqq' has no 'bits'"),
    ({"quantization_config": {"bits": 7, "group_size": 128}}, "quantization.bits"),
    ({"num_key_value_heads": 5}, "kv_heads: 5 must divide heads 32"),
])
def test_bad_field_values(change, message) -> None:
    with pytest.raises(SpecError, match=message):
        spec_from_hf_config(dict(LLAMA_31_8B, **change), "x")


def test_missing_file_and_bad_json(tmp_path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(SpecError, match="not valid JSON"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(SpecError, match="JSON object"):
        load_hf_config(tmp_path)


def test_error_is_one_line() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_hf_config({"model_type": "llama"}, "x")
    assert "\n" not in str(info.value)


def test_does_not_import_torch() -> None:
    code = "import sys, planner.model.hfconfig; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
