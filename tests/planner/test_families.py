"""Each family's tensor inventory and KV cache against what transformers builds and allocates
for a tiny random model of that family (config classes from transformers)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from planner.model.hfconfig import spec_from_hf_config  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
MLA = dict(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
           n_group=1, topk_group=1)
ROUTED = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1)
PROMPT_TOKENS = 20  # longer than the sliding windows below


def tiny_configs() -> dict[str, object]:
    t = transformers
    return {
        "qwen3": t.Qwen3Config(head_dim=16, **COMMON),
        "qwen3_moe": t.Qwen3MoeConfig(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                      norm_topk_prob=True, **COMMON),
        "gpt_oss": t.GptOssConfig(head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
                                  **COMMON),
        "deepseek_v3": t.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, n_shared_experts=1, **ROUTED,
                                          **MLA),
        "deepseek_v2": t.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, n_shared_experts=2, **ROUTED,
                                          **{**MLA, "q_lora_rank": None}),
        "glm4_moe": t.Glm4MoeConfig(head_dim=16, n_shared_experts=1, attention_bias=True, n_group=1, topk_group=1,
                                    **ROUTED, **COMMON),
        "gemma3": t.Gemma3TextConfig(head_dim=16, sliding_window=8, **{**COMMON, "num_hidden_layers": 6}),
        "mixtral": t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **COMMON),
    }


def checkpoint_bytes(model) -> int:
    """Bytes of the model's weights as a bf16 checkpoint stores them: every parameter in bf16
    (transformers builds some routers in fp32), routing-score corrections in fp32."""
    total = sum(p.numel() * 2 for p in model.parameters())
    total += sum(b.numel() * 4 for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    return total


@pytest.fixture(scope="module")
def built():
    out = {}
    for family, config in tiny_configs().items():
        config.dtype = "bfloat16"
        spec = spec_from_hf_config(config.to_dict(), family)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            cache = model(torch.randint(0, 128, (1, PROMPT_TOKENS)), use_cache=True).past_key_values
        kv_bytes = sum(layer.keys.numel() * layer.keys.element_size()
                       + layer.values.numel() * layer.values.element_size() for layer in cache.layers)
        out[family] = (spec, model, kv_bytes)
    return out


@pytest.mark.parametrize("family", list(tiny_configs()))
def test_weight_bytes_equal_the_model(built, family):
    spec, model, _ = built[family]
    assert spec.family == family
    assert spec.weight_bytes == checkpoint_bytes(model)


@pytest.mark.parametrize("family", list(tiny_configs()))
def test_parameter_count_counts_a_tied_embedding_once(built, family):
    spec, model, _ = built[family]
    norms = spec.norm_bytes // spec.weight_elt_bytes
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith("bias"))
    assert spec.params + norms + biases == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", list(tiny_configs()))
def test_kv_cache_bytes_equal_transformers(built, family):
    """transformers keeps window - 1 past tokens in a sliding layer (the next query brings the
    window's last one); offplan counts the window it attends over, one token more."""
    spec, _, measured = built[family]
    sliding = sum(1 for layer in range(spec.layers) if spec.is_sliding(layer))
    assert measured == spec.kv_cache_bytes(PROMPT_TOKENS) - sliding * spec.kv_bytes_per_token_layer


def test_what_each_family_reads():
    specs = {family: spec_from_hf_config(c.to_dict(), family) for family, c in tiny_configs().items()}
    assert specs["gemma3"].sliding_window == 8 and specs["gemma3"].full_every == 6
    assert [specs["gpt_oss"].is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert specs["deepseek_v3"].kv_bytes_per_token_layer == (16 + 8) * 2  # latent + shared rope key
    assert specs["deepseek_v3"].moe.dense_first == 1 and "layers.0.mlp.down_proj" in specs["deepseek_v3"].by_name
    assert {t.kind for t in specs["qwen3_moe"].layer_tensors(0)} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "router", "experts"}
    assert specs["qwen3"].qk_norm and not specs["mixtral"].qk_norm
    bank = specs["qwen3_moe"].by_name["layers.2.mlp.experts"]
    assert (bank.experts, bank.route_prob, bank.flops_per_token) == (8, 0.25, 2 * 3 * 32 * 64 * 2)


def test_kimi_k2_reads_as_deepseek_v3():
    config = transformers.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, n_shared_experts=1, **ROUTED,
                                           **MLA).to_dict()
    config["model_type"] = "kimi_k2"
    assert spec_from_hf_config(config, "k").family == "deepseek_v3"


def test_gpt_oss_mxfp4_experts_at_4_25_bits():
    config = tiny_configs()["gpt_oss"].to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4"}
    spec = spec_from_hf_config(config, "g")
    bank = spec.by_name["layers.0.mlp.experts"]
    biases = 8 * (2 * 96 + 64) * 2  # gate_up and down biases of 8 experts, bf16
    assert bank.n_bytes == 8 * 3 * 96 * 64 * 4.25 / 8 + biases
    assert spec.by_name["layers.0.self_attn.q_proj"].n_bytes == 64 * 64 * 2 + 64 * 2  # bf16 with bias


def test_unsupported_family_is_one_line():
    from planner.errors import SpecError
    with pytest.raises(SpecError, match=r"model_type: 'falcon' is not supported; supported: .*qwen3_moe") as info:
        spec_from_hf_config({"model_type": "falcon"}, "f")
    assert "\n" not in str(info.value)
