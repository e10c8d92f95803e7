"""How long the placement ILP takes, and how good its answer is, as models grow.

    python benchmarks/solve_scaling.py [--hw rtx4090] [--groups 8,12,16] [--time-limit 60]
                                       [--limits 1,3,10,30] [--threads 0] [--skip-symmetry]

Three tables, all at batch 1, prompt 2048, generate 256, per-tensor granularity:

1. Llama 3.1 8B (bf16), 70B (int4 g128 and bf16) and 405B (int4 g128) on the profile, with
   `--ram` large enough for the weights, for each `max_groups`: solver status, solve time,
   objective, predicted decode speed, the solver's proven gap, problem size, and the gap to
   the LP relaxation (the same problem with every binary relaxed to [0, 1]), a measure of how
   hard the MILP is.
2. The two hardest cases under shorter time limits, with the fewest and the most groups of
   table 1: what a user gets from `--time-limit`.
3. A 16-layer model, whose layers fit in 16 groups and so get one group each (the exact
   model): per-layer binaries are symmetric and branch-and-bound struggles to close its gap.
4. Mixture-of-experts models (Qwen3-30B-A3B, Qwen3-235B-A22B, gpt-oss-120b, GLM-4.5-Air,
   DeepSeek-V3) on rtx3060 and rtx4090 with 64-256 GiB of RAM, at the default solver options:
   solve time, the time including the option tables, and the resident experts chosen.
   `--moe-only` prints this table alone.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import pulp

from planner.cost.options import Scenario
from planner.errors import InfeasiblePlanError
from planner.hardware.profile import load_profile, with_overrides
from planner.solve.ilp import SolverOptions, pick_solver, solve_placement
from planner.solve.groups import layer_groups
from planner.solve.problem import MS, build_problem
from planner.cost.evaluate import option_tables
from planner.model.presets import preset
from planner.model.spec import Quantization, Workload
from planner.units import GIB

WORKLOAD = Workload(batch=1, prompt=2048, gen=256)
INT4 = Quantization(bits=4, group_size=128)


@dataclass(frozen=True)
class Case:
    label: str
    model: str
    quantization: Quantization | None
    ram_bytes: int | None  # host memory override; None = the profile's own
    vram_bytes: int | None = None


CASES = (
    Case("llama-3.1-8b bf16", "llama-3.1-8b", None, None),
    Case("llama-3.1-70b int4", "llama-3.1-70b", INT4, None),
    Case("llama-3.1-70b bf16", "llama-3.1-70b", None, 192 * GIB),
    Case("llama-3.1-405b int4", "llama-3.1-405b", INT4, 256 * GIB),
)
INT2 = Quantization(bits=2, group_size=32)  # about 2.5 bits per weight, a Q2_K-class file
MOE_CASES = (
    Case("qwen3-30b-a3b int4", "qwen3-30b-a3b", Quantization(bits=4, group_size=32), None),
    Case("qwen3-235b-a22b int4", "qwen3-235b-a22b", Quantization(bits=4, group_size=32), None),
    Case("gpt-oss-120b mxfp4", "gpt-oss-120b", None, None),
    Case("glm-4.5-air int4", "glm-4.5-air", Quantization(bits=4, group_size=32), None),
    Case("deepseek-v3 int2", "deepseek-v3", INT2, None),
)
MOE_RAM_GIB = (64, 128, 256)
SYMMETRY_CASE = Case("llama-3.2-1b bf16", "llama-3.2-1b", None, None, vram_bytes=int(2.5 * GIB))


@dataclass(frozen=True)
class Row:
    case: str
    layers: int
    groups: int
    limit_s: float
    status: str
    solve_s: float
    objective_s: float
    decode_tok_s: float
    variables: int
    constraints: int
    lp_bound_s: float
    proven_gap: float  # the solver's own proven relative gap (0 when optimal, nan if unknown)

    @property
    def lp_gap(self) -> float:
        """Relative distance of the MILP answer above the LP relaxation's bound."""
        return (self.objective_s - self.lp_bound_s) / self.objective_s


def scenario(case: Case, hw: str) -> Scenario:
    spec = preset(case.model)
    if case.quantization is not None:
        spec = replace(spec, quantization=case.quantization)
    profile = with_overrides(load_profile(hw), case.vram_bytes, case.ram_bytes)
    return Scenario(spec, profile, WORKLOAD)


def lp_bound_s(tables, options: SolverOptions) -> float:
    """Objective of the LP relaxation: the same problem with every binary continuous in [0, 1]."""
    prob = build_problem(tables, options).prob
    for var in prob.variables():
        if var.cat != pulp.LpContinuous:
            var.cat = pulp.LpContinuous  # binaries keep their [0, 1] bounds
    _, solver = pick_solver(options)
    prob.solve(solver)
    return pulp.value(prob.objective) / MS


def run(case: Case, hw: str, options: SolverOptions, with_lp: bool = True) -> Row | str:
    scn = scenario(case, hw)
    tables = option_tables(scn)
    try:
        solution = solve_placement(scn, options, tables)
    except InfeasiblePlanError as exc:
        return f"{case.label}: {exc}"
    bound = lp_bound_s(tables, options) if with_lp else float("nan")
    return Row(case.label, scn.spec.layers, len(layer_groups(scn.spec.layers, options.max_groups)),
               options.time_limit_s, solution.status.split(" (")[0], solution.solve_time_s, solution.objective_s,
               solution.prediction.decode_tokens_per_s, solution.n_variables, solution.n_constraints, bound,
               solution.gap)


COLUMNS = (
    ("model", "<", lambda r: r.case),
    ("layers", ">", lambda r: str(r.layers)),
    ("groups", ">", lambda r: str(r.groups)),
    ("limit", ">", lambda r: f"{r.limit_s:g} s"),
    ("status", "<", lambda r: r.status),
    ("solve", ">", lambda r: f"{r.solve_s:.2f} s"),
    ("objective", ">", lambda r: f"{r.objective_s:.3f} s"),
    ("decode", ">", lambda r: f"{r.decode_tok_s:.2f} tok/s"),
    ("proven gap", ">", lambda r: "-" if r.proven_gap != r.proven_gap else f"{100 * r.proven_gap:.2f} %"),
    ("vars", ">", lambda r: str(r.variables)),
    ("cons", ">", lambda r: str(r.constraints)),
    ("LP bound", ">", lambda r: f"{r.lp_bound_s:.3f} s"),
    ("gap vs LP", ">", lambda r: f"{100 * max(r.lp_gap, 0.0):.2f} %"),  # clamp float noise below 0
)


def print_table(title: str, rows: list[Row | str], columns=COLUMNS) -> None:
    table = [[fmt(r) for _, _, fmt in columns] for r in rows if isinstance(r, Row)]
    widths = [max([len(name)] + [len(line[i]) for line in table]) for i, (name, _, _) in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(f"{name:{align}{w}}" for (name, align, _), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for line in table:
        print("  ".join(f"{cell:{align}{w}}" for cell, (_, align, _), w in zip(line, columns, widths)))
    for r in rows:
        if isinstance(r, str):
            print(f"  infeasible: {r}")


def run_moe(case: Case, hw: str, ram_gib: int, options: SolverOptions) -> str:
    """One line of table 4."""
    started = time.perf_counter()
    scn = scenario(replace(case, ram_bytes=ram_gib * GIB), hw)
    label = f"{case.label:22s} {hw:8s} {ram_gib:4d} GiB"
    try:
        solution = solve_placement(scn, options)
    except InfeasiblePlanError as exc:
        return f"{label}  {str(exc).split(';')[0]}"
    total_s = time.perf_counter() - started
    banks = [t for t in scn.spec.tensors() if t.experts]
    resident = sum(solution.placement.experts_on_gpu(t) for t in banks)
    experts = sum(t.experts for t in banks)
    return (f"{label}  {solution.status.split(' (')[0]:8s} solve {solution.solve_time_s:5.2f} s  "
            f"with tables {total_s:5.2f} s  {solution.n_variables:4d} vars  "
            f"decode {solution.prediction.decode_tokens_per_s:7.2f} tok/s  experts on GPU {resident}/{experts}")


def print_moe_table(options: SolverOptions) -> None:
    print("\n4. mixture-of-experts models, default solver options (batch 1, prompt 2048, generate 256)")
    for case in MOE_CASES:
        for hw in ("rtx3060", "rtx4090"):
            for ram_gib in MOE_RAM_GIB:
                print(run_moe(case, hw, ram_gib, options), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hw", default="rtx4090", help="shipped profile name or YAML file")
    parser.add_argument("--groups", default="8,12,16", help="max_groups values for table 1")
    parser.add_argument("--time-limit", type=float, default=60.0, help="solver time limit for table 1, seconds")
    parser.add_argument("--limits", default="1,3,10,30", help="time limits for table 2, seconds")
    parser.add_argument("--threads", type=int, default=0, help="solver threads (0 = solver default)")
    parser.add_argument("--skip-symmetry", action="store_true", help="leave out table 3")
    parser.add_argument("--moe-only", action="store_true", help="print table 4 (mixture-of-experts) alone")
    args = parser.parse_args()
    if args.moe_only:
        print_moe_table(SolverOptions(time_limit_s=args.time_limit, threads=args.threads))
        return
    groups = [int(g) for g in args.groups.split(",")]
    limits = [float(t) for t in args.limits.split(",")]
    base = SolverOptions(time_limit_s=args.time_limit, threads=args.threads)
    started = time.perf_counter()
    print(f"placement ILP on {load_profile(args.hw).name}; batch {WORKLOAD.batch}, prompt {WORKLOAD.prompt}, "
          f"generate {WORKLOAD.gen}; solver {pick_solver(base)[0]}, gap_rel {base.gap_rel:g}")

    rows = [run(case, args.hw, replace(base, max_groups=g)) for case in CASES for g in groups]
    print_table("1. solve time and answer quality by model size and layer groups", rows)

    hard = [c for c in CASES if c.model in ("llama-3.1-70b", "llama-3.1-405b") and c.label != "llama-3.1-70b int4"]
    rows = [run(case, args.hw, replace(base, max_groups=g, time_limit_s=t), with_lp=False)
            for case in hard for g in sorted({min(groups), max(groups)}) for t in limits]
    print_table("2. what shorter time limits give, fewest and most groups", rows, COLUMNS[:9])

    if not args.skip_symmetry:
        rows = [run(SYMMETRY_CASE, "rtx3060", replace(base, max_groups=g, time_limit_s=30.0)) for g in (16, 8, 4)]
        print_table("3. one group per layer (16 layers, 16 groups) vs fewer groups, rtx3060 with 2.5 GiB", rows)
    print_moe_table(base)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
