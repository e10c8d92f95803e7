"""executor.model with q/k norms (Qwen3) and routed experts (Qwen3-MoE, Mixtral) against
transformers on tiny random checkpoints: same logits, same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import (MixtralConfig, MixtralForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)
from transformers.utils import logging as hf_logging

from executor.model import Transformer
from executor.weights import load_checkpoint, save_checkpoint, synthetic_model
from planner.errors import SpecError
from planner.model.presets import preset
from test_model_hf import TINY, VOCAB, randomize_, tokens

hf_logging.disable_progress_bar()

MOE = dict(num_experts_per_tok=2, output_router_logits=False)
CASES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=24)),
    "qwen3_moe-norm-topk": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                            dict(head_dim=16, num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, **MOE)),
    "qwen3_moe-raw-topk": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                           dict(num_experts=6, moe_intermediate_size=48, norm_topk_prob=False, **MOE)),
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=4, sliding_window=None, **MOE)),
}


def write_checkpoint(tmp_path, case: str, seed: int = 0):
    config_cls, model_cls, overrides = CASES[case]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**{**TINY, **overrides})).eval()
    randomize_(hf, seed)
    out = tmp_path / case
    hf.save_pretrained(out)
    return out, hf


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    path, hf = write_checkpoint(tmp_path, case)
    spec, model = load_checkpoint(path)
    assert spec.family == hf.config.model_type
    batch = tokens(2, 24)
    with torch.no_grad():
        expected = hf(batch).logits
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(model(batch), expected, atol=1e-4, rtol=1e-4)


def hf_greedy(hf, prompt: torch.Tensor, steps: int) -> list[int]:
    """transformers' own greedy decode with its KV cache (generate() would also apply the
    checkpoint's generation config, e.g. end-of-sequence handling)."""
    out = []
    with torch.no_grad():
        result = hf(prompt, use_cache=True)
        for _ in range(steps):
            token = result.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            out.append(int(token))
            result = hf(token, past_key_values=result.past_key_values, use_cache=True)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(tmp_path, case):
    path, hf = write_checkpoint(tmp_path, case, seed=3)
    _, model = load_checkpoint(path)
    prompt = tokens(1, 12, seed=5)
    expected = hf_greedy(hf, prompt, 16)
    model.setup_caches(batch=1, max_tokens=40)
    out, step = [], model(prompt, last_only=True)
    for _ in range(16):
        token = step[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        out.append(int(token))
        step = model(token)
    assert out == expected
    assert len(set(out)) > 2  # the comparison is not between constant sequences


def test_routing_is_what_makes_them_match(tmp_path):
    """Power check: routing to a different expert set changes the logits clearly."""
    path, _ = write_checkpoint(tmp_path, "qwen3_moe-norm-topk")
    _, model = load_checkpoint(path)
    batch = tokens(1, 16)
    reference = model(batch)
    for layer in model.model.layers:
        layer.mlp.top_k = 1
    assert (model(batch) - reference).abs().max() > 1e-2


def test_saved_moe_checkpoint_is_read_by_transformers(tmp_path):
    spec = preset("qwen3-30b-a3b")
    from dataclasses import replace
    from planner.model.spec import MoE
    tiny = replace(spec, layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, vocab=VOCAB,
                   dtype="fp32", moe=MoE(4, 2, 32, norm_topk=True))
    model = synthetic_model(tiny, seed=1)
    save_checkpoint(model, tiny, tmp_path / "ck")
    hf = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "ck").eval()
    batch = tokens(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), hf(batch).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gemma-3-27b", "deepseek-v3", "glm-4.5-air"])
def test_planned_only_families_are_refused_in_one_line(name):
    with pytest.raises(SpecError, match="the executor does not build") as info:
        with torch.device("meta"):
            Transformer(preset(name))
    assert "\n" not in str(info.value)
