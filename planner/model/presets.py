"""Shapes of well-known open models, by name (`model: llama-3.1-70b` in a model.yaml, draft
candidates, benchmarks). Numbers are those of the public Hugging Face config.json files."""

from __future__ import annotations

from planner.errors import SpecError
from planner.model.spec import MLA, MoE, ModelSpec, Quantization, RopeScaling

_LLAMA31_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA32_ROPE = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def _llama(name, layers, hidden, inter, heads, kv, vocab=128256, tied=False, rope=_LLAMA31_ROPE):
    return ModelSpec(name=name, family="llama", layers=layers, hidden=hidden, intermediate=inter, heads=heads,
                     kv_heads=kv, vocab=vocab, tied_embeddings=tied, max_context=131072, rope_theta=500000.0,
                     rope_scaling=rope)


def _qwen(name, layers, hidden, inter, heads, kv, tied=False, context=32768):
    return ModelSpec(name=name, family="qwen2", layers=layers, hidden=hidden, intermediate=inter, heads=heads,
                     kv_heads=kv, vocab=152064 if not tied else 151936, tied_embeddings=tied, attention_bias=True,
                     max_context=context, rope_theta=1000000.0, rms_eps=1e-6)


def _qwen3(name, layers, hidden, inter, heads, kv, moe=None):
    return ModelSpec(name=name, family="qwen3_moe" if moe else "qwen3", layers=layers, hidden=hidden,
                     intermediate=inter, heads=heads, kv_heads=kv, head_dim=128, vocab=151936, max_context=40960,
                     rope_theta=1000000.0, rms_eps=1e-6, qk_norm=True, moe=moe)


def _gpt_oss(name, layers, experts):
    """openai/gpt-oss-*: experts in MXFP4 (4.25 bits per weight), everything else bf16."""
    return ModelSpec(name=name, family="gpt_oss", layers=layers, hidden=2880, intermediate=2880, heads=64,
                     kv_heads=8, head_dim=64, vocab=201088, attention_bias=True, max_context=131072,
                     rope_theta=150000.0, sliding_window=128, full_every=2, attention_sinks=True,
                     moe=MoE(experts, 4, 2880, router_bias=True, expert_bias=True),
                     weight_bits={"experts": 4.25})


def _moe_presets() -> list[ModelSpec]:
    return [
        _qwen3("qwen3-30b-a3b", 48, 2048, 6144, 32, 4, MoE(128, 8, 768)),
        _qwen3("qwen3-235b-a22b", 94, 4096, 12288, 64, 4, MoE(128, 8, 1536)),
        _gpt_oss("gpt-oss-20b", 24, 32),
        _gpt_oss("gpt-oss-120b", 36, 128),
        ModelSpec(name="glm-4.5-air", family="glm4_moe", layers=46, hidden=4096, intermediate=10944, heads=96,
                  kv_heads=8, head_dim=128, vocab=151552, attention_bias=True, max_context=131072,
                  rope_theta=1000000.0, moe=MoE(128, 8, 1408, shared_intermediate=1408, dense_first=1,
                                                router_bias=True)),
        # Published in block-wise fp8 (128 x 128 blocks, one fp32 scale each).
        ModelSpec(name="deepseek-v3", family="deepseek_v3", layers=61, hidden=7168, intermediate=18432,
                  heads=128, kv_heads=128, head_dim=192, vocab=129280, max_context=163840, rms_eps=1e-6,
                  quantization=Quantization(bits=8, group_size=8192), mla=MLA(1536, 512, 128, 64, 128),
                  moe=MoE(256, 8, 2048, shared_intermediate=2048, dense_first=3, router_bias=True)),
        ModelSpec(name="deepseek-v2-lite", family="deepseek_v2", layers=27, hidden=2048, intermediate=10944,
                  heads=16, kv_heads=16, head_dim=192, vocab=102400, max_context=163840, rms_eps=1e-6,
                  mla=MLA(0, 512, 128, 64, 128),
                  moe=MoE(64, 6, 1408, shared_intermediate=2816, dense_first=1)),
        ModelSpec(name="mixtral-8x7b", family="mixtral", layers=32, hidden=4096, intermediate=14336, heads=32,
                  kv_heads=8, vocab=32000, max_context=32768, rope_theta=1000000.0, moe=MoE(8, 2, 14336)),
    ]


def _all() -> dict[str, ModelSpec]:
    specs = [
        _llama("llama-3.2-1b", 16, 2048, 8192, 32, 8, tied=True, rope=_LLAMA32_ROPE),
        _llama("llama-3.2-3b", 28, 3072, 8192, 24, 8, tied=True, rope=_LLAMA32_ROPE),
        _llama("llama-3.1-8b", 32, 4096, 14336, 32, 8),
        _llama("llama-3.1-70b", 80, 8192, 28672, 64, 8),
        _llama("llama-3.1-405b", 126, 16384, 53248, 128, 8),
        _qwen("qwen2.5-0.5b", 24, 896, 4864, 14, 2, tied=True),
        _qwen("qwen2.5-1.5b", 28, 1536, 8960, 12, 2, tied=True),
        _qwen("qwen2.5-7b", 28, 3584, 18944, 28, 4),
        _qwen("qwen2.5-32b", 64, 5120, 27648, 40, 8),
        _qwen3("qwen3-8b", 36, 4096, 12288, 32, 8),
        _qwen3("qwen3-14b", 40, 5120, 17408, 40, 8),
        _qwen3("qwen3-32b", 64, 5120, 25600, 64, 8),
        ModelSpec(name="gemma-3-27b", family="gemma3", layers=62, hidden=5376, intermediate=21504, heads=32,
                  kv_heads=16, head_dim=128, vocab=262208, tied_embeddings=True, ffn="geglu", max_context=131072,
                  rope_theta=1000000.0, rope_scaling=RopeScaling("linear", 8.0), rms_eps=1e-6, qk_norm=True,
                  sliding_window=1024, full_every=6),
        *_moe_presets(),
        ModelSpec(name="mistral-7b", family="mistral", layers=32, hidden=4096, intermediate=14336, heads=32,
                  kv_heads=8, vocab=32768, max_context=32768, rope_theta=1000000.0),
    ]
    return {s.name: s for s in specs}


def preset_names() -> list[str]:
    return sorted(_all())


def preset(name: str) -> ModelSpec:
    """The preset called `name`, in any letter case ('Llama-3.1-8B' is 'llama-3.1-8b')."""
    specs = _all()
    key = name.strip().lower()
    if key not in specs:
        raise SpecError(f"model {name!r}: unknown preset; known: {', '.join(sorted(specs))}, "
                        "or give a model.yaml / config.json / .gguf path")
    return specs[key]
