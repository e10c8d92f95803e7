"""Weights for `executor.model.Transformer`: Hugging Face safetensors checkpoints (one file or
sharded), deterministic synthetic weights from a ModelSpec, and writing a checkpoint back.

Models are built on the meta device and receive their tensors with
`load_state_dict(assign=True)`, so no second copy of the weights is ever allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from planner.errors import PlanError, SpecError
from planner.model.hfconfig import hf_config_from_spec, load_hf_config
from planner.schema import atomic_write, new_file_mode
from planner.model.spec import ModelSpec

from .model import Transformer, torch_dtype

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
# Spec fields that do not change the weights or the math of a forward pass: the name, the
# context limit, and the storage dtype / quantization (weights are cast or quantized on load).
_IGNORED_FIELDS = ("name", "max_context", "dtype", "quantization")
# Buffers some older checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Synthetic weights: logits of std ~LOGIT_GAIN; biases small beside unit-scale activations.
LOGIT_GAIN = 3.0
# Residual-stream contributions of the attention and MLP blocks (per element, summed over layers).
# The MLP term dominates the embedding (LOGIT_GAIN/sqrt(hidden) per element), so with tied
# embeddings a token does not just predict itself; chosen so greedy decoding of tiny and deep
# synthetic models keeps producing new tokens instead of settling into a short cycle.
ATTN_OUT_GAIN = 3.0
MLP_OUT_GAIN = 40.0
SYNTHETIC_BIAS_STD = 0.1


def load_checkpoint(model_dir: str | Path, dtype: str | None = None,
                    device: torch.device | str = "cpu") -> tuple[ModelSpec, Transformer]:
    """(spec, model) from a Hugging Face checkpoint directory (config.json + *.safetensors).

    `dtype` ('bf16' | 'fp16' | 'fp32') overrides the config's dtype; tensors stored in another
    dtype are cast one at a time as they are read."""
    model_dir = Path(model_dir)
    spec = load_hf_config(model_dir)
    if spec.quantization is not None:
        raise SpecError(f"{model_dir}: quantized checkpoints cannot be loaded; "
                        "use an unquantized (bf16/fp16/fp32) checkpoint")
    if dtype is not None:
        torch_dtype(dtype)
        spec = dataclasses.replace(spec, dtype=dtype)
    with torch.device("meta"):
        model = Transformer(spec)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    target = torch_dtype(spec.dtype)
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        try:
            _read_file(path, spec, expected, target, device, tensors)
        except SafetensorError as exc:  # corrupt, truncated or absurd header
            raise SpecError(f"{path}: not a readable safetensors file ({exc}); is the download "
                            "complete?") from None
    if spec.tied_embeddings and EMBED_KEY in tensors:
        tensors[HEAD_KEY] = tensors[EMBED_KEY]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise SpecError(f"{model_dir}: checkpoint is missing tensor {missing[0]!r} "
                        f"({len(missing)} missing in all); is the download complete?")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return spec, model.eval()


def _read_file(path: Path, spec: ModelSpec, expected: dict[str, tuple[int, ...]], target: torch.dtype,
               device: torch.device | str, tensors: dict[str, torch.Tensor]) -> None:
    """Read one safetensors file into `tensors`, checking every name and shape against `expected`."""
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        for key in handle.keys():
            if key.endswith(_IGNORED_SUFFIXES) or (spec.tied_embeddings and key == HEAD_KEY):
                continue
            if key not in expected:
                raise SpecError(f"{path.name}: unexpected tensor {key!r} for a {spec.family} model "
                                "with this config.json; the checkpoint and its config disagree")
            tensor = handle.get_tensor(key)
            if tuple(tensor.shape) != expected[key]:
                raise SpecError(f"{path.name}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                f"config.json implies {expected[key]}")
            tensors[key] = tensor if tensor.dtype == target else tensor.to(target)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SpecError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise SpecError(f"{index}: shard {path.name} is missing from {model_dir}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SpecError(f"{model_dir}: no *.safetensors weights found; "
                        "offplan reads Hugging Face checkpoints in safetensors format")
    return files


def check_checkpoint(model_dir: str | Path, spec: ModelSpec) -> None:
    """Raise PlanError naming the first field where the checkpoint's config differs from `spec`
    (the plan's model); reads config.json only, no weight."""
    found = load_hf_config(model_dir)
    for field in dataclasses.fields(ModelSpec):
        if field.name in _IGNORED_FIELDS:
            continue
        ours, theirs = getattr(spec, field.name), getattr(found, field.name)
        if not _same(ours, theirs):
            raise PlanError(f"checkpoint {model_dir} does not match the plan's model {spec.name!r}: "
                            f"{field.name} is {theirs!r} in the checkpoint but {ours!r} in the plan; "
                            "use the checkpoint the plan was solved for, or solve again for this one")


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def synthetic_model(spec: ModelSpec, seed: int = 0, dtype: str | None = None,
                    device: torch.device | str = "cpu") -> Transformer:
    """A model with deterministic random weights whose logits are well-conditioned.

    Norms are 1; matrices are N(0, std^2) with std = 1/sqrt(fan_in) (0.016 at hidden 4096), so
    every projection keeps activations near unit scale; o_proj and down_proj are scaled by
    ATTN_OUT_GAIN / MLP_OUT_GAIN over sqrt(2 * layers), so the residual stream stays bounded at any
    depth; the embedding and lm_head use std LOGIT_GAIN/sqrt(hidden), giving logits of std
    ~LOGIT_GAIN (also when tied).
    Each tensor is drawn from its own generator seeded by (seed, tensor name), directly in the
    target dtype, so a tensor does not depend on the others and no fp32 copy is made."""
    if dtype is not None:
        spec = dataclasses.replace(spec, dtype=dtype)
    target = torch_dtype(spec.dtype)
    with torch.device("meta"):
        model = Transformer(spec)
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict().items():
        if spec.tied_embeddings and name == HEAD_KEY:
            continue
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(meta.shape, dtype=target, device=device)
            continue
        generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
        tensor = torch.empty(meta.shape, dtype=target)  # drawn on the CPU, then moved
        tensor.normal_(0.0, synthetic_std(spec, name, tuple(meta.shape)), generator=generator)
        tensors[name] = tensor.to(device)
    if spec.tied_embeddings:
        tensors[HEAD_KEY] = tensors[EMBED_KEY]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def synthetic_std(spec: ModelSpec, name: str, shape: tuple[int, ...]) -> float:
    """Standard deviation of the synthetic tensor `name` of `shape` ([out, in] for matrices)."""
    if name.endswith(".bias"):
        return SYNTHETIC_BIAS_STD
    if name in (EMBED_KEY, HEAD_KEY):
        return LOGIT_GAIN / math.sqrt(spec.hidden)
    std = 1.0 / math.sqrt(shape[-1])
    if name.endswith("o_proj.weight"):
        std *= ATTN_OUT_GAIN / math.sqrt(2 * spec.layers)
    elif name.endswith(("down_proj.weight", ".w2.weight")):  # Mixtral's expert down projection is w2
        std *= MLP_OUT_GAIN / math.sqrt(2 * spec.layers)
    return std


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def save_checkpoint(model: Transformer, spec: ModelSpec, out_dir: str | Path) -> Path:
    """Write config.json (Hugging Face layout for the family) and model.safetensors to `out_dir`.

    Tied embeddings are stored once (no lm_head.weight), as Hugging Face does. Files are
    written under temporary names and renamed, so a crash leaves no half-written checkpoint."""
    out_dir = Path(out_dir)
    config = hf_config_from_spec(spec)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()
             if not (spec.tied_embeddings and name == HEAD_KEY)}
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{SINGLE_FILE}.", dir=out_dir)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, out_dir / SINGLE_FILE)
        (out_dir / INDEX_FILE).unlink(missing_ok=True)  # a stale shard index would take precedence
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir
