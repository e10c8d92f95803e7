"""Measure a model's rank table: how much quantization error each rank of residual
compensation leaves, matrix by matrix (`offplan sensitivity ... --out ranks.yaml`).

With calibration prompts, the float model runs them once while forward pre-hooks on every
quantizable Linear accumulate the second moment C = E[x xᵀ] of its input; each weight is
then quantized and the spectrum of its error taken activation-aware (the σ² that
executor.compensation.residual_svd decomposes, from a Gram matrix's eigenvalues), so the
table states the output error left on inputs like the calibration ones. Without prompts the
plain spectrum of the error is used (inputs assumed isotropic).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from planner.errors import SpecError
from planner.model.ranks import RankTable, aggregate_kinds, check_ranks, quantized_tensors
from planner.model.spec import ModelSpec
from planner.units import fmt_bytes

from .compensation import calibration_second_moment
from .model import Transformer
from .quant import QuantizedTensor, dequantize, quantize
from .weights import synthetic_model

ProgressFn = Callable[[int, int, str], None]  # (matrices done, matrices in all, tensor name)
SYNTHETIC_PROMPTS = 8
SYNTHETIC_PROMPT_TOKENS = 64
_CHOLESKY_RIDGE = 1e-12


def linear_of(model: Transformer, name: str) -> nn.Module:
    """The module of plan tensor `name` (`layers.3.mlp.down_proj` -> model.model.layers[3]...)."""
    try:
        return model.model.get_submodule(name)
    except AttributeError:
        raise SpecError(f"tensor {name!r} is not in the model; the model and its spec disagree") from None


def random_prompts(vocab: int, prompts: int = SYNTHETIC_PROMPTS, tokens: int = SYNTHETIC_PROMPT_TOKENS,
                   seed: int = 0) -> list[Tensor]:
    """`prompts` uniformly random token sequences, each [1, tokens] int64."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, tokens), generator=generator) for _ in range(prompts)]


@contextmanager
def _without_caches(model: Transformer) -> Iterator[None]:
    """Run whole sequences: detach the KV caches (calibration must not append to them)."""
    saved = [layer.self_attn.kv_cache for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.kv_cache = None
    try:
        yield
    finally:
        for layer, cache in zip(model.model.layers, saved):
            layer.self_attn.kv_cache = cache


@torch.no_grad()
def collect_second_moments(model: Transformer, names: list[str], calibration: list[Tensor]) -> dict[str, Tensor]:
    """C = mean over calibration token rows of x xᵀ ([in, in] float64, CPU) for each Linear in
    `names`, from the float model's forward passes over `calibration` ([batch, t] or [t])."""
    if not calibration:
        raise SpecError("calibration: no prompts; pass at least one token sequence")
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(names, 0)

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # [batch, t, in]
            n = x.numel() // x.shape[-1]
            moment = calibration_second_moment([x]) * n  # [in, in], sum of x xᵀ over the rows
            sums[name] = moment if name not in sums else sums[name] + moment
            rows[name] += n
        return hook

    device = model.model.embed_tokens.weight.device
    hooks = [linear_of(model, name).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        with _without_caches(model):
            for tokens in calibration:
                tokens = tokens if tokens.dim() == 2 else tokens.unsqueeze(0)  # [batch, t]
                model(tokens.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: sums[name] / rows[name] for name in names}


def error_spectrum(weight: Tensor, qt: QuantizedTensor, moment: Tensor | None = None) -> tuple[Tensor, float]:
    """σ² of S·Eᵀ (descending, float64) and E‖x Wᵀ‖², exactly as residual_svd defines them
    (S = C^{1/2}, or I when plain), but from the eigenvalues of the smaller Gram matrix: no
    singular vectors are formed, several times faster than the SVD the factors need.

    With C: E C Eᵀ ([out, out]) when out <= in; else Lᵀ Eᵀ E L ([in, in]) with C = L Lᵀ,
    which has the same eigenvalues (AB and BA share them). Cholesky needs C positive
    definite, so a ridge of 1e-12 x its mean eigenvalue is added there (below fp64 noise of
    the tail energies that matter)."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)  # [out, in]
    err = w - dequantize(qt.to("cpu"), torch.float64)  # [out, in] = E
    out_features, in_features = err.shape
    if moment is None:
        gram = err @ err.T if out_features <= in_features else err.T @ err
        energy = float((w ** 2).sum())
    else:
        c = moment.detach().to(device="cpu", dtype=torch.float64)  # [in, in]
        if tuple(c.shape) != (in_features, in_features):
            raise SpecError(f"calibration moment: shape {tuple(c.shape)} does not match "
                            f"[in_features, in_features] = [{in_features}, {in_features}]")
        c = 0.5 * (c + c.T)
        energy = float((w @ c * w).sum())  # tr(W C Wᵀ)
        if out_features <= in_features:
            gram = err @ c @ err.T  # [out, out]
        else:
            el = err @ _cholesky_with_ridge(c)  # [out, in]
            gram = el.T @ el  # [in, in]
    sigma2 = torch.linalg.eigvalsh(0.5 * (gram + gram.T)).flip(0).clamp_min(0.0)  # [k], descending
    return sigma2, energy


def _cholesky_with_ridge(c: Tensor) -> Tensor:
    """L with L Lᵀ = C + ridge·I ([in, in]); the ridge starts at _CHOLESKY_RIDGE x the mean
    eigenvalue and grows only while rounding leaves a rank-deficient C indefinite."""
    mean_eig = float(torch.diagonal(c).mean())
    if not mean_eig > 0:
        raise SpecError("calibration moment: all zero (calibration inputs were zero); use real prompts")
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    ridge = _CHOLESKY_RIDGE
    while True:
        chol, info = torch.linalg.cholesky_ex(c + ridge * mean_eig * eye)
        if int(info) == 0 or ridge >= 1e-6:
            return torch.linalg.cholesky(c + ridge * mean_eig * eye) if int(info) else chol
        ridge *= 100.0


def tail_energies(sigma2: Tensor) -> Tensor:
    """[k + 1] float64: entry r is Σ_{i>=r} σ_i², the error energy left at rank r."""
    tails = torch.flip(torch.cumsum(torch.flip(sigma2, [0]), 0), [0])  # [k]
    return torch.cat([tails, tails.new_zeros(1)])


def _check_model(model: Transformer, spec: ModelSpec, names: list[str]) -> None:
    for name in names:
        module = linear_of(model, name)
        t = spec.by_name[name]
        if not isinstance(module, nn.Linear):
            raise SpecError(f"tensor {name!r}: the model holds a {type(module).__name__}, not a float Linear; "
                            "measure sensitivity on the unquantized model")
        if tuple(module.weight.shape) != (t.rows, t.cols):
            raise SpecError(f"tensor {name!r}: weight {tuple(module.weight.shape)} in the model, "
                            f"[{t.rows}, {t.cols}] in the spec; the model and its spec disagree")


def sensitivity(model: Transformer, spec: ModelSpec, bits: int, group_size: int, ranks: tuple[int, ...] | list[int],
                calibration: list[Tensor] | None = None, symmetric: bool = True,
                progress: ProgressFn | None = None, moments: dict[str, Tensor] | None = None) -> RankTable:
    """The rank table of `model` (float weights) quantized to `bits` / `group_size`.

    For each attention / MLP matrix: the fraction of its quantization output-error energy left
    at each rank (tail(r) / tail(0)), and its relative output error ‖x E‖ / ‖x Wᵀ‖ at rank 0;
    at rank r the relative output error is output_error · sqrt(remaining[r]). Ranks above
    min(in, out) leave no error. Calibration prompts should supply more token rows than the
    widest input (else C is rank-deficient and the table fits those prompts only).
    `moments` (from collect_second_moments) may replace running `calibration` again."""
    ranks = check_ranks(list(ranks), "--ranks")
    names = [t.name for t in quantized_tensors(spec)]
    _check_model(model, spec, names)
    if moments is None:
        moments = collect_second_moments(model, names, calibration) if calibration else {}
    tensors: dict[str, dict[int, float]] = {}
    output_error: dict[str, float] = {}
    for done, name in enumerate(names, start=1):
        weight = linear_of(model, name).weight.detach()  # [out, in]
        sigma2, output_energy = error_spectrum(weight, quantize(weight, bits, group_size, symmetric),
                                               moments.get(name))
        tails = tail_energies(sigma2)  # [k + 1]
        total = float(tails[0])
        tensors[name] = {r: (float(tails[min(r, len(tails) - 1)]) / total if total > 0 else 0.0) for r in ranks}
        output_error[name] = math.sqrt(total / output_energy) if output_energy > 0 else 0.0
        if progress is not None:
            progress(done, len(names), name)
    method = "activation-aware" if moments else "plain"
    return RankTable(spec.name, bits, group_size, ranks, tensors, aggregate_kinds(tensors), output_error,
                     symmetric, method)


def synthetic_sensitivity(spec: ModelSpec, ranks: tuple[int, ...] | list[int], bits: int | None = None,
                          group_size: int | None = None, symmetric: bool | None = None,
                          prompts: int = SYNTHETIC_PROMPTS, prompt_tokens: int = SYNTHETIC_PROMPT_TOKENS,
                          seed: int = 0, dtype: str = "fp32", progress: ProgressFn | None = None) -> RankTable:
    """`offplan sensitivity --synthetic`: the table of executor.weights.synthetic_model(spec)
    calibrated on uniformly random prompts. Quantization defaults to the spec's."""
    q = spec.quantization
    if (bits is None or group_size is None) and q is None:
        raise SpecError("quantization: the model is not quantized; pass --bits and --group-size or add "
                        "`quantization:` to model.yaml")
    bits = q.bits if bits is None else bits
    group_size = q.group_size if group_size is None else group_size
    symmetric = (q.symmetric if q is not None else True) if symmetric is None else symmetric
    model = synthetic_model(spec, seed=seed, dtype=dtype)
    calibration = random_prompts(spec.vocab, prompts, min(prompt_tokens, spec.max_context), seed)
    return sensitivity(model, spec, bits, group_size, ranks, calibration, symmetric, progress)


def check_host_memory(spec: ModelSpec, what: str, available_bytes: int | None = None) -> None:
    """Refuse, before allocating, a model whose fp32 weights (what `sensitivity` holds while it
    measures) exceed the memory this machine has available."""
    needed = spec.params * 4
    if available_bytes is None:
        from .hostfacts import probe_host
        available_bytes = probe_host().ram_available_bytes
    if available_bytes and needed > available_bytes:
        raise SpecError(f"{what}: {spec.name} needs {fmt_bytes(needed)} of memory for its fp32 weights, "
                        f"this machine has {fmt_bytes(available_bytes)} available; use a smaller model")
