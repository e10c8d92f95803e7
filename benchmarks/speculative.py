"""Speculative decoding on this machine: predicted and measured decode speed with and without
a draft, and the measured acceptance.

    python benchmarks/speculative.py [--profile FILE] [--gammas 2,3,4] [--gen 48] [--threads N]

Target: a synthetic Llama-family model (12 layers, hidden 1024, vocab 8192, fp32: ~600 MB).
Draft: a truncated copy of the target: its first `--draft-layers` layers with the target's
embeddings, final norm and lm_head (the same tensors, shared, not copied), so both share the
vocabulary. Random weights give every layer a large, independent say in the logits, so a
truncated copy alone would almost never agree with the target; the target's remaining layers
therefore have their residual outputs (o_proj, down_proj) scaled by `--damp`, making them
small corrections to what the first layers decided. `--damp` sets the acceptance: 1 gives ~0,
0.1 about 0.7, 0.02 about 0.95.

All weights and KV caches stay resident on the accelerator (on a loopback profile, the CPU
itself), and the prediction is for that same placement (every tensor `gpu`). The profile is
`--profile FILE`, or measured now with executor.profiler's quick profile; without that module
a rough one is measured here (one GEMV for bandwidth, one GEMM for flops).

Decode speed is measured as batch x (gen - 1) / (time of a whole generation - time of its
prefill), each the median of `--repeats` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from planner.cost.options import Scenario
from planner.hardware.profile import Accelerator, HardwareProfile, Host, Link, Source, load_profile
from planner.solve.ilp import SolverOptions
from planner.model.modelfile import DraftCandidate
from planner.model.placement import uniform_placement
from planner.cost.evaluate import evaluate
from planner.cli.render_search import draft_summary
from planner.cost.roofline import expected_tokens_per_step
from planner.solve.drafts import search
from planner.model.spec import ModelSpec, Workload
from planner.units import fmt_bytes

from executor.model import Transformer
from executor.speculative import greedy_generate, speculative_generate, truncated_draft
from executor.weights import synthetic_model

TARGET = ModelSpec(name="bench-target-600m", family="llama", layers=12, hidden=1024, intermediate=2816,
                   heads=16, kv_heads=4, vocab=8192, dtype="fp32", max_context=4096)



@torch.no_grad()
def damp_layers(model: Transformer, first: int, factor: float) -> None:
    """Scale the residual outputs of layers `first`.. by `factor` (see the module docstring)."""
    for layer in model.model.layers[first:]:
        layer.self_attn.o_proj.weight.mul_(factor)
        layer.mlp.down_proj.weight.mul_(factor)


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up: caches allocated, kernels chosen
    samples_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples_s.append(time.perf_counter() - start)
    return statistics.median(samples_s)


def rough_profile() -> HardwareProfile:
    """A loopback profile from two quick measurements: fp32 GEMV bandwidth and GEMM rate."""
    weight = torch.randn(8192, 8192)  # [out, in] fp32, 256 MiB
    x = torch.randn(1, 8192)  # [batch, in]
    gemv_s = median_s(lambda: torch.nn.functional.linear(x, weight), 5)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)  # [m, k], [k, n]
    gemm_s = median_s(lambda: a @ b, 5)
    gbps = weight.numel() * 4 / gemv_s / 1e9
    tflops = {"fp32": 2 * 1024**3 / gemm_s / 1e12}
    memory_bytes = 8 * 2**30
    return HardwareProfile(
        name="rough-loopback",
        accelerator=Accelerator("loopback (CPU)", memory_bytes, gbps, tflops, gemv_efficiency=1.0,
                                matmul_efficiency=1.0, op_overhead_s=5e-6, loopback=True),
        link=Link(h2d_gbps=gbps / 2, d2h_gbps=gbps / 2, latency_s=1e-6),
        host=Host("CPU", torch.get_num_threads(), memory_bytes, gbps, tflops, gemv_efficiency=1.0,
                  matmul_efficiency=1.0, op_overhead_s=5e-6),
        source=Source("measured", notes="benchmarks/speculative.py: one GEMV and one GEMM"))


def machine_profile(path: str | None) -> HardwareProfile:
    if path:
        return load_profile(path)
    try:
        from executor.profiler import profile_machine
    except ImportError:
        return rough_profile()
    return profile_machine(quick=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", help="hardware profile YAML (default: measure this machine now)")
    parser.add_argument("--gammas", default="2,3,4", help="draft lengths, comma-separated")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--damp", type=float, default=0.1, help="scale of the layers the draft lacks")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--gen", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    gammas = [int(g) for g in args.gammas.split(",")]

    with console.status("profiling this machine..."):
        profile = machine_profile(args.profile)
    target = synthetic_model(TARGET, seed=0)
    damp_layers(target, args.draft_layers, args.damp)
    draft = truncated_draft(target, args.draft_layers)
    console.print(f"target {TARGET.name}: {fmt_bytes(TARGET.weight_bytes)}; draft {draft.spec.name}: "
                  f"{fmt_bytes(draft.spec.weight_bytes)} ({args.draft_layers} of {TARGET.layers} layers, "
                  f"shared embeddings and lm_head); profile {profile.name}; {torch.get_num_threads()} threads")

    workload = Workload(batch=1, prompt=args.prompt, gen=args.gen)
    prompt = torch.randint(0, TARGET.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    placement = uniform_placement(TARGET, "gpu")
    reference = greedy_generate(target, prompt, args.gen)

    table = Table(title="Decode speed, predicted vs measured (all weights on the accelerator)", title_justify="left")
    # E: tokens per verify step (predicted from the measured acceptance, and measured);
    # tok/s: decode tokens per second.
    for column in ("draft layers", "γ", "acceptance", "E pred", "E meas", "tok/s pred", "tok/s meas", "error"):
        table.add_column(column, justify="right")

    def measured_tok_s(generate, prefill) -> float:
        with console.status("timing..."):
            return (args.gen - 1) / (median_s(generate, args.repeats) - median_s(prefill, args.repeats))

    base_pred = evaluate(Scenario(TARGET, profile, workload), placement).decode_tokens_per_s
    base_meas = measured_tok_s(lambda: greedy_generate(target, prompt, args.gen),
                               lambda: greedy_generate(target, prompt, 1))
    table.add_row("no draft", "-", "-", "1.00", "1.00", f"{base_pred:.2f}", f"{base_meas:.2f}",
                  f"{100 * (base_pred - base_meas) / base_meas:+.0f}%")
    accepted: list[float] = []
    for gamma in gammas:
        out = speculative_generate(target, draft, prompt, args.gen, gamma)
        if not torch.equal(out.tokens, reference):
            raise SystemExit(f"γ={gamma}: speculative output differs from greedy output")
        accepted.append(out.acceptance_rate)
        scn = Scenario(TARGET, profile, workload, draft.spec, gamma, out.acceptance_rate)
        pred = evaluate(scn, placement).decode_tokens_per_s
        meas = measured_tok_s(lambda: speculative_generate(target, draft, prompt, args.gen, gamma),
                              lambda: speculative_generate(target, draft, prompt, 1, gamma))
        table.add_row(str(args.draft_layers), str(gamma), f"{out.acceptance_rate:.2f}",
                      f"{expected_tokens_per_step(out.acceptance_rate, gamma):.2f}", f"{out.tokens_per_step:.2f}",
                      f"{pred:.2f}", f"{meas:.2f}", f"{100 * (pred - meas) / meas:+.0f}%")
    console.print(table)

    acceptance = statistics.mean(accepted)
    with console.status("planner search over draft lengths..."):
        result = search(TARGET, profile, workload, [DraftCandidate(draft.spec.name, draft.spec, acceptance)],
                        SolverOptions(time_limit_s=10))
    console.print(f"planner, acceptance {acceptance:.2f}: {draft_summary(result)}")


if __name__ == "__main__":
    main()
