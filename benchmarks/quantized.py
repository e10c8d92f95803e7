"""Fused quantized kernels on the loopback device: decode speed of the tiny example in fp32,
int8 and int4, measured against predicted, and the speed-up over fp32.

    python benchmarks/quantized.py [--profile FILE] [--threads 1] [--gen 64]

Without --profile it measures this machine first (`offplan profile --quick`) at the same
thread count as the runs, so the planner prices the fused kernels with their measured
speeds. Each format runs the all-resident plan of examples/tiny.yaml in a fresh process
(`offplan run plan.yaml --synthetic --json`): int8 with one scale per output channel
(`_weight_int8pack_mm`), int4 in groups of 128 with stored scale-and-zero pairs
(`_weight_int4pack_mm_for_cpu`). Targets: int8 at least 2.5x and int4 at least 3.5x the fp32
decode speed, and measured decode within 15% of predicted for each. Prints what one run
measured; timings on a shared machine vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from planner.cost.options import Scenario
from planner.hardware.profile import load_profile
from planner.model.modelfile import load_model_file
from planner.model.placement import uniform_placement
from planner.model.spec import Quantization
from planner.plan.record import make_plan, save_plan

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {"fp32": None, "int8": Quantization(8, 0, True), "int4": Quantization(4, 128, False)}
TARGET_SPEEDUP = {"int8": 2.5, "int4": 3.5}
TARGET_ERROR_PCT = 15.0


def loopback_profile(path: str | None, threads: int):
    if path:
        return load_profile(path)
    from executor.profiler import profile_machine
    return profile_machine(quick=True, threads=threads)


def run_in_process(plan, threads: int, workdir: Path, name: str) -> dict:
    """`offplan run` of `plan` in a fresh Python process; its JSON report."""
    plan_path, report_path = workdir / f"plan-{name}.yaml", workdir / f"report-{name}.json"
    save_plan(plan, plan_path)
    command = [sys.executable, "-c", "from planner.cli.app import main; main()", "run", str(plan_path),
               "--synthetic", "--threads", str(threads), "--json", str(report_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"offplan run failed for {name}:\n{done.stderr or done.stdout}")
    return json.loads(report_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="loopback profile (default: measure this machine, --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--gen", type=int, default=64, help="tokens generated per run (default 64)")
    args = parser.parse_args(argv)
    profile = loopback_profile(args.profile, args.threads)
    model_file = load_model_file(str(ROOT / "examples" / "tiny.yaml"))
    workload = replace(model_file.workload, gen=args.gen)
    print(f"{model_file.spec.name}, all resident, {workload.prompt}-token prompt, {workload.gen} tokens, "
          f"{args.threads} thread(s), profile {profile.name}")
    print(f"{'format':<7}{'weights MiB':>12}{'predicted':>11}{'measured':>10}{'error':>8}{'vs fp32':>9}")
    measured, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, quantization in FORMATS.items():
            spec = replace(model_file.spec, quantization=quantization)
            plan = make_plan(Scenario(spec, profile, workload), uniform_placement(spec, "gpu"), "resident")
            report = run_in_process(plan, args.threads, Path(tmp), name)
            predicted = report["predicted"]["decode_tokens_per_s"]
            measured[name] = report["measured"]["decode_tokens_per_s"]
            errors[name] = 100.0 * (predicted - measured[name]) / measured[name]
            print(f"{name:<7}{spec.weight_bytes / 2**20:>12.0f}{predicted:>11.1f}{measured[name]:>10.1f}"
                  f"{errors[name]:>+7.0f}%{measured[name] / measured['fp32']:>8.2f}x", flush=True)
    print("decode tok/s; error = (predicted - measured) / measured")
    held = True
    for name, target in TARGET_SPEEDUP.items():
        ratio = measured[name] / measured["fp32"]
        held &= ratio >= target
        print(f"{name} / fp32 decode: {ratio:.2f}x (target >= {target}x): {'met' if ratio >= target else 'NOT met'}")
    for name, error in errors.items():
        within = abs(error) <= TARGET_ERROR_PCT
        held &= within
        print(f"{name} predicted vs measured: {error:+.0f}% (target within {TARGET_ERROR_PCT:.0f}%): "
              f"{'met' if within else 'NOT met'}")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
