"""`offplan profile` on this machine: a loopback profile (no CUDA here) whose every figure is
positive and physically possible, that saves and loads back equal, and whose link curves follow
the cost model's `latency + bytes / curve(size)` convention.

No figure is held to a lower bound on speed: a machine busy with other work measures slow, and
that is a true measurement, not a defect (how fast this machine profiles is what
benchmarks/probe_timings.py prints)."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import replace

import pytest
import torch
import yaml

from executor import hostfacts, measure, overhead, profiler, timing
from executor.measure import Figure, Settings, Target, Timing
from planner.errors import HardwareError
from planner.hardware.profile import HardwareProfile, load_profile, save_profile
from planner.cost.roofline import h2d_s

MIB = 2**20
loopback_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the loopback profile")


@pytest.fixture(scope="module")
def tiny_run() -> tuple[HardwareProfile, list[tuple[str, float]]]:
    """The smallest sweep, one thread (a busy 2-core machine cannot stall a parallel region)."""
    calls: list[tuple[str, float]] = []
    profile = profiler.measure_profile(profiler.TINY, threads=1,
                                       progress=lambda step, done: calls.append((step, done)))
    return profile, calls


def positive(*values: float) -> bool:
    return all(0 < v < math.inf for v in values)


def assert_sane(p: HardwareProfile, threads: int) -> None:
    """Every figure positive and finite; rates no higher than any CPU reaches (a timer or
    byte-count error shows as an impossible speed; a busy machine only as a slow one)."""
    a, k, h = p.accelerator, p.link, p.host
    assert a.loopback and a.name.startswith("loopback (CPU: ")
    assert p.is_measured and p.source.date and "loopback" in p.source.notes
    for gbps in (a.mem_bw_gbps, h.mem_bw_gbps, k.h2d_gbps, k.d2h_gbps, h.attention_gbps, h.bus_gbps,
                 a.elementwise_gbps):
        assert positive(gbps) and gbps <= 1000, f"{gbps} GB/s"
    for tflops in (*a.flops_tflops.values(), *h.flops_tflops.values(), a.attention_tflops):
        assert positive(tflops) and tflops <= 1000, f"{tflops} TFLOPS"
    assert set(h.flops_tflops) == {"fp32", "bf16"}
    assert positive(k.latency_s, a.op_overhead_s, h.op_overhead_s)
    assert 0 < a.gemv_efficiency <= 1 and 0 < h.gemv_efficiency <= 1
    assert a.matmul_efficiency == 1.0 and h.matmul_efficiency == 1.0
    # what a decode step costs beyond bytes and flops, measured on the executor's own code
    # (the per-layer part is a difference of two timings: noise on a loaded machine can zero it)
    assert min(a.layer_overhead_s, a.head_overhead_s, a.split_overhead_s, h.task_overhead_s) >= 0
    assert positive(a.layer_overhead_s + a.head_overhead_s)
    assert h.copy_slowdown_s_per_gb >= 0
    assert a.gemv_size_factor and all(size > 0 and f > 0 for size, f in a.gemv_size_factor)
    # loopback: the CPU's figures on both sides, and available RAM split between them
    assert (a.mem_bw_gbps, a.flops_tflops) == (h.mem_bw_gbps, h.flops_tflops)
    assert abs(a.memory_bytes - h.memory_bytes) <= 1 and h.available_bytes == h.memory_bytes
    assert p.reserve_bytes == profiler.LOOPBACK_RESERVE_BYTES and p.vram_usable_bytes > 0
    assert h.cores >= 1 and h.threads == threads
    for curve in (k.h2d_curve, k.d2h_curve, k.h2d_pageable_curve, k.d2h_pageable_curve):
        assert curve and all(size > 0 and gbps > 0 for size, gbps in curve)
    for key in ("link.h2d_gbps", "link.latency_s", "link.h2d_curve", "accelerator.mem_bw_gbps",
                "accelerator.flops_tflops.bf16", "host.gemv_efficiency", "host.attention_gbps"):
        assert p.spread[key] > 0


@pytest.mark.slow
@loopback_only
def test_tiny_profile_is_a_sane_loopback_profile(tiny_run):
    profile, _ = tiny_run
    assert_sane(profile, threads=1)
    assert [size for size, _ in profile.link.h2d_curve] == list(profiler.TINY.link_sizes_bytes)
    assert profile.link.h2d_gbps == profile.link.h2d_curve[-1][1]
    assert "link.h2d_pageable_curve" not in profile.spread  # loopback: a copy of the pinned curve


@pytest.mark.slow
@loopback_only
def test_progress_reports_no_cuda_then_every_step_in_order(tiny_run):
    _, calls = tiny_run
    assert "no CUDA device" in calls[0][0] and "loopback" in calls[0][0]
    fractions = [done for _, done in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0.0 <= fractions[0]
    steps = [step for step, _ in calls]
    assert any(s.startswith("link h2d pinned") for s in steps)
    assert any("attention" in s for s in steps) and any("bf16 matmul" in s for s in steps)


def test_threads_are_restored_and_zero_threads_is_refused():
    before = torch.get_num_threads()
    with pytest.raises(HardwareError, match="--threads"):
        profiler.measure_profile(profiler.TINY, threads=0)
    assert torch.get_num_threads() == before


@pytest.mark.slow
@loopback_only
def test_profile_saves_to_its_default_path_and_loads_back_equal(tiny_run, tmp_path, monkeypatch):
    profile, _ = tiny_run
    monkeypatch.chdir(tmp_path)
    path = profiler.default_profile_path(profile)
    assert path.parent.name == "hwprofiles"
    assert re.fullmatch(r"[a-z0-9-]+-loopback\.yaml", path.name)
    save_profile(profile, path)
    loaded = load_profile(str(path))
    assert loaded == profile and loaded.digest == profile.digest


def test_quick_profile_measures_the_quick_sweep(monkeypatch):
    """`--quick` runs the QUICK sweep (the same code as the TINY sweep above, on larger sizes);
    the sweep itself takes a minute, so benchmarks/probe_timings.py runs it, not the tests."""
    calls = []
    monkeypatch.setattr(profiler, "measure_profile", lambda settings, threads, progress: calls.append(
        (settings, threads, progress)) or "profile")
    assert profiler.profile_machine(quick=True, threads=3, progress=print) == "profile"
    assert profiler.profile_machine() == "profile"
    assert calls == [(profiler.QUICK, 3, print), (profiler.FULL, None, None)]
    quick, full = profiler.QUICK, profiler.FULL
    assert max(quick.link_sizes_bytes) == 256 * MIB and set(quick.link_sizes_bytes) < set(full.link_sizes_bytes)
    assert quick.repeats < full.repeats and quick.copy_bytes < full.copy_bytes and quick.bus_runs < full.bus_runs


@pytest.mark.parametrize("threads, advice", [(None, "or with --threads 1"), (2, "")])
def test_busy_machine_warning_suggests_threads_only_when_not_given(monkeypatch, threads, advice):
    monkeypatch.setattr(profiler.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    note = profiler.busy_note(threads)
    assert note.startswith("machine busy: load average 64.0") and "profile again when it is idle" in note
    assert ("--threads" in note) == bool(advice)
    monkeypatch.setattr(profiler.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert profiler.busy_note(threads) == ""


def test_profile_command_warns_before_it_measures(monkeypatch, tmp_path, capsys):
    from planner.cli.run_cmds import profile as profile_command
    monkeypatch.setattr(profiler.os, "getloadavg", lambda: (64.0, 64.0, 64.0))

    def measure(quick, threads, progress):
        print("MEASURING", file=sys.stderr)
        return load_profile("tests/assets/loopback-test.yaml")
    monkeypatch.setattr(profiler, "profile_machine", measure)
    profile_command(quick=True, threads=2, out=tmp_path / "p.yaml")
    err = capsys.readouterr().err
    assert "machine busy" in err and err.index("machine busy") < err.index("MEASURING")
    assert "--threads 1" not in err
    assert load_profile(str(tmp_path / "p.yaml")).name == load_profile("tests/assets/loopback-test.yaml").name


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["accelerator"].pop("mem_bw_gbps"), "accelerator.mem_bw_gbps"),
    (lambda d: d["link"].update(h2d_gbps=-5.0), "link.h2d_gbps"),
    (lambda d: d["host"].update(memory_bytes=-1), "host.memory_bytes"),
    (lambda d: d["link"].update(latency_s=-1e-6), "link.latency_s"),
])
@pytest.mark.slow
def test_a_missing_or_negative_field_is_named(tiny_run, tmp_path, edit, field):
    profile, _ = tiny_run
    save_profile(profile, tmp_path / "good.yaml")
    data = yaml.safe_load((tmp_path / "good.yaml").read_text())
    edit(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(HardwareError, match=re.escape(field)) as err:
        load_profile(str(bad))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_gpu_profile_assembles_from_the_same_sweep():
    """The CUDA code path without CUDA: the 'device' is the CPU (the timing kernels' twins), the
    facts NVML and torch.cuda would give are made up; everything after them runs for real."""
    gpu = profiler.GpuFacts(device=torch.device("cpu"), name="Test GPU 24GB", total_bytes=24 * 2**30,
                            free_bytes=22 * 2**30, used_by_others_bytes=1536 * MIB, context_bytes=500 * MIB,
                            pcie_generation=4, pcie_width=16, bf16=True)
    small = replace(profiler.TINY, link_sizes_bytes=(64 * 1024, MIB), copy_bytes=16 * MIB,
                    cpu_gemm_shapes=((64, 256, 256),), cuda_gemm_shapes=((32, 64, 64),),
                    gemv_shape=(512, 512), attention_tokens=1024)
    host = hostfacts.probe_host()
    p = profiler._profile_with(small, 1, lambda step, done: None, host, gpu)
    a = p.accelerator
    assert not a.loopback and a.name == "Test GPU 24GB" and p.name.endswith("-test-gpu-24gb")
    assert a.memory_bytes == 24 * 2**30 and a.used_by_others_bytes == 1536 * MIB
    assert (a.pcie_generation, a.pcie_width) == (4, 16)
    assert set(a.flops_tflops) == {"bf16", "fp16", "fp32"} and "fp16" not in p.host.flops_tflops
    assert p.reserve_bytes == 500 * MIB + int(profiler.FRAGMENTATION_FRACTION * 24 * 2**30)
    assert p.vram_usable_bytes == a.memory_bytes - a.used_by_others_bytes - p.reserve_bytes
    assert p.host.memory_bytes == host.ram_total_bytes and p.host.available_bytes == host.ram_available_bytes
    assert p.host_usable_bytes == host.ram_available_bytes - profiler.HOST_RESERVE_BYTES
    assert [size for size, _ in p.link.d2h_pageable_curve] == [64 * 1024, MIB]
    assert "PCIe gen4 x16: theoretical 31.5 GB/s" in p.source.notes
    assert "accelerator.flops_tflops.fp16" in p.spread and "link.d2h_pageable_curve" in p.spread


# ---- the pieces, on synthetic inputs --------------------------------------------------------

def test_parse_proc_files():
    cpuinfo = ("processor\t: 0\nmodel name\t: Test CPU 9000\nphysical id\t: 0\ncore id\t\t: 0\n\n"
               "processor\t: 1\nmodel name\t: Test CPU 9000\nphysical id\t: 0\ncore id\t\t: 0\n\n"
               "processor\t: 2\nmodel name\t: Test CPU 9000\nphysical id\t: 0\ncore id\t\t: 1\n")
    assert hostfacts.parse_cpuinfo(cpuinfo) == ("Test CPU 9000", 2)  # 3 threads on 2 cores
    assert hostfacts.parse_cpuinfo("processor\t: 0\nBogoMIPS\t: 50.00\n") == ("", 0)
    meminfo = "MemTotal:       24684092 kB\nMemFree:        1000 kB\nMemAvailable:   20000000 kB\n"
    assert hostfacts.parse_meminfo(meminfo) == (24684092 * 1024, 20000000 * 1024)
    assert profiler.slug("My Box.local-NVIDIA GeForce RTX 4090") == "my-box-local-nvidia-geforce-rtx-4090"


def test_relative_spread_is_iqr_over_median():
    assert timing.relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.0 - 2.0) / 3.0)
    assert timing.relative_spread([2.0, 2.0, 4.0]) == pytest.approx(1.0)  # (max - min) / median
    assert timing.relative_spread([1.0, 1.0, 1.0, 1.0]) == timing.MIN_SPREAD


SYNTH = Settings(link_sizes_bytes=(64 * 1024, MIB, 64 * MIB), warmup=0, repeats=1, latency_calls=1,
                 overhead_calls=1, copy_bytes=64 * MIB, cpu_gemm_shapes=((64, 64, 64), (128, 128, 128)),
                 cuda_gemm_shapes=(), gemv_shape=(1024, 1024), gemv_batches=(1, 8), attention_tokens=16)


@pytest.mark.slow
def test_link_curves_reproduce_measured_times_through_the_cost_model(tiny_run):
    latency_s, gbps = 5e-6, 10.0
    timings = {"link.latency": Timing(latency_s, 0.01, 3)}
    for direction in ("h2d", "d2h"):
        for size in SYNTH.link_sizes_bytes:
            timings[f"link.{direction}.pinned.{size}"] = Timing(latency_s + size / (gbps * 1e9), 0.02, 3)
    link, spread = measure.link_figures(timings, SYNTH, pageable_measured=False)
    assert link.h2d_gbps == pytest.approx(gbps, rel=1e-3) and link.latency_s == latency_s
    assert link.h2d_pageable_curve == link.h2d_curve and spread["link.h2d_curve"] == 0.02
    with_link = replace(tiny_run[0], link=link)
    for size in SYNTH.link_sizes_bytes:
        measured_s = timings[f"link.h2d.pinned.{size}"].median_s
        assert h2d_s(with_link, size) == pytest.approx(measured_s, rel=1e-3)


def test_compute_figures_take_the_best_shape_and_clamp_gemv_efficiency():
    target = Target("host", torch.device("cpu"), ("bf16",), SYNTH.cpu_gemm_shapes, SYNTH.copy_bytes)
    weight_bytes = 1024 * 1024 * 2
    timings = {"host.copy": Timing(2 * 64 * MIB / 20e9, 0.01, 3),  # 20 GB/s read + write
               "host.gemm.bf16.0": Timing(2 * 64**3 / 1e11, 0.1, 3),  # 0.1 TFLOPS
               "host.gemm.bf16.1": Timing(2 * 128**3 / 2e11, 0.2, 3),  # 0.2 TFLOPS: the best
               "host.gemv.bf16.1": Timing(weight_bytes / 25e9, 0.05, 3),  # faster than the copy
               "host.gemv.bf16.8": Timing(weight_bytes / 10e9, 0.05, 3),
               "host.overhead": Timing(2e-6, 0.3, 3),
               "host.decoder.2": Timing(2 * 100e-6 + 50e-6, 0.02, 3),  # 100 µs a layer, 50 µs a step
               "host.decoder.6": Timing(6 * 100e-6 + 50e-6, 0.02, 3),
               **{f"host.gemv.int{bits}.{b}": Timing(1e-3, 0.05, 3) for bits in (4, 8) for b in (1, 8)},
               "host.attention.device": Timing(80e-6, 0.02, 3),
               "host.attention.split": Timing(200e-6, 0.02, 3),
               "host.prefill.elementwise": Timing(1.1e-3, 0.02, 3),
               "host.prefill.attention": Timing(5e-3, 0.02, 3),
               "host.branch.with": Timing(90e-6, 0.02, 3), "host.branch.without": Timing(30e-6, 0.02, 3)}
    c = measure.compute_figures(target, timings, SYNTH)
    assert c.layer_overhead_s.value == pytest.approx(100e-6)
    assert c.head_overhead_s.value == pytest.approx(50e-6)
    assert c.split_overhead_s.value == pytest.approx(120e-6)
    assert c.elementwise_gbps.value == pytest.approx(overhead.elementwise_gbps(Timing(1.1e-3, 0, 3), 100e-6, "bf16"),
                                                     rel=1e-3)
    assert c.attention_tflops.value == pytest.approx(overhead.attention_tflops(Timing(5e-3, 0, 3)), rel=1e-3)
    assert c.task_overhead_s.value == pytest.approx(60e-6)
    # the dequantizing matmul is rated in the packed bytes the planner counts for the matrix
    packed = measure.QUANT_FORMAT[4].bytes_for(1024 * 1024)
    assert c.gemv_gbps["int4"][1].value == pytest.approx(packed / 1e-3 / 1e9, rel=1e-3)
    assert c.gemv_size_factor() == ()  # SYNTH times no sizes
    sized = replace(SYNTH, gemv_size_shapes=((256, 1024),))
    small = 256 * 1024 * 2
    c_sized = measure.compute_figures(target, {**timings, "host.gemv_size.256x1024": Timing(small / 12.5e9, 0.1, 3)},
                                      sized)
    assert c_sized.gemv_size_factor() == ((float(small), 0.5), (float(weight_bytes), 1.0))  # 12.5 / 25 GB/s
    assert c.mem_bw_gbps.value == pytest.approx(20.0)
    assert c.flops_tflops["bf16"] == Figure(0.2, 0.2)
    assert c.gemv_efficiency().value == 1.0  # 25 GB/s / 20 GB/s, clamped
    assert c.gemv_gbps["bf16"][8].value == pytest.approx(10.0)
    assert c.spread("host")["host.flops_tflops.bf16"] == 0.2
