"""Check the executor on this machine's accelerator: one script, under ten minutes on one GPU.

    python benchmarks/gpu_check.py [--tiny-only] [--profile FILE] [--threads N]

1. Profiles the machine (`offplan profile --quick`; skipped with --profile FILE).
2. For the tiny example model and a ~1B Llama-shaped model (synthetic weights; --tiny-only
   skips the 1B one), runs hand-made plans that stream weights, compute matrices on the
   CPU, split the KV cache between host and device, mix all three, and do the mixed plan in
   int8 and int4. For each it prints:
   - whether the generated tokens equal those of the all-resident plan of the same model
     (greedy decoding, same synthetic weights and prompt), or how many leading tokens do.
     Streaming runs the resident plan's kernels on the same bytes, so its tokens must be
     identical. A matrix computed on the CPU, or attention over a host-side KV cache, rounds
     differently from the GPU; float plans run in fp32, where that cannot flip a greedy
     token except at a near-tie, while quantized plans run in bf16 on CUDA (the dtype of
     PyTorch's fused int4 kernel there), where a late divergence can be such a tie;
   - copy/compute overlap: the share of decode weight-copy time during which the
     accelerator was computing, from the run's trace (CUDA events on the copy and compute
     streams; the copy thread on the loopback device);
   - peak accelerator memory against the plan (on CUDA: peak reserved by PyTorch plus what
     the card holds outside it, against the plan plus its reserve);
   - measured against predicted time to first token and decode tokens/s.
Exit status 1 if any plan's tokens differ from its resident run or a plan fails to run (its
row then shows the error and the check goes on).

Without CUDA it runs unchanged on the loopback device (the CPU plays the accelerator), which
is how it is tested. The plans are made for the profile measured in step 1, so predictions
describe this machine.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from executor.run import RunOptions, run_plan
from executor.streams import Devices
from planner.cost.options import Scenario
from planner.hardware.profile import HardwareProfile, load_profile, save_profile
from planner.model.modelfile import load_model_file
from planner.model.placement import Placement
from planner.model.spec import ModelSpec, Quantization, Workload
from planner.plan.record import make_plan
from planner.units import fmt_bytes

ROOT = Path(__file__).resolve().parent.parent
# A Llama-3.2-1B-shaped model (1.2 B parameters, tied embeddings), in fp32 (see above).
ONE_B = ModelSpec(name="llama-1b-shape", family="llama", layers=16, hidden=2048, intermediate=8192, heads=32,
                  kv_heads=8, vocab=128256, dtype="fp32", max_context=4096, tied_embeddings=True,
                  rope_theta=500000.0)
# The layouts of PyTorch's fused kernels (executor/qkernels.py): int4 in groups of 64 (divides
# every matrix width of both models), int8 with one scale per output channel (group size 0).
GROUP_SIZE = {4: 64, 8: 0}
KV_HOST_FRACTION = 0.5


@dataclass(frozen=True)
class Case:
    model: str
    plan: str
    spec: ModelSpec
    placement: Placement
    workload: Workload


def _devices_by_pattern(spec: ModelSpec, pick) -> dict[str, str]:
    """Device of every tensor: `pick(tensor)` for matrices, the accelerator for embeddings."""
    return {t.name: ("gpu" if t.group == "embed" else pick(t)) for t in spec.tensors()}


def placements(spec: ModelSpec) -> dict[str, Placement]:
    """Resident, streamed (every other layer and the head), cpu (every third layer's MLP),
    KV split, and all of it mixed with a prefill-streamed cpu matrix."""
    no_kv, split = (0.0,) * spec.layers, (KV_HOST_FRACTION,) * spec.layers
    resident = _devices_by_pattern(spec, lambda t: "gpu")
    stream = _devices_by_pattern(spec, lambda t: "stream" if t.layer is None or t.layer % 2 else "gpu")
    cpu = _devices_by_pattern(spec, lambda t: "cpu" if t.layer is not None and t.layer % 3 == 1
                              and t.group == "mlp" else "gpu")
    mixed = {name: stream[name] if cpu[name] == "gpu" else "cpu" for name in resident}
    prefill_streamed = tuple(n for n, d in mixed.items() if d == "cpu")[:1]
    return {"resident": Placement(resident, no_kv), "stream": Placement(stream, no_kv),
            "cpu": Placement(cpu, no_kv), "kv split": Placement(resident, split),
            "mixed": Placement(mixed, split, prefill_streamed)}


def cases(name: str, spec: ModelSpec, workload: Workload, quant_dtype: str) -> list[Case]:
    """The float plans, then resident and mixed plans of the int8 and int4 model (in
    `quant_dtype`)."""
    float_plans = placements(spec)
    out = [Case(name, plan, spec, placement, workload) for plan, placement in float_plans.items()]
    for bits in (8, 4):
        quantized = replace(spec, dtype=quant_dtype, quantization=Quantization(bits, GROUP_SIZE[bits], True))
        out += [Case(name, f"int{bits} {plan}", quantized, float_plans[plan], workload)
                for plan in ("resident", "mixed")]
    return out


def overlap_share(events) -> float | None:
    """Share of decode weight-copy time during which the accelerator computed; None when
    nothing streamed."""
    copies = [(e.start_s, e.end_s) for e in events if e.resource == "h2d" and e.phase == "decode"]
    busy = sorted((e.start_s, e.end_s) for e in events if e.resource == "accelerator" and e.phase == "decode")
    copy_s = sum(end - start for start, end in copies)
    if copy_s <= 0:
        return None
    merged: list[list[float]] = []
    for start, end in busy:  # union of compute intervals
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    both_s = sum(max(0.0, min(end, m_end) - max(start, m_start))
                 for start, end in copies for m_start, m_end in merged)
    return both_s / copy_s


def _cuda_release() -> None:
    """Give cached blocks back, so the next run's reserved peak is its own."""
    torch.cuda.empty_cache()


def release(devices: Devices) -> None:
    gc.collect()
    if devices.cuda:
        _cuda_release()


def measure(case: Case, profile: HardwareProfile, threads: int | None, devices: Devices):
    plan = make_plan(Scenario(case.spec, profile, case.workload), case.placement, "gpu-check")
    report = run_plan(plan, RunOptions(synthetic=True, threads=threads, trace=True, warmup_steps=2),
                      devices=devices)
    release(devices)
    return report


def matched(tokens: tuple, reference: tuple | None) -> str:
    """'yes' when equal, else how many leading tokens (of every sequence) agree: '9/16'."""
    if tokens == reference:
        return "yes"
    if reference is None:
        return "-"
    agree = min(next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), len(t)) for t, r in zip(tokens, reference))
    return f"{agree}/{len(tokens[0])}"


def row(case: Case, report, tok: str) -> str:
    p, m = report.predicted, report.measured
    memory = {name: (planned, measured) for name, planned, measured, _ in report.comparisons()}
    planned_mem, peak_mem = memory["accelerator memory"]
    share = overlap_share(m.events)
    return (f"{case.model:<5} {case.plan:<13} {tok:<5} "
            f"{'-' if share is None else f'{100 * share:.0f}%':>4} "
            f"{fmt_bytes(peak_mem):>9} {fmt_bytes(planned_mem):>9} "
            f"{m.ttft_s * 1e3:>7.1f} {p.ttft_s * 1e3:>7.1f} "
            f"{m.decode_tokens_per_s:>6.1f} {p.decode_tokens_per_s:>6.1f}")


# 80 columns: tok = tokens equal to the resident run's, ovl = copy/compute overlap.
HEADER = (f"{'model':<5} {'plan':<13} {'tok':<5} {'ovl':>4} {'peak mem':>9} {'planned':>9} "
          f"{'TTFT ms':>7} {'pred':>7} {'tok/s':>6} {'pred':>6}")


def get_profile(path: str | None, threads: int | None, out_dir: Path) -> HardwareProfile:
    if path:
        return load_profile(path)
    from executor.profiler import profile_machine
    print("profiling this machine (offplan profile --quick) ...", flush=True)
    profile = profile_machine(quick=True, threads=threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_profile(profile, out_dir / "gpu-check-profile.yaml")
    print(f"profile {profile.name} written to {out_dir / 'gpu-check-profile.yaml'}", flush=True)
    return profile


def models(args) -> list[tuple[str, ModelSpec, Workload]]:
    tiny = load_model_file(args.model or str(ROOT / "examples" / "tiny.yaml")).spec
    out = [("tiny", tiny, Workload(1, args.prompt or 128, args.gen or 16))]
    if not args.tiny_only:
        out.append(("1B", ONE_B, Workload(1, args.prompt or 256, args.gen or 32)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-only", action="store_true", help="skip the ~1B model")
    parser.add_argument("--profile", help="hardware profile YAML of this machine (default: measure now)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="gpu-check", help="directory for the measured profile")
    parser.add_argument("--model", help="model file to use instead of the tiny example")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 128 tiny, 256 1B)")
    parser.add_argument("--gen", type=int, help="generated tokens (default 16 tiny, 32 1B)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    devices = Devices.detect()
    name = torch.cuda.get_device_name() if devices.cuda else "loopback (CPU as the accelerator)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    profile = get_profile(args.profile, args.threads, Path(args.out))
    print(f"plans made for profile {profile.name}", flush=True)
    print(HEADER, flush=True)
    failures = 0
    for model_name, spec, workload in models(args):
        reference: dict[Quantization | None, tuple] = {}  # tokens of the resident plan, by weight format
        quant_dtype = "bf16" if devices.cuda else spec.dtype
        for case in cases(model_name, spec, workload, quant_dtype):
            try:
                report = measure(case, profile, args.threads, devices)
            except Exception as exc:  # report it and go on: the other plans still tell something
                failures += 1
                print(f"{case.model:<5} {case.plan:<13} ERROR {type(exc).__name__}: {exc}"[:300], flush=True)
                release(devices)
                continue
            tokens = report.measured.tokens
            if case.plan.endswith("resident"):  # runs first for its weight format
                reference[case.spec.quantization] = tokens
            tok = matched(tokens, reference.get(case.spec.quantization))  # '-' when the resident run failed
            failures += tok != "yes"
            print(row(case, report, tok), flush=True)
    print("tokens equal to the resident run: " + ("yes, every plan" if not failures
                                                  else f"NO for {failures} plans (or they failed)"))
    print("tok: tokens equal to the resident run's (else how many leading ones are)")
    print("ovl: share of decode copy time the accelerator computed")
    print("peak mem: " + ("peak reserved by PyTorch + held outside it; planned: plan + reserve" if devices.cuda
                          else "offplan's tensors on the loopback device; planned: the plan's"))
    print(f"gpu_check took {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
