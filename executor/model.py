"""A plain Llama-family decoder (Llama, Mistral, Qwen2, Qwen3; routed experts of Qwen3-MoE and
Mixtral in executor/moe.py) built from a ModelSpec.

It knows nothing of offload. Module names mirror Hugging Face exactly, so `state_dict()` keys
equal checkpoint keys and plan tensor names (`layers.3.mlp.down_proj`) map onto modules
(`model.layers[3].mlp.down_proj`). Every Linear is called as a module and the decoder layers
run from a plain loop, so offload code can wrap, hook or replace them from outside; the KV
cache of each layer is a separate object (`layer.self_attn.kv_cache`) for the same reason.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from planner.errors import SpecError
from planner.model.hf_families import RUNNABLE_FAMILIES
from planner.model.inventory import O_BIAS_FAMILIES
from planner.model.spec import ModelSpec

from .moe import SparseMoE, block_name

# Families this decoder builds (routed experts: executor/moe.py); the config reader applies its
# strict checks (rotary details the executor needs) to the same families.
EXECUTOR_FAMILIES = RUNNABLE_FAMILIES
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(spec_dtype: str) -> torch.dtype:
    """'bf16' -> torch.bfloat16 (the ModelSpec dtype names)."""
    if spec_dtype not in TORCH_DTYPES:
        raise SpecError(f"dtype: unknown {spec_dtype!r}; expected one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[spec_dtype]


# ---- rotary position embedding ----------------------------------------------------------------

def rope_inv_freq(spec: ModelSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with Llama-3 or linear scaling applied."""
    dim = spec.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (spec.rope_theta ** exponents)  # [head_dim / 2]
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind != "llama3":
        raise SpecError(f"rope_scaling.kind: {scaling.kind!r} is not supported; expected llama3 or linear")
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (wavelengths in tokens).
    old_context = scaling.original_max_position
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(spec: ModelSpec, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [tokens, head_dim] for integer `positions` [tokens]; angles in float32, then cast."""
    inv_freq = rope_inv_freq(spec, positions.device)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [tokens, head_dim / 2]
    emb = torch.cat((angles, angles), dim=-1)  # [tokens, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, tokens, head_dim] by cos/sin [tokens, head_dim] (half-split layout)."""
    cos, sin = cos.to(x.device), sin.to(x.device)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ---- attention ----------------------------------------------------------------------------------

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    """Causal grouped-query attention.

    q [batch, heads, t, head_dim] holds tokens at positions q_start..q_start+t-1;
    k, v [batch, kv_heads, s, head_dim] hold positions 0..s-1. Query i sees keys 0..q_start+i.
    Returns [batch, heads, t, head_dim]. GQA folds the query heads sharing one KV head into the
    token axis (the same result as repeating K/V per head, without copying the cache)."""
    batch, heads, t, head_dim = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    if q_start == 0 and t == s and t > 1:  # a whole prompt: the fused causal kernel, no mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
    groups = heads // kv_heads
    q_folded = q.reshape(batch, kv_heads, groups * t, head_dim)  # row r = group * t + token
    if t == 1:
        mask = None  # a single new token sees every cached token
    else:
        token = torch.arange(groups * t, device=q.device) % t  # [groups * t]
        mask = torch.arange(s, device=q.device)[None, :] <= (q_start + token)[:, None]  # [groups * t, s]
    out = F.scaled_dot_product_attention(q_folded, k, v, attn_mask=mask)  # [batch, kv_heads, groups*t, hd]
    return out.reshape(batch, heads, t, head_dim)


class KVCache(nn.Module):
    """Keys and values of one layer for `batch` sequences, up to `max_tokens` tokens each.

    Offload code may replace a layer's cache with any object offering `length`, `attend` and
    `truncate`."""

    def __init__(self, batch: int, max_tokens: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        shape = (batch, kv_heads, max_tokens, head_dim)
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.max_tokens = max_tokens
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens stored per sequence."""
        return self._length

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [batch, heads, t, head_dim] (RoPE applied); k, v [batch, kv_heads, t, head_dim], the new
        tokens at positions length..length+t-1. Appends k/v and returns the causal attention output
        [batch, heads, t, head_dim] over all cached tokens."""
        start, t = self._length, k.shape[2]
        end = start + t
        if end > self.max_tokens:
            raise ValueError(f"KV cache holds at most {self.max_tokens} tokens; {start} stored, {t} more "
                             "requested: call setup_caches with a larger max_tokens")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self._length = end
        return causal_attention(q, self.k[:, :, :end], self.v[:, :, :end], start)

    def truncate(self, length: int) -> None:
        """Drop tokens at positions >= length (speculative-decoding rollback)."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate a KV cache of {self._length} tokens to {length}")
        self._length = length


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        h, hd = spec.hidden, spec.head_dim
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, hd
        # Llama and Qwen3 put attention_bias on all four projections, Qwen2 on q/k/v only.
        o_bias = spec.attention_bias and spec.family in O_BIAS_FAMILIES
        self.q_proj = nn.Linear(h, spec.heads * hd, bias=spec.attention_bias, dtype=dtype)
        self.k_proj = nn.Linear(h, spec.kv_heads * hd, bias=spec.attention_bias, dtype=dtype)
        self.v_proj = nn.Linear(h, spec.kv_heads * hd, bias=spec.attention_bias, dtype=dtype)
        self.o_proj = nn.Linear(spec.heads * hd, h, bias=o_bias, dtype=dtype)
        if spec.qk_norm:  # Qwen3: RMSNorm over each query and key head before the rotation
            self.q_norm = RMSNorm(hd, spec.rms_eps, dtype)
            self.k_norm = RMSNorm(hd, spec.rms_eps, dtype)
        self.qk_norm = spec.qk_norm
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, t, _ = x.shape  # x [batch, t, hidden]
        q = self.q_proj(x).view(batch, t, self.heads, self.head_dim)  # [b, t, heads, hd]
        k = self.k_proj(x).view(batch, t, self.kv_heads, self.head_dim)  # [b, t, kv, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, heads, t, hd], [b, kv, t, hd]
        v = self.v_proj(x).view(batch, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, kv, t, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is None:
            out = causal_attention(q, k, v, 0)  # no cache: the tokens are the whole sequence
        else:
            out = self.kv_cache.attend(q, k, v)  # [b, heads, t, hd]
        return self.o_proj(out.transpose(1, 2).reshape(batch, t, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (`down(silu(gate(x)) * up(x))`) or plain (`down(gelu(up(x)))`)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        self.gated = spec.ffn == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(spec.hidden, spec.intermediate, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(spec.hidden, spec.intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(spec.intermediate, spec.hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class RMSNorm(nn.Module):
    """Normalises in float32 (as Hugging Face does), scales in the input dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(spec, dtype)
        # The feed-forward block: a dense MLP, or routed experts under the family's name.
        self.ffn_name = block_name(spec) if spec.moe is not None else "mlp"
        setattr(self, self.ffn_name, SparseMoE(spec, dtype) if spec.moe is not None else MLP(spec, dtype))
        self.input_layernorm = RMSNorm(spec.hidden, spec.rms_eps, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden, spec.rms_eps, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embedding, decoder layers and final norm: Hugging Face's `model.` prefix."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(spec, dtype) for _ in range(spec.layers))
        self.norm = RMSNorm(spec.hidden, spec.rms_eps, dtype)

    def cache_length(self) -> int:
        cache = self.layers[0].self_attn.kv_cache
        return 0 if cache is None else cache.length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, t] -> final-normed hidden states [batch, t, hidden]."""
        start = self.cache_length()
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)  # [t]
        x = self.embed_tokens(tokens)  # [batch, t, hidden]
        cos, sin = rope_cos_sin(self.spec, positions, x.dtype)  # [t, head_dim] each
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class Transformer(nn.Module):
    """Causal LM: `forward(tokens [batch, t]) -> logits [batch, t, vocab]`.

    With caches installed (`setup_caches`) each call continues the cached sequences: the new
    tokens sit at positions cache length .. cache length + t - 1. Without caches each call is
    a whole sequence starting at position 0."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype | None = None):
        super().__init__()
        if spec.family not in EXECUTOR_FAMILIES or spec.ffn == "geglu":
            raise SpecError(f"the executor does not build {spec.family} models (it builds "
                            f"{', '.join(EXECUTOR_FAMILIES)})")
        dtype = dtype or torch_dtype(spec.dtype)
        self.spec = spec
        self.model = DecoderStack(spec, dtype)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False, dtype=dtype)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tied embeddings lm_head.weight *is* model.embed_tokens.weight (one Parameter)."""
        if self.spec.tied_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """logits [batch, t, vocab]; with `last_only` just the last position's, [batch, 1, vocab]
        (a prefill that only needs the next token skips the vocabulary projection of the rest)."""
        hidden = self.model(tokens)  # [batch, t, hidden]
        return self.lm_head(hidden[:, -1:] if last_only else hidden)

    # ---- KV caches ------------------------------------------------------------------------------
    @property
    def cache_length(self) -> int:
        """Tokens held in the caches (0 without caches)."""
        return self.model.cache_length()

    def setup_caches(self, batch: int, max_tokens: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Install one empty KVCache per layer; by default in the model dtype, on the device of
        each layer's input norm weight: where its activations are. (k_proj may hold no float
        weight: quantized, compensated or placed by offload code.)"""
        for layer in self.model.layers:
            attn, norm = layer.self_attn, layer.input_layernorm.weight
            attn.kv_cache = KVCache(batch, max_tokens, attn.kv_heads, attn.head_dim, dtype or norm.dtype,
                                    device or norm.device)

    def reset_caches(self) -> None:
        self.truncate_caches(0)

    def truncate_caches(self, length: int) -> None:
        """Keep the first `length` tokens of every layer's cache."""
        for layer in self.model.layers:
            if layer.self_attn.kv_cache is not None:
                layer.self_attn.kv_cache.truncate(length)
