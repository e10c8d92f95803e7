"""ModelSpec and Workload: what is being run, and the exact tensor inventory it implies.

Tensor names follow Hugging Face module paths without the `model.` prefix and the
`.weight` suffix (`layers.3.self_attn.q_proj`, `layers.3.mlp.down_proj`, `embed_tokens`,
`lm_head`), so a plan maps onto a checkpoint and onto `executor/model.py` by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from planner.errors import SpecError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "gpt_oss",
            "deepseek_v2", "deepseek_v3", "glm4_moe", "gemma3")
FFN_KINDS = ("swiglu", "geglu", "plain")



@dataclass(frozen=True)
class Quantization:
    """Group-wise integer weights: `bits` per weight plus one 16-bit scale (and zero point when
    asymmetric) per `group_size` weights along the input dimension; `group_size` 0 means one
    group per row (per output channel, the layout of PyTorch's fused int8 kernel)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def bytes_for(self, n_weights: int, row_length: int = 0) -> int:
        """Packed bytes of `n_weights` weights in rows of `row_length` (needed when per row)."""
        group = self.group_size or row_length or n_weights
        n_groups = -(-n_weights // group)
        per_group_bytes = 2 if self.symmetric else 4
        return -(-n_weights * self.bits // 8) + n_groups * per_group_bytes


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`) or plain linear scaling."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class MoE:
    """Routed experts. `shared_intermediate` is the summed width of the always-active shared
    expert(s) (0: none); the first `dense_first` layers have a dense MLP of `intermediate`
    (DeepSeek's first_k_dense_replace); `router_bias` counts a bias (or score-correction) vector
    of `experts` values beside the router; `expert_bias` counts biases on every expert matrix."""

    experts: int
    active: int
    expert_intermediate: int
    shared_intermediate: int = 0
    dense_first: int = 0
    router_bias: bool = False
    expert_bias: bool = False
    norm_topk: bool = True  # the k routing weights renormalized to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2). Queries go through a rank
    `q_lora_rank` bottleneck (0: a plain q_proj); keys and values are rebuilt per head from a
    `kv_lora_rank` latent, which is what the cache holds, with `qk_rope_head_dim` rotary
    dimensions shared by all heads."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class TensorSpec:
    """One weight matrix, or a layer's bank of routed experts. `rows` x `cols` = out_features x
    in_features (torch Linear layout); a bank (`experts` > 0) stacks the gate, up and down
    matrices of one expert as rows = 3 x expert_intermediate, cols = hidden, and `n_bytes`
    holds all `experts` of them.

    `route_prob` is the fraction of tokens that use one expert (1 for dense, active/experts for
    an expert); `flops_per_token` already includes it (for a bank: `active` experts' work)."""

    name: str
    layer: int | None  # None for embed_tokens / lm_head
    kind: str  # q_proj, k_proj, ..., router, experts, embed_tokens, lm_head
    group: str  # attn | mlp | router | experts | embed | head
    rows: int
    cols: int
    n_bytes: int
    flops_per_token: float
    route_prob: float = 1.0
    experts: int = 0  # routed experts in a bank (0: an ordinary matrix)

    @property
    def params(self) -> int:
        return self.rows * self.cols * max(self.experts, 1)

    @property
    def expert_bytes(self) -> float:
        """Bytes of one expert of a bank (the whole tensor for an ordinary matrix)."""
        return self.n_bytes / max(self.experts, 1)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0 means hidden // heads
    tied_embeddings: bool = False
    attention_bias: bool = False
    ffn: str = "swiglu"
    dtype: str = "bf16"
    quantization: Quantization | None = None
    max_context: int = 8192
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-5
    moe: MoE | None = None
    mla: MLA | None = None
    qk_norm: bool = False  # RMSNorm over each query and key head (Qwen3, Gemma 3)
    sliding_window: int = 0  # tokens a sliding-window layer attends to (0: none)
    full_every: int = 0  # with a window: layer i attends fully when (i + 1) % full_every == 0
    attention_sinks: bool = False  # a learned sink logit per head (gpt-oss)
    # Stored bits per weight by tensor kind, scales included, where the file says so (GGUF
    # tensor types, MXFP4 experts); overrides `quantization` and `dtype` for that kind.
    weight_bits: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_spec(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def weight_elt_bytes(self) -> int:
        """Bytes per element of unquantized tensors (embeddings, norms, biases, KV)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Cache bytes of one token in one full-attention layer: K and V of every KV head, or
        for MLA the compressed latent and the shared rotary key."""
        if self.mla is not None:
            return (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) * self.weight_elt_bytes
        return 2 * self.kv_heads * self.head_dim * self.weight_elt_bytes

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends only to the last `sliding_window` tokens."""
        if self.sliding_window == 0:
            return False
        return self.full_every == 0 or (layer + 1) % self.full_every != 0

    def cached_tokens(self, layer: int, context: int) -> int:
        """Tokens layer `layer` keeps in its cache after `context` tokens."""
        return min(context, self.sliding_window) if self.is_sliding(layer) else context

    def kv_cache_bytes(self, context: int, batch: int = 1) -> int:
        """The whole KV cache after `context` tokens of `batch` sequences, every layer."""
        tokens = sum(self.cached_tokens(layer, context) for layer in range(self.layers))
        return batch * tokens * self.kv_bytes_per_token_layer

    def mean_kv_bytes_per_token_layer(self, context: int) -> float:
        """Cache bytes per token and layer averaged over layers at `context` tokens: sliding
        layers hold at most their window, so this is below kv_bytes_per_token_layer."""
        return self.kv_cache_bytes(context) / (self.layers * max(context, 1))

    @property
    def ffn_width(self) -> int:
        """Feed-forward activations per token at the widest layer: a dense MLP's intermediate,
        or the active and shared experts' widths together in an MoE layer."""
        if self.moe is None:
            return self.intermediate
        routed = self.moe.active * self.moe.expert_intermediate + self.moe.shared_intermediate
        return max(routed, self.intermediate if self.moe.dense_first else 0)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.layers

    @property
    def norm_bytes(self) -> int:
        """Norm weights and other small per-layer vectors (q/k norms, MLA latent norms,
        attention sinks) plus the final norm; always kept with the accelerator."""
        per_layer = (4 if self.family == "gemma3" else 2) * self.hidden
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        if self.mla is not None:
            per_layer += self.mla.q_lora_rank + self.mla.kv_lora_rank
        if self.attention_sinks:
            per_layer += self.heads
        return (per_layer * self.layers + self.hidden) * self.weight_elt_bytes

    def matrix_bytes(self, rows: int, cols: int, quantizable: bool = True, kind: str = "") -> int:
        bits = self.weight_bits.get(kind)
        if bits is not None:
            return int(round(rows * cols * bits / 8))
        if self.quantization is not None and quantizable:
            return self.quantization.bytes_for(rows * cols, cols)
        return rows * cols * self.weight_elt_bytes

    @cached_property
    def inventory(self) -> tuple[TensorSpec, ...]:
        from planner.model.inventory import iter_tensors
        return tuple(iter_tensors(self))

    def tensors(self) -> tuple[TensorSpec, ...]:
        """Every weight matrix, in execution order: embed, layers 0..L-1, lm_head."""
        return self.inventory

    @cached_property
    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.inventory}

    @cached_property
    def _by_layer(self) -> dict[int | None, tuple[TensorSpec, ...]]:
        out: dict[int | None, list[TensorSpec]] = {}
        for t in self.inventory:
            out.setdefault(t.layer, []).append(t)
        return {k: tuple(v) for k, v in out.items()}

    def layer_tensors(self, layer: int) -> tuple[TensorSpec, ...]:
        return self._by_layer.get(layer, ())

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.dense_first

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.inventory) + self.norm_bytes

    @property
    def params(self) -> int:
        """Weights of the matrices, a tied embedding counted once (norms left out)."""
        return sum(t.params for t in self.inventory if not (self.tied_embeddings and t.kind == "embed_tokens"))

    @property
    def active_params(self) -> int:
        """Weights one token reads: routed banks count only their `active` experts."""
        total = 0
        for t in self.inventory:
            if self.tied_embeddings and t.kind == "embed_tokens":
                continue
            total += t.params * t.route_prob if t.experts else t.params
        return int(total)


@dataclass(frozen=True)
class Workload:
    """What the user will run: `batch` sequences of `prompt` tokens, `gen` generated each."""

    batch: int = 1
    prompt: int = 512
    gen: int = 128

    def __post_init__(self) -> None:
        for name in ("batch", "prompt", "gen"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"workload.{name}: must be a positive whole number, got {value!r}")

    @property
    def context(self) -> int:
        """Tokens held in the KV cache at the end of the run."""
        return self.prompt + self.gen

    @property
    def mean_decode_context(self) -> float:
        """Average KV depth seen by a decode step (the cache grows from prompt to context)."""
        return self.prompt + self.gen / 2.0


# No dimension of a real model comes near 2**24 (16.8 M): the largest vocabularies are about
# 0.26 M tokens and the longest contexts 10 M; the deepest models have under 200 layers.
# Larger values are typos (`vocab: 1e30`), refused before any table is built.
MAX_DIMENSION = 2**24
MAX_LAYERS = 2**12


def validate_spec(spec: ModelSpec) -> None:
    """Raise SpecError naming the first inconsistent field of `spec`."""
    for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "max_context"):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SpecError(f"{name}: must be a positive whole number, got {value!r}")
        _check_dimension(name, value)
    if spec.family not in FAMILIES:
        raise SpecError(f"family: unknown {spec.family!r}; expected one of {', '.join(FAMILIES)}")
    if spec.ffn not in FFN_KINDS:
        raise SpecError(f"ffn: unknown {spec.ffn!r}; expected one of {', '.join(FFN_KINDS)}")
    if spec.dtype not in DTYPE_BYTES:
        raise SpecError(f"dtype: unknown {spec.dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    if spec.head_dim == 0:
        if spec.hidden % spec.heads != 0:
            raise SpecError(f"heads: {spec.heads} does not divide hidden {spec.hidden}; "
                            "fix heads or set head_dim explicitly")
        object.__setattr__(spec, "head_dim", spec.hidden // spec.heads)
    if not isinstance(spec.head_dim, int) or spec.head_dim < 0:
        raise SpecError(f"head_dim: must be a positive whole number, got {spec.head_dim!r}")
    if spec.heads % spec.kv_heads != 0:
        raise SpecError(f"kv_heads: {spec.kv_heads} must divide heads {spec.heads} (grouped-query attention)")
    if spec.head_dim % 2 != 0:
        raise SpecError(f"head_dim: must be even for rotary embeddings, got {spec.head_dim}")
    if spec.rope_theta <= 0 or spec.rms_eps <= 0:
        raise SpecError("rope_theta and rms_eps: must be positive")
    q = spec.quantization
    if q is not None:
        if q.bits not in (2, 3, 4, 5, 6, 8):
            raise SpecError(f"quantization.bits: must be one of 2, 3, 4, 5, 6, 8, got {q.bits}")
        if q.group_size < 0:
            raise SpecError(f"quantization.group_size: must be positive (or 0: one scale per "
                            f"output channel), got {q.group_size}")
    m = spec.moe
    if m is not None and not (0 < m.active <= m.experts and m.expert_intermediate > 0):
        raise SpecError("moe: need 0 < active <= experts and expert_intermediate > 0")
    if m is not None and not (0 <= m.dense_first < spec.layers and m.shared_intermediate >= 0):
        raise SpecError(f"moe.dense_first: must be below layers ({spec.layers}), got {m.dense_first}; "
                        "moe.shared_intermediate must not be negative")
    if m is not None:
        for name in ("experts", "expert_intermediate"):
            _check_dimension(f"moe.{name}", getattr(m, name))
    _check_dimension("head_dim", spec.head_dim)
    _validate_attention(spec)


def _validate_attention(spec: ModelSpec) -> None:
    mla = spec.mla
    if mla is not None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(mla, name) <= 0:
                raise SpecError(f"mla.{name}: must be a positive whole number, got {getattr(mla, name)!r}")
        if mla.q_lora_rank < 0:
            raise SpecError(f"mla.q_lora_rank: must be 0 (no query bottleneck) or positive, got {mla.q_lora_rank}")
    if spec.sliding_window < 0 or spec.full_every < 0:
        raise SpecError("sliding_window and full_every: must not be negative")
    for kind, bits in spec.weight_bits.items():
        if not 0 < bits <= 64:
            raise SpecError(f"weight_bits.{kind}: must be between 0 and 64 bits per weight, got {bits!r}")


def _check_dimension(name: str, value: int) -> None:
    limit = MAX_LAYERS if name == "layers" else MAX_DIMENSION
    if value > limit:
        raise SpecError(f"{name}: {value:.3g} is beyond any real model (at most {limit}); a typo?")
