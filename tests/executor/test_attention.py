"""Hybrid host/device attention equals plain causal attention, for every split of the cache."""

from __future__ import annotations

import math
import random
import threading

import pytest
import torch
import torch.nn.functional as F

from executor.attention import HybridKVCache, attention_with_lse, merge_partials, split_tokens
from planner.errors import PlanError

_THREAD_PREFIX = "offplan-kv-host"


def _reference(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, start: int) -> torch.Tensor:
    """Plain attention: q [b, h, t, d] at positions start..start+t-1 over k_all, v_all
    [b, kv_heads, start+t, d], KV repeated per head and an explicit causal mask."""
    group = q.shape[1] // k_all.shape[1]
    k_rep = k_all.repeat_interleave(group, dim=1)  # [b, h, n, d]
    v_rep = v_all.repeat_interleave(group, dim=1)
    t, n = q.shape[2], k_all.shape[2]
    mask = torch.arange(n).unsqueeze(0) <= (start + torch.arange(t)).unsqueeze(1)  # [t, n]
    return F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)


def _masked_scores(q: torch.Tensor, k: torch.Tensor, causal_offset: int | None) -> torch.Tensor:
    """Scaled scores [b, h, t, s] with invisible keys at -inf."""
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal_offset is not None:
        t, s = q.shape[2], k.shape[2]
        hidden = torch.arange(s).unsqueeze(0) > (causal_offset + torch.arange(t)).unsqueeze(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def _random_case(seed: int, host_fraction: float | None = None) -> dict:
    rng = random.Random(seed)
    kv_heads = rng.choice([1, 2, 3])
    return {
        "batch": rng.randint(1, 3),
        "kv_heads": kv_heads,
        "heads": kv_heads * rng.choice([1, 2, 4]),
        "head_dim": rng.choice([8, 16, 32, 64]),
        "prefill": rng.randint(1, 24),
        "decode": rng.randint(2, 5),
        "host_fraction": rng.random() if host_fraction is None else host_fraction,
    }


def _drive(cache: HybridKVCache, case: dict, steps: list[int], gen: torch.Generator,
           dtype: torch.dtype = torch.float32, scale: float = 1.0) -> float:
    """Feeds random tokens in chunks of `steps` and returns the largest deviation from the
    reference over all outputs."""
    b, h, kvh, d = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    k_all = torch.empty(b, kvh, 0, d, dtype=dtype)
    v_all = torch.empty(b, kvh, 0, d, dtype=dtype)
    worst = 0.0
    for t in steps:
        q = torch.randn(b, h, t, d, generator=gen, dtype=dtype) * scale
        k = torch.randn(b, kvh, t, d, generator=gen, dtype=dtype) * scale
        v = torch.randn(b, kvh, t, d, generator=gen, dtype=dtype) * scale
        start = cache.length
        out = cache.attend(q, k, v)
        k_all, v_all = torch.cat([k_all, k], dim=2), torch.cat([v_all, v], dim=2)
        expected = _reference(q, k_all, v_all, start)
        assert out.shape == expected.shape and out.dtype == dtype
        assert torch.isfinite(out).all()
        worst = max(worst, (out - expected).abs().max().item())
        assert cache.length == start + t
    return worst


@pytest.mark.parametrize("seed,fraction", [(s, None) for s in range(10)]
                         + [(10, 0.0), (11, 1.0), (12, 0.0), (13, 1.0)])
def test_hybrid_equals_plain_attention(seed: int, fraction: float | None) -> None:
    case = _random_case(seed, fraction)
    steps = [case["prefill"]] + [1] * case["decode"] + [4, 1]
    max_tokens = sum(steps)
    host_tokens = split_tokens(case["host_fraction"], max_tokens)
    gen = torch.Generator().manual_seed(seed)
    with HybridKVCache(case["batch"], max_tokens, case["kv_heads"], case["head_dim"], torch.float32,
                       "cpu", host_tokens=host_tokens) as cache:
        assert _drive(cache, case, steps, gen) < 1e-5
        assert cache.length == max_tokens


@pytest.mark.parametrize("host_tokens", [1, 5, 9, 10, 11, 16])
def test_prefill_and_verify_straddle_boundary(host_tokens: int) -> None:
    """Prefill of 10 tokens and a 4-token verify, with the boundary before, inside and after each."""
    case = {"batch": 2, "heads": 4, "kv_heads": 2, "head_dim": 16}
    gen = torch.Generator().manual_seed(host_tokens)
    with HybridKVCache(2, 16, 2, 16, torch.float32, "cpu", host_tokens=host_tokens) as cache:
        assert _drive(cache, case, [10, 1, 4, 1], gen) < 1e-5


def test_float64_exact_on_large_values() -> None:
    case = {"batch": 2, "heads": 6, "kv_heads": 2, "head_dim": 32}
    gen = torch.Generator().manual_seed(7)
    with HybridKVCache(2, 40, 2, 32, torch.float64, "cpu", host_tokens=13) as cache:
        assert _drive(cache, case, [17, 1, 1, 4, 1, 4], gen, dtype=torch.float64, scale=4.0) < 1e-10


@pytest.mark.parametrize("causal_offset", [None, -3, 0, 2, 5, 20])
def test_attention_with_lse_matches_logsumexp(causal_offset: int | None) -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 5, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, 9, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 9, 16, generator=gen, dtype=torch.float64)
    out, lse = attention_with_lse(q, k, v, causal_offset)
    scores = _masked_scores(q, k, causal_offset)  # [2, 6, 5, 9]
    expected_lse = torch.logsumexp(scores, dim=-1)
    assert lse.shape == (2, 6, 5) and lse.dtype == torch.float64
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected_lse))
    seen = ~torch.isneginf(expected_lse)
    assert torch.allclose(lse[seen], expected_lse[seen], atol=1e-12)
    expected_out = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v.repeat_interleave(2, dim=1)
    assert torch.allclose(out, expected_out, atol=1e-12)
    assert not torch.isnan(out).any()
    if causal_offset == -3:  # queries 0..2 see no key at all
        assert torch.isneginf(lse[:, :, :3]).all() and (out[:, :, :3] == 0).all()
        assert torch.isfinite(lse[:, :, 3:]).all()


def test_lse_is_float32_for_half_inputs() -> None:
    q = torch.randn(1, 2, 3, 8).to(torch.bfloat16)
    k = torch.randn(1, 1, 4, 8).to(torch.bfloat16)
    out, lse = attention_with_lse(q, k, k, causal_offset=1)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_merge_of_two_blocks_equals_full_attention() -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 3, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 11, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 11, 8, generator=gen, dtype=torch.float64)
    full_out, full_lse = attention_with_lse(q, k, v, causal_offset=8)
    for cut in (0, 4, 9, 11):
        o_a, lse_a = attention_with_lse(q, k[:, :, :cut], v[:, :, :cut], causal_offset=8)
        o_b, lse_b = attention_with_lse(q, k[:, :, cut:], v[:, :, cut:], causal_offset=8 - cut)
        out, lse = merge_partials(o_a, lse_a, o_b, lse_b)
        assert torch.allclose(out, full_out, atol=1e-12)
        assert torch.allclose(lse, full_lse, atol=1e-12)


def test_merge_with_empty_sides() -> None:
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, 3, 8, generator=gen)
    k = torch.randn(2, 2, 5, 8, generator=gen)
    o_full, lse_full = attention_with_lse(q, k, k, None)
    o_empty, lse_empty = attention_with_lse(q, k[:, :, :0], k[:, :, :0], None)
    assert torch.isneginf(lse_empty).all() and (o_empty == 0).all()
    for out, lse in (merge_partials(o_full, lse_full, o_empty, lse_empty),
                     merge_partials(o_empty, lse_empty, o_full, lse_full)):
        assert torch.equal(out, o_full) and torch.equal(lse, lse_full)
    out, lse = merge_partials(o_empty, lse_empty, o_empty, lse_empty)
    assert not torch.isnan(out).any() and (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("host_tokens", [0, 6, 12, 30])
def test_truncate_then_continue_equals_fresh_run(host_tokens: int) -> None:
    b, h, kvh, d = 2, 4, 2, 8
    gen = torch.Generator().manual_seed(11)
    prompt_q, prompt_k, prompt_v = (torch.randn(b, n, 8, d, generator=gen) for n in (h, kvh, kvh))
    verify = [torch.randn(b, n, 4, d, generator=gen) for n in (h, kvh, kvh)]
    follow = [torch.randn(b, n, 5, d, generator=gen) for n in (h, kvh, kvh)]
    with HybridKVCache(b, 30, kvh, d, torch.float32, "cpu", host_tokens=host_tokens) as cache, \
            HybridKVCache(b, 30, kvh, d, torch.float32, "cpu", host_tokens=host_tokens) as fresh:
        cache.attend(prompt_q, prompt_k, prompt_v)
        cache.attend(*verify)  # positions 8..11
        cache.truncate(10)  # keep two of the four verified tokens; host_tokens=6 rolls back across the boundary
        assert cache.length == 10
        rolled = cache.attend(*follow)
        fresh.attend(torch.cat([prompt_q, verify[0][:, :, :2]], 2),
                     torch.cat([prompt_k, verify[1][:, :, :2]], 2),
                     torch.cat([prompt_v, verify[2][:, :, :2]], 2))
        expected = fresh.attend(*follow)
        assert torch.allclose(rolled, expected, atol=1e-5)
        with pytest.raises(ValueError, match="truncate"):
            cache.truncate(16)


def test_query_without_visible_keys_in_one_part_has_no_nan() -> None:
    """A 6-token prefill with 4 host slots: queries 0..3 see no device key, and the device part
    alone (lse = -inf there) must not poison the merge."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    with HybridKVCache(1, 8, 2, 8, torch.float32, "cpu", host_tokens=4) as cache:
        out = cache.attend(q, k, v)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, _reference(q, k, v, 0), atol=1e-6)


def _worker_threads() -> list[threading.Thread]:
    return [th for th in threading.enumerate() if th.name.startswith(_THREAD_PREFIX)]


def test_worker_thread_runs_and_shuts_down() -> None:
    before = len(_worker_threads())
    cache = HybridKVCache(1, 8, 1, 8, torch.float32, "cpu", host_tokens=3, cpu_threads=1)
    q = torch.randn(1, 2, 5, 8)
    cache.attend(q, torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
    assert len(_worker_threads()) == before  # a prefill from empty attends on the device alone
    assert cache.host_s == 0 and cache.device_s > 0
    cache.attend(q[:, :, :1], torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    assert len(_worker_threads()) == before + 1
    assert cache.host_s > 0 and cache.device_s > 0 and cache.merge_s > 0 and cache.calls == 2
    assert cache.total_s >= cache.merge_s
    cache.close()
    assert len(_worker_threads()) == before
    cache.reset_timings()
    assert (cache.host_s, cache.device_s, cache.merge_s, cache.total_s, cache.calls) == (0, 0, 0, 0, 0)
    with cache:  # usable again after close; the context manager joins the new worker
        cache.attend(q[:, :, :1], torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
        assert cache.calls == 1
    assert len(_worker_threads()) == before


def test_plain_and_host_only_caches_start_no_thread() -> None:
    before = len(_worker_threads())
    for host_tokens in (0, 6):
        with HybridKVCache(1, 6, 1, 8, torch.float32, None, host_tokens=host_tokens) as cache:
            assert cache.device == torch.device("cpu")  # None = torch's default device
            cache.attend(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
            cache.reset_timings()
            cache.attend(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
            assert len(_worker_threads()) == before
            assert (cache.host_s > 0) == (host_tokens > 0)
            assert (cache.device_s > 0) == (host_tokens == 0)


def test_split_tokens_rounds_host_slots_up() -> None:
    assert split_tokens(0.0, 100) == 0
    assert split_tokens(1.0, 100) == 100
    assert split_tokens(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert split_tokens(0.301, 10) == 4
    assert split_tokens(0.5, 0) == 0
    with pytest.raises(PlanError, match="fraction"):
        split_tokens(1.5, 10)
    with pytest.raises(PlanError, match="max_tokens"):
        split_tokens(0.5, -1)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(PlanError, match="host_tokens"):
        HybridKVCache(1, 8, 1, 8, torch.float32, "cpu", host_tokens=9)
    with pytest.raises(PlanError, match="kv_heads"):
        HybridKVCache(1, 8, 0, 8, torch.float32, "cpu")
    with pytest.raises(PlanError, match="cpu_threads"):
        HybridKVCache(1, 8, 1, 8, torch.float32, "cpu", cpu_threads=0)
    with HybridKVCache(1, 4, 1, 8, torch.float32, "cpu", host_tokens=2) as cache:
        with pytest.raises(ValueError, match="max_tokens"):
            cache.attend(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
        with pytest.raises(ValueError, match="expected q"):
            cache.attend(torch.randn(1, 1, 2, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
        assert cache.length == 0
