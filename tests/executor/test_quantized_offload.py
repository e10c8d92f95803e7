"""Quantized plans that stream matrices or compute them on the host: they move and multiply
packed integers, give the tokens of the all-resident quantized plan, and a streamed
matrix's compensation branch runs on the worker thread while its streamed matmul runs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import tiny_spec
from executor.compensate_model import WORKER_PREFIX, compensate_model
from executor.offload import PlacedLinear, apply_plan
from executor.run import RunOptions, run_plan
from executor.streams import Devices
from executor.weights import synthetic_model
from planner.cost.options import Scenario
from planner.hardware.profile import load_profile
from planner.model.placement import Placement, uniform_placement
from planner.plan.record import make_plan
from planner.model.ranks import quantized_tensors
from planner.model.spec import ModelSpec, Quantization, Workload

PROFILE = load_profile(str(Path(__file__).parent.parent / "assets" / "loopback-test.yaml"))
CPU = Devices(torch.device("cpu"), torch.device("cpu"))
WORKLOAD = Workload(1, 12, 6)
BARRIER_TIMEOUT_S = 5.0  # only reached when the branch and the matmul do not overlap


@pytest.fixture(autouse=True)
def no_leaked_workers():
    yield
    assert [t for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX)] == []


def quantized_spec(bits: int = 4, symmetric: bool = True, group: int = 32) -> ModelSpec:
    return tiny_spec(name="qoffload", layers=3, quantization=Quantization(bits, group, symmetric))


def cycled_devices(spec: ModelSpec) -> dict[str, str]:
    """gpu, stream, cpu in turn over the inventory (embeddings on the host), so every kind of
    matrix lands on every device somewhere in the model."""
    cycle = ("gpu", "stream", "cpu")
    return {t.name: ("cpu" if t.group == "embed" else cycle[i % 3]) for i, t in enumerate(spec.tensors())}


def ranks_for(spec: ModelSpec, devices: dict[str, str], on: tuple[str, ...]) -> dict[str, int]:
    """Ranks 4 and 8 alternating over the quantized matrices placed on a device in `on`."""
    names = [t.name for t in quantized_tensors(spec) if devices[t.name] in on]
    return {name: (4, 8)[i % 2] for i, name in enumerate(names)}


def plan_for(spec: ModelSpec, placement: Placement):
    ranks = tuple(sorted({0, *placement.ranks.values()}))
    return make_plan(Scenario(spec, PROFILE, WORKLOAD, rank_choices=ranks), placement, "test")


def tokens_of(spec: ModelSpec, placement: Placement):
    return run_plan(plan_for(spec, placement), RunOptions(synthetic=True, warmup_steps=1), devices=CPU).measured


@pytest.mark.parametrize("bits, symmetric, group, ranked",
                         [(4, True, 32, False), (4, False, 32, True), (8, True, 32, True), (8, False, 0, True)])
def test_streamed_and_cpu_quantized_matrices_give_the_all_resident_tokens(bits, symmetric, group, ranked):
    spec = quantized_spec(bits, symmetric, group)
    devices = cycled_devices(spec)
    # With ranks every quantized matrix gets one, cpu ones too (a plan the planner does not
    # write, but the executor runs the branch wherever the plan asks for it).
    ranks = ranks_for(spec, devices, ("gpu", "stream", "cpu")) if ranked else {}
    resident = Placement(uniform_placement(spec, "gpu").devices, (0.0,) * spec.layers, (), ranks)
    reference = tokens_of(spec, resident).tokens
    assert len(set(reference[0])) > 2  # a real, non-degenerate generation
    cpu_names = tuple(n for n, d in devices.items() if d == "cpu" and n != "embed_tokens")
    placements = {
        "mixed": Placement(devices, (0.0, 0.5, 1.0), (), ranks),
        "mixed-prefill-streamed": Placement(devices, (0.0,) * spec.layers, cpu_names[::2], ranks),
        "all-stream": Placement(uniform_placement(spec, "stream").devices, (0.0,) * spec.layers, (), ranks),
    }
    for name, placement in placements.items():
        assert tokens_of(spec, placement).tokens == reference, name


@pytest.mark.parametrize("bits, symmetric, group", [(4, True, 32), (4, False, 32), (8, True, 32), (8, False, 0)])
def test_decode_streams_the_packed_bytes_the_planner_charges(bits, symmetric, group):
    spec = quantized_spec(bits, symmetric, group)
    devices = cycled_devices(spec)
    placement = Placement(devices, (0.0,) * spec.layers, (), ranks_for(spec, devices, ("gpu", "stream")))
    measured = tokens_of(spec, placement)
    streamed = [t for t in spec.tensors() if devices[t.name] == "stream"]
    quantized = {t.name for t in quantized_tensors(spec)}
    assert any(t.name in quantized for t in streamed)
    packed = sum(t.n_bytes for t in streamed)  # Quantization.bytes_for for quantized matrices
    float_bytes = sum(t.rows * t.cols * 4 if t.name in quantized else t.n_bytes for t in streamed)
    assert measured.streamed_bytes_per_step == packed
    assert packed < 0.6 * float_bytes  # what streaming their fp32 equivalents would have cost


def test_streamed_and_cpu_quantized_matrices_stay_packed_on_the_host():
    spec = quantized_spec(4, symmetric=False)
    devices = cycled_devices(spec)
    plan = plan_for(spec, Placement(devices, (0.0,) * spec.layers))
    model = synthetic_model(spec, seed=0)
    with compensate_model(model, plan):
        handle = apply_plan(model, plan, CPU, max_tokens=16)
        try:
            placed = {t.name: model.model.get_submodule(t.name) for t in quantized_tensors(spec)
                      if devices[t.name] != "gpu"}
            assert {p.placement for p in placed.values()} == {"stream", "cpu"}
            for t in quantized_tensors(spec):
                if t.name in placed:
                    codes, *scales = placed[t.name].host_tensors  # packed for the CPU's int4 kernel
                    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (t.rows, t.cols // 2)
                    assert sum(x.numel() * x.element_size() for x in (codes, *scales)) == t.n_bytes
        finally:
            handle.close()


def test_streamed_branch_runs_on_the_worker_while_the_streamed_matmul_runs(monkeypatch):
    spec = quantized_spec()
    devices = cycled_devices(spec)
    placement = Placement(devices, (0.0,) * spec.layers, (), ranks_for(spec, devices, ("gpu", "stream")))
    plan = plan_for(spec, placement)
    target = next(n for n, d in devices.items() if d == "stream" and placement.ranks.get(n))

    import executor.compensation as compensation
    barrier = threading.Barrier(2, timeout=BARRIER_TIMEOUT_S)
    met = {"branch": [], "matmul": []}  # per call: did the other side arrive while this one was running?
    branch_threads = []
    original_branch, original_forward = compensation._host_branch, PlacedLinear.forward

    def rendezvous(side: str) -> None:
        try:
            barrier.wait()
            met[side].append(True)
        except threading.BrokenBarrierError:
            met[side].append(False)

    def branch(x_host, ready, a, b):
        if a is module.a:
            branch_threads.append(threading.current_thread().name)
            rendezvous("branch")
        return original_branch(x_host, ready, a, b)

    def forward(self, x):
        if self.name == target and self.streams_now():
            rendezvous("matmul")
        return original_forward(self, x)

    model = synthetic_model(spec, seed=0)
    with compensate_model(model, plan) as comp:
        module = comp.modules[target]
        handle = apply_plan(model, plan, CPU, max_tokens=16)
        assert isinstance(module.quant, PlacedLinear) and module.quant.placement == "stream"
        monkeypatch.setattr(compensation, "_host_branch", branch)
        monkeypatch.setattr(PlacedLinear, "forward", forward)
        try:
            prompt = torch.randint(0, spec.vocab, (1, 8), generator=torch.Generator().manual_seed(0))
            handle.begin("prefill")
            token = model(prompt, last_only=True)[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            for _ in range(2):
                handle.begin("decode")
                token = model(token)[:, -1].argmax(-1, keepdim=True)
        finally:
            handle.close()
        assert met == {"branch": [True] * 3, "matmul": [True] * 3}
        assert all(name.startswith(WORKER_PREFIX) for name in branch_threads)
        assert module.calls == 3 and module.host_branch_s > 0


def test_setup_caches_works_on_a_compensated_model():
    spec = quantized_spec()
    model = synthetic_model(spec, seed=0)
    with compensate_model(model, {"layers.0.self_attn.k_proj": 4}, 4, 32):
        model.setup_caches(1, 16)  # k_proj holds no float weight to take the device from
        cache = model.model.layers[0].self_attn.kv_cache
        assert cache.k.device.type == "cpu" and cache.k.dtype == torch.float32
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, spec.vocab)
