"""Dispatch overheads and the memory-bus probe (executor/overhead.py, executor/contention.py).

The probes are run for what they return (a positive, finite time per call over the runs asked
for), never for how long they take: how the timings compare on a machine is what
benchmarks/probe_timings.py prints."""

from __future__ import annotations

import math

import pytest
import torch

from executor.contention import bus_figure, slowdown_s_per_gb
from executor.overhead import (DEEP_LAYERS, SHALLOW_LAYERS, decode_step_timing, split_attention_timing,
                               split_kv_overhead_s, step_overhead)
from executor.timing import Timing

CPU = torch.device("cpu")


def timed(t: Timing, runs: int) -> bool:
    """A timing of `runs` runs with a positive, finite time per call and a spread >= 0."""
    return t.runs == runs and 0 < t.median_s < math.inf and 0 <= t.spread < math.inf


def test_split_overhead_separates_layers_from_the_rest_of_a_step():
    shallow = Timing(SHALLOW_LAYERS * 200e-6 + 70e-6, 0.01, 3)
    deep = Timing(DEEP_LAYERS * 200e-6 + 70e-6, 0.02, 3)
    step = step_overhead(shallow, deep)
    assert step.layer_s == pytest.approx(200e-6) and step.head_s == pytest.approx(70e-6)
    assert step.spread == 0.02
    # noise that makes the deeper model look faster gives zero, never a negative time
    assert step_overhead(deep, shallow).layer_s == 0.0
    assert split_kv_overhead_s(Timing(3e-4, 0.1, 3), Timing(1e-4, 0.1, 3)) == pytest.approx(2e-4)
    assert split_kv_overhead_s(Timing(1e-4, 0.1, 3), Timing(3e-4, 0.1, 3)) == 0.0


def test_decode_step_probe_times_models_of_both_depths():
    torch.manual_seed(0)
    assert SHALLOW_LAYERS < DEEP_LAYERS
    for layers in (SHALLOW_LAYERS, DEEP_LAYERS):
        assert timed(decode_step_timing(CPU, "fp32", layers, warmup=1, repeats=2), runs=2)


def test_split_attention_probe_runs_both_cache_layouts():
    for host_fraction in (0.0, 0.5):
        assert timed(split_attention_timing(CPU, "fp32", host_fraction, warmup=1, repeats=2), runs=2)


def test_slowdown_is_the_compute_time_lost_per_gb_copied():
    # matmuls at 15 GB/s instead of 20 lose a quarter of their time while 10 GB/s are copied
    assert slowdown_s_per_gb(10.0, 15.0, 20.0) == pytest.approx(0.025)
    assert slowdown_s_per_gb(10.0, 21.0, 20.0) == 0.0  # faster beside the copy: noise, no slowdown
    assert slowdown_s_per_gb(0.0, 15.0, 20.0) == 0.0


def test_bus_probe_counts_loopback_copies_twice():
    torch.set_num_threads(1)
    f = bus_figure(CPU, "fp32", (1024, 1024), duration_s=0.1, repeats=2)
    # (on a loaded machine the copy thread may get no copy done inside so short a window)
    assert f.copy_gbps >= 0 and f.gemv_gbps > 0 and f.gemv_alone_gbps > 0
    assert f.dram_gbps == pytest.approx(2 * f.copy_gbps + f.gemv_gbps, rel=1e-6)
    assert f.slowdown_s_per_gb >= 0


def test_prefill_probes_time_the_executors_operators():
    from executor.overhead import (attention_prefill_timing, attention_tflops, elementwise_gbps,
                                   prefill_elementwise_timing)
    elementwise = prefill_elementwise_timing(CPU, "fp32", warmup=1, repeats=2)
    attention = attention_prefill_timing(CPU, "fp32", warmup=1, repeats=2)
    assert timed(elementwise, runs=2) and timed(attention, runs=2)
    assert elementwise_gbps(elementwise, 0.0, "fp32") > 0 and attention_tflops(attention) > 0
    # a fixed cost larger than the whole timing cannot make the rate infinite or negative
    assert 0 < elementwise_gbps(elementwise, 10.0, "fp32") < float("inf")


def test_branch_probe_times_a_linear_with_and_without_its_host_branch():
    from executor.overhead import branch_overhead_s, branch_timing
    with_branch = branch_timing(CPU, True, warmup=1, repeats=2)
    without = branch_timing(CPU, False, warmup=1, repeats=2)
    assert timed(without, runs=2) and timed(with_branch, runs=2)
    assert branch_overhead_s(Timing(9e-5, 0, 3), Timing(3e-5, 0, 3)) == pytest.approx(6e-5)
    assert branch_overhead_s(Timing(3e-5, 0, 3), Timing(9e-5, 0, 3)) == 0.0
