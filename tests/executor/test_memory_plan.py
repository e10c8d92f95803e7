"""Every byte the executor allocates is planned: for each kind of plan (resident, streamed,
host-computed, split KV cache, mixed, quantized), the weights, caches and buffers it holds
plus the peak of the temporaries a prefill and decode steps allocate stay within what the
plan charges (accelerator memory with its workspace, and the host staging buffers: on the
loopback both sides are this process's memory). Temporaries are tracked by the profiler's
allocator events, so every operator's outputs and scratch buffers count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import tiny_spec
from executor import attention
from executor.compensate_model import compensate_model
from executor.offload import apply_plan
from executor.streams import Devices
from executor.weights import synthetic_model
from planner.cost.options import Scenario
from planner.cost import terms
from planner.cost.terms import host_staging_bytes
from planner.hardware.profile import load_profile
from planner.model.placement import Placement, uniform_placement
from planner.model.spec import ModelSpec, Quantization, Workload
from planner.plan.record import make_plan

PROFILE = load_profile(str(Path(__file__).parent.parent / "assets" / "loopback-test.yaml"))
CPU = Devices(torch.device("cpu"), torch.device("cpu"))
WORKLOAD = Workload(1, 128, 3)


def spec_for(quantization: Quantization | None) -> ModelSpec:
    return tiny_spec(name="memory", layers=2, hidden=256, intermediate=512, heads=16, kv_heads=4,
                     vocab=256, max_context=512, quantization=quantization)


def placements(spec: ModelSpec) -> dict[str, Placement]:
    names = [t.name for t in spec.tensors()]
    cycle = ("gpu", "stream", "cpu")
    devices = {n: ("cpu" if n == "embed_tokens" else cycle[i % 3]) for i, n in enumerate(names)}
    cpu_names = tuple(n for n, d in devices.items() if d == "cpu" and n != "embed_tokens")
    return {
        "resident": uniform_placement(spec, "gpu"),
        "all-stream": uniform_placement(spec, "stream"),
        "all-cpu": uniform_placement(spec, "cpu"),
        "kv-split": uniform_placement(spec, "gpu", 0.5),
        "mixed-prefill-streamed": Placement(devices, (0.5, 0.25), cpu_names[::2]),
    }


def temporaries_peak_bytes(run) -> int:
    """Highest rise of this thread's allocated CPU memory above where it was before `run()`."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n_bytes in events:
        live += n_bytes
        peak = max(peak, live)
    return peak


def generate(model, handle, prompt: torch.Tensor, steps: int) -> None:
    handle.begin("prefill")
    token = model(prompt, last_only=True)[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    for _ in range(steps):
        handle.begin("decode")
        token = model(token)[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("quantization", [None, Quantization(4, 32, False), Quantization(8, 0)],
                         ids=["fp32", "int4", "int8"])
def test_held_memory_and_temporaries_stay_within_the_plan(quantization, monkeypatch):
    # A score chunk far below this prompt's heads x prompt² scores, in the executor and the
    # planner alike: a split-KV prefill that built the whole score matrix would not fit.
    monkeypatch.setattr(attention, "SCORE_CHUNK_ELEMENTS", 2 ** 14)
    monkeypatch.setattr(terms, "SCORE_CHUNK_ELEMENTS", 2 ** 14)
    spec = spec_for(quantization)
    prompt = torch.randint(0, spec.vocab, (1, WORKLOAD.prompt), generator=torch.Generator().manual_seed(0))
    for name, placement in placements(spec).items():
        scenario = Scenario(spec, PROFILE, WORKLOAD)
        plan = make_plan(scenario, placement, "test")
        vram = plan.evaluate().vram
        model = synthetic_model(spec, seed=0)
        compensation = compensate_model(model, plan) if quantization else None
        handle = apply_plan(model, plan, CPU, max_tokens=WORKLOAD.context)
        try:
            generate(model, handle, prompt[:, :8], 1)  # packs quantized weights for their kernels
            handle.reset_caches()
            peak = temporaries_peak_bytes(lambda: generate(model, handle, prompt, WORKLOAD.gen))
        finally:
            handle.close()
            if compensation is not None:
                compensation.close()
        held = handle.accelerator_bytes
        # Each stream slot starts every tensor (codes, scales, offsets) at a 256-byte boundary.
        alignment = 2 * 256 * 3 * max(len(members) for members in
                                      (*handle.engine._stage_members["prefill"].values(), [None]))
        assert held <= vram.weights_bytes + vram.kv_bytes + vram.buffer_bytes + alignment, (name, held, vram)
        assert 0 < peak <= vram.workspace_bytes + host_staging_bytes(scenario), (name, peak, vram.workspace_bytes)
