"""Host memory the executor allocates for the link: streamed weights (and only they) in one
pool sized to their bytes, cpu weights left where they are, page-locking done in place with
whole pages (no power-of-two rounding), and the totals within the plan's host terms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from executor import hostmem
from executor.hostmem import PageLocked
from executor.offload import PlacedLinear, apply_plan
from executor.run import RunOptions, run_plan
from executor.streams import Devices, aligned_bytes
from executor.weights import synthetic_model
from planner.cost.options import Scenario
from planner.hardware.profile import load_profile
from planner.model.placement import Placement
from planner.model.spec import ModelSpec, Quantization, Workload
from planner.plan.record import make_plan

PROFILE = load_profile(str(Path(__file__).parent.parent / "assets" / "loopback-test.yaml"))
CPU = Devices(torch.device("cpu"), torch.device("cpu"))


def spec_of(**overrides) -> ModelSpec:
    fields = dict(name="hostmem-test", family="llama", layers=3, hidden=128, intermediate=256, heads=8,
                  kv_heads=2, vocab=512, dtype="fp32", max_context=256)
    fields.update(overrides)
    return ModelSpec(**fields)


def mixed_plan(spec: ModelSpec):
    """gpu, stream and cpu in turn; two cpu matrices stream for prefill; one layer's KV split."""
    cycle = ("gpu", "stream", "cpu")
    devices = {t.name: ("cpu" if t.group == "embed" else cycle[i % 3]) for i, t in enumerate(spec.tensors())}
    prefill_streamed = tuple(n for n, d in devices.items() if d == "cpu" and n != "embed_tokens")[:2]
    placement = Placement(devices, (0.0, 0.5, 0.0), prefill_streamed)
    return make_plan(Scenario(spec, PROFILE, Workload(1, 16, 6)), placement, "test")


def placed_modules(model) -> dict[str, PlacedLinear]:
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, PlacedLinear):
            found[module.name] = module
    return found


def test_only_streamed_weights_are_in_the_pool_and_it_holds_exactly_their_bytes():
    for spec in (spec_of(), spec_of(quantization=Quantization(4, 32, False))):
        plan = mixed_plan(spec)
        model = synthetic_model(spec, seed=0)
        if spec.quantization is not None:
            from executor.compensate_model import compensate_model
            compensation = compensate_model(model, plan)
        handle = apply_plan(model, plan, CPU, max_tokens=32)
        try:
            placed = placed_modules(model)
            streamed = {n for n, m in placed.items() if m.placement == "stream" or m.prefill_streamed}
            assert streamed and set(placed) - streamed  # both kinds are present
            for name, module in placed.items():
                in_pool = [handle.pool.contains(t) for t in module.host_tensors]
                assert all(in_pool) if name in streamed else not any(in_pool), name
            pooled = [t for n in streamed for t in placed[n].host_tensors]
            assert handle.pool.n_bytes == sum(aligned_bytes(t) for t in pooled)
            planned = sum(t.n_bytes for t in plan.model.tensors() if t.name in streamed)
            assert planned <= handle.pool.n_bytes < planned + 256 * len(pooled)
        finally:
            handle.close()
            if spec.quantization is not None:
                compensation.close()


def test_page_locked_bytes_of_a_run_stay_within_the_plans_host_terms():
    spec = spec_of()
    plan = mixed_plan(spec)
    model = synthetic_model(spec, seed=0)
    handle = apply_plan(model, plan, CPU, max_tokens=32)
    try:
        tokens = torch.randint(0, spec.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
        handle.begin("prefill")
        logits = model(tokens)
        handle.begin("decode")
        model(logits[:, -1:].argmax(-1))
        host = plan.evaluate().host
        streamed = {n for n, m in placed_modules(model).items() if m.placement == "stream" or m.prefill_streamed}
        planned_streamed = sum(t.n_bytes for t in plan.model.tensors() if t.name in streamed)
        assert 0 < handle.uplink.staging_bytes <= host.buffer_bytes
        assert handle.page_locked_bytes <= planned_streamed + 256 * 3 * len(streamed) + host.buffer_bytes
    finally:
        handle.close()


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister calls (success = 0)."""

    def __init__(self):
        self.calls = []

    def cudaHostRegister(self, address, n_bytes, flags):
        self.calls.append(("register", address, n_bytes))
        return 0

    def cudaHostUnregister(self, address):
        self.calls.append(("unregister", address))
        return 0


def test_page_locking_registers_whole_pages_in_place_once_and_unregisters_on_close(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    page = hostmem._PAGE_BYTES
    n_bytes = 5 * page + 123  # a power-of-two rounding would lock 8 pages
    memory = PageLocked(n_bytes, cuda=True)
    (kind, address, locked), = fake.calls
    assert kind == "register" and address % page == 0 and locked == 6 * page
    assert memory.buffer.numel() == n_bytes and memory.buffer.data_ptr() == address
    memory.close()
    memory.close()
    assert fake.calls[1:] == [("unregister", address)]


def test_a_run_reports_the_page_locked_bytes_it_would_use_on_cuda_within_the_plan():
    spec = spec_of()
    report = run_plan(mixed_plan(spec), RunOptions(synthetic=True, warmup_steps=1), devices=CPU)
    rows = {name: (planned, measured) for name, planned, measured, _ in report.comparisons()}
    planned, measured = rows["host memory for the link"]
    assert measured == report.measured.host_page_locked_bytes and 0 < measured <= planned


def test_a_plan_needing_more_memory_than_available_is_refused_before_loading(monkeypatch):
    import executor.devmem as devmem
    import executor.run as run_module
    from executor.devmem import Available
    from planner.errors import PlanError

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were built before the memory check")
    monkeypatch.setattr(run_module, "synthetic_model", must_not_load)
    monkeypatch.setattr(devmem, "_host_available", lambda: Available(2**20, 2**21, "host RAM (loopback device)"))
    with pytest.raises(PlanError) as refused:
        run_plan(mixed_plan(spec_of()), RunOptions(synthetic=True), devices=CPU)
    message = str(refused.value)
    assert "\n" not in message and "1.0 MiB available" in message and "loopback memory" in message


def test_a_plan_for_a_24_gib_card_is_refused_on_a_12_gib_card(monkeypatch):
    import executor.devmem as devmem
    from executor.devmem import Available, check_memory
    from planner.errors import PlanError
    from planner.plan.record import MemorySummary

    gib = 2**30
    monkeypatch.setattr(devmem, "_cuda_available", lambda devices: Available(int(11.5 * gib), 12 * gib, "RTX 3060"))
    monkeypatch.setattr(devmem, "_host_available", lambda: Available(60 * gib, 64 * gib, "host RAM"))
    vram = MemorySummary(20 * gib, 2 * gib, gib // 2, gib // 4, 0, 0, gib // 2, int(23.5 * gib))
    host = MemorySummary(8 * gib, 0, 0, 0, 0, 0, 0, 60 * gib)
    cuda = Devices(torch.device("cuda", 0), torch.device("cpu"))
    with pytest.raises(PlanError) as refused:
        check_memory(vram, host, cuda)
    message = str(refused.value)
    assert "\n" not in message and "RTX 3060 has 11.5 GiB free of 12.0 GiB" in message
    check_memory(MemorySummary(8 * gib, gib, 0, gib // 4, 0, 0, gib // 2, 11 * gib), host, cuda)  # fits


def test_tied_embeddings_look_up_in_the_streamed_heads_pooled_copy():
    from executor.offload import HostEmbedding
    spec = spec_of(tied_embeddings=True)
    devices = {t.name: "stream" if t.name == "lm_head" else "gpu" for t in spec.tensors()}
    plan = make_plan(Scenario(spec, PROFILE, Workload(1, 16, 6)), Placement(devices, (0.0,) * spec.layers), "test")
    model = synthetic_model(spec, seed=0)
    handle = apply_plan(model, plan, CPU, max_tokens=32)
    try:
        assert isinstance(model.model.embed_tokens, HostEmbedding)
        assert model.model.embed_tokens.host_weight.data_ptr() == model.lm_head.host_tensors[0].data_ptr()
        assert handle.pool.contains(model.model.embed_tokens.host_weight)
    finally:
        handle.close()
