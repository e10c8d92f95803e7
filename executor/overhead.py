"""The fixed cost of a decode step that no byte or flop count explains.

A decode step of the executor's decoder calls some forty small operators per layer (norms,
rotary embedding, views, cache append, attention, residual adds) and a few more for the
embedding, final norm, lm_head and argmax. At batch 1 each costs its dispatch (Python, the
PyTorch dispatcher, a kernel launch) rather than its bytes. The profiler measures that cost
directly: it times decode steps of the same decoder at a negligible width with two depths;
the difference per extra layer is the per-layer overhead, the rest is the per-step overhead
of embedding + head. Using the real model code keeps the figure honest as the model changes.

The same approach prices the other costs bytes and flops miss: what splitting a layer's KV
cache adds to its attention, the element-wise operators and causal attention of a prefill
at a realistic width, and the hand-off of a compensation branch to the host worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from planner.cost.attention import attention_prefill_flops
from planner.cost.options import elementwise_bytes
from planner.model.spec import ModelSpec

from .attention import HybridKVCache
from .compensation import CompensatedLinear
from .model import DecoderLayer, Transformer, rope_cos_sin
from .timing import DTYPES, Timing, time_runs

SHALLOW_LAYERS, DEEP_LAYERS = 2, 6
PROMPT_TOKENS = 32  # cache depth while timing; tiny, so attention costs only its dispatch
# Calls per timed run: steps are ~0.1-1 ms, so several per run beat timer jitter.
STEPS_PER_RUN = 20


def overhead_spec(layers: int) -> ModelSpec:
    """A Llama-shaped decoder so narrow that its matmuls cost only their dispatch."""
    return ModelSpec(name=f"overhead-probe-{layers}", family="llama", layers=layers, hidden=64,
                     intermediate=128, heads=4, kv_heads=2, vocab=256, dtype="fp32",
                     max_context=PROMPT_TOKENS + 8)


def decode_step_timing(device: torch.device, dtype: str, layers: int, warmup: int, repeats: int) -> Timing:
    """One greedy decode step (forward of one token, argmax) of a `layers`-deep probe model
    with a KV cache of PROMPT_TOKENS; the cache is cut back after each step."""
    spec = overhead_spec(layers)
    model = Transformer(spec, DTYPES[dtype]).to(device)
    model.setup_caches(1, spec.max_context, device=device)
    prompt = torch.zeros(1, PROMPT_TOKENS, dtype=torch.long, device=device)  # [1, prompt]
    model(prompt, last_only=True)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]

    def step() -> torch.Tensor:
        logits = model(token, last_only=True)  # [1, 1, vocab]
        model.truncate_caches(PROMPT_TOKENS)
        return logits.argmax(dim=-1)  # [1, 1]

    return time_runs(step, device, warmup, repeats, calls=STEPS_PER_RUN)


@dataclass(frozen=True)
class StepOverhead:
    layer_s: float  # per decoder layer
    head_s: float  # per step: embedding, final norm, lm_head, argmax, the loop itself
    spread: float  # relative spread of the deeper timing


def step_overhead(shallow: Timing, deep: Timing) -> StepOverhead:
    """Per-layer and per-step parts from steps of SHALLOW_LAYERS and DEEP_LAYERS layers."""
    layer_s = max(deep.median_s - shallow.median_s, 0.0) / (DEEP_LAYERS - SHALLOW_LAYERS)
    head_s = max(shallow.median_s - SHALLOW_LAYERS * layer_s, 0.0)
    return StepOverhead(layer_s, head_s, deep.spread)


def split_attention_timing(device: torch.device, dtype: str, host_fraction: float, warmup: int,
                           repeats: int) -> Timing:
    """One decode token's attention through the executor's HybridKVCache over PROMPT_TOKENS
    keys, `host_fraction` of them on the host: at this size the time is all coordination
    (staging copies, the host worker's round trip, the merge) and dispatch."""
    kv_heads, group, head_dim, max_tokens = 2, 2, 16, PROMPT_TOKENS + 8
    tdt = DTYPES[dtype]
    host_tokens = int(round(host_fraction * PROMPT_TOKENS))
    cache = HybridKVCache(1, max_tokens, kv_heads, head_dim, tdt, device, host_tokens=host_tokens,
                          cpu_threads=torch.get_num_threads(), timed=False)

    def rand(heads: int, t: int) -> torch.Tensor:
        return torch.randn(1, heads, t, head_dim, dtype=tdt, device=device)  # [1, heads, t, head_dim]

    cache.attend(rand(kv_heads * group, PROMPT_TOKENS), rand(kv_heads, PROMPT_TOKENS), rand(kv_heads, PROMPT_TOKENS))
    q, k, v = rand(kv_heads * group, 1), rand(kv_heads, 1), rand(kv_heads, 1)

    def step() -> torch.Tensor:
        out = cache.attend(q, k, v)  # [1, heads, 1, head_dim]
        cache.truncate(PROMPT_TOKENS)
        return out

    with cache:
        return time_runs(step, device, warmup, repeats, calls=STEPS_PER_RUN)


def split_kv_overhead_s(split: Timing, device_only: Timing) -> float:
    """What splitting the KV cache adds to one layer's decode attention, beyond the work."""
    return max(split.median_s - device_only.median_s, 0.0)


# ---- prefill: element-wise operators and causal attention at a realistic width ----------------

PREFILL_ROWS = 256
PREFILL_WIDTH = (1024, 2816, 16, 4)  # hidden, intermediate, heads, kv_heads: a small Llama


class _ShapeOnly(nn.Module):
    """Stands in for a Linear: an output of the right shape, so only the operators around the
    matmuls are timed (allocating the output is a cost the matmul's bytes do not count either)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)  # [..., out]


class _NoAttention:
    """Stands in for the KV cache: attention is timed on its own (attention_prefill_timing)."""

    length = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(q)  # [b, heads, t, hd]


def _width_spec(layers: int = 1) -> ModelSpec:
    hidden, intermediate, heads, kv_heads = PREFILL_WIDTH
    return ModelSpec(name="prefill-probe", family="llama", layers=layers, hidden=hidden,
                     intermediate=intermediate, heads=heads, kv_heads=kv_heads, vocab=256, dtype="fp32",
                     max_context=PREFILL_ROWS + 8)


def prefill_elementwise_timing(device: torch.device, dtype: str, warmup: int, repeats: int) -> Timing:
    """One decoder layer of PREFILL_WIDTH over PREFILL_ROWS new tokens, with its matmuls and
    attention stood in for: the norms, rotary embedding, activation and residual adds."""
    spec, tdt = _width_spec(), DTYPES[dtype]
    layer = DecoderLayer(spec, tdt).to(device)
    for block in (layer.self_attn, layer.mlp):
        for name, child in list(block.named_children()):
            if isinstance(child, nn.Linear):
                setattr(block, name, _ShapeOnly(child.out_features))
    layer.self_attn.kv_cache = _NoAttention()
    cos, sin = rope_cos_sin(spec, torch.arange(PREFILL_ROWS, device=device), tdt)  # [rows, hd] each
    x = torch.randn(1, PREFILL_ROWS, spec.hidden, dtype=tdt, device=device)  # [1, rows, hidden]
    return time_runs(lambda: layer(x, cos, sin), device, warmup, repeats)


def elementwise_gbps(timing: Timing, layer_overhead_s: float, dtype: str) -> float:
    """The probe's element-wise traffic (as the cost model counts it) per second, after the
    layer's fixed dispatch cost."""
    hidden, intermediate, _, _ = PREFILL_WIDTH
    n_bytes = elementwise_bytes(hidden, intermediate, PREFILL_ROWS, DTYPES[dtype].itemsize)
    return n_bytes / max(timing.median_s - layer_overhead_s, timing.median_s / 10) / 1e9


def attention_prefill_timing(device: torch.device, dtype: str, warmup: int, repeats: int) -> Timing:
    """Causal attention over a fresh prompt of PREFILL_ROWS tokens through the KV cache the
    executor installs (executor/attention.py), the cache emptied after each call."""
    _, _, heads, kv_heads = PREFILL_WIDTH
    head_dim, tdt = _width_spec().head_dim, DTYPES[dtype]
    cache = HybridKVCache(1, PREFILL_ROWS, kv_heads, head_dim, tdt, device, timed=False)
    q = torch.randn(1, heads, PREFILL_ROWS, head_dim, dtype=tdt, device=device)  # [1, heads, t, hd]
    k = torch.randn(1, kv_heads, PREFILL_ROWS, head_dim, dtype=tdt, device=device)  # [1, kv, t, hd]
    v = torch.randn(1, kv_heads, PREFILL_ROWS, head_dim, dtype=tdt, device=device)

    def prefill() -> torch.Tensor:
        out = cache.attend(q, k, v)  # [1, heads, t, hd]
        cache.truncate(0)
        return out

    with cache:
        return time_runs(prefill, device, warmup, repeats)


def attention_tflops(timing: Timing) -> float:
    _, _, heads, _ = PREFILL_WIDTH
    return attention_prefill_flops(heads, _width_spec().head_dim, 1, PREFILL_ROWS) / timing.median_s / 1e12


# ---- compensation branches: handing a host task to the worker and joining it ------------------

def branch_timing(device: torch.device, with_branch: bool, warmup: int, repeats: int) -> Timing:
    """A 64-wide int4 linear on `device`, with (CompensatedLinear, rank 4) or without
    (QuantLinear) its host branch: at this size the difference is the hand-off to the
    worker thread and back, what every compensated matrix pays on top of its work."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 64, bias=False)
    module = CompensatedLinear.from_linear(linear, rank=4, bits=4, group_size=32, device=device)
    x = torch.randn(1, 1, 64, device=device)  # [1, 1, in]
    forward = module if with_branch else module.quant
    try:
        return time_runs(lambda: forward(x), device, warmup, repeats, calls=STEPS_PER_RUN)
    finally:
        module.close()


def branch_overhead_s(with_branch: Timing, without: Timing) -> float:
    return max(with_branch.median_s - without.median_s, 0.0)
