"""Predicted (ILP), simulated and measured speed on this machine's loopback profile (DESIGN §6).

For a synthetic model of a few hundred MB and several plans (the ILP at several VRAM
budgets, the baselines, hand-made placements that stream / compute on the CPU / split the
KV cache), prints predicted and measured decode tokens/s and time to first token, the error
of each, and the median absolute error of decode speed.

    python benchmarks/predict_vs_measure.py [--profile FILE] [--threads 1]

Without --profile it measures this machine first (`offplan profile --quick`) at the same
thread count as the runs. One torch thread is the default: on a small shared machine,
OpenMP matmuls with every core busy collapse whenever another process wants a core.

Each plan runs in a fresh process (`offplan run plan.yaml --synthetic --json`), as a user
runs it: in one long process, the C allocator's heap after the first model is freed serves
the next model's weights from reused memory, and matmuls over it ran ~9% slower here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from planner.solve.baselines import run_baselines
from planner.cost.options import Scenario
from planner.hardware.profile import load_profile, with_overrides
from planner.solve.ilp import solve_placement
from planner.model.modelfile import load_model_file
from planner.model.placement import uniform_placement
from planner.units import error_pct
from planner.plan.record import load_plan, make_plan, save_plan
from planner.model.spec import Workload
from planner.units import GIB

from planner.simulate.engine import simulate_plan



def loopback_profile(path: str | None, threads: int):
    if path:
        return load_profile(path)
    from executor.profiler import profile_machine
    return profile_machine(quick=True, threads=threads)


def run_in_process(plan, threads: int, workdir: Path, index: int) -> dict:
    """`offplan run` of `plan` in a fresh Python process; its JSON report."""
    plan_path, report_path = workdir / f"plan-{index}.yaml", workdir / f"report-{index}.json"
    save_plan(plan, plan_path)
    command = [sys.executable, "-c", "from planner.cli.app import main; main()", "run", str(plan_path),
               "--synthetic", "--threads", str(threads), "--json", str(report_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"offplan run failed for plan {index}:\n{done.stderr or done.stdout}")
    return json.loads(report_path.read_text())


def plans(spec, profile, workload):
    weights_gib = spec.weight_bytes / GIB
    out = []
    for share in (1.2, 0.6, 0.35, 0.2):
        prof = with_overrides(profile, vram_bytes=int(share * weights_gib * GIB))
        scn = Scenario(spec, prof, workload)
        try:
            sol = solve_placement(scn)
        except Exception as exc:  # a budget too small to plan: skip it
            print(f"vram {share:.0%} of weights: {exc}", file=sys.stderr)
            continue
        out.append((f"ilp, vram {share:.0%} of weights", make_plan(scn, sol.placement, "ilp", sol.prediction)))
        if share == 0.6:  # the baselines fit at this budget
            for b in run_baselines(scn):
                if b.placement is not None:
                    out.append((f"{b.name} ({b.note})", make_plan(scn, b.placement, b.name, b.prediction)))
    big = Scenario(spec, with_overrides(profile, vram_bytes=int(2 * weights_gib * GIB)), workload)
    for name, placement in (("all streamed", uniform_placement(spec, "stream")),
                            ("all on the cpu", uniform_placement(spec, "cpu")),
                            ("KV cache 50% on the host", uniform_placement(spec, "gpu", 0.5))):
        out.append((name, make_plan(big, placement, "hand")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="loopback profile YAML (default: measure now)")
    parser.add_argument("--model", default="examples/tiny.yaml")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--gen", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    profile = loopback_profile(args.profile, args.threads)
    spec = load_model_file(args.model).spec
    workload = Workload(1, args.prompt, args.gen)
    table = Table(title=f"{spec.name} on {profile.name}: predicted vs measured")
    for col in ("plan", "decode step ILP", "simulated", "measured", "error", "TTFT pred", "measured", "error"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    decode_errors, ttft_errors = [], []
    with tempfile.TemporaryDirectory(prefix="offplan-pvm-") as tmp:
        for i, (name, plan) in enumerate(plans(spec, profile, workload)):
            report = run_in_process(plan, args.threads, Path(tmp), i)
            p, m = report["predicted"], report["measured"]
            e_dec = error_pct(p["decode_tokens_per_s"], m["decode_tokens_per_s"])
            e_ttft = error_pct(p["ttft_s"], m["ttft_s"])
            decode_errors.append(abs(e_dec))
            ttft_errors.append(abs(e_ttft))
            # The executor's engine prefetches the next stage that streams anything ("next-streamed").
            sim = simulate_plan(load_plan(Path(tmp) / f"plan-{i}.yaml"), prefetch="next-streamed")
            table.add_row(name, f"{p['decode_step_s'] * 1e3:.1f} ms", f"{sim.decode_step_s * 1e3:.1f} ms",
                          f"{m['decode_step_s'] * 1e3:.1f} ms", f"{e_dec:+.1f}%",
                          f"{p['ttft_s'] * 1e3:.0f} ms", f"{m['ttft_s'] * 1e3:.0f} ms", f"{e_ttft:+.1f}%")
    console = Console(width=120)
    console.print(table)
    console.print("error = ILP prediction vs measurement, of decode tokens/s and of time to first token; "
                  "simulated = the plan replayed as events (the host memory bus as the ILP counts it, per stage)")
    console.print(f"median |error| decode tok/s: {statistics.median(decode_errors):.1f}% over {len(decode_errors)} "
                  f"plans; time to first token: {statistics.median(ttft_errors):.1f}%")


if __name__ == "__main__":
    main()
