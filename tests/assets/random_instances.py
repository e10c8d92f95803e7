"""Random small planning problems for the planner tests: small models, made-up machines whose
memory is chosen so that the problem is tight, and brute force over every option combination.

Import as `from assets.random_instances import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace

from planner.cost.options import Scenario
from planner.cost.terms import acc_workspace_bytes, draft_vram_bytes, host_staging_bytes
from planner.hardware.profile import Accelerator, HardwareProfile, Host, Link, Source
from planner.cost.evaluate import OptionTables, Prediction, option_tables, predict
from planner.model.spec import ModelSpec, Quantization, Workload

GIB = 2**30


def random_spec(rng: random.Random, layers: int | None = None, ffn: str | None = None,
                quantized: bool | None = None, scale: int = 1) -> ModelSpec:
    """A small Llama-family model: 1-3 layers, random GQA shape, sometimes tied or quantized.
    At `scale=1` tensors take 4-500 KiB; `scale=4` gives 0.1-8 MiB, large next to the solver's
    feasibility tolerance (about 1 KiB: the ILP counts memory in GiB)."""
    head_dim = rng.choice((16, 32)) * scale
    heads = rng.choice((2, 4, 8))
    kv_heads = rng.choice([d for d in range(1, heads + 1) if heads % d == 0])
    quantized = rng.random() < 0.35 if quantized is None else quantized
    return ModelSpec(
        name=f"rand-{rng.randrange(10**6)}", family="llama", layers=layers or rng.randint(1, 3),
        hidden=heads * head_dim, intermediate=rng.choice((128, 256, 384, 512)) * scale, heads=heads,
        kv_heads=kv_heads, vocab=rng.choice((256, 512, 1000)) * scale, tied_embeddings=rng.random() < 0.3,
        ffn=ffn or rng.choice(("swiglu", "plain")), dtype=rng.choice(("fp32", "bf16")),
        quantization=Quantization(bits=rng.choice((4, 8)), group_size=32) if quantized else None,
        max_context=4096)


def random_workload(rng: random.Random) -> Workload:
    return Workload(batch=rng.choice((1, 1, 2)), prompt=rng.choice((16, 64, 128)), gen=rng.choice((4, 16, 64)))


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def random_profile(rng: random.Random, vram_bytes: int = 64 * GIB, host_bytes: int = 64 * GIB) -> HardwareProfile:
    """A made-up machine. Rates are scaled down so that moving or computing a small tensor costs
    about as much as the fixed per-operator overheads: every resource matters to the optimum."""
    curve = ()
    if rng.random() < 0.5:
        curve = ((4096.0, _log_uniform(rng, 0.1, 0.5)), (262144.0, _log_uniform(rng, 0.5, 5.0)))
    acc = Accelerator(name="rand-acc", memory_bytes=vram_bytes, mem_bw_gbps=_log_uniform(rng, 5.0, 50.0),
                      flops_tflops={"bf16": _log_uniform(rng, 0.05, 2.0), "fp32": _log_uniform(rng, 0.02, 1.0)},
                      gemv_efficiency=rng.uniform(0.5, 1.0), matmul_efficiency=rng.uniform(0.5, 1.0),
                      op_overhead_s=_log_uniform(rng, 1e-7, 5e-6))
    link = Link(h2d_gbps=_log_uniform(rng, 0.5, 5.0), d2h_gbps=_log_uniform(rng, 0.5, 5.0),
                latency_s=_log_uniform(rng, 1e-7, 1e-5), h2d_curve=curve)
    host = Host(name="rand-host", cores=4, memory_bytes=host_bytes, mem_bw_gbps=_log_uniform(rng, 1.0, 10.0),
                flops_tflops={"fp32": _log_uniform(rng, 0.005, 0.1)}, gemv_efficiency=rng.uniform(0.5, 1.0),
                matmul_efficiency=rng.uniform(0.5, 1.0), op_overhead_s=_log_uniform(rng, 1e-7, 5e-6),
                attention_gbps=rng.choice((0.0, _log_uniform(rng, 1.0, 10.0))))
    # The host memory bus (planner/cost/membus.py): loopback doubles copy traffic and adds the
    # accelerator's reads; a measured bus figure replaces mem_bw_gbps; a host worker hand-off
    # is paid per compensation branch. Drawn from a second
    # generator seeded by a figure above, so that `rng` (and every instance callers build
    # from it afterwards) is unchanged.
    bus_rng = random.Random(acc.mem_bw_gbps)
    acc = replace(acc, loopback=bus_rng.random() < 0.3)
    host = replace(host, bus_gbps=bus_rng.choice((0.0, _log_uniform(bus_rng, 1.0, 20.0))),
                   copy_slowdown_s_per_gb=bus_rng.choice((0.0, _log_uniform(bus_rng, 0.01, 0.5))),
                   task_overhead_s=bus_rng.choice((0.0, _log_uniform(bus_rng, 1e-7, 5e-6))))
    return HardwareProfile(name="random", accelerator=acc, link=link, host=host, source=Source("datasheet"))


def memory_span(tables: OptionTables) -> tuple[int, int, int, int]:
    """(least, most) accelerator bytes and (least, most) host bytes any choice can need; the
    most on the accelerator counts a double streaming buffer for every tensor (no staging)."""
    scn = tables.scenario
    n = scn.spec.layers
    fixed_vram = scn.spec.norm_bytes + acc_workspace_bytes(scn) + draft_vram_bytes(scn)
    lo_v = fixed_vram + sum(min(o.vram_bytes for o in opts) for opts in tables.tensor.values())
    lo_v += n * min(o.vram_bytes for o in tables.kv)
    hi_v = fixed_vram + sum(max(o.vram_bytes + 2 * o.buffer_bytes for o in opts) for opts in tables.tensor.values())
    hi_v += n * max(o.vram_bytes for o in tables.kv)
    lo_h = sum(min(o.host_bytes + o.comp_bytes for o in opts) for opts in tables.tensor.values())
    lo_h += n * min(o.host_bytes for o in tables.kv)
    hi_h = sum(max(o.host_bytes + o.comp_bytes for o in opts) for opts in tables.tensor.values())
    hi_h += n * max(o.host_bytes for o in tables.kv)
    return lo_v, hi_v, lo_h, hi_h


def resident_vram_bytes(tables: OptionTables) -> int:
    """Accelerator bytes when every weight and the whole KV cache are resident."""
    scn = tables.scenario
    weights = sum(max(o.vram_bytes for o in opts) for opts in tables.tensor.values())
    kv = scn.spec.layers * max(o.vram_bytes for o in tables.kv)
    return scn.spec.norm_bytes + acc_workspace_bytes(scn) + draft_vram_bytes(scn) + weights + kv


def with_memory(profile: HardwareProfile, vram_bytes: int, host_bytes: int) -> HardwareProfile:
    return replace(profile, accelerator=replace(profile.accelerator, memory_bytes=vram_bytes),
                   host=replace(profile.host, memory_bytes=host_bytes))


@dataclass(frozen=True)
class Instance:
    scenario: Scenario
    tables: OptionTables


def tight_instance(rng: random.Random, spec: ModelSpec | None = None, workload: Workload | None = None,
                   host_tight: bool | None = None, below_resident: bool = False, **scenario_fields) -> Instance:
    """A random problem whose accelerator memory holds only part of what the model could use
    and, sometimes, whose host memory is tight too. With `below_resident` the accelerator
    memory is also below the all-resident need, so some weights or KV must leave it."""
    spec = spec or random_spec(rng)
    workload = workload or random_workload(rng)
    profile = random_profile(rng)
    loose = Scenario(spec, profile, workload, **scenario_fields)
    loose_tables = option_tables(loose)
    lo_v, hi_v, lo_h, hi_h = memory_span(loose_tables)
    if below_resident:
        hi_v = resident_vram_bytes(loose_tables)
    vram = int(lo_v + rng.uniform(0.15, 0.85) * (hi_v - lo_v))
    host_tight = rng.random() < 0.5 if host_tight is None else host_tight
    host = (int(host_staging_bytes(loose) + lo_h + rng.uniform(0.3, 0.9) * (hi_h - lo_h)) if host_tight
            else 64 * GIB)
    scn = replace(loose, profile=with_memory(profile, vram, host))
    return Instance(scn, option_tables(scn))


def restrict(tables: OptionTables, rng: random.Random, budget: int, kv_levels: int = 2) -> OptionTables:
    """The same tables with a random subset of each item's options, so that brute force over
    every combination stays within `budget`. The ILP accepts such tables unchanged. Each tensor
    and the KV cache keep their leanest option on the accelerator, so that most restricted problems stay feasible."""
    leanest_kv = min(tables.kv, key=lambda o: o.vram_bytes)
    kv_others = [o for o in tables.kv if o is not leanest_kv]
    kv = sorted([leanest_kv, *rng.sample(kv_others, min(kv_levels - 1, len(kv_others)))],
                key=lambda o: o.host_fraction)
    keep = {}
    for name, opts in tables.tensor.items():
        leanest = min(range(len(opts)), key=lambda k: (opts[k].vram_bytes + 2 * opts[k].buffer_bytes, rng.random()))
        others = [k for k in range(len(opts)) if k != leanest]
        keep[name] = [leanest] + rng.sample(others, rng.randint(0, len(others)))
    while len(kv) ** tables.scenario.spec.layers * math.prod(len(k) for k in keep.values()) > budget:
        widest = max(keep, key=lambda name: (len(keep[name]), rng.random()))
        keep[widest].pop()
    tensor = {name: [tables.tensor[name][k] for k in sorted(keep[name])] for name in tables.tensor}
    return replace(tables, tensor=tensor, kv=kv)


def n_combinations(tables: OptionTables) -> int:
    return len(tables.kv) ** tables.scenario.spec.layers * math.prod(len(o) for o in tables.tensor.values())


def brute_force(tables: OptionTables, quality: float | None = None) -> Prediction | None:
    """The fastest combination of options that fits (and recovers at least `quality` of the
    quantization error), by scoring every one with predict(); None when none fits."""
    names = list(tables.tensor)
    best = None
    for kv in itertools.product(tables.kv, repeat=tables.scenario.spec.layers):
        for combo in itertools.product(*(tables.tensor[n] for n in names)):
            prediction = predict(tables, dict(zip(names, combo)), list(kv))
            if not prediction.fits:
                continue
            if quality is not None and prediction.recovered_error < quality - 1e-12:
                continue
            if best is None or prediction.total_s < best.total_s:
                best = prediction
    return best
