"""The host memory bus (planner/cost/membus.py): what streaming and host compute cost together."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planner.cost.options import Scenario, tensor_options
from planner.hardware.profile import load_profile
from planner.cost.membus import bus_gbps, copy_slowdown_s, dram_s, weight_bus
from planner.model.placement import uniform_placement
from planner.cost.evaluate import evaluate
from planner.model.spec import ModelSpec, Workload

GIB = 2**30
WORKLOAD = Workload(batch=1, prompt=64, gen=16)


def _spec() -> ModelSpec:
    return ModelSpec(name="bus", family="llama", layers=3, hidden=512, intermediate=1536, heads=8, kv_heads=2,
                     vocab=4096, dtype="fp32", max_context=1024)


def _loopback(bus: float = 20.0, slowdown: float = 0.01):
    p = load_profile("rtx4090")
    return replace(p, accelerator=replace(p.accelerator, loopback=True),
                   host=replace(p.host, bus_gbps=bus, copy_slowdown_s_per_gb=slowdown))


def _option(scn: Scenario, name: str, device: str):
    t = next(t for t in scn.spec.tensors() if t.name == name)
    return t, next(o for o in tensor_options(scn, t) if o.device == device and not o.prefill_streamed and o.rank == 0)


def test_bus_figure_falls_back_to_the_copy_bandwidth():
    p = load_profile("rtx4090")
    assert p.host.bus_gbps == 0 and bus_gbps(p) == p.host.mem_bw_gbps
    assert bus_gbps(replace(p, host=replace(p.host, bus_gbps=12.5))) == 12.5
    assert dram_s(replace(p, host=replace(p.host, bus_gbps=12.5)), 25e9) == pytest.approx(2.0)


def test_loopback_copies_read_and_write_and_the_accelerator_reads_host_memory():
    scn = Scenario(_spec(), _loopback(bus=20.0, slowdown=0.01), WORKLOAD)
    t, stream = _option(scn, "layers.1.mlp.up_proj", "stream")
    w = t.n_bytes
    assert stream.decode_bus_s == pytest.approx(w / 20e9)  # the matmul reads the streamed copy
    assert stream.decode_fetch_bus_s == pytest.approx(2 * w / 20e9)  # copy: read + write
    assert stream.decode_fetch_slow_s == pytest.approx(0.01 * w / 1e9)
    _, gpu = _option(scn, "layers.1.mlp.up_proj", "gpu")
    assert gpu.decode_bus_s == pytest.approx(w / 20e9) and gpu.decode_fetch_bus_s == 0 == gpu.decode_fetch_slow_s


def test_over_a_real_link_only_the_dma_and_host_compute_use_host_memory():
    p = load_profile("rtx4090")
    p = replace(p, host=replace(p.host, bus_gbps=20.0, copy_slowdown_s_per_gb=0.01))
    scn = Scenario(_spec(), p, WORKLOAD)
    t, stream = _option(scn, "layers.0.self_attn.q_proj", "stream")
    _, gpu = _option(scn, "layers.0.self_attn.q_proj", "gpu")
    _, cpu = _option(scn, "layers.0.self_attn.q_proj", "cpu")
    assert stream.decode_bus_s == 0 and stream.decode_fetch_bus_s == pytest.approx(t.n_bytes / 20e9)
    assert gpu.decode_bus_s == 0
    assert cpu.decode_bus_s == pytest.approx(t.n_bytes / 20e9)
    assert stream.decode_fetch_slow_s == 0 and copy_slowdown_s(p, 1e9) == 0


def test_weight_bus_of_a_cpu_tensor_streamed_for_prefill():
    p = _loopback(bus=10.0, slowdown=0.02)
    bus = weight_bus(p, "cpu", True, read_decode_bytes=1e9, read_prefill_bytes=1e9, weight_bytes=1e9)
    assert bus.own_decode_s == pytest.approx(0.1) and bus.fetch_decode_s == 0 and bus.slow_decode_s == 0
    assert bus.fetch_prefill_s == pytest.approx(0.2) and bus.slow_prefill_s == pytest.approx(0.02)


def test_a_stage_bound_by_the_bus_takes_its_bus_time():
    """All streamed on a slow bus: each layer's time is its own reads (weights and, on
    loopback, the KV cache at its mean depth) plus the next layer's copy (read + write), and
    the plan says the memory bus bounds decode."""
    spec = _spec()
    scn = Scenario(spec, _loopback(bus=0.5, slowdown=0.0), WORKLOAD)
    pr = evaluate(scn, uniform_placement(spec, "stream"))
    layer = spec.layer_tensors(0)
    w_layer = sum(t.n_bytes for t in layer)
    middle = pr.stages[1]
    assert middle.bound("decode") == "memory"
    assert middle.decode_s == pytest.approx(middle.decode_bus_s)
    kv_bytes = spec.kv_bytes_per_token_layer * (WORKLOAD.prompt + WORKLOAD.gen / 2)
    assert middle.decode_bus_s == pytest.approx((w_layer + kv_bytes + 2 * w_layer) / 0.5e9)
    assert pr.bound("decode") == "memory"


def test_the_next_stages_copy_slows_this_stages_compute():
    spec = _spec()
    streamed = uniform_placement(spec, "stream")
    fast = evaluate(Scenario(spec, _loopback(bus=1000.0, slowdown=0.0), WORKLOAD), streamed)
    slow = evaluate(Scenario(spec, _loopback(bus=1000.0, slowdown=0.05), WORKLOAD), streamed)
    w_layer = sum(t.n_bytes for t in spec.layer_tensors(1))
    added = slow.stages[0].decode_path.acc_s - fast.stages[0].decode_path.acc_s
    assert added == pytest.approx(0.05 * w_layer / 1e9)
    resident = uniform_placement(spec, "gpu")
    assert (evaluate(Scenario(spec, _loopback(bus=1000.0, slowdown=0.05), WORKLOAD), resident).decode_step_s
            == pytest.approx(evaluate(Scenario(spec, _loopback(bus=1000.0, slowdown=0.0), WORKLOAD),
                                      resident).decode_step_s))
