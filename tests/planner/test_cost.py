"""Cost model formulas (planner/cost/options.py): rooflines, transfers, speculation, KV split, bytes."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from planner.cost.attention import KV_LEVELS, attention_decode, kv_options, mean_host_tokens
from planner.cost.options import Scenario, tensor_options
from planner.hardware.profile import flops_for, load_profile
from planner.model.presets import preset
from planner.cost.roofline import (acc_op_s, d2h_s, expected_tokens_per_step, h2d_s, host_attention_s, host_op_s,
                              roofline_s, touched_fraction)
from planner.model.spec import ModelSpec, MoE, Quantization, Workload

GIB = 2**30


@pytest.fixture(scope="module")
def rtx4090():
    return load_profile("rtx4090")


def _spec(**overrides) -> ModelSpec:
    fields = dict(name="unit", family="llama", layers=2, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                  vocab=32000, dtype="bf16", max_context=16384)
    fields.update(overrides)
    return ModelSpec(**fields)


# ---- rooflines ------------------------------------------------------------------------------------

def test_roofline_is_overhead_plus_the_slower_of_compute_and_memory():
    assert roofline_s(2e12, 1e9, 1e12, 1e12, 1e-6) == pytest.approx(1e-6 + 2.0)  # compute-bound
    assert roofline_s(1e9, 3e12, 1e12, 1e12, 1e-6) == pytest.approx(1e-6 + 3.0)  # memory-bound
    assert roofline_s(0.0, 0.0, 1e12, 1e12, 5e-6) == 5e-6


def test_gemv_at_one_row_is_bandwidth_bound_and_prefill_is_compute_bound(rtx4090):
    """A 4096x4096 bf16 projection on the accelerator: one decode row reads the whole matrix;
    4096 prompt rows do 137 GFLOP on it."""
    spec = _spec()
    q = spec.by_name["layers.0.self_attn.q_proj"]
    a = rtx4090.accelerator
    bytes_per_s = a.mem_bw_gbps * 1e9 * a.gemv_efficiency
    flops_per_s = flops_for(a.flops_tflops, "bf16") * a.matmul_efficiency

    decode = Scenario(spec, rtx4090, Workload(1, 4096, 16))
    gpu = tensor_options(decode, q)[0]
    assert gpu.device == "gpu"
    read_bytes = q.n_bytes + 1 * (q.rows + q.cols) * 2  # weights + activations in and out
    assert gpu.decode.acc_s == pytest.approx(a.op_overhead_s + read_bytes / bytes_per_s, rel=1e-12)
    assert 2.0 * q.rows * q.cols / flops_per_s < read_bytes / bytes_per_s / 50  # far from compute-bound

    rows = decode.prefill_rows
    assert gpu.prefill.acc_s == pytest.approx(a.op_overhead_s + rows * q.flops_per_token / flops_per_s, rel=1e-12)
    assert rows * q.flops_per_token / flops_per_s > 5 * (q.n_bytes + rows * (q.rows + q.cols) * 2) / bytes_per_s


def test_host_matmul_pays_its_roofline_and_the_activation_transfers(rtx4090):
    spec = _spec()
    t = spec.by_name["layers.1.mlp.down_proj"]
    scn = Scenario(spec, rtx4090, Workload(1, 512, 16))
    cpu = next(o for o in tensor_options(scn, t) if o.device == "cpu" and not o.prefill_streamed)
    h = rtx4090.host
    expected_cpu = h.op_overhead_s + max(2.0 * t.rows * t.cols / (flops_for(h.flops_tflops, "bf16") * h.matmul_efficiency),
                                         (t.n_bytes + (t.rows + t.cols) * 2) / (h.mem_bw_gbps * 1e9 * h.gemv_efficiency))
    assert cpu.decode.cpu_s == pytest.approx(expected_cpu, rel=1e-12)
    assert cpu.decode.cpu_s == pytest.approx(host_op_s(rtx4090, "bf16", 2.0 * t.rows * t.cols,
                                                       t.n_bytes + (t.rows + t.cols) * 2), rel=1e-12)
    assert cpu.decode.xfer_s == pytest.approx(d2h_s(rtx4090, t.cols * 2) + h2d_s(rtx4090, t.rows * 2), rel=1e-12)
    assert cpu.decode.acc_s == 0.0
    # the weight itself never crosses the link during decode
    assert cpu.decode_link_s == 0.0 and cpu.vram_bytes == 0 and cpu.host_bytes == t.n_bytes


def test_acc_op_time_falls_back_to_the_slowest_listed_dtype(rtx4090):
    slowest = min(rtx4090.accelerator.flops_tflops.values()) * 1e12
    a = rtx4090.accelerator
    assert acc_op_s(rtx4090, "int3", 1e15, 0.0) == pytest.approx(a.op_overhead_s + 1e15 / (slowest * a.matmul_efficiency))


# ---- transfers --------------------------------------------------------------------------------------

def test_h2d_is_latency_plus_size_over_bandwidth(rtx4090):
    flat = replace(rtx4090, link=replace(rtx4090.link, h2d_curve=(), h2d_gbps=20.0, latency_s=1e-5))
    assert h2d_s(flat, 0) == 0.0
    assert h2d_s(flat, 2e9) == pytest.approx(1e-5 + 0.1)
    assert h2d_s(flat, 1) == pytest.approx(1e-5 + 1 / 20e9)


def test_h2d_interpolates_the_bandwidth_curve_in_log_size(rtx4090):
    curve = ((2.0**16, 4.0), (2.0**20, 12.0), (2.0**24, 20.0))
    p = replace(rtx4090, link=replace(rtx4090.link, h2d_curve=curve, h2d_gbps=99.0, latency_s=2e-5))
    # on a point, between points (log-linear), and clamped outside
    assert h2d_s(p, 2**20) == pytest.approx(2e-5 + 2**20 / 12e9)
    assert h2d_s(p, 2**18) == pytest.approx(2e-5 + 2**18 / 8e9)  # halfway in log size: 4 + (12-4)/2
    assert h2d_s(p, 2**22) == pytest.approx(2e-5 + 2**22 / 16e9)
    assert h2d_s(p, 1024) == pytest.approx(2e-5 + 1024 / 4e9)
    assert h2d_s(p, 2**30) == pytest.approx(2e-5 + 2**30 / 20e9)
    sizes = [2.0**k for k in range(10, 32)]
    times = [h2d_s(p, s) for s in sizes]
    assert times == sorted(times)  # bigger copies never take less time


def test_d2h_uses_its_own_direction(rtx4090):
    p = replace(rtx4090, link=replace(rtx4090.link, d2h_curve=(), d2h_gbps=5.0, h2d_curve=(), h2d_gbps=50.0))
    assert d2h_s(p, 1e9) == pytest.approx(p.link.latency_s + 0.2)
    assert h2d_s(p, 1e9) == pytest.approx(p.link.latency_s + 0.02)


# ---- speculation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 2, 4, 8])
def test_expected_tokens_per_step_limits_and_formula(gamma):
    assert expected_tokens_per_step(0.0, gamma) == 1.0
    assert expected_tokens_per_step(1.0, gamma) == gamma + 1
    for a in (0.1, 0.5, 0.8, 0.99):
        e = expected_tokens_per_step(a, gamma)
        assert e == pytest.approx((1 - a ** (gamma + 1)) / (1 - a))
        assert e == pytest.approx(sum(a**k for k in range(gamma + 1)))  # one + each accepted draft token
        assert 1.0 < e < gamma + 1
    assert expected_tokens_per_step(0.7, 0) == 1.0
    assert expected_tokens_per_step(0.6, gamma) < expected_tokens_per_step(0.7, gamma)
    assert expected_tokens_per_step(0.7, gamma) < expected_tokens_per_step(0.7, gamma + 1)


def test_scenario_speculation_terms(rtx4090):
    spec, draft = _spec(), _spec(name="draft", layers=1, hidden=1024, intermediate=2048, heads=8, kv_heads=8)
    wl = Workload(2, 128, 65)
    plain = Scenario(spec, rtx4090, wl, gamma=3, acceptance=0.5)  # no draft: gamma is ignored for E
    assert plain.expected_tokens == 1.0
    spec_scn = Scenario(spec, rtx4090, wl, draft, gamma=3, acceptance=0.5)
    assert spec_scn.expected_tokens == pytest.approx(1.875)
    assert spec_scn.decode_steps == pytest.approx(64 / 1.875)
    assert spec_scn.decode_rows == 2 * 4  # batch x (gamma + 1) rows verified per step


# ---- KV cache split -------------------------------------------------------------------------------

@pytest.mark.parametrize("host_tokens,start,end", [(0, 100, 200), (50, 100, 200), (100, 100, 200), (130, 100, 200),
                                                   (199.5, 100, 200), (200, 100, 200), (500, 100, 200),
                                                   (37.5, 0, 64), (3000, 2048, 2304), (10, 5, 5), (2, 5, 5)])
def test_mean_host_tokens_is_the_average_of_min_over_depths(host_tokens, start, end):
    if end > start:
        n = 200_000
        depths = start + (np.arange(n) + 0.5) * (end - start) / n  # midpoint rule
        numeric = float(np.minimum(host_tokens, depths).mean())
    else:
        numeric = min(host_tokens, start)
    assert mean_host_tokens(host_tokens, start, end) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_mean_host_tokens_matches_random_cases():
    rng = random.Random(0)
    for _ in range(50):
        start = rng.uniform(0, 4000)
        end = start + rng.uniform(1, 2000)
        h = rng.uniform(0, end * 1.2)
        n = 400_000
        depths = start + (np.arange(n) + 0.5) * (end - start) / n
        numeric = float(np.minimum(h, depths).mean())
        assert mean_host_tokens(h, start, end) == pytest.approx(numeric, rel=1e-6)


@pytest.fixture(scope="module")
def attention_scenario(rtx4090):
    return Scenario(_spec(), rtx4090, Workload(1, 8192, 512))


@pytest.mark.parametrize("c", [0.125, 0.25, 0.5, 0.75, 0.875])
def test_hybrid_attention_is_never_faster_than_its_slower_part(attention_scenario, c):
    scn = attention_scenario
    spec, wl, p = scn.spec, scn.workload, scn.profile
    host_tokens = mean_host_tokens(c * wl.context, wl.prompt, wl.context)
    device_tokens = wl.mean_decode_context - host_tokens
    assert host_tokens > 0 and device_tokens > 0
    flops_per_key = 4.0 * spec.heads * spec.head_dim
    kv_per_key = spec.kv_bytes_per_token_layer
    acc_part = acc_op_s(p, "bf16", flops_per_key * device_tokens, kv_per_key * device_tokens)
    cpu_part = (host_attention_s(p, "bf16", flops_per_key * host_tokens, kv_per_key * host_tokens)
                + d2h_s(p, spec.heads * spec.head_dim * 2) + h2d_s(p, spec.heads * (spec.head_dim + 1) * 4))
    hybrid = attention_decode(scn, c)
    assert hybrid.total_s >= max(acc_part, cpu_part) * (1 - 1e-12)
    assert hybrid.total_s <= acc_part + cpu_part + 2 * p.accelerator.op_overhead_s + 1e-15
    assert hybrid.hidden_cpu_s + hybrid.total_s >= acc_part + cpu_part - 1e-12  # the shorter side is hidden


def test_attention_at_the_ends_runs_on_one_device(attention_scenario):
    scn = attention_scenario
    on_gpu, on_cpu = attention_decode(scn, 0.0), attention_decode(scn, 1.0)
    assert on_gpu.cpu_s == 0 and on_gpu.xfer_s == 0 and on_gpu.acc_s > 0
    assert on_cpu.acc_s == 0 and on_cpu.cpu_s > 0 and on_cpu.xfer_s > 0
    # the host scans the KV cache more slowly than the accelerator: moving it there costs time
    times = [attention_decode(scn, c).total_s for c in KV_LEVELS]
    assert times[-1] > times[0]


@pytest.mark.parametrize("batch,prompt,gen", [(1, 512, 128), (4, 1000, 37), (2, 8192, 512)])
def test_kv_options_split_exactly_the_full_cache(rtx4090, batch, prompt, gen):
    spec = _spec()
    wl = Workload(batch, prompt, gen)
    options = kv_options(Scenario(spec, rtx4090, wl))
    full = batch * (prompt + gen) * spec.kv_bytes_per_token_layer
    assert full == batch * (prompt + gen) * 2 * spec.kv_heads * spec.head_dim * 2
    assert [o.host_fraction for o in options] == list(KV_LEVELS)
    for o in options:
        assert o.vram_bytes + o.host_bytes == full
        assert o.host_bytes == pytest.approx(o.host_fraction * full, abs=1)
    assert options[0].host_bytes == 0 and options[-1].vram_bytes == 0
    assert [o.host_bytes for o in options] == sorted(o.host_bytes for o in options)
    assert spec.layers * full == batch * (prompt + gen) * spec.kv_bytes_per_token


# ---- bytes of tensors -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,symmetric,n", [(4, 128, True, 4096 * 4096), (4, 128, False, 4096 * 4096),
                                                     (8, 64, True, 1000), (3, 128, True, 1001), (2, 32, True, 33)])
def test_quantized_bytes_are_packed_weights_plus_group_scales(bits, group, symmetric, n):
    q = Quantization(bits, group, symmetric)
    scale_bytes = 2 if symmetric else 4  # fp16 scale (+ fp16 zero point)
    assert q.bytes_for(n) == math.ceil(n * bits / 8) + math.ceil(n / group) * scale_bytes


def test_quantized_model_tensor_bytes():
    spec = _spec(quantization=Quantization(4, 128), attention_bias=True, tied_embeddings=True)
    q4 = Quantization(4, 128)
    by = spec.by_name
    q = by["layers.0.self_attn.q_proj"]
    assert q.n_bytes == q4.bytes_for(4096 * 4096) + 4096 * 2  # bias stays bf16
    assert by["layers.0.self_attn.k_proj"].n_bytes == q4.bytes_for(1024 * 4096) + 1024 * 2
    assert by["layers.0.self_attn.o_proj"].n_bytes == q4.bytes_for(4096 * 4096) + 4096 * 2  # llama: o_proj too
    assert by["layers.1.mlp.down_proj"].n_bytes == q4.bytes_for(4096 * 14336)
    assert by["lm_head"].n_bytes == 32000 * 4096 * 2  # the output layer stays unquantized
    assert by["embed_tokens"].n_bytes == 0  # tied: stored once, as lm_head
    assert q4.bytes_for(4096 * 4096) == 4096 * 4096 // 2 + 4096 * 4096 // 128 * 2  # 4.125 bits per weight


@pytest.mark.parametrize("name,params", [("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496),
                                         ("qwen2.5-7b", 7_615_616_512)])
def test_preset_sizes_match_the_published_parameter_counts(name, params):
    spec = preset(name)
    elt = spec.weight_elt_bytes
    bias_params = sum(t.n_bytes // elt - t.rows * t.cols for t in spec.tensors())
    norms = spec.norm_bytes // elt
    assert spec.params + bias_params + norms == params
    assert spec.weight_bytes == 2 * params


def test_tensor_options_memory_fields(rtx4090):
    spec = _spec(quantization=Quantization(4, 128))
    scn = Scenario(spec, rtx4090, Workload(1, 512, 64), rank_choices=(0, 16))
    t = spec.by_name["layers.0.mlp.up_proj"]
    options = tensor_options(scn, t)
    keys = [(o.device, o.prefill_streamed, o.rank) for o in options]
    assert sorted(keys) == sorted([("gpu", False, 0), ("stream", False, 0), ("gpu", False, 16),
                                   ("stream", False, 16), ("cpu", False, 0), ("cpu", True, 0)])
    W = t.n_bytes
    for o in options:
        assert (o.vram_bytes, o.buffer_bytes, o.host_bytes) == {
            ("gpu", False): (W, 0, 0), ("stream", False): (0, W, W),
            ("cpu", False): (0, 0, W), ("cpu", True): (0, W, W)}[(o.device, o.prefill_streamed)]
        assert o.comp_bytes == o.rank * (t.rows + t.cols) * 4  # fp32 factors, a bf16 model
        streamed_in = o.device == "stream"
        assert (o.decode_link_s > 0) == streamed_in
        assert (o.prefill_link_s > 0) == (streamed_in or o.prefill_streamed)
    embed = tensor_options(scn, spec.by_name["embed_tokens"])
    assert [o.device for o in embed] == ["gpu", "cpu"]


def test_expert_weights_are_touched_by_the_routed_share(rtx4090):
    assert touched_fraction(1.0, 1) == 1.0
    assert touched_fraction(0.25, 1) == pytest.approx(0.25)
    assert touched_fraction(0.25, 2) == pytest.approx(1 - 0.75**2)
    assert touched_fraction(0.25, 4096) == pytest.approx(1.0)
    moe = _spec(family="mixtral", moe=MoE(experts=8, active=2, expert_intermediate=1024))
    bank = moe.by_name["layers.0.mlp.experts"]
    assert bank.route_prob == pytest.approx(0.25)
    assert bank.flops_per_token == pytest.approx(2.0 * 3 * 1024 * 4096 * 2)  # 2 of 8 experts run


def test_measured_gemv_curve_sets_weight_bandwidth_by_dtype_and_rows():
    from dataclasses import replace as dc_replace
    from planner.cost.roofline import acc_op_s, host_op_s
    from planner.hardware.profile import weight_read_gbps
    curve = {"fp32": ((1.0, 20.0), (16.0, 5.0))}
    assert weight_read_gbps(curve, "fp32", 1, 100.0, 0.5) == 20.0
    assert weight_read_gbps(curve, "fp32", 4, 100.0, 0.5) == pytest.approx(12.5)  # halfway in log(rows)
    assert weight_read_gbps(curve, "fp32", 64, 100.0, 0.5) == 5.0  # clamped past the last point
    assert weight_read_gbps(curve, "bf16", 4, 100.0, 0.5) == 50.0  # no curve: bandwidth x efficiency
    import planner.hardware.profile as hw
    profile = hw.load_profile("rtx4090")
    n_bytes = 1e9
    plain = acc_op_s(profile, "fp32", 0.0, n_bytes, rows=4)
    curved = acc_op_s(dc_replace(profile, accelerator=dc_replace(profile.accelerator, gemv_gbps=curve)),
                      "fp32", 0.0, n_bytes, rows=4)
    assert curved == pytest.approx(profile.accelerator.op_overhead_s + n_bytes / 12.5e9)
    assert plain < curved
    assert host_op_s(dc_replace(profile, host=dc_replace(profile.host, gemv_gbps=curve)), "fp32", 0.0, n_bytes,
                     rows=1) == pytest.approx(profile.host.op_overhead_s + n_bytes / 20e9)


def test_measured_size_factor_slows_small_matrices():
    from planner.cost.roofline import acc_op_s
    from planner.hardware.profile import weight_read_gbps
    rows_curve = {"fp32": ((1.0, 20.0),)}
    size_factor = ((2**21, 0.5), (2**26, 1.0))  # 2 MiB matrices stream at half the 64 MiB rate
    assert weight_read_gbps(rows_curve, "fp32", 1, 100.0, 0.5, 2**21, size_factor) == pytest.approx(10.0)
    assert weight_read_gbps(rows_curve, "fp32", 1, 100.0, 0.5, 2**30, size_factor) == pytest.approx(20.0)
    assert weight_read_gbps(rows_curve, "fp32", 1, 100.0, 0.5, 0.0, size_factor) == 20.0  # not a weight
    p = load_profile("rtx4090")
    p = replace(p, accelerator=replace(p.accelerator, gemv_gbps=rows_curve, gemv_size_factor=size_factor))
    assert acc_op_s(p, "fp32", 0.0, 2**21, 1, weight_bytes=2**21) == pytest.approx(
        p.accelerator.op_overhead_s + 2**21 / 10e9)


def test_measured_dispatch_overheads_replace_the_operator_count():
    from planner.cost.attention import split_merge_s
    from planner.cost.options import (CHARGED_OPS_PER_HEAD, CHARGED_OPS_PER_LAYER, ELEMENTWISE_OPS_PER_LAYER,
                                      head_dispatch_s, layer_dispatch_s)
    p = load_profile("rtx4090")
    a = p.accelerator
    assert layer_dispatch_s(p) == pytest.approx(ELEMENTWISE_OPS_PER_LAYER * a.op_overhead_s)
    assert split_merge_s(p) == pytest.approx(2 * a.op_overhead_s)
    measured = replace(p, accelerator=replace(a, layer_overhead_s=300e-6, head_overhead_s=100e-6,
                                              split_overhead_s=250e-6))
    # the matmuls' and attention's own overheads are charged by their options already
    assert layer_dispatch_s(measured) == pytest.approx(300e-6 - CHARGED_OPS_PER_LAYER * a.op_overhead_s)
    assert head_dispatch_s(measured) == pytest.approx(100e-6 - CHARGED_OPS_PER_HEAD * a.op_overhead_s)
    assert split_merge_s(measured) == 250e-6
    scn = Scenario(_spec(), measured, Workload(1, 128, 32))
    split = attention_decode(scn, 0.5).total_s - attention_decode(Scenario(_spec(), p, Workload(1, 128, 32)),
                                                                  0.5).total_s
    assert split == pytest.approx(250e-6 - 2 * a.op_overhead_s)


def test_quantized_matrices_read_at_the_measured_packed_speed():
    """A profile with an int4 curve (the executor's dequantizing matmul, packed bytes/s) prices
    quantized attention/MLP matrices with it; the float lm_head keeps the float curve; without
    the curve the compute dtype's is used. Arithmetic stays in the model's dtype."""
    p = load_profile("rtx4090")
    curves = {"bf16": ((1.0, 100.0),), "int4": ((1.0, 0.5),)}
    p = replace(p, accelerator=replace(p.accelerator, gemv_gbps=curves))
    spec = _spec(quantization=Quantization(bits=4, group_size=128))
    scn = Scenario(spec, p, Workload(1, 64, 16))
    assert scn.compute_dtype == "bf16" and scn.weight_dtype == "int4"
    by_name = {t.name: t for t in spec.tensors()}

    def gpu_decode_s(scenario, name):
        return next(o for o in tensor_options(scenario, by_name[name]) if o.device == "gpu" and o.rank == 0).decode.acc_s

    q = by_name["layers.0.self_attn.q_proj"]
    act_bytes = (q.rows + q.cols) * 2
    assert gpu_decode_s(scn, q.name) == pytest.approx(p.accelerator.op_overhead_s + (q.n_bytes + act_bytes) / 0.5e9)
    head = by_name["lm_head"]
    assert gpu_decode_s(scn, "lm_head") == pytest.approx(
        p.accelerator.op_overhead_s + (head.n_bytes + (head.rows + head.cols) * 2) / 100e9)
    no_int4 = replace(scn, profile=replace(p, accelerator=replace(p.accelerator, gemv_gbps={"bf16": curves["bf16"]})))
    assert gpu_decode_s(no_int4, q.name) == pytest.approx(p.accelerator.op_overhead_s + (q.n_bytes + act_bytes) / 100e9)


def test_measured_prefill_rates_replace_bandwidth_and_matmul_peak():
    from planner.cost.attention import attention_prefill, attention_prefill_flops
    from planner.cost.options import elementwise_bytes, layer_dispatch_s, layer_fixed
    p = load_profile("rtx4090")
    spec = _spec()
    wl = Workload(1, 512, 16)
    measured = replace(p, accelerator=replace(p.accelerator, elementwise_gbps=50.0, attention_tflops=2.0))
    scn = Scenario(spec, measured, wl)
    rows = 512
    assert layer_fixed(scn, rows).acc_s == pytest.approx(
        layer_dispatch_s(measured) + elementwise_bytes(spec.hidden, spec.intermediate, rows, 2) / 50e9)
    flops = attention_prefill_flops(spec.heads, spec.head_dim, 1, 512)
    assert attention_prefill(scn, 0.0).acc_s == pytest.approx(p.accelerator.op_overhead_s + flops / 2e12)
    plain = Scenario(spec, p, wl)  # unmeasured: memory bandwidth and the matmul roofline
    assert layer_fixed(plain, rows).acc_s == pytest.approx(
        layer_dispatch_s(p) + elementwise_bytes(spec.hidden, spec.intermediate, rows, 2) / (p.accelerator.mem_bw_gbps * 1e9))
    assert attention_prefill(plain, 0.0).acc_s < attention_prefill(scn, 0.0).acc_s


def test_a_compensation_branch_pays_the_measured_hand_off_on_the_path():
    p = load_profile("rtx4090")
    spec = _spec(quantization=Quantization(bits=4, group_size=128))
    handed = replace(p, host=replace(p.host, task_overhead_s=80e-6))
    t = next(t for t in spec.tensors() if t.name == "layers.0.mlp.up_proj")

    def ranked(profile, rank):
        scn = Scenario(spec, profile, Workload(1, 64, 16), rank_choices=(0, 16))
        return next(o for o in tensor_options(scn, t) if o.device == "gpu" and o.rank == rank)

    assert ranked(handed, 16).decode.total_s == pytest.approx(ranked(p, 16).decode.total_s + 80e-6)
    assert ranked(handed, 0).decode.total_s == ranked(p, 0).decode.total_s  # no branch, no hand-off
