"""Speculative decoding (DESIGN §3): greedy draft-then-verify with KV-cache rollback.

Each step the draft proposes `gamma` tokens greedily, one forward per token on its own cache;
the target runs the last accepted token and the gamma proposals in one forward of gamma + 1
positions, accepts the longest prefix of proposals equal to its own greedy choices, and adds
its own next token (the "bonus"). A step therefore yields 1..gamma+1 tokens and the output
is exactly plain greedy decoding of the target (up to floating-point ties: the verify forward
multiplies gamma + 1 rows at once, so logits can differ from one-row forwards in the last bit).

Cache invariant between steps: the target's cache holds every accepted token except the
last one (`pending`: known, not yet run through the target). The draft's cache holds a prefix
of the accepted tokens and `backlog` the accepted tokens it has not seen: normally just
`pending`; when all gamma proposals were accepted the draft never ran the last proposal, so
the backlog is [last proposal, bonus] and the next step's first draft forward takes both.

Batch > 1: every sequence of a batch shares one cache length, so a step accepts the
*minimum* accepted prefix over the batch (each sequence still gets the target's greedy
tokens: a sequence that matched further takes the target's choice at that position, which
equals its proposal). Acceptance is then that of the slowest sequence.

Acceptance rate (per token, 0..1): accepted proposals / proposals the target examined, where
a proposal is examined when every earlier proposal of its step was accepted (a step with k
accepted of gamma examined k + 1 proposals when k < gamma, gamma when k = gamma). For
i.i.d. per-token acceptance with probability a this estimates a itself (it is the maximum-
likelihood estimate), so E = (1 - a^(g+1)) / (1 - a) of planner.cost.options holds for any g.
The ratio accepted / proposed is smaller (it is (E - 1) / g) and is not what the planner wants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from planner.errors import OffplanError, SpecError

from .model import KVCache, Transformer

Phase = Callable[[str], None]  # called with "prefill" / "decode" before a target forward (OffloadHandle.begin)


@dataclass(frozen=True)
class SpecStep:
    """What one draft/verify step did (passed to `on_step`)."""

    index: int  # 0-based step number
    accepted: int  # proposals accepted (minimum over the batch)
    proposed: int  # gamma
    tokens: torch.Tensor  # [batch, accepted + 1] tokens this step added


@dataclass(frozen=True)
class SpecOutput:
    tokens: torch.Tensor  # [batch, gen] generated tokens (prompt excluded)
    steps: int  # draft/verify steps after the prefill
    accepted_per_step: list[int]
    acceptance_rate: float  # per-token rate (see the module docstring)
    tokens_per_step: float  # mean tokens a step yields (accepted + 1): the measured E


def acceptance_from_steps(accepted_per_step: Sequence[int], gamma: int) -> float:
    """Per-token acceptance rate: accepted / examined proposals (module docstring)."""
    accepted = sum(accepted_per_step)
    rejected = sum(1 for k in accepted_per_step if k < gamma)  # the proposal that failed
    return accepted / (accepted + rejected) if accepted + rejected else 0.0


# ---- caches and devices -----------------------------------------------------------------------

def _cache_batch(cache: torch.nn.Module) -> int:
    return cache.batch if hasattr(cache, "batch") else cache.k.shape[0]


def prepare_caches(model: Transformer, batch: int, max_tokens: int) -> None:
    """Empty caches for `batch` sequences of up to `max_tokens` tokens.

    Missing caches are installed; the model's own KVCache objects are replaced (same device and
    dtype) when too small or for another batch; other caches (installed by offload code) must
    already be large enough."""
    layers = model.model.layers
    caches = [layer.self_attn.kv_cache for layer in layers]
    if any(c is None for c in caches):
        model.setup_caches(batch, max_tokens)
        return
    if all(_cache_batch(c) == batch and c.max_tokens >= max_tokens for c in caches):
        model.truncate_caches(0)
        return
    if not all(type(c) is KVCache for c in caches):
        raise ValueError(f"the installed KV caches hold fewer than {max_tokens} tokens or another batch than "
                         f"{batch}; install them for prompt + gen + gamma + 1 tokens (apply_plan(max_tokens=...))")
    for layer, c in zip(layers, caches):
        # [batch, kv_heads, max_tokens, head_dim], on the old cache's device and dtype
        layer.self_attn.kv_cache = KVCache(batch, max_tokens, c.k.shape[1], c.k.shape[3], c.k.dtype, c.k.device)


def _token_device(model: Transformer) -> torch.device:
    """Where the model's token ids must be: its embedding table's device (an offloaded
    embedding without a `weight` moves ids itself)."""
    weight = getattr(model.model.embed_tokens, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")


def _last_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy next token [batch, 1] from logits [batch, t, vocab]."""
    return logits[:, -1:].argmax(dim=-1)


def _prefill_next(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Run the prompt tokens [batch, p] into the cache; the greedy next token [batch, 1]. The
    lm_head runs on the last position only (as the cost model assumes)."""
    return _last_argmax(model(tokens, last_only=True))  # [batch, 1, vocab] -> [batch, 1]


def _check_args(prompt: torch.Tensor, gen: int, gamma: int | None = None) -> tuple[int, int]:
    if prompt.dim() != 2 or prompt.shape[1] < 1 or prompt.dtype != torch.long:
        raise ValueError(f"prompt: expected token ids of dtype long and shape [batch, tokens >= 1], "
                         f"got {prompt.dtype} {tuple(prompt.shape)}")
    for name, value in (("gen", gen), ("gamma", gamma)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: must be a whole number >= 1, got {value!r}")
    return prompt.shape[0], prompt.shape[1]


# ---- generation -------------------------------------------------------------------------------

@torch.no_grad()
def greedy_generate(model: Transformer, prompt: torch.Tensor, gen: int, begin: Phase | None = None) -> torch.Tensor:
    """Plain greedy decoding with the KV cache: prompt [batch, p] -> tokens [batch, gen]."""
    batch, p = _check_args(prompt, gen)
    begin = begin or (lambda _phase: None)
    prepare_caches(model, batch, p + gen)
    device = _token_device(model)
    begin("prefill")
    token = _prefill_next(model, prompt.to(device))  # [batch, 1]
    out = [token]
    for _ in range(gen - 1):
        begin("decode")
        token = _last_argmax(model(token.to(device)))  # [batch, 1]
        out.append(token)
    return torch.cat(out, dim=1).to(prompt.device)  # [batch, gen]


@torch.no_grad()
def speculative_generate(target: Transformer, draft: Transformer, prompt: torch.Tensor, gen: int, gamma: int,
                         on_step: Callable[[SpecStep], None] | None = None,
                         target_begin: Phase | None = None) -> SpecOutput:
    """Greedy speculative decoding: prompt [batch, p] -> SpecOutput with tokens [batch, gen],
    equal to `greedy_generate(target, prompt, gen)`.

    Caches are installed or emptied here (prepare_caches) for p + gen + gamma + 1 tokens.
    `target_begin(phase)` runs before each target forward ("prefill", then "decode" for every
    verify), e.g. an OffloadHandle's `begin`; the draft is expected to be resident."""
    batch, p = _check_args(prompt, gen, gamma)
    if draft.spec.vocab != target.spec.vocab:
        raise SpecError(f"draft {draft.spec.name!r}: vocabulary of {draft.spec.vocab} tokens, the target has "
                        f"{target.spec.vocab}; a draft must share the target's tokenizer")
    begin = target_begin or (lambda _phase: None)
    max_tokens = p + gen + gamma + 1
    prepare_caches(target, batch, max_tokens)
    prepare_caches(draft, batch, max_tokens)
    t_dev, d_dev = _token_device(target), _token_device(draft)

    begin("prefill")
    pending = _prefill_next(target, prompt.to(t_dev))  # [batch, 1] first generated token
    draft.model(prompt.to(d_dev))  # fills the draft's cache; no logits needed
    backlog = pending  # [batch, 1 or 2] accepted tokens the draft has not run
    out, produced, accepted_per_step = [pending], 1, []
    while produced < gen:
        base = target.cache_length  # tokens before `pending`
        feed, proposals = backlog.to(d_dev), []
        for _ in range(gamma):
            feed = _last_argmax(draft(feed))  # [batch, 1]
            proposals.append(feed)
        verify_in = torch.cat([pending, torch.cat(proposals, dim=1).to(t_dev)], dim=1)  # [batch, gamma + 1]
        begin("decode")
        choice = target(verify_in).argmax(dim=-1)  # [batch, gamma + 1]: target's token after each input
        matched = (choice[:, :gamma] == verify_in[:, 1:]).long().cumprod(dim=1)  # [batch, gamma]
        # Accepted prefix, shortest in the batch: the one host sync of a step (k sets the cache lengths).
        k = int(matched.sum(dim=1).min())
        step_seq = torch.cat([verify_in[:, :k + 1], choice[:, k:k + 1]], dim=1)  # [batch, k + 2]: pending..bonus
        target.truncate_caches(base + 1 + k)  # keeps pending and the accepted proposals
        draft.truncate_caches(min(draft.cache_length, base + 1 + k))
        backlog = step_seq[:, draft.cache_length - base:]  # [batch, 1], or [batch, 2] after a full accept
        pending = step_seq[:, -1:]
        new = step_seq[:, 1:]  # [batch, k + 1]
        out.append(new)
        produced += k + 1
        accepted_per_step.append(k)
        if on_step is not None:
            on_step(SpecStep(len(accepted_per_step) - 1, k, gamma, new))
    tokens = torch.cat(out, dim=1)[:, :gen].to(prompt.device)  # [batch, gen]
    steps = len(accepted_per_step)
    per_step = sum(k + 1 for k in accepted_per_step) / steps if steps else 0.0
    return SpecOutput(tokens, steps, accepted_per_step, acceptance_from_steps(accepted_per_step, gamma), per_step)


def measure_acceptance(target: Transformer, draft: Transformer, prompts: Sequence[torch.Tensor], gamma: int,
                       gen: int, target_begin: Phase | None = None) -> tuple[float, float]:
    """(per-token acceptance rate, mean tokens per step) of `draft` for `target`, pooled over
    every step of speculative decoding of each prompt ([p] or [batch, p] token ids).
    `target_begin`: as for speculative_generate (an offloaded target's OffloadHandle.begin)."""
    if not prompts:
        raise OffplanError("prompts: need at least one prompt to measure acceptance")
    steps: list[int] = []
    for prompt in prompts:
        ids = prompt if prompt.dim() == 2 else prompt.reshape(1, -1)  # [batch, p]
        steps += speculative_generate(target, draft, ids, gen, gamma, target_begin=target_begin).accepted_per_step
    if not steps:
        raise OffplanError(f"--gen {gen}: generate at least 2 tokens so that a draft/verify step runs")
    return acceptance_from_steps(steps, gamma), sum(k + 1 for k in steps) / len(steps)


# ---- prompt files -----------------------------------------------------------------------------

def load_prompts(path: str | Path, vocab: int | None = None) -> list[list[int]]:
    """Token-id prompts for `offplan acceptance --prompts FILE` (no tokenizer is involved).

    One prompt per line, either whitespace-separated integer ids (`1 15043 3186`) or a JSON
    object `{"tokens": [1, 15043, 3186]}`; blank lines and lines starting with '#' are skipped.
    With `vocab`, every id must be below it."""
    path = Path(path)
    if not path.is_file():
        raise OffplanError(f"--prompts {path}: file not found")
    prompts = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        ids = _json_tokens(line, where) if line.startswith("{") else _text_tokens(line, where)
        if not ids:
            raise OffplanError(f"{where}: empty prompt; give at least one token id")
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            limit = f" and below the vocabulary size {vocab}" if vocab is not None else ""
            raise OffplanError(f"{where}: token id {bad[0]} is out of range; ids must be >= 0{limit}")
        prompts.append(ids)
    if not prompts:
        raise OffplanError(f"--prompts {path}: no prompts; write one prompt of token ids per line")
    return prompts


def _text_tokens(line: str, where: str) -> list[int]:
    try:
        return [int(word) for word in line.split()]
    except ValueError:
        raise OffplanError(f"{where}: expected whitespace-separated integer token ids or a JSON object "
                           '{"tokens": [...]}; found text (tokenize the prompts first)') from None


def _json_tokens(line: str, where: str) -> list[int]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise OffplanError(f"{where}: not valid JSON ({exc.msg}); expected {{\"tokens\": [...]}}") from None
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise OffplanError(f'{where}: expected {{"tokens": [...]}} with a list of integer token ids')
    return tokens


def prompt_tensors(token_lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Token-id lists -> [1, p] int64 tensors, one per prompt."""
    return [torch.tensor(list(tokens), dtype=torch.long).unsqueeze(0) for tokens in token_lists]


def truncated_draft(target: Transformer, layers: int) -> Transformer:
    """A draft made of the target's first `layers` decoder layers with its embeddings, final
    norm and lm_head (tensors shared, not copied): a draft that agrees with random-weight
    targets often enough to exercise speculative decoding."""
    spec = replace(target.spec, layers=layers, name=f"{target.spec.name}-first{layers}")
    with torch.device("meta"):
        draft = Transformer(spec)
    state = {name: tensor for name, tensor in target.state_dict().items()
             if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}
    draft.load_state_dict(state, strict=True, assign=True)
    draft.tie_weights()
    return draft.eval()
