"""The prefetch engine hands a stage its streamed weights only once their copy has completed
and never overwrites a buffer slot compute is reading, whatever the number of streamed stages
and however slow the copies are: each test copier first poisons its destination (NaN bytes),
then sleeps, then copies, so a read of an unfinished copy or of an overwritten slot shows in
the logits. And it does prefetch: the trace shows the next stage's copy running while the
current stage computes."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from executor import streams
from executor.offload import apply_plan
from executor.run import RunOptions, run_plan
from executor.streams import Devices
from executor.weights import synthetic_model
from planner.cost.options import Scenario
from planner.hardware.profile import load_profile
from planner.model.placement import Placement, uniform_placement
from planner.model.spec import ModelSpec, Quantization, Workload
from planner.plan.record import make_plan

PROFILE = load_profile(str(Path(__file__).parent.parent / "assets" / "loopback-test.yaml"))
CPU = Devices(torch.device("cpu"), torch.device("cpu"))
SLOW_COPY_S = 0.05  # what an asynchronous copy over PCIe looks like to the host
PROMPT, DECODE_STEPS = 12, 4


def spec_of(**overrides) -> ModelSpec:
    fields = dict(name="prefetch-test", family="llama", layers=3, hidden=128, intermediate=256, heads=8,
                  kv_heads=2, vocab=512, dtype="fp32", max_context=256)
    fields.update(overrides)
    return ModelSpec(**fields)


def placement_streaming(spec: ModelSpec, streamed: set[str], prefill_streamed: tuple[str, ...] = (),
                        cpu: set[str] = frozenset()) -> Placement:
    devices = {t.name: ("cpu" if t.group == "embed" or t.name in cpu or t.name in prefill_streamed
                        else "stream" if t.name in streamed else "gpu") for t in spec.tensors()}
    return Placement(devices, (0.0,) * spec.layers, prefill_streamed)


def placements(spec: ModelSpec) -> dict[str, Placement]:
    """Decode streaming one stage (a layer; the head), two, every stage; a prefill that streams
    more stages than its decode."""
    mlp1 = {f"layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
    prefill_only = ("layers.0.self_attn.q_proj", "layers.2.mlp.up_proj")
    return {
        "one layer streams": placement_streaming(spec, mlp1),
        "only the head streams": placement_streaming(spec, {"lm_head"}),
        "two stages stream": placement_streaming(spec, {"layers.0.self_attn.o_proj", "lm_head"}),
        "every stage streams": uniform_placement(spec, "stream"),
        "prefill streams three stages, decode one": placement_streaming(spec, mlp1, prefill_only),
    }


def plan_for(spec: ModelSpec, placement: Placement):
    return make_plan(Scenario(spec, PROFILE, Workload(1, PROMPT, DECODE_STEPS + 1)), placement, "test")


def poisoning_copier(delay_s):
    """A copy thread body that poisons each destination, waits `delay_s()`, then copies."""
    def copy(jobs):
        for dst, _ in jobs:
            dst.view(torch.uint8).fill_(0xFF)  # all-ones bytes: NaN in every float dtype
        time.sleep(delay_s())
        for dst, src in jobs:
            dst.copy_(src)
    return staticmethod(copy)


def greedy_logits(model, begin=lambda phase: None) -> list[torch.Tensor]:
    """Logits of a prefill of PROMPT tokens and DECODE_STEPS greedy decode steps."""
    tokens = torch.randint(0, model.spec.vocab, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    begin("prefill")
    out = [model(tokens)]
    for _ in range(DECODE_STEPS):
        begin("decode")
        out.append(model(out[-1][:, -1:].argmax(-1)))
    return out


def resident_logits(spec: ModelSpec) -> list[torch.Tensor]:
    model = synthetic_model(spec, seed=2)
    model.setup_caches(1, PROMPT + DECODE_STEPS + 1)
    return greedy_logits(model)


def offloaded_logits(spec: ModelSpec, placement: Placement) -> list[torch.Tensor]:
    model = synthetic_model(spec, seed=2)
    handle = apply_plan(model, plan_for(spec, placement), CPU, max_tokens=PROMPT + DECODE_STEPS + 1)
    try:
        return greedy_logits(model, handle.begin)
    finally:
        handle.close()


@pytest.mark.parametrize("delays", ["slow", "random"])
def test_slow_and_jittery_copies_give_the_resident_logits(monkeypatch, delays):
    rng = random.Random(7)
    delay = (lambda: SLOW_COPY_S) if delays == "slow" else (lambda: rng.uniform(0.0, 0.02))
    monkeypatch.setattr(streams._ThreadCopier, "copy", poisoning_copier(delay))
    spec = spec_of()
    expected = resident_logits(spec)
    for name, placement in placements(spec).items():
        got = offloaded_logits(spec, placement)
        for step, (e, g) in enumerate(zip(expected, got)):
            torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5, msg=f"{name}, step {step}")


@pytest.mark.parametrize("bits", [4, 8])
def test_slow_copies_of_packed_weights_give_the_resident_tokens(monkeypatch, bits):
    monkeypatch.setattr(streams._ThreadCopier, "copy", poisoning_copier(lambda: SLOW_COPY_S))
    spec = spec_of(quantization=Quantization(bits, 32, True))
    mlp1 = {f"layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
    options = RunOptions(synthetic=True, warmup_steps=1)
    resident = run_plan(plan_for(spec, uniform_placement(spec, "gpu")), options, devices=CPU).measured.tokens
    streamed = run_plan(plan_for(spec, placement_streaming(spec, mlp1)), options, devices=CPU).measured.tokens
    assert streamed == resident


def test_trace_shows_the_next_stages_copy_while_the_current_stage_computes(monkeypatch):
    monkeypatch.setattr(streams._ThreadCopier, "copy", poisoning_copier(lambda: 0.02))
    spec = spec_of()
    events = run_plan(plan_for(spec, uniform_placement(spec, "stream")),
                      RunOptions(synthetic=True, warmup_steps=1, trace=True), devices=CPU).measured.events
    stage_order = [f"layer {i}" for i in range(spec.layers)] + ["head"]
    nxt = {s: stage_order[(i + 1) % len(stage_order)] for i, s in enumerate(stage_order)}
    copies = [e for e in events if e.resource == "h2d" and e.phase == "decode"]
    computes = [e for e in events if e.resource == "accelerator" and e.phase == "decode"]
    assert len(computes) == DECODE_STEPS * len(stage_order)
    overlapped = [c for c in computes
                  if any(k.stage == nxt[c.stage] and k.start_s < c.end_s and k.end_s > c.start_s for k in copies)]
    # Without prefetching a stage's copy starts when the stage is entered, after the previous
    # stage's compute ended: no overlap at all. A loaded machine may start a copy thread late.
    assert len(overlapped) >= len(computes) // 2


def test_split_kv_caches_time_their_parts_only_when_layers_are_profiled():
    """Timing a split KV cache's parts waits for CUDA events inside the step: only
    --profile-layers asks for it."""
    from executor.attention import HybridKVCache
    spec = spec_of()
    plan = plan_for(spec, Placement({t.name: "gpu" for t in spec.tensors()}, (0.5,) * spec.layers))
    for timed in (False, True):
        model = synthetic_model(spec, seed=2)
        handle = apply_plan(model, plan, CPU, max_tokens=PROMPT + DECODE_STEPS + 1, timed=timed)
        try:
            caches = [c for c in handle.caches if isinstance(c, HybridKVCache)]
            assert len(caches) == spec.layers and all(c.timed == timed for c in caches)
        finally:
            handle.close()
    report = run_plan(plan, RunOptions(synthetic=True, warmup_steps=1, profile_layers=True), devices=CPU)
    assert sum(stage.host_attention_s for stage in report.measured.stages) > 0
