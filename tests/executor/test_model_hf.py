"""executor.model / executor.weights against Hugging Face transformers on tiny random checkpoints
written by the tests themselves."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
from transformers.utils import logging as hf_logging

from conftest import tiny_spec, write_tiny_checkpoint
from executor.model import KVCache, Transformer
from executor.weights import check_checkpoint, load_checkpoint, save_checkpoint, synthetic_model
from planner.errors import PlanError, SpecError

hf_logging.disable_progress_bar()

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            attn_implementation="eager")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CASES = {
    "llama-gqa-llama3-rope": (LlamaConfig, LlamaForCausalLM,
                              dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-linear-rope-attention-bias": (LlamaConfig, LlamaForCausalLM,
                                         dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                              attention_bias=True)),
    "llama-tied-mha": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen2-bias-gqa": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=1e6)),
    "qwen2-tied": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so attention is sharp and norms and biases matter (the default
    init gives near-uniform attention, zero biases and unit norms, which would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))


def write_hf_checkpoint(tmp_path, case: str, seed: int = 0, **save_kwargs):
    config_cls, model_cls, overrides = CASES[case]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**{**TINY, **overrides})).eval()
    randomize_(hf, seed)
    out = tmp_path / case
    hf.save_pretrained(out, **save_kwargs)
    return out, hf


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- equality with Hugging Face ----------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case) -> None:
    path, hf = write_hf_checkpoint(tmp_path, case)
    spec, model = load_checkpoint(path)
    assert spec.dtype == "fp32" and spec.family == hf.config.model_type
    assert set(model.state_dict()) == set(hf.state_dict())
    batch = tokens(2, 40)
    with torch.no_grad():
        expected = hf(batch).logits
    got = model(batch)
    assert got.shape == (2, 40, VOCAB)
    assert expected.abs().max() > 1.0  # the comparison below is not between near-zero logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama-gqa-llama3-rope", "llama-linear-rope-attention-bias"])
def test_rope_scaling_is_what_makes_them_match(tmp_path, case) -> None:
    """Power check: the same weights without the rope scaling give clearly different logits."""
    path, hf = write_hf_checkpoint(tmp_path, case)
    spec, model = load_checkpoint(path)
    assert spec.rope_scaling is not None
    unscaled = Transformer(dataclasses.replace(spec, rope_scaling=None))
    unscaled.load_state_dict(model.state_dict())
    batch = tokens(1, 40)
    assert (unscaled(batch) - model(batch)).abs().max() > 1e-2


def test_tied_embeddings_share_one_parameter(tmp_path) -> None:
    path, _ = write_hf_checkpoint(tmp_path, "qwen2-tied")
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    spec, model = load_checkpoint(path)
    assert spec.tied_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_checkpoint_loads(tmp_path) -> None:
    path, hf = write_hf_checkpoint(tmp_path, "llama-gqa-llama3-rope", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    _, model = load_checkpoint(path)
    batch = tokens(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), hf(batch).logits, atol=1e-4, rtol=1e-4)


def test_save_checkpoint_is_read_by_transformers(tmp_path) -> None:
    spec = tiny_spec(family="qwen2", attention_bias=True, tied_embeddings=True, vocab=VOCAB)
    model = synthetic_model(spec, seed=3)
    save_checkpoint(model, spec, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert isinstance(hf, Qwen2ForCausalLM)
    batch = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), hf(batch).logits, atol=1e-4, rtol=1e-4)
    loaded_spec, loaded = load_checkpoint(tmp_path / "out")
    assert dataclasses.replace(loaded_spec, name="tiny") == spec
    assert torch.equal(loaded(batch), model(batch))


# ---- KV cache -----------------------------------------------------------------------------------

def test_incremental_decode_equals_full_recompute(tmp_path) -> None:
    path, hf = write_hf_checkpoint(tmp_path, "llama-gqa-llama3-rope")
    _, model = load_checkpoint(path)
    batch = tokens(2, 20)
    full = model(batch)  # no cache: the whole sequence at once
    with torch.no_grad():
        torch.testing.assert_close(full, hf(batch).logits, atol=1e-4, rtol=1e-4)
    model.setup_caches(batch=2, max_tokens=32)
    pieces, start = [], 0
    for size in (10, 1, 1, 3, 1, 4):  # prefill, then single- and multi-token steps
        pieces.append(model(batch[:, start:start + size]))
        start += size
        assert model.cache_length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_truncate_then_redecode_is_identical() -> None:
    model = synthetic_model(tiny_spec(), seed=1)
    prompt, draft, other = tokens(1, 12, seed=2), tokens(1, 4, seed=3), tokens(1, 4, seed=4)
    model.setup_caches(batch=1, max_tokens=24)
    model(prompt)
    first = model(draft)
    model.truncate_caches(12)
    assert model.cache_length == 12
    assert torch.equal(model(draft), first)
    model.truncate_caches(12)  # rollback, then a different continuation: as if never cached
    got = model(other)
    full = Transformer.forward(model_without_caches(model), torch.cat([prompt, other], dim=1))
    torch.testing.assert_close(got, full[:, 12:], atol=1e-5, rtol=1e-5)
    model.reset_caches()
    assert model.cache_length == 0


def model_without_caches(model: Transformer) -> Transformer:
    fresh = Transformer(model.spec)
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_cache_limits_are_enforced() -> None:
    model = synthetic_model(tiny_spec())
    model.setup_caches(batch=1, max_tokens=8)
    model(tokens(1, 6))
    with pytest.raises(ValueError, match="at most 8 tokens"):
        model(tokens(1, 3))
    with pytest.raises(ValueError, match="cannot truncate"):
        model.truncate_caches(7)


def test_cache_and_layers_can_be_replaced_and_hooked_from_outside() -> None:
    """The offload contract: a cache object installed from outside is used, and forward
    pre-hooks on model.layers[i] fire once per layer, in order."""
    model = synthetic_model(tiny_spec(layers=3))
    calls: list[tuple[str, int]] = []

    class RecordingCache(KVCache):
        def attend(self, q, k, v):
            calls.append(("attend", k.shape[2]))
            return super().attend(q, k, v)

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: calls.append(("layer", i)))
        layer.self_attn.kv_cache = RecordingCache(1, 16, 2, 16, torch.float32, "cpu")
    reference = model_without_caches(model)(tokens(1, 5))
    assert torch.allclose(model(tokens(1, 5)), reference, atol=1e-5)
    assert calls == [("layer", 0), ("attend", 5), ("layer", 1), ("attend", 5), ("layer", 2), ("attend", 5)]
    assert model.cache_length == 5


# ---- synthetic weights ---------------------------------------------------------------------------

def test_synthetic_model_is_deterministic_and_well_conditioned() -> None:
    spec = tiny_spec(tied_embeddings=True)
    a, b, c = synthetic_model(spec, seed=0), synthetic_model(spec, seed=0), synthetic_model(spec, seed=1)
    batch = tokens(1, 32)
    logits = a(batch)
    assert torch.equal(logits, b(batch)) and not torch.equal(logits, c(batch))
    assert torch.isfinite(logits).all()
    assert 1.0 < logits.std() < 10.0
    assert len(set(logits[0].argmax(-1).tolist())) >= 16  # argmax varies with position
    for seed in range(5):  # greedy decoding keeps producing new tokens, whatever the prompt
        a.setup_caches(1, 64)
        step, generated = a(tokens(1, 32, seed=seed)), []
        for _ in range(16):
            generated.append(step[0, -1].argmax().item())
            step = a(torch.tensor([[generated[-1]]]))
        assert len(set(generated)) >= 6, generated


def test_synthetic_model_in_bf16_has_no_fp32_copy_and_tracks_fp32() -> None:
    spec = tiny_spec(dtype="bf16")
    model = synthetic_model(spec, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = tokens(1, 16)
    logits = model(batch)
    assert logits.dtype == torch.bfloat16
    as_fp32 = Transformer(dataclasses.replace(spec, dtype="fp32"))
    as_fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    reference = as_fp32(batch)
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("overrides", [{}, {"ffn": "plain"}, {"tied_embeddings": True},
                                       {"family": "qwen2", "attention_bias": True}])
def test_module_names_match_the_spec_inventory(overrides) -> None:
    spec = tiny_spec(**overrides)
    state = synthetic_model(spec).state_dict()
    for tensor in spec.tensors():
        key = "lm_head.weight" if tensor.name == "lm_head" else f"model.{tensor.name}.weight"
        assert tuple(state[key].shape) == (tensor.rows, tensor.cols)
    matrices = {k for k in state if k.endswith(".weight") and state[k].dim() == 2}
    assert len(matrices) == len(spec.tensors())


def test_plain_ffn_uses_gelu() -> None:
    model = synthetic_model(tiny_spec(ffn="plain"))
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, 64)
    expected = mlp.down_proj.weight @ torch.nn.functional.gelu(mlp.up_proj.weight @ x[0].T)
    torch.testing.assert_close(mlp(x)[0], expected.T)
    assert not hasattr(mlp, "gate_proj")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_modules_hold_the_plan_banks(family) -> None:
    """Each plan tensor maps onto a module (executor.moe.module_path); a bank's experts hold
    exactly its bytes."""
    from executor.moe import module_path
    from planner.model.spec import MoE
    spec = tiny_spec(family=family, moe=MoE(experts=4, active=2, expert_intermediate=32),
                     qk_norm=family == "qwen3_moe")
    model = synthetic_model(spec)
    for tensor in spec.tensors():
        path = "lm_head" if tensor.name == "lm_head" else f"model.{module_path(spec, tensor.name)}"
        module = model.get_submodule(path)
        n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        assert n_bytes == tensor.n_bytes or (tensor.kind == "embed_tokens" and spec.tied_embeddings)


# ---- checkpoint errors ---------------------------------------------------------------------------

def test_missing_tensor_is_named(tiny_checkpoint) -> None:
    path = tiny_checkpoint / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(SpecError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_checkpoint(tiny_checkpoint)


def test_unexpected_tensor_is_named(tiny_checkpoint) -> None:
    path = tiny_checkpoint / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(SpecError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_checkpoint(tiny_checkpoint)


def test_shape_mismatch_is_named(tiny_checkpoint) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["intermediate_size"] = 64
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    message = r"down_proj.weight' has shape \(64, 128\), config.json implies \(64, 64\)"
    with pytest.raises(SpecError, match=message):
        load_checkpoint(tiny_checkpoint)


def test_no_weights_and_quantized_checkpoints_are_refused(tiny_checkpoint) -> None:
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(SpecError, match=r"no \*.safetensors weights"):
        load_checkpoint(tiny_checkpoint)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match="quantized checkpoints cannot be loaded"):
        load_checkpoint(tiny_checkpoint)


def test_dtype_override_casts_on_load(tiny_checkpoint) -> None:
    spec, model = load_checkpoint(tiny_checkpoint, dtype="bf16")
    assert spec.dtype == "bf16" and {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_check_checkpoint_names_first_differing_field(tmp_path) -> None:
    spec = tiny_spec(name="planned")
    path = write_tiny_checkpoint(tmp_path / "ck", spec)
    check_checkpoint(path, spec)
    check_checkpoint(path, dataclasses.replace(spec, dtype="bf16", max_context=64))  # storage only
    with pytest.raises(PlanError, match="kv_heads is 2 in the checkpoint but 4 in the plan"):
        check_checkpoint(path, dataclasses.replace(spec, kv_heads=4))
    with pytest.raises(PlanError, match="rope_theta"):
        check_checkpoint(path, dataclasses.replace(spec, rope_theta=500000.0))


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_checkpoint_files_follow_the_umask(tmp_path, mask, mode) -> None:
    import os
    import stat
    before = os.umask(mask)
    try:
        out = write_tiny_checkpoint(tmp_path / "ckpt")
    finally:
        os.umask(before)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name
