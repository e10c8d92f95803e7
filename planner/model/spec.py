"""ModelSpec and Workload: what is being run, and the exact tensor inventory it implies.

Tensor names follow Hugging Face module paths without the `model.` prefix and the
`.weight` suffix (`layers.3.self_attn.q_proj`, `layers.3.mlp.down_proj`, `embed_tokens`,
`lm_head`), so a plan maps onto a checkpoint and onto `executor/model.py` by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

from planner.errors import SpecError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FAMILIES = ("llama", "mistral", "qwen2", "mixtral")
FFN_KINDS = ("swiglu", "plain")

ATTN_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KINDS_SWIGLU = ("gate_proj", "up_proj", "down_proj")
MLP_KINDS_PLAIN = ("up_proj", "down_proj")


@dataclass(frozen=True)
class Quantization:
    """Group-wise integer weights: `bits` per weight plus one fp16 scale (and zero point when
    asymmetric) per `group_size` weights along the input dimension."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def bytes_for(self, n_weights: int) -> int:
        n_groups = -(-n_weights // self.group_size)
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
    experts: int
    active: int
    expert_intermediate: int


@dataclass(frozen=True)
class TensorSpec:
    """One weight matrix. `rows` x `cols` = out_features x in_features (torch Linear layout).

    `route_prob` is the fraction of tokens that use it (1 for dense, active/experts for an
    expert); `flops_per_token` already includes it."""

    name: str
    layer: int | None  # None for embed_tokens / lm_head
    kind: str  # q_proj, k_proj, ..., embed_tokens, lm_head
    group: str  # attn | mlp | embed | head
    rows: int
    cols: int
    n_bytes: int
    flops_per_token: float
    route_prob: float = 1.0


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

    def __post_init__(self) -> None:
        validate_spec(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def weight_elt_bytes(self) -> int:
        """Bytes per element of unquantized tensors (embeddings, norms, biases, KV)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer, in bytes."""
        return 2 * self.kv_heads * self.head_dim * self.weight_elt_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.layers

    @property
    def norm_bytes(self) -> int:
        """RMSNorm weights (2 per layer + final); always kept with the accelerator."""
        return (2 * self.layers + 1) * self.hidden * self.weight_elt_bytes

    def matrix_bytes(self, rows: int, cols: int, quantizable: bool = True) -> int:
        if self.quantization is not None and quantizable:
            return self.quantization.bytes_for(rows * cols)
        return rows * cols * self.weight_elt_bytes

    @cached_property
    def inventory(self) -> tuple[TensorSpec, ...]:
        return tuple(self._iter_tensors())

    def tensors(self) -> tuple[TensorSpec, ...]:
        """Every weight matrix, in execution order: embed, layers 0..L-1, lm_head."""
        return self.inventory

    @cached_property
    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.inventory}

    def layer_tensors(self, layer: int) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.inventory if t.layer == layer)

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.inventory) + self.norm_bytes

    @property
    def params(self) -> int:
        return sum(t.rows * t.cols for t in self.inventory)

    def _iter_tensors(self) -> Iterator[TensorSpec]:
        h, hd = self.hidden, self.head_dim
        eb = self.weight_elt_bytes
        embed_bytes = self.vocab * h * eb
        yield TensorSpec("embed_tokens", None, "embed_tokens", "embed", self.vocab, h,
                         0 if self.tied_embeddings else embed_bytes, 0.0)
        attn_shapes = {
            "q_proj": (self.heads * hd, h), "k_proj": (self.kv_heads * hd, h),
            "v_proj": (self.kv_heads * hd, h), "o_proj": (h, self.heads * hd),
        }
        for layer in range(self.layers):
            for kind in ATTN_KINDS:
                rows, cols = attn_shapes[kind]
                n_bytes = self.matrix_bytes(rows, cols)
                if self.attention_bias and kind != "o_proj":
                    n_bytes += rows * eb
                yield TensorSpec(f"layers.{layer}.self_attn.{kind}", layer, kind, "attn",
                                 rows, cols, n_bytes, 2.0 * rows * cols)
            yield from self._mlp_tensors(layer)
        yield TensorSpec("lm_head", None, "lm_head", "head", self.vocab, h,
                         self.matrix_bytes(self.vocab, h, quantizable=False), 2.0 * self.vocab * h)

    def _mlp_tensors(self, layer: int) -> Iterator[TensorSpec]:
        h = self.hidden
        kinds = MLP_KINDS_SWIGLU if self.ffn == "swiglu" else MLP_KINDS_PLAIN
        if self.moe is None:
            experts, inter, prob, prefix = [None], self.intermediate, 1.0, f"layers.{layer}.mlp"
        else:
            experts, inter = range(self.moe.experts), self.moe.expert_intermediate
            prob, prefix = self.moe.active / self.moe.experts, f"layers.{layer}.mlp.experts"
        for expert in experts:
            base = prefix if expert is None else f"{prefix}.{expert}"
            for kind in kinds:
                rows, cols = (h, inter) if kind == "down_proj" else (inter, h)
                yield TensorSpec(f"{base}.{kind}", layer, kind, "mlp", rows, cols,
                                 self.matrix_bytes(rows, cols), 2.0 * rows * cols * prob, prob)


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


def validate_spec(spec: ModelSpec) -> None:
    """Raise SpecError naming the first inconsistent field of `spec`."""
    for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "max_context"):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SpecError(f"{name}: must be a positive whole number, got {value!r}")
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
        if q.group_size <= 0:
            raise SpecError(f"quantization.group_size: must be positive, got {q.group_size}")
    m = spec.moe
    if m is not None and not (0 < m.active <= m.experts and m.expert_intermediate > 0):
        raise SpecError("moe: need 0 < active <= experts and expert_intermediate > 0")
