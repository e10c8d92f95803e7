"""Speculative decoding: identical output to plain greedy, rollback of both caches, acceptance."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import tiny_spec
from executor.model import KVCache, Transformer
from executor.speculative import (acceptance_from_steps, greedy_generate, load_prompts, measure_acceptance,
                                  prepare_caches, SpecStep, speculative_generate, truncated_draft)
from executor.weights import synthetic_model
from planner.errors import OffplanError, SpecError
from planner.cost.roofline import expected_tokens_per_step

GEN = 40


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a busy machine the threads'
    spin-waits make each forward pass hundreds of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target() -> Transformer:
    return synthetic_model(tiny_spec(), seed=0)



def prompt_of(batch: int, tokens: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, tiny_spec().vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("gamma", [1, 2, 3, 5])
def test_identical_draft_accepts_everything(target, gamma, batch):
    draft = synthetic_model(tiny_spec(), seed=0)  # same weights, its own caches
    prompt = prompt_of(batch, seed=gamma)
    out = speculative_generate(target, draft, prompt, GEN, gamma)
    assert torch.equal(out.tokens, greedy_generate(target, prompt, GEN))
    assert out.acceptance_rate == 1.0
    assert out.tokens_per_step == gamma + 1
    assert out.accepted_per_step == [gamma] * out.steps
    assert out.steps == -(-(GEN - 1) // (gamma + 1))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_independent_random_draft_still_gives_greedy_output(target, gamma, batch):
    draft = synthetic_model(tiny_spec(layers=1, intermediate=64), seed=7)
    prompt = prompt_of(batch, seed=10 + gamma)
    out = speculative_generate(target, draft, prompt, GEN, gamma)
    assert out.tokens.shape == (batch, GEN)
    assert torch.equal(out.tokens, greedy_generate(target, prompt, GEN))
    assert out.acceptance_rate < 0.2
    assert out.tokens_per_step == pytest.approx(1 + sum(out.accepted_per_step) / out.steps)


@pytest.mark.parametrize("gamma", [2, 4, 8])
def test_truncated_draft_partial_acceptance(target, gamma):
    draft = truncated_draft(target, 1)
    steps: list[SpecStep] = []
    prompt = prompt_of(1, seed=3)
    out = speculative_generate(target, draft, prompt, GEN, gamma, on_step=steps.append)
    assert torch.equal(out.tokens, greedy_generate(target, prompt, GEN))
    assert 0 < out.acceptance_rate < 1
    assert any(0 < k < gamma for k in out.accepted_per_step)  # partial accepts were rolled back
    assert [s.accepted for s in steps] == out.accepted_per_step
    assert all(s.proposed == gamma and s.tokens.shape == (1, s.accepted + 1) for s in steps)
    replayed = torch.cat([out.tokens[:, :1], *(s.tokens for s in steps)], dim=1)[:, :GEN]
    assert torch.equal(replayed, out.tokens)


def test_caches_hold_exactly_the_accepted_tokens(target):
    """After each step the target's cache holds every accepted token but the last; its contents
    equal a fresh greedy run's cache (rollback left no rejected keys behind)."""
    gamma, prompt = 3, prompt_of(1, seed=5)
    draft = truncated_draft(target, 1)
    seen: list[int] = []
    out = speculative_generate(target, draft, prompt, GEN, gamma,
                               on_step=lambda s: seen.append(target.cache_length))
    produced = 1 + torch.cumsum(torch.tensor(out.accepted_per_step) + 1, 0)
    assert seen == (prompt.shape[1] + produced - 1).tolist()
    assert draft.cache_length <= target.cache_length
    spec_k = target.model.layers[1].self_attn.kv_cache.k[:, :, :target.cache_length].clone()
    reference = synthetic_model(tiny_spec(), seed=0)
    reference.setup_caches(1, 128)
    reference(torch.cat([prompt, out.tokens], dim=1)[:, :target.cache_length])
    ref_k = reference.model.layers[1].self_attn.kv_cache.k[:, :, :target.cache_length]
    torch.testing.assert_close(spec_k, ref_k, rtol=1e-4, atol=1e-5)


def test_prepare_caches_installs_reuses_and_grows():
    model = synthetic_model(tiny_spec(), seed=1)
    prepare_caches(model, 2, 20)  # none installed: installs
    cache = model.model.layers[0].self_attn.kv_cache
    assert isinstance(cache, KVCache) and cache.max_tokens == 20 and cache.k.shape[0] == 2
    model(torch.zeros(2, 5, dtype=torch.long))
    prepare_caches(model, 2, 10)  # large enough: emptied, same object
    assert model.model.layers[0].self_attn.kv_cache is cache and model.cache_length == 0
    prepare_caches(model, 1, 50)  # too small / other batch: replaced
    grown = model.model.layers[0].self_attn.kv_cache
    assert grown is not cache and grown.max_tokens == 50 and grown.k.shape[0] == 1


def test_caller_caches_too_small_are_replaced_and_output_unchanged(target):
    draft = truncated_draft(target, 1)
    target.setup_caches(1, 8)
    draft.setup_caches(1, 8)
    prompt = prompt_of(1, seed=9)
    out = speculative_generate(target, draft, prompt, 20, 4)
    assert torch.equal(out.tokens, greedy_generate(target, prompt, 20))
    assert target.model.layers[0].self_attn.kv_cache.max_tokens >= 7 + 20 + 4 + 1


def test_gen_one_needs_no_step(target):
    out = speculative_generate(target, truncated_draft(target, 1), prompt_of(1), 1, 4)
    assert out.steps == 0 and out.tokens.shape == (1, 1) and out.tokens_per_step == 0.0
    assert torch.equal(out.tokens, greedy_generate(target, prompt_of(1), 1))


def test_bad_arguments(target):
    draft = truncated_draft(target, 1)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, draft, prompt_of(1), 5, 0)
    with pytest.raises(ValueError, match="prompt"):
        speculative_generate(target, draft, prompt_of(1)[0], 5, 2)
    other_vocab = synthetic_model(tiny_spec(vocab=64), seed=0)
    with pytest.raises(SpecError, match="vocabulary"):
        speculative_generate(target, other_vocab, prompt_of(1), 5, 2)


# ---- acceptance -----------------------------------------------------------------------------

def test_acceptance_counts_examined_proposals():
    # gamma 3: steps accepting 2 (3 examined), 0 (1 examined), 3 (3 examined, none rejected)
    assert acceptance_from_steps([2, 0, 3], 3) == pytest.approx(5 / 7)
    assert acceptance_from_steps([3, 3], 3) == 1.0
    assert acceptance_from_steps([0, 0], 4) == 0.0
    assert acceptance_from_steps([], 4) == 0.0


@pytest.mark.parametrize("a, gamma", [(0.8, 4), (0.5, 2), (0.95, 8)])
def test_acceptance_rate_is_consistent_with_planner_e(a, gamma):
    """With i.i.d. acceptance a the measured rate estimates a, and E(a, g) of the planner
    predicts the measured tokens per step."""
    rng = random.Random(0)
    steps = []
    for _ in range(20000):
        k = 0
        while k < gamma and rng.random() < a:
            k += 1
        steps.append(k)
    assert acceptance_from_steps(steps, gamma) == pytest.approx(a, abs=0.01)
    measured_e = sum(k + 1 for k in steps) / len(steps)
    assert expected_tokens_per_step(acceptance_from_steps(steps, gamma), gamma) == pytest.approx(measured_e, rel=0.02)
    assert sum(steps) / (gamma * len(steps)) < a - 0.01  # accepted / proposed underestimates a


def test_measure_acceptance(target):
    prompts = [prompt_of(1, 5, seed=1)[0], prompt_of(1, 9, seed=2)]  # [p] and [1, p]
    same = synthetic_model(tiny_spec(), seed=0)
    assert measure_acceptance(target, same, prompts, gamma=3, gen=20) == (1.0, 4.0)
    rate, per_step = measure_acceptance(target, truncated_draft(target, 1), prompts, gamma=3, gen=20)
    assert 0 < rate < 1 and 1 < per_step < 4
    with pytest.raises(OffplanError, match="at least one prompt"):
        measure_acceptance(target, same, [], gamma=3, gen=20)


# ---- prompt files -----------------------------------------------------------------------------

def test_load_prompts_text_and_jsonl(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# token ids\n1 2 3\n\n  40\t50 \n" + json.dumps({"tokens": [7, 8]}) + "\n")
    assert load_prompts(path, vocab=96) == [[1, 2, 3], [40, 50], [7, 8]]


@pytest.mark.parametrize("content, message", [
    ("1 2 three\n", ":1: expected whitespace-separated integer token ids"),
    ("1 2\n{\"tokens\": [1, \"a\"]}\n", ":2: expected {\"tokens\": [...]}"),
    ("{bad json\n", ":1: not valid JSON"),
    ("{\"tokens\": []}\n", ":1: empty prompt"),
    ("5 96\n", ":1: token id 96 is out of range"),
    ("-1\n", ":1: token id -1 is out of range"),
    ("# only a comment\n\n", "no prompts"),
])
def test_load_prompts_rejects_bad_lines(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(OffplanError) as raised:
        load_prompts(path, vocab=96)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_load_prompts_missing_file(tmp_path):
    with pytest.raises(OffplanError, match="file not found"):
        load_prompts(tmp_path / "nope.txt")


def test_target_begin_is_called_per_forward(target):
    phases: list[str] = []
    out = speculative_generate(target, truncated_draft(target, 1), prompt_of(1), 20, 3, target_begin=phases.append)
    assert phases == ["prefill"] + ["decode"] * out.steps


def test_offloaded_target_with_streamed_weights_and_split_kv():
    """The loop runs on a target placed by apply_plan (streamed weights, half the KV cache on
    the host side) and still reproduces plain greedy decoding."""
    from executor.offload import apply_plan
    from planner.cost.options import Scenario
    from planner.hardware.profile import load_profile
    from planner.model.placement import uniform_placement
    from planner.plan.record import make_plan
    from planner.model.spec import Workload

    spec, gen, gamma = tiny_spec(), 16, 3
    prompt = prompt_of(1, 6, seed=4)
    scn = Scenario(spec, load_profile("rtx4090"), Workload(batch=1, prompt=6, gen=gen))
    plan = make_plan(scn, uniform_placement(spec, "stream", kv_host_fraction=0.5), "test")
    placed = synthetic_model(spec, seed=0)
    handle = apply_plan(placed, plan, max_tokens=6 + gen + gamma + 1)
    try:
        out = speculative_generate(placed, truncated_draft(synthetic_model(spec, seed=0), 1), prompt, gen, gamma,
                                   target_begin=handle.begin)
    finally:
        handle.close()
    assert torch.equal(out.tokens, greedy_generate(synthetic_model(spec, seed=0), prompt, gen))
    assert out.steps > 0
