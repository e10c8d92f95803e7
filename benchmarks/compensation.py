"""Residual compensation on this machine: decode speed with and without the CPU branches,
and how much of the 4-bit error they recover (logit error against the float model).

A synthetic model of a few hundred MB (fp32) is quantized to 4 bits; its rank table is
measured activation-aware on random calibration prompts; the ILP picks ranks with
`--quality max` and `--quality 0.5` on this machine's loopback profile (the CPU plays the accelerator, so the
branches compete for the same cores: the planner's overlap is optimistic here, and the
table shows by how much). Each configuration is timed with a plain greedy decode loop over
the model with compensate_model applied, everything on the CPU. Backbones keep their
dequantized weights cached, as a fused low-bit kernel on an accelerator would not pay a
dequantize pass per token.

    python benchmarks/compensation.py [--profile FILE] [--layers 8] [--steps 16] [--rounds 3]

Without --profile it measures this machine first (`offplan profile --quick`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field, replace

import torch
from rich.console import Console
from rich.table import Table

from planner.cost.compensation import compensation_time
from planner.cost.options import Scenario
from planner.hardware.profile import load_profile, with_overrides
from planner.solve.ilp import SolverOptions, solve_placement
from planner.solve.quality import solve_compensated, uncompensated
from planner.cost.evaluate import option_tables
from planner.model.ranks import compensation_settings
from planner.model.spec import ModelSpec, Quantization, Workload

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
    """This machine's profile, planned as the benchmark runs: the backbones keep their
    dequantized fp32 weights cached (as a fused low-bit kernel would not pay a dequantize
    pass), so an int4 matrix streams 4 bytes per weight at the fp32 matrix-vector speed. In
    the packed bytes the planner counts, that is the fp32 curve scaled by packed / fp32 bytes;
    it replaces the profile's measured dequantizing-kernel curve."""
    if path:
        profile = load_profile(path)
    else:
        from executor.profiler import profile_machine
        profile = profile_machine(quick=True)
    return replace(profile, accelerator=replace(profile.accelerator, gemv_gbps=_cached_curves(profile.accelerator)),
                   host=replace(profile.host, gemv_gbps=_cached_curves(profile.host)))


def _cached_curves(part) -> dict:
    n = 2**20
    packed_per_fp32 = Quantization(BITS, GROUP).bytes_for(n) / (4 * n)
    curves = {dtype: curve for dtype, curve in part.gemv_gbps.items() if not dtype.startswith("int")}
    if "fp32" in curves:
        curves[f"int{BITS}"] = tuple((rows, gbps * packed_per_fp32) for rows, gbps in curves["fp32"])
    return curves


@torch.no_grad()
def relative_logit_error(model, prompts, reference) -> float:
    logits = torch.cat([model(p) for p in prompts])  # [prompts, t, vocab]
    return float((logits - reference).norm() / reference.norm())


@dataclass
class Config:
    """One model under test, its last greedy token, per-step decode times, branch counters."""

    label: str
    model: object
    handle: object | None = None
    token: torch.Tensor | None = None  # [1, 1]
    step_s: list[float] = field(default_factory=list)
    branch_s: float = 0.0
    exposed_s: float = 0.0


@torch.no_grad()
def time_decode(configs: list[Config], prompt: torch.Tensor, steps: int, warmup: int = 2) -> None:
    """Prefill `prompt` [1, t] on every model, then run `steps` greedy decode steps taking
    the models in turn, so that load from other programs hits them alike; appends each
    step's time and adds the branch counters of the timed steps."""
    for config in configs:
        model = config.model
        model.setup_caches(1, prompt.shape[1] + warmup + steps, device="cpu")
        config.token = model(prompt)[:, -1:].argmax(-1)
        for _ in range(warmup):
            config.token = model(config.token)[:, -1:].argmax(-1)
        if config.handle is not None:
            config.handle.reset_timers()
    for _ in range(steps):
        for config in configs:
            start = time.perf_counter()
            config.token = config.model(config.token)[:, -1:].argmax(-1)
            config.step_s.append(time.perf_counter() - start)
    for config in configs:
        if config.handle is not None:
            config.branch_s += config.handle.host_branch_s
            config.exposed_s += config.handle.wait_s
        config.model.setup_caches(1, 1, device="cpu")  # drop the cache memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="loopback profile YAML (default: measure now)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per round and configuration")
    parser.add_argument("--rounds", type=int, default=3)
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
    table = sensitivity(float_model, spec, BITS, GROUP, RANKS, moments=moments)
    console.print(f"rank table measured in {time.perf_counter() - start:.1f} s "
                  f"({len(calibration)} prompts x 128 tokens, activation-aware)")
    with torch.no_grad():
        reference = torch.cat([float_model(p) for p in held_out])

    # ---- the plan: everything resident on the loopback accelerator, ranks by the ILP -------
    workload = Workload(1, 64, 128)
    choices, recovery = compensation_settings(spec, None, table)
    roomy = with_overrides(profile, vram_bytes=4 * spec.weight_bytes)
    scn = Scenario(spec, roomy, workload, rank_choices=choices, rank_recovery=recovery)
    tables = option_tables(scn)
    plain = solve_placement(scn, SolverOptions(), uncompensated(tables))
    plans = {"ILP --quality max": solve_compensated(scn, SolverOptions(quality_mode="max"), tables),
             "ILP --quality 0.5": solve_compensated(scn, SolverOptions(quality=0.5), tables)}
    console.print(f"planned on {profile.name}; predicted decode without compensation "
                  f"{1 / plain.prediction.decode_step_s:.2f} tok/s")
    for label, solution in plans.items():
        overlap = compensation_time(tables, solution.placement)
        off_accelerator = sorted({d for d in solution.placement.devices.values() if d != "gpu"})
        console.print(f"  {label}: ranks {sorted(set(solution.placement.ranks.values())) or [0]} on "
                      f"{len(solution.placement.ranks)} of {len(names)} matrices; predicted "
                      f"{1 / solution.prediction.decode_step_s:.2f} tok/s, recovered "
                      f"{solution.prediction.recovered_error:.1%}; CPU branch {overlap.branch_s * 1e3:.2f} ms/step, "
                      f"{overlap.exposed_s * 1e3:.2f} ms exposed"
                      + (f" (placement also uses {', '.join(off_accelerator)}; timed here all resident)"
                         if off_accelerator else ""))

    configs = [Config("float (fp32)", float_model)]
    specs = [("4-bit, no compensation", 0)]
    specs += [(label, dict(solution.placement.ranks)) for label, solution in plans.items()]
    specs += [(f"uniform rank {r}", r) for r in (32, 128)]
    errors = {}
    try:
        for label, ranks in specs:
            model = synthetic_model(spec)
            handle = compensate_model(model, ranks, BITS, GROUP, True, moments, cache_dequantized=True)
            configs.append(Config(label, model, handle))
            errors[label] = relative_logit_error(model, held_out, reference)
        for round_ in range(args.rounds):
            time_decode(configs, held_out[round_ % len(held_out)], args.steps)
    finally:
        for config in configs:
            if config.handle is not None:
                config.handle.close()

    base = configs[1]
    base_speed = 1 / statistics.median(base.step_s)
    out = Table(title=f"{spec.name}: greedy decode on this CPU, median of {args.rounds} x {args.steps} steps")
    for col in ("configuration", "tok/s", "vs 4-bit", "branch ms/step", "exposed ms/step", "factor MiB",
                "logit error", "error energy removed"):
        out.add_column(col, justify="left" if col == "configuration" else "right")
    for config in configs:
        speed = 1 / statistics.median(config.step_s)
        n_steps = len(config.step_s)
        error = errors.get(config.label, 0.0)
        base_error = errors[base.label]
        removed = 1 - (error / base_error) ** 2 if base_error > 0 else 0.0
        factor_mib = config.handle.factor_bytes / 2**20 if config.handle is not None else 0.0
        out.add_row(config.label, f"{speed:.2f}", f"{speed / base_speed - 1:+.1%}",
                    f"{config.branch_s / n_steps * 1e3:.2f}", f"{config.exposed_s / n_steps * 1e3:.2f}",
                    f"{factor_mib:.1f}", f"{error:.4f}", f"{removed:.1%}")
    console.print(out)
    console.print("branch / exposed ms: CPU time of all branches per decode step, and how long the backbone "
                  "waited for them (exposed; it includes the hand-off to the worker thread, so it can exceed the "
                  "branch time when the two share the cores). Error energy removed = 1 - (logit error / 4-bit logit error)^2 "
                  "on held-out prompts (the planner's 'recovered' is the mean over matrices of their output-error "
                  "energy removed).")


if __name__ == "__main__":
    main()
