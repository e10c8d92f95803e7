"""Residual compensation on this machine: decode speed with and without the CPU branches,
and how much of the 4-bit error they recover (logit error against the float model).

A synthetic model of a few hundred MB (fp32) is quantized to 4 bits; its rank table is
measured activation-aware on random calibration prompts; the ILP picks ranks with
`--quality max` on this machine's loopback profile (the CPU plays the accelerator, so the
branches compete for the same cores: the planner's overlap is optimistic here, and the
table shows by how much). Each configuration is timed with a plain greedy decode loop over
the model with compensate_model applied, everything on the CPU. Backbones keep their
dequantized weights cached, as a fused low-bit kernel on an accelerator would not pay a
dequantize pass per token.

    python benchmarks/compensation.py [--profile FILE] [--layers 8] [--steps 24]

Without --profile it measures this machine first (`offplan profile --quick`).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from planner.compensation_time import compensation_time
from planner.cost import Scenario
from planner.hardware import load_profile, with_overrides
from planner.ilp import SolverOptions, solve_compensated, solve_placement, uncompensated
from planner.predict import option_tables
from planner.ranks import compensation_settings
from planner.spec import ModelSpec, Quantization, Workload

from executor.compensate_model import compensate_model
from executor.sensitivity import collect_second_moments, random_prompts, sensitivity
from executor.weights import synthetic_model

RANKS = (0, 16, 32, 64, 128, 256)
BITS, GROUP = 4, 128


def bench_spec(layers: int) -> ModelSpec:
    """~45 MB of fp32 weights per layer plus 67 MB of embeddings and head."""
    return ModelSpec(name=f"bench-{layers}l-1024", family="llama", layers=layers, hidden=1024, intermediate=2048,
                     heads=16, kv_heads=4, vocab=8192, dtype="fp32", max_context=2048,
                     quantization=Quantization(BITS, GROUP))


def loopback_profile(path: str | None):
    if path:
        return load_profile(path)
    from executor.profiler import profile_machine
    return profile_machine(quick=True)


@torch.no_grad()
def relative_logit_error(model, prompts, reference) -> float:
    logits = torch.cat([model(p) for p in prompts])  # [prompts, t, vocab]
    return float((logits - reference).norm() / reference.norm())


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, steps: int, warmup: int = 2,
                        before_timing: Callable[[], None] | None = None) -> float:
    """Greedy decode after a prefill of `prompt` [1, t]; tokens/s over `steps` timed steps.
    `before_timing` runs after prefill and warm-up (to reset counters)."""
    model.setup_caches(1, prompt.shape[1] + warmup + steps, device="cpu")
    token = model(prompt)[:, -1:].argmax(-1)  # [1, 1]
    for _ in range(warmup):
        token = model(token)[:, -1:].argmax(-1)
    if before_timing is not None:
        before_timing()
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token)[:, -1:].argmax(-1)
    elapsed = time.perf_counter() - start
    model.setup_caches(1, 1, device="cpu")  # drop the cache memory
    return steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="loopback profile YAML (default: measure now)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per configuration")
    args = parser.parse_args()
    console = Console(width=120)
    spec = bench_spec(args.layers)
    console.print(f"{spec.name}: {spec.params / 1e6:.0f}M parameters, {spec.params * 4 / 2**20:.0f} MiB in fp32, "
                  f"{BITS}-bit group {GROUP}; torch threads {torch.get_num_threads()}")
    profile = loopback_profile(args.profile)

    float_model = synthetic_model(spec)
    calibration = random_prompts(spec.vocab, prompts=16, tokens=128, seed=1)
    held_out = random_prompts(spec.vocab, prompts=4, tokens=64, seed=2)
    names = [t.name for t in spec.tensors() if t.group in ("attn", "mlp")]
    start = time.perf_counter()
    moments = collect_second_moments(float_model, names, calibration)
    table = sensitivity(float_model, spec, BITS, GROUP, RANKS, calibration)
    console.print(f"rank table measured in {time.perf_counter() - start:.1f} s "
                  f"({len(calibration)} prompts x 128 tokens, activation-aware)")
    with torch.no_grad():
        reference = torch.cat([float_model(p) for p in held_out])
    float_speed = decode_tokens_per_s(float_model, held_out[0], args.steps)
    del float_model

    # ---- the plan: everything resident on the loopback accelerator, ranks by the ILP -------
    workload = Workload(1, 64, 128)
    choices, recovery = compensation_settings(spec, None, table)
    roomy = with_overrides(profile, vram_bytes=4 * spec.weight_bytes)
    scn = Scenario(spec, roomy, workload, rank_choices=choices, rank_recovery=recovery)
    tables = option_tables(scn)
    plain = solve_placement(scn, SolverOptions(), uncompensated(tables))
    solution = solve_compensated(scn, SolverOptions(quality_mode="max"), tables)
    overlap = compensation_time(tables, solution.placement)
    off_accelerator = sorted({d for d in solution.placement.devices.values() if d != "gpu"})
    console.print(f"ILP --quality max on {profile.name}: ranks {sorted(set(solution.placement.ranks.values()))} "
                  f"on {len(solution.placement.ranks)} of {len(names)} matrices; predicted decode "
                  f"{1 / plain.prediction.decode_step_s:.2f} -> {1 / solution.prediction.decode_step_s:.2f} tok/s, "
                  f"recovered {solution.prediction.recovered_error:.1%}; CPU branch per step "
                  f"{overlap.branch_s * 1e3:.2f} ms, hidden {overlap.hidden_fraction:.0%}"
                  + (f" (placement also uses {', '.join(off_accelerator)}; timed here all resident)"
                     if off_accelerator else ""))

    configs = [("4-bit, no compensation", 0), ("ILP plan (--quality max)", dict(solution.placement.ranks))]
    configs += [(f"uniform rank {r}", r) for r in (32, 128)]
    out = Table(title=f"{spec.name}: decode on this CPU (float: {float_speed:.2f} tok/s)")
    for col in ("configuration", "tok/s", "vs 4-bit", "branch ms/step", "exposed ms/step", "factor MiB",
                "logit error", "error energy removed"):
        out.add_column(col, justify="left" if col == "configuration" else "right")
    base_error = base_speed = 0.0
    for label, ranks in configs:
        model = synthetic_model(spec)
        with compensate_model(model, ranks, BITS, GROUP, True, moments, cache_dequantized=True) as handle:
            error = relative_logit_error(model, held_out, reference)
            speed = decode_tokens_per_s(model, held_out[0], args.steps, before_timing=handle.reset_timers)
            branch_ms, exposed_ms = handle.host_branch_s / args.steps * 1e3, handle.wait_s / args.steps * 1e3
            factor_mib = handle.factor_bytes / 2**20
        del model
        if ranks == 0:
            base_error, base_speed = error, speed
        removed = 1 - (error / base_error) ** 2 if base_error > 0 else 0.0
        out.add_row(label, f"{speed:.2f}", f"{speed / base_speed - 1:+.1%}", f"{branch_ms:.2f}", f"{exposed_ms:.2f}",
                    f"{factor_mib:.1f}", f"{error:.4f}", f"{removed:.1%}")
    console.print(out)
    console.print("branch / exposed ms: CPU time of all branches per decode step, and how long the backbone "
                  "waited for them (exposed). Error energy removed = 1 - (logit error / 4-bit logit error)^2 "
                  "on held-out prompts.")

if __name__ == "__main__":
    main()
