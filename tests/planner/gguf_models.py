"""Tiny GGUF files written with the `gguf` package, tensors named and typed as llama.cpp's
converter writes them (zeros for data): a qwen3moe, a gpt-oss and a deepseek2 model."""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 256, 4, 2, 64, 512, 4
EXPERTS, ACTIVE, EXPERT_FFN, DENSE_FFN = 8, 2, 256, 512


def _add(w: gguf.GGUFWriter, name: str, shape: tuple[int, ...], qtype: Q = Q.F16) -> None:
    """`shape` in torch order ([experts,] out, in); the file stores GGML order (reversed)."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[qtype]
        data = np.zeros(shape, dtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype == Q.BF16 else None)
        return
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    byte_shape = (*shape[:-1], shape[-1] // block_weights * block_bytes)
    w.add_tensor(name, np.zeros(byte_shape, np.uint8), raw_dtype=qtype)


def _header(w: gguf.GGUFWriter, dense_ffn: int, blocks: int = LAYERS) -> None:
    w.add_name("tiny")
    w.add_block_count(blocks)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(dense_ffn)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(ACTIVE)
    w.add_expert_feed_forward_length(EXPERT_FFN)
    w.add_vocab_size(VOCAB)


def _experts(w: gguf.GGUFWriter, b: str, qtype: Q, down_type: Q, bias: bool = False) -> None:
    _add(w, f"{b}.ffn_gate_inp.weight", (EXPERTS, HIDDEN), Q.F32)
    _add(w, f"{b}.ffn_gate_exps.weight", (EXPERTS, EXPERT_FFN, HIDDEN), qtype)
    _add(w, f"{b}.ffn_up_exps.weight", (EXPERTS, EXPERT_FFN, HIDDEN), qtype)
    _add(w, f"{b}.ffn_down_exps.weight", (EXPERTS, HIDDEN, EXPERT_FFN), down_type)
    if bias:
        _add(w, f"{b}.ffn_gate_inp.bias", (EXPERTS,), Q.F32)
        for part, width in (("gate", EXPERT_FFN), ("up", EXPERT_FFN), ("down", HIDDEN)):
            _add(w, f"{b}.ffn_{part}_exps.bias", (EXPERTS, width), Q.F32)


def _gqa(w: gguf.GGUFWriter, b: str, qtype: Q, bias: bool = False, o_bias: bool = True) -> None:
    for part, rows, cols in (("q", HEADS * HEAD_DIM, HIDDEN), ("k", KV_HEADS * HEAD_DIM, HIDDEN),
                             ("v", KV_HEADS * HEAD_DIM, HIDDEN), ("output", HIDDEN, HEADS * HEAD_DIM)):
        _add(w, f"{b}.attn_{part}.weight", (rows, cols), qtype)
        if bias and (o_bias or part != "output"):
            _add(w, f"{b}.attn_{part}.bias", (rows,), Q.F32)


def write_qwen3moe(path, body: Q = Q.Q4_K, output: Q = Q.Q6_K, down: Q = Q.Q6_K) -> str:
    """Qwen3-MoE as a Q4_K_M file: Q4_K body, Q6_K expert down projections and output."""
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    _header(w, DENSE_FFN)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    _add(w, "token_embd.weight", (VOCAB, HIDDEN), body)
    _add(w, "output_norm.weight", (HIDDEN,), Q.F32)
    _add(w, "output.weight", (VOCAB, HIDDEN), output)
    for layer in range(LAYERS):
        b = f"blk.{layer}"
        for norm, width in (("attn_norm", HIDDEN), ("ffn_norm", HIDDEN), ("attn_q_norm", HEAD_DIM),
                            ("attn_k_norm", HEAD_DIM)):
            _add(w, f"{b}.{norm}.weight", (width,), Q.F32)
        _gqa(w, b, body)
        _experts(w, b, body, down)
    _write(w)
    return str(path)


def write_gpt_oss(path) -> str:
    """gpt-oss as ggml-org publishes it: MXFP4 experts, F16 attention, sinks, biases, windows."""
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    _header(w, EXPERT_FFN)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_sliding_window(128)
    _add(w, "token_embd.weight", (VOCAB, HIDDEN), Q.F16)
    _add(w, "output_norm.weight", (HIDDEN,), Q.F32)
    _add(w, "output.weight", (VOCAB, HIDDEN), Q.F16)
    for layer in range(LAYERS):
        b = f"blk.{layer}"
        _add(w, f"{b}.attn_norm.weight", (HIDDEN,), Q.F32)
        _add(w, f"{b}.post_attention_norm.weight", (HIDDEN,), Q.F32)
        _add(w, f"{b}.attn_sinks.weight", (HEADS,), Q.F32)
        _gqa(w, b, Q.F16, bias=True)
        _experts(w, b, Q.MXFP4, Q.MXFP4, bias=True)
    _write(w)
    return str(path)


def write_deepseek2(path, dense_first: int = 1) -> str:
    """DeepSeek-V3 shape: MLA (q_a/q_b, kv_a_mqa, kv_b), dense first layer, shared expert."""
    w = gguf.GGUFWriter(str(path), "deepseek2")
    _header(w, DENSE_FFN)
    q_lora, kv_lora, nope, rope, v_dim = 128, 64, 32, 32, 32
    w.add_q_lora_rank(q_lora)
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(nope + rope)
    w.add_value_length(v_dim)
    w.add_rope_dimension_count(rope)
    w.add_leading_dense_block_count(dense_first)
    w.add_expert_shared_count(1)
    _add(w, "token_embd.weight", (VOCAB, HIDDEN), Q.Q8_0)
    _add(w, "output_norm.weight", (HIDDEN,), Q.F32)
    _add(w, "output.weight", (VOCAB, HIDDEN), Q.Q8_0)
    for layer in range(LAYERS):
        b = f"blk.{layer}"
        _add(w, f"{b}.attn_norm.weight", (HIDDEN,), Q.F32)
        _add(w, f"{b}.ffn_norm.weight", (HIDDEN,), Q.F32)
        _add(w, f"{b}.attn_q_a_norm.weight", (q_lora,), Q.F32)
        _add(w, f"{b}.attn_kv_a_norm.weight", (kv_lora,), Q.F32)
        _add(w, f"{b}.attn_q_a.weight", (q_lora, HIDDEN), Q.Q8_0)
        _add(w, f"{b}.attn_q_b.weight", (HEADS * (nope + rope), q_lora), Q.Q8_0)
        _add(w, f"{b}.attn_kv_a_mqa.weight", (kv_lora + rope, HIDDEN), Q.Q8_0)
        _add(w, f"{b}.attn_kv_b.weight", (HEADS * (nope + v_dim), kv_lora), Q.Q8_0)
        _add(w, f"{b}.attn_output.weight", (HIDDEN, HEADS * v_dim), Q.Q8_0)
        if layer < dense_first:
            for part, shape in (("gate", (DENSE_FFN, HIDDEN)), ("up", (DENSE_FFN, HIDDEN)),
                                ("down", (HIDDEN, DENSE_FFN))):
                _add(w, f"{b}.ffn_{part}.weight", shape, Q.Q8_0)
            continue
        _experts(w, b, Q.Q4_K, Q.Q4_K)
        _add(w, f"{b}.exp_probs_b.bias", (EXPERTS,), Q.F32)
        for part, shape in (("gate", (EXPERT_FFN, HIDDEN)), ("up", (EXPERT_FFN, HIDDEN)),
                            ("down", (HIDDEN, EXPERT_FFN))):
            _add(w, f"{b}.ffn_{part}_shexp.weight", shape, Q.Q8_0)
    _write(w)
    return str(path)


def write_glm4moe(path) -> str:
    """GLM-4.5-Air shape: q/k/v biases, one dense first layer, a shared expert, and the
    multi-token-prediction layer llama.cpp's converter keeps as an extra block (not run)."""
    w = gguf.GGUFWriter(str(path), "glm4moe")
    _header(w, DENSE_FFN, blocks=LAYERS + 1)  # the MTP block is counted
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_leading_dense_block_count(1)
    w.add_expert_shared_count(1)
    w.add_nextn_predict_layers(1)
    _add(w, "token_embd.weight", (VOCAB, HIDDEN), Q.Q8_0)
    _add(w, "output_norm.weight", (HIDDEN,), Q.F32)
    _add(w, "output.weight", (VOCAB, HIDDEN), Q.Q6_K)
    for layer in range(LAYERS + 1):
        b = f"blk.{layer}"
        _add(w, f"{b}.attn_norm.weight", (HIDDEN,), Q.F32)
        _add(w, f"{b}.ffn_norm.weight", (HIDDEN,), Q.F32)
        _gqa(w, b, Q.Q4_K, bias=True, o_bias=False)  # GLM: q/k/v biases only
        if layer == 0:
            for part, shape in (("gate", (DENSE_FFN, HIDDEN)), ("up", (DENSE_FFN, HIDDEN)),
                                ("down", (HIDDEN, DENSE_FFN))):
                _add(w, f"{b}.ffn_{part}.weight", shape, Q.Q4_K)
            continue
        _experts(w, b, Q.Q4_K, Q.Q6_K)
        _add(w, f"{b}.exp_probs_b.bias", (EXPERTS,), Q.F32)
        for part, shape in (("gate", (EXPERT_FFN, HIDDEN)), ("up", (EXPERT_FFN, HIDDEN)),
                            ("down", (HIDDEN, EXPERT_FFN))):
            _add(w, f"{b}.ffn_{part}_shexp.weight", shape, Q.Q4_K)
    _write(w)
    return str(path)


def write_gemma3(path) -> str:
    """Gemma 3: q/k norms, four norms per layer, tied embedding, a 1024-token window."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny")
    w.add_block_count(LAYERS + 2)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(DENSE_FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_sliding_window(1024)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    _add(w, "token_embd.weight", (VOCAB, HIDDEN), Q.Q6_K)
    _add(w, "output_norm.weight", (HIDDEN,), Q.F32)
    for layer in range(LAYERS + 2):
        b = f"blk.{layer}"
        for norm, width in (("attn_norm", HIDDEN), ("post_attention_norm", HIDDEN), ("ffn_norm", HIDDEN),
                            ("post_ffw_norm", HIDDEN), ("attn_q_norm", HEAD_DIM), ("attn_k_norm", HEAD_DIM)):
            _add(w, f"{b}.{norm}.weight", (width,), Q.F32)
        _gqa(w, b, Q.Q4_K)
        for part, shape in (("gate", (DENSE_FFN, HIDDEN)), ("up", (DENSE_FFN, HIDDEN)),
                            ("down", (HIDDEN, DENSE_FFN))):
            _add(w, f"{b}.ffn_{part}.weight", shape, Q.Q4_K)
    _write(w)
    return str(path)


def _write(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
