"""Shapes of well-known open models, by name (`model: llama-3.1-70b` in a model.yaml, draft
candidates, benchmarks). Numbers are those of the public Hugging Face config.json files."""

from __future__ import annotations

from planner.errors import SpecError
from planner.model.spec import ModelSpec, RopeScaling

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
