"""How long offplan's measuring and simulating take on this machine, and how the probes' timings
compare: the timing the tests leave out (tests assert what the code returns; a busy machine
makes any speed figure fail).

    python benchmarks/probe_timings.py [--skip-quick] [--threads N]

Prints, each with the wall-clock time it took:
1. `offplan profile --quick` (the QUICK sweep, no file written) — the figure README.md quotes;
2. the TINY sweep the tests run;
3. a simulation of an 80-layer int4 plan (tests/planner/test_simulate.py builds the same);
4. the dispatch probes as ratios: a 6-layer over a 2-layer probe decode step (each layer costs
   its small operators), split over device-only KV-cache attention, a linear with its host
   branch over one without (what the profile's split and hand-off overheads come from).
The load average before each item is printed beside it: on a busy machine every figure is
slower and the ratios are noisy.
"""

from __future__ import annotations

import argparse
import os
import time


def _load() -> str:
    return f"load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""


def _timed(label: str, fn):
    load = _load()
    start = time.perf_counter()
    result = fn()
    print(f"{label}: {time.perf_counter() - start:.1f} s ({load})")
    return result


def _simulate_70b():
    from planner.cost.options import Scenario
    from planner.hardware.profile import load_profile
    from planner.model.placement import Placement
    from planner.model.spec import ModelSpec, Quantization, Workload
    from planner.plan.record import make_plan
    from planner.simulate.engine import simulate_plan

    spec = ModelSpec(name="70b", family="llama", layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8,
                     vocab=128256, quantization=Quantization())
    scn = Scenario(spec, load_profile("rtx4090"), Workload(1, 512, 128))
    devices = {t.name: ("gpu" if (t.layer or 0) < 30 else "stream" if t.layer < 70 or t.kind != "down_proj"
                        else "cpu") for t in spec.tensors()}
    devices["embed_tokens"] = "cpu"
    placement = Placement(devices, tuple(0.5 if i > 60 else 0.0 for i in range(80)))
    return simulate_plan(make_plan(scn, placement, "benchmark"))


def _ratios() -> None:
    import torch

    from executor.overhead import (DEEP_LAYERS, SHALLOW_LAYERS, branch_timing, decode_step_timing,
                                   split_attention_timing)
    cpu = torch.device("cpu")
    shallow = decode_step_timing(cpu, "fp32", SHALLOW_LAYERS, warmup=3, repeats=7)
    deep = decode_step_timing(cpu, "fp32", DEEP_LAYERS, warmup=3, repeats=7)
    device_only = split_attention_timing(cpu, "fp32", 0.0, warmup=3, repeats=7)
    split = split_attention_timing(cpu, "fp32", 0.5, warmup=3, repeats=7)
    without = branch_timing(cpu, False, warmup=3, repeats=7)
    with_branch = branch_timing(cpu, True, warmup=3, repeats=7)
    print(f"decode step, {DEEP_LAYERS} over {SHALLOW_LAYERS} layers: {deep.median_s / shallow.median_s:.2f}x "
          f"({shallow.median_s * 1e6:.0f} -> {deep.median_s * 1e6:.0f} µs)")
    print(f"attention, split over device-only KV cache: {split.median_s / device_only.median_s:.2f}x")
    print(f"linear with its host branch over without: {with_branch.median_s / without.median_s:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-quick", action="store_true", help="leave out the minute-long quick sweep")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the sweeps")
    args = parser.parse_args()
    from executor import profiler

    if not args.skip_quick:
        _timed("offplan profile --quick (QUICK sweep)", lambda: profiler.profile_machine(quick=True,
                                                                                          threads=args.threads))
    _timed("TINY sweep (the tests')", lambda: profiler.measure_profile(profiler.TINY, threads=args.threads))
    result = _timed("simulate an 80-layer int4 plan", _simulate_70b)
    print(f"  critical path of its decode step: {len(result.critical_path)} events")
    _ratios()


if __name__ == "__main__":
    main()
