"""The discrete-event simulator: agrees with the ILP where the ILP's model is exact, is never
faster than it with one prefetch buffer, keeps resources exclusive and dependencies in order;
traces round-trip; the Gantt renders."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from rich.console import Console

from planner.cost.attention import KV_LEVELS, attention_decode, attention_decode_parts
from planner.cost.options import Scenario, tensor_options
from planner.cli.render_gantt import gantt, summary_table
from planner.hardware.profile import Accelerator, HardwareProfile, Host, Link, Source, load_profile
from planner.solve.ilp import SolverOptions, solve_placement
from planner.model.placement import Placement
from planner.plan.record import make_plan
from planner.cost.options import activation_transfer_s, matmul_rows
from planner.simulate.engine import SimulationError, simulate_plan
from planner.simulate.schedule import Op, schedule
from planner.simulate.events import KINDS, RESOURCES, STREAM_PREFIX, Event
from planner.model.spec import ModelSpec, Quantization, Workload
from planner.simulate.trace import (TraceError, decode_step_events, read_trace, to_chrome_trace, whole_workload_events,
                           workload_metadata, write_trace)

MIB, GIB = 2**20, 2**30


def _spec(**overrides) -> ModelSpec:
    fields = dict(name="sim-test", family="llama", layers=4, hidden=512, intermediate=1536, heads=8, kv_heads=2,
                  vocab=4096, dtype="bf16", max_context=2048)
    fields.update(overrides)
    return ModelSpec(**fields)


def _profile(vram_bytes: int = 8 * GIB, host_bw_gbps: float = 40.0, host_op_s: float = 2e-6,
             bus_gbps: float = 0.0) -> HardwareProfile:
    """A made-up machine; its host memory bus is `bus_gbps`, by default the host's memory
    bandwidth (planner/cost/membus.py)."""
    return HardwareProfile(
        name="sim-test",
        accelerator=Accelerator("test accelerator", vram_bytes, 200.0, {"bf16": 40.0, "fp32": 10.0}),
        link=Link(h2d_gbps=8.0, d2h_gbps=8.0, latency_s=1e-5),
        host=Host("test host", 8, 64 * GIB, host_bw_gbps, {"bf16": 0.4, "fp32": 0.4}, op_overhead_s=host_op_s,
                  bus_gbps=bus_gbps),
        source=Source("datasheet"))


def _scenario(spec: ModelSpec | None = None, profile: HardwareProfile | None = None, draft: bool = False,
              ranks: tuple[int, ...] = (0,)) -> Scenario:
    spec = spec or _spec()
    workload = Workload(batch=1, prompt=128, gen=32)
    d = _spec(name="sim-draft", layers=1, hidden=256, intermediate=512, heads=4) if draft else None
    return Scenario(spec, profile or _profile(), workload, d, 3 if draft else 0, 0.7 if draft else 0.0, ranks)


def _random_placement(spec: ModelSpec, rng: random.Random, devices=("gpu", "stream"), kv_levels=(0.0,),
                      ranks: tuple[int, ...] = (0,)) -> Placement:
    chosen, streamed, rank_of = {}, [], {}
    for t in spec.tensors():
        if t.group == "embed":
            chosen[t.name] = rng.choice(["gpu", "cpu"] if "cpu" in devices else ["gpu"])
            continue
        chosen[t.name] = rng.choice(devices)
        if chosen[t.name] == "cpu" and rng.random() < 0.5:
            streamed.append(t.name)
        if chosen[t.name] != "cpu" and spec.quantization and t.group in ("attn", "mlp"):
            rank_of[t.name] = rng.choice(ranks)
    kv = tuple(rng.choice(kv_levels) for _ in range(spec.layers))
    return Placement(chosen, kv, tuple(streamed), {k: r for k, r in rank_of.items() if r})


def _plan(scn: Scenario, placement: Placement):
    return make_plan(scn, placement, "test")


# ---- agreement with the ILP --------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_ilp_where_its_model_is_exact(seed):
    """2 buffers, weights resident or streamed, KV on the accelerator: no activation crosses
    the link, so the ILP's per-stage max is exact (prefill differs only by the embedding
    lookup overlapping the first copy)."""
    scn = _scenario()
    plan = _plan(scn, _random_placement(scn.spec, random.Random(seed)))
    result = simulate_plan(plan, buffers=2)
    assert result.decode_step_s == pytest.approx(result.ilp_decode_step_s, rel=1e-9)
    assert result.prefill_s == pytest.approx(result.ilp_prefill_s, rel=0.01)
    assert result.prefill_s <= result.ilp_prefill_s * (1 + 1e-9)
    assert all(abs(diff) < 1e-9 for _, diff in result.per_stage_diff_s)


def test_agrees_with_an_ilp_solution():
    """A plan the MILP chose under memory pressure (host compute too slow for any cpu
    placement; copies still draw on the memory bus)."""
    spec = _spec(layers=6)
    scn = _scenario(spec, _profile(vram_bytes=36 * MIB, host_bw_gbps=0.05, host_op_s=1e-3, bus_gbps=20.0))
    solution = solve_placement(scn, SolverOptions(time_limit_s=20))
    placement = solution.placement
    assert set(placement.devices.values()) == {"gpu", "stream"}, "precondition: some streamed, none on the cpu"
    assert not any(placement.kv_host_fraction)
    result = simulate_plan(make_plan(scn, placement, "ilp", solution.prediction))
    assert result.decode_step_s == pytest.approx(solution.prediction.decode_step_s, rel=0.01)
    assert result.prefill_s == pytest.approx(solution.prediction.prefill_s, rel=0.01)


def _hard_plans():
    """Random plans with everything the ILP does not model exactly: cpu tensors, hybrid attention,
    compensation branches, a draft model, streaming-heavy placements."""
    quantized = _spec(quantization=Quantization(bits=4, group_size=64))
    cases = []
    for seed in range(8):
        rng = random.Random(100 + seed)
        spec = quantized if seed % 2 else _spec()
        scn = _scenario(spec, draft=seed % 3 == 0, ranks=(0, 16, 32) if spec.quantization else (0,))
        devices = ("stream",) if seed in (1, 4) else ("gpu", "stream", "stream", "cpu")
        placement = _random_placement(spec, rng, devices, kv_levels=KV_LEVELS, ranks=(0, 16, 32))
        cases.append(_plan(scn, placement))
    return cases


@pytest.mark.parametrize("plan", _hard_plans())
def test_one_buffer_is_never_faster_than_the_ilp(plan):
    result = simulate_plan(plan, buffers=1)
    assert result.decode_step_s >= result.ilp_decode_step_s * (1 - 1e-9)
    assert result.prefill_s >= result.ilp_prefill_s * (1 - 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_more_buffers_never_slow_down_without_link_contention(seed):
    scn = _scenario()
    plan = _plan(scn, _random_placement(scn.spec, random.Random(seed), ("gpu", "stream", "stream")))
    steps = [simulate_plan(plan, buffers=b).decode_step_s for b in (1, 2, 3)]
    assert steps[0] >= steps[1] * (1 - 1e-9) and steps[1] >= steps[2] * (1 - 1e-9)
    running_ahead = simulate_plan(plan, buffers=2, prefetch="next-streamed").decode_step_s
    assert running_ahead <= steps[1] * (1 + 1e-9)


def test_copies_running_ahead_beat_the_ilp_after_a_resident_stage():
    """A link-bound layer after a resident one: skipping the resident stage (as the executor's
    prefetch engine does) starts its copy a stage earlier than the ILP credits."""
    scn = _scenario(_spec(layers=4))
    devices = {t.name: "stream" if t.layer in (1, 3) else "gpu" for t in scn.spec.tensors()}
    plan = _plan(scn, Placement(devices, (0.0,) * 4))
    stage = simulate_plan(plan, prefetch="next-stage")
    ahead = simulate_plan(plan, prefetch="next-streamed")
    assert stage.decode_step_s == pytest.approx(stage.ilp_decode_step_s, rel=1e-9)
    assert ahead.decode_step_s < stage.decode_step_s * 0.99


def test_link_contention_delays_activation_transfers():
    """A cpu-placed tensor's output queues behind the next stage's weight copy on the h2d link;
    copying in pieces lets it through sooner."""
    scn = _scenario()
    devices = {t.name: "stream" if t.kind == "gate_proj" else "cpu" if t.kind == "v_proj" else "gpu"
               for t in scn.spec.tensors()}
    plan = _plan(scn, Placement(devices, (0.0,) * scn.spec.layers))
    result = simulate_plan(plan, buffers=2)
    assert result.decode_step_s > result.ilp_decode_step_s * 1.1
    out = next(e for e in result.events if e.name == "layers.1.self_attn.v_proj out" and e.phase == "decode")
    copy = next(e for e in result.events if e.name == STREAM_PREFIX + "layers.2.mlp.gate_proj"
                and e.start_s < out.start_s <= e.end_s + 1e-12)
    assert out.start_s == pytest.approx(copy.end_s, abs=1e-12)
    chunked = simulate_plan(plan, buffers=2, copy_chunk_bytes=MIB)
    assert result.ilp_decode_step_s < chunked.decode_step_s < result.decode_step_s
    assert any(e.name == STREAM_PREFIX + "layers.2.mlp.gate_proj [2/2]" for e in chunked.events)


# ---- pieces match the cost model -------------------------------------------------------------

def test_pieces_add_up_to_the_cost_model():
    scn = _scenario(_spec(quantization=Quantization(bits=4, group_size=64)), ranks=(0, 16))
    for c in KV_LEVELS:
        p = attention_decode_parts(scn, c)
        merged = attention_decode(scn, c)
        host = p.q_down_s + p.host_s + p.out_up_s
        expected = (max(p.device_s, host) + p.merge_s if p.merge_s else p.device_s + host)
        assert expected == pytest.approx(merged.total_s, rel=1e-12)
    for t in scn.spec.tensors():
        for option in tensor_options(scn, t):
            if option.device == "cpu" and t.group != "embed":
                down, up = activation_transfer_s(scn, t, matmul_rows(scn, t, "decode"))
                assert down + up == pytest.approx(option.decode.xfer_s, rel=1e-12)


# ---- resources and dependencies -------------------------------------------------------------

def _check_exclusive(events: list[Event], cpu_workers: int) -> None:
    for r in RESOURCES:
        mine = sorted((e for e in events if e.resource == r), key=lambda e: e.start_s)
        limit = cpu_workers if r == "cpu" else 1
        running: list[float] = []
        for e in mine:
            running = [end for end in running if end > e.start_s + 1e-15]
            running.append(e.end_s)
            assert len(running) <= limit, f"{r}: {len(running)} events overlap at {e.start_s}"


def _check_dependencies(result, plan) -> None:
    events = sorted(result.events, key=lambda e: e.start_s)
    by_name: dict[tuple[str, str], list[Event]] = {}
    for e in events:
        by_name.setdefault((e.resource, e.name), []).append(e)
    for t in plan.model.tensors():
        uses = by_name.get(("accelerator", t.name), [])
        copies = by_name.get(("h2d", STREAM_PREFIX + t.name), [])
        if copies:  # every use of a streamed weight comes after its own copy
            assert len(copies) >= len(uses)
            for copy, use in zip(copies, uses):
                assert use.start_s >= copy.end_s - 1e-12
        for down, work in zip(by_name.get(("d2h", f"{t.name} x"), []), by_name.get(("cpu", t.name), [])):
            assert work.start_s >= down.end_s - 1e-12
    s = result.step_starts_s
    windows = [(0.0, s[0], "prefill")] + [(s[k], s[k + 1], "decode") for k in range(len(s) - 1)]
    for lo, hi, phase in windows:
        layer_ops = {}
        for e in events:
            if e.phase == phase and lo <= e.start_s < hi and not e.name.startswith(STREAM_PREFIX):
                layer_ops.setdefault(e.stage, []).append(e)
        for layer in range(plan.model.layers - 1):
            this, nxt = layer_ops[f"layer {layer}"], layer_ops[f"layer {layer + 1}"]
            assert min(e.start_s for e in nxt) >= max(e.end_s for e in this) - 1e-12
        lm_head = [e for e in layer_ops["head"] if e.name.startswith("lm_head")]
        assert min(e.start_s for e in lm_head) >= max(e.end_s for e in layer_ops[f"layer {plan.model.layers - 1}"]) - 1e-12


@pytest.mark.parametrize("plan", _hard_plans()[:5])
@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_resources_are_exclusive_and_dependencies_hold(plan, buffers):
    result = simulate_plan(plan, buffers=buffers)
    _check_exclusive(list(result.events), 1)
    _check_dependencies(result, plan)
    assert set(result.busy_fraction) == set(RESOURCES)
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in result.busy_fraction.values())
    assert sum(result.critical_by_kind_s.values()) == pytest.approx(result.step_starts_s[-1] - result.step_starts_s[-2])


def test_cpu_workers_bound_concurrent_host_work():
    ops = [Op("cpu", f"task {i}", 1.0, "layer 0", "decode") for i in range(5)]
    for workers, makespan in ((1, 5.0), (2, 3.0), (5, 1.0)):
        tl = schedule(ops, [[] for _ in ops], workers)
        assert max(tl.end) == pytest.approx(makespan)
        _check_exclusive([Event("cpu", o.name, tl.start[i], tl.end[i], o.stage, o.phase)
                          for i, o in enumerate(ops)], workers)


def test_bad_options_name_the_field():
    plan = _plan(_scenario(), _random_placement(_spec(), random.Random(0)))
    with pytest.raises(SimulationError, match="buffers"):
        simulate_plan(plan, buffers=0)
    with pytest.raises(SimulationError, match="prefetch"):
        simulate_plan(plan, prefetch="eager")
    with pytest.raises(SimulationError, match="copy_chunk_bytes"):
        simulate_plan(plan, copy_chunk_bytes=-1)


def test_a_70b_plan_simulates():
    """Every layer on the critical path of an 80-layer plan (how long the simulation takes is
    what benchmarks/probe_timings.py prints)."""
    spec = ModelSpec(name="70b", family="llama", layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8,
                     vocab=128256, quantization=Quantization())
    scn = Scenario(spec, load_profile("rtx4090"), Workload(1, 512, 128))
    devices = {t.name: ("gpu" if (t.layer or 0) < 30 else "stream" if t.layer < 70 or t.kind != "down_proj"
                        else "cpu") for t in spec.tensors()}
    devices["embed_tokens"] = "cpu"
    plan = _plan(scn, Placement(devices, tuple(0.5 if i > 60 else 0.0 for i in range(80))))
    result = simulate_plan(plan)
    assert len(result.critical_path) > 80


# ---- trace files and the Gantt --------------------------------------------------------------

def test_trace_round_trips_and_is_chrome_format(tmp_path):
    plan = _hard_plans()[0]
    result = simulate_plan(plan, cpu_workers=2)
    events = whole_workload_events(result, plan)
    meta = workload_metadata(result, plan)
    path = tmp_path / "plan.trace.json"
    write_trace(path, events, meta)
    back, back_meta = read_trace(path)
    assert back == events and back_meta == meta
    data = json.loads(path.read_text())
    complete = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == len(events)
    for e in complete:
        assert isinstance(e["name"], str) and e["dur"] >= 0 and e["ts"] >= 0
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
    names = {e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"accelerator", "h2d", "d2h", "cpu"} <= names
    assert to_chrome_trace(events, meta)["otherData"]["decode_steps"] == meta["decode_steps"]


def test_whole_workload_samples_long_generations():
    scn = replace(_scenario(), workload=Workload(batch=1, prompt=64, gen=200))
    plan = _plan(scn, _random_placement(scn.spec, random.Random(1)))
    result = simulate_plan(plan)
    meta = workload_metadata(result, plan)
    assert meta["decode_steps"] == 199 and meta["decode_steps_shown"] == [*range(8), 198]
    events = whole_workload_events(result, plan)
    end = max(e.end_s for e in events)
    expected = result.step_starts_s[-1] + (199 - 3) * (result.step_starts_s[-1] - result.step_starts_s[-2])
    assert end == pytest.approx(expected, rel=0.01)
    assert "omitted" in meta["note"]


def test_read_trace_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TraceError, match="not a JSON trace"):
        read_trace(bad)
    with pytest.raises(TraceError, match="not found"):
        read_trace(tmp_path / "missing.json")


def test_gantt_and_summary_render():
    plan = _hard_plans()[1]
    result = simulate_plan(plan)
    console = Console(record=True, width=100)
    console.print(gantt(decode_step_events(result), width=100, title="decode step"))
    console.print(summary_table(result))
    text = console.export_text()
    rows = text.splitlines()
    for r in RESOURCES:
        assert any(line.startswith(r) for line in rows), r
    assert all(len(line) <= 100 for line in rows)
    assert "decode step" in text and "ILP" in text and "bound by" in text
    accelerator = next(line for line in rows if line.startswith("accelerator"))
    assert set(accelerator.split()[1]) & set("Aa")  # its bins show accelerator compute
    legend = next(line for line in rows if "weight streaming" in line) + " " + next(line for line in rows if "idle" in line)
    marks = [word for word in legend.split() if len(word) == 1]
    assert len(set(marks)) == len(marks) == len(KINDS) + 1  # every kind and idle has its own mark, colour or not
