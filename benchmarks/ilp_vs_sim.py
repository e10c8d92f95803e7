"""ILP estimate against the discrete-event simulation, for a few plans of 70B- and 8B-shaped
models on a shipped profile, with 1, 2 and 3 prefetch buffers.

    python benchmarks/ilp_vs_sim.py [--hw rtx4090] [--time-limit 20] [--chunk-mib 4]

Where the two differ, the simulation shows what the ILP leaves out: link contention between
weight copies and activation transfers, a single buffer (no overlap), copies overlapping
draft forwards. Each column is one entry of COLUMNS, so a measured column (from `offplan run`)
is one more field on Row and one more entry there.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from rich import box
from rich.console import Console
from rich.table import Table

from planner.solve.baselines import run_baselines
from planner.cost.options import Scenario
from planner.errors import OffplanError
from planner.hardware.profile import HardwareProfile, load_profile, with_overrides
from planner.solve.ilp import SolverOptions, solve_placement
from planner.plan.record import Plan, make_plan
from planner.cost.evaluate import option_tables
from planner.model.presets import preset
from planner.simulate.engine import simulate_plan
from planner.model.spec import Quantization, Workload
from planner.units import GIB, fmt_seconds

WORKLOAD = Workload(batch=1, prompt=512, gen=128)
BUFFERS = (1, 2, 3)


@dataclass(frozen=True)
class Row:
    model: str
    plan: str
    buffers: int
    ilp_decode_s: float
    sim_decode_s: float
    ilp_prefill_s: float
    sim_prefill_s: float
    bound: str  # what holds the simulated decode step's critical path


def _diff(sim_s: float, ilp_s: float) -> str:
    return f"{(sim_s - ilp_s) / ilp_s:+.1%}"


COLUMNS = (
    ("model", lambda r: r.model),
    ("plan", lambda r: r.plan),
    ("buf", lambda r: str(r.buffers)),
    ("ILP step", lambda r: fmt_seconds(r.ilp_decode_s)),
    ("sim step", lambda r: fmt_seconds(r.sim_decode_s)),
    ("diff", lambda r: _diff(r.sim_decode_s, r.ilp_decode_s)),
    ("ILP prefill", lambda r: fmt_seconds(r.ilp_prefill_s)),
    ("sim prefill", lambda r: fmt_seconds(r.sim_prefill_s)),
    ("diff ", lambda r: _diff(r.sim_prefill_s, r.ilp_prefill_s)),
    ("step bound", lambda r: r.bound),
)


def models(profile: HardwareProfile) -> list[tuple[str, Scenario]]:
    """70B with 4-bit weights on the full card; 8B in bf16 on 12 GiB so it must offload."""
    llama70 = replace(preset("llama-3.1-70b"), quantization=Quantization(bits=4, group_size=128))
    llama8 = preset("llama-3.1-8b")
    return [("70B int4", Scenario(llama70, profile, WORKLOAD)),
            ("8B @12GiB", Scenario(llama8, with_overrides(profile, vram_bytes=12 * GIB), WORKLOAD))]


def plans(scn: Scenario, time_limit_s: float) -> list[tuple[str, Plan]]:
    tables = option_tables(scn)
    out = []
    try:
        solution = solve_placement(scn, SolverOptions(time_limit_s=time_limit_s), tables)
        out.append(("ilp", make_plan(scn, solution.placement, "ilp", solution.prediction)))
    except OffplanError as exc:
        print(f"ilp: {exc}")
    for result in run_baselines(scn, tables):
        if result.placement is not None:
            out.append((result.name, make_plan(scn, result.placement, result.name, result.prediction)))
    return out


def rows(model: str, plan_name: str, plan: Plan, chunk_bytes: int = 0) -> list[Row]:
    out = []
    for buffers in BUFFERS:
        sim = simulate_plan(plan, buffers=buffers, copy_chunk_bytes=chunk_bytes)
        out.append(Row(model, plan_name, buffers, sim.ilp_decode_step_s, sim.decode_step_s,
                       sim.ilp_prefill_s, sim.prefill_s, sim.decode_bound))
    return out


def table(all_rows: list[Row], title: str) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, _ in COLUMNS:
        t.add_column(header.strip(), justify="left" if header in ("model", "plan", "step bound") else "right",
                     no_wrap=True)
    for r in all_rows:
        t.add_row(*(cell(r) for _, cell in COLUMNS))
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hw", default="rtx4090", help="shipped profile name or profile YAML path")
    parser.add_argument("--time-limit", type=float, default=20.0, help="ILP time limit per model, seconds")
    parser.add_argument("--chunk-mib", type=float, default=0.0,
                        help="simulate weight copies in pieces of this many MiB (0: whole tensors)")
    args = parser.parse_args()
    profile = load_profile(args.hw)
    chunk_bytes = int(args.chunk_mib * 2**20)
    all_rows = []
    for model, scn in models(profile):
        for plan_name, plan in plans(scn, args.time_limit):
            all_rows += rows(model, plan_name, plan, chunk_bytes)
    chunks = f", copies in {args.chunk_mib:g} MiB pieces" if chunk_bytes else ""
    title = f"ILP estimate vs simulation on {profile.name}, prompt {WORKLOAD.prompt}, batch {WORKLOAD.batch}{chunks}"
    Console(width=max(Console().width, 120)).print(table(all_rows, title))


if __name__ == "__main__":
    main()
