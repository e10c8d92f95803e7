"""The `offplan` command line: thin commands over the library, rich output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .baselines import run_baselines
from .cli_common import (BatchOpt, GenOpt, HostBwOpt, HwOpt, JsonOpt, PromptOpt, RamOpt, SolverOpt, TimeLimitOpt,
                         VramOpt, check_out_path, console, load_hardware, load_model, print_json, resolve_workload,
                         run_app)
from .cost import Scenario
from .hardware import load_profile, shipped_profile_names
from .ilp import SolverOptions, solve_placement
from .plan import make_plan, save_plan
from .predict import option_tables
from .render import compare_table, memory_table, model_line, placement_table, plan_json, speed_table
from .errors import OffplanError
from .units import fmt_bytes, fmt_seconds

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan and run LLMs on a GPU that is too small for them.")
hw_app = typer.Typer(no_args_is_help=True, help="Hardware profiles: list the shipped ones, show one.")
app.add_typer(hw_app, name="hw")


@app.command()
def solve(
    model: Annotated[str, typer.Argument(help="model.yaml, HF config.json (or its directory), .gguf, or a preset name.")],
    hw: HwOpt,
    vram: VramOpt = None, ram: RamOpt = None, host_bw: HostBwOpt = None,
    prompt: PromptOpt = None, gen: GenOpt = None, batch: BatchOpt = None,
    compare: Annotated[bool, typer.Option("--compare", help="Also score what accelerate / llama.cpp / "
                                                             "stream-all would pick.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the plan as YAML.")] = None,
    json_out: JsonOpt = False,
    time_limit: TimeLimitOpt = 10.0,
    solver: SolverOpt = "auto",
    no_draft: Annotated[bool, typer.Option("--no-draft", help="Ignore the model file's draft candidates.")] = False,
    accept: Annotated[list[str], typer.Option("--acceptance", help="Measured acceptance of a draft: NAME=RATE "
                                                                   "(repeat; see `offplan acceptance`).")] = [],
    quality: Annotated[Optional[str], typer.Option("--quality", help="Quantized models: 'max' (recover the most "
                       "error within --slack of the fastest plan) or R in 0..1 (fastest plan recovering R).")] = None,
    slack: Annotated[float, typer.Option("--slack", help="With --quality max: allowed slow-down, 0.02 = 2%.")] = 0.02,
    rank_table: Annotated[Optional[Path], typer.Option("--rank-table", help="ranks.yaml from `offplan "
                                                                            "sensitivity`.")] = None,
) -> None:
    """Find the fastest placement that fits (and the best draft model), and say why."""
    check_out_path(out)
    model_file = load_model(model)
    profile = load_hardware(hw, vram, ram, host_bw)
    workload = resolve_workload(model_file, prompt, gen, batch)
    from .ilp import parse_quality, solve_compensated
    from .ranks import compensation_settings, load_rank_table
    quality_mode, quality_value = parse_quality(quality)
    if not 0 <= slack <= 1:
        raise OffplanError(f"--slack: must be between 0 and 1, got {slack}")
    rank_choices, rank_recovery = (0,), {}
    if quality is not None:
        if model_file.spec.quantization is None:
            raise OffplanError("--quality: the model is not quantized; add 'quantization:' to the model file")
        table = load_rank_table(rank_table) if rank_table else None
        rank_choices, rank_recovery = compensation_settings(model_file.spec, model_file.compensation, table)
    elif rank_table is not None:
        raise OffplanError("--rank-table: give --quality too (max, or a fraction such as 0.5)")
    options = SolverOptions(time_limit_s=time_limit, solver=solver, quality=quality_value,
                            quality_mode=quality_mode, slack=slack)
    search_result = None
    if model_file.drafts and not no_draft:
        from .search import search, search_plan
        acceptance = dict(_parse_acceptance(a) for a in accept)
        with console.status("searching drafts x draft lengths...", spinner="dots") if not json_out \
                else _nullcontext() as status:
            search_result = search(model_file.spec, profile, workload, model_file.drafts, options,
                                   progress=(lambda line: status.update(line)) if not json_out else None,
                                   acceptance=acceptance, rank_choices=rank_choices, rank_recovery=rank_recovery)
        scn = search_result.scenario
        plan = search_plan(search_result)
        solution = search_result.best.solution
    else:
        scn = Scenario(model_file.spec, profile, workload, rank_choices=rank_choices, rank_recovery=rank_recovery)
        with console.status("solving placement ILP...", spinner="dots") if not json_out else _nullcontext():
            solution = solve_compensated(scn, options)
        plan = make_plan(scn, solution.placement, "ilp", solution.prediction, solution.solver, solution.status,
                         solution.solve_time_s, solution.objective_s)
    tables = option_tables(scn)
    baselines = run_baselines(scn, tables) if compare else None
    if out is not None:
        save_plan(plan, out)
    if json_out:
        print_json(plan_json(plan, baselines))
        return
    console.print(f"[bold]{model_line(plan.model)}[/]")
    console.print(f"on {profile.name}; batch {workload.batch}, prompt {workload.prompt}, generate {workload.gen}")
    within = f", within {solution.gap:.1%} of optimal" if solution.gap == solution.gap and solution.gap > 0 else ""
    console.print(f"solved with {solution.solver} in {fmt_seconds(solution.solve_time_s)} ({solution.status}{within}; "
                  f"{solution.n_variables} variables)" + (f"; {len(search_result.candidates)} draft combinations "
                                                          f"considered" if search_result else ""))
    console.print(placement_table(plan))
    console.print(memory_table(plan))
    console.print(speed_table(plan))
    if quality is not None:
        from .compensation_time import compensation_time
        ct = compensation_time(tables, plan.placement)
        console.print(f"compensation: {ct.tensors} matrices with a CPU branch; predicted recovered error "
                      f"{plan.predicted.recovered_error:.1%} of the quantization error; CPU branch "
                      f"{fmt_seconds(ct.branch_s)} per step, {fmt_seconds(ct.hidden_s)} hidden behind the "
                      f"accelerator, {fmt_seconds(ct.exposed_s)} exposed")
    if search_result is not None:
        from .render_search import alternatives_table, draft_summary
        console.print(draft_summary(search_result))
        console.print(alternatives_table(search_result))
    if baselines is not None:
        console.print(compare_table(plan, baselines))
    if out is not None:
        console.print(f"plan written to [bold]{out}[/]")


@app.command()
def run(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `offplan solve --out`.", metavar="PLAN")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Hugging Face safetensors directory.")] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Random weights of the planned shape.")] = False,
    draft_checkpoint: Annotated[Optional[Path], typer.Option("--draft-checkpoint",
                                                             help="Checkpoint of the plan's draft model.")] = None,
    prompt: PromptOpt = None, gen: GenOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of synthetic weights and prompts.")] = 0,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
    profile_layers: Annotated[bool, typer.Option("--profile-layers", help="Time every stage.")] = False,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON.")] = None,
    trace: Annotated[Optional[Path], typer.Option("--trace", help="Write the measured timeline as a "
                                                                  "Chrome/Perfetto trace.")] = None,
) -> None:
    """Execute a plan with PyTorch; compare measured with predicted speed."""
    from .plan import load_plan
    from .render_run import comparison_table, stage_table
    from .schema import atomic_write
    check_out_path(json_file)
    check_out_path(trace)
    if checkpoint is not None and synthetic:
        raise OffplanError("--checkpoint and --synthetic: give one of them")
    plan = load_plan(plan_file)
    try:
        from executor.run import RunOptions, run_plan
    except ImportError as exc:
        raise OffplanError(f"offplan run needs the [run] extra (pip install 'offplan[run]'): {exc.name} is missing")
    options = RunOptions(checkpoint=checkpoint, synthetic=synthetic, seed=seed, prompt=prompt, gen=gen,
                         threads=threads, profile_layers=profile_layers, draft_checkpoint=draft_checkpoint,
                         trace=trace is not None)
    with console.status("running...", spinner="dots") as status:
        report = run_plan(plan, options, lambda msg: status.update(msg))
    wl = report.workload
    console.print(f"[bold]{model_line(plan.model)}[/] on {report.device} "
                  f"(plan for {plan.profile.name}); batch {wl.batch}, prompt {wl.prompt}, generate {wl.gen}")
    console.print(comparison_table(report.comparisons(), "Measured vs predicted"))
    m = report.measured
    if m.streamed_bytes_per_step:
        console.print(f"streamed {fmt_bytes(m.streamed_bytes_per_step)} per decode step at {m.link_gbps:.1f} GB/s; "
                      f"compute waited {fmt_seconds(m.copy_wait_s_per_step)} per step for weights")
    if m.accelerator_peak_is_accounted:
        console.print("accelerator memory on the loopback device counts offplan's own tensors "
                      "(weights, buffers, KV cache)")
    if m.stages:
        console.print(stage_table(m.stages))
    if trace is not None:
        from .trace import write_trace
        write_trace(trace, list(m.events), {"source": "measured", "model": plan.model.name, "device": report.device,
                                            "workload": vars(wl)})
        console.print(f"measured trace written to [bold]{trace}[/] ({len(m.events)} events): open it in "
                      "chrome://tracing or https://ui.perfetto.dev")
    if json_file is not None:
        atomic_write(json_file, json.dumps(run_report_json(report), indent=2) + "\n")
        console.print(f"report written to [bold]{json_file}[/]")


def run_report_json(report) -> dict:
    from .schema import to_dict
    m = report.measured
    return {
        "model": report.plan.model.name, "profile": report.plan.profile.name, "device": report.device,
        "workload": vars(report.workload),
        "comparisons": [{"metric": n, "predicted": p, "measured": v, "unit": u,
                         "error_pct": 100.0 * (p - v) / v if v else None} for n, p, v, u in report.comparisons()],
        "measured": {k: v for k, v in to_dict(m).items() if k not in ("events",)},
        "predicted": to_dict(report.predicted),
    }


@app.command()
def profile(
    quick: Annotated[bool, typer.Option("--quick", help="About 30 s instead of a few minutes.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads the executor will use.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Profile file (default hwprofiles/<host>-<gpu>.yaml).")] = None,
) -> None:
    """Measure this machine (link, accelerator, host) and write a hardware profile."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from .hardware import save_profile
    from .hwtable import profile_table
    check_out_path(out)
    try:
        from executor.profiler import default_profile_path, profile_machine
    except ImportError as exc:
        raise OffplanError(f"offplan profile needs the [run] extra (pip install 'offplan[run]'): {exc.name} is missing")
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("profiling", total=1.0)

        def progress(step: str, fraction: float) -> None:
            bar.update(task, description=step, completed=fraction)
        measured = profile_machine(quick=quick, threads=threads, progress=progress)
    path = out or default_profile_path(measured)
    save_profile(measured, path)
    console.print(profile_table(measured))
    console.print(f"profile written to [bold]{path}[/]; use it with `offplan solve MODEL --hw {path}`")


@app.command()
def acceptance(
    target: Annotated[Path, typer.Option("--target", help="Target model checkpoint directory.")],
    draft: Annotated[Path, typer.Option("--draft", help="Draft model checkpoint directory.")],
    prompts: Annotated[Path, typer.Option("--prompts", help="One prompt per line: token ids, or JSON "
                                                            '{"tokens": [...]}.')],
    gamma: Annotated[int, typer.Option("--gamma", help="Draft length.")] = 4,
    gen: GenOpt = 64,
) -> None:
    """Measure the per-token acceptance rate of a draft for a target on a prompt file."""
    if gamma < 1 or (gen or 0) < 2:
        raise OffplanError("--gamma must be at least 1 and --gen at least 2")
    try:
        import torch
        from executor.speculative import load_prompts, measure_acceptance
        from executor.weights import load_checkpoint
    except ImportError as exc:
        raise OffplanError(f"offplan acceptance needs the [run] extra (pip install 'offplan[run]'): {exc.name} is missing")
    with console.status("loading models...", spinner="dots") as status:
        target_spec, target_model = load_checkpoint(target)
        draft_spec, draft_model = load_checkpoint(draft)
        token_lists = load_prompts(prompts, vocab=target_spec.vocab)
        status.update(f"speculative decoding of {len(token_lists)} prompts")
        rate, per_step = measure_acceptance(target_model, draft_model,
                                            [torch.tensor(t).unsqueeze(0) for t in token_lists], gamma, gen)
    console.print(f"acceptance of {draft_spec.name} for {target_spec.name}: [bold]{rate:.3f}[/] per token; "
                  f"{per_step:.2f} tokens per verify step at gamma {gamma} ({len(token_lists)} prompts)")
    console.print(f"use it with: offplan solve MODEL --acceptance {draft_spec.name}={rate:.3f}")


@app.command()
def sensitivity(
    source: Annotated[str, typer.Argument(help="Checkpoint directory; with --synthetic a model file or preset.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Write the rank table (ranks.yaml).")],
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Random weights of the model's shape.")] = False,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Prompt file (token ids per line) "
                                                                              "for activation-aware tables.")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Quantization bits (4 or 8).")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Weights per scale group.")] = None,
    ranks: Annotated[str, typer.Option("--ranks", help="Comma-separated ranks to tabulate.")] = "0,8,16,32,64,128",
) -> None:
    """Measure, per weight matrix, the quantization error left at each compensation rank."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from .ranks import save_rank_table
    check_out_path(out)
    try:
        rank_list = sorted({int(r) for r in ranks.split(",") if r.strip()})
    except ValueError:
        raise OffplanError(f"--ranks {ranks!r}: write whole numbers separated by commas, e.g. 0,8,16,32") from None
    if not rank_list or rank_list[0] < 0:
        raise OffplanError(f"--ranks {ranks!r}: need at least one rank, none negative")
    try:
        import torch
        from executor.sensitivity import random_prompts, sensitivity as measure, synthetic_sensitivity
        from executor.speculative import load_prompts
        from executor.weights import load_checkpoint
    except ImportError as exc:
        raise OffplanError(f"offplan sensitivity needs the [run] extra (pip install 'offplan[run]'): {exc.name} is missing")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
        task = bar.add_task("quantizing and factorising", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)
        if synthetic:
            spec = load_model(source).spec
            q = spec.quantization
            table = synthetic_sensitivity(spec, rank_list, bits or (q.bits if q else 4),
                                          group_size or (q.group_size if q else 128), progress=progress)
        else:
            spec, model = load_checkpoint(source, dtype="fp32")
            prompts = ([torch.tensor(t).unsqueeze(0) for t in load_prompts(calibration, vocab=spec.vocab)]
                       if calibration else random_prompts(spec.vocab))
            table = measure(model, spec, bits or 4, group_size or 128, rank_list, prompts, progress=progress)
    save_rank_table(table, out)
    console.print(f"rank table of {len(table.tensors)} matrices ({table.method}) written to [bold]{out}[/]; use it "
                  f"with `offplan solve MODEL --quality max --rank-table {out}`")


@app.command()
def simulate(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `offplan solve --out`.", metavar="PLAN")],
    hw: Annotated[Optional[str], typer.Option("--hw", help="Replay the same placement on another profile.")] = None,
    vram: VramOpt = None, ram: RamOpt = None, host_bw: HostBwOpt = None,
    buffers: Annotated[int, typer.Option("--buffers", help="Prefetch buffer slots.")] = 2,
    prefetch: Annotated[str, typer.Option("--prefetch", help="next-streamed (the executor's engine) or "
                                                            "next-stage (the ILP's model).")] = "next-streamed",
    chunk: Annotated[str, typer.Option("--chunk", help="Weight copies in pieces of this size (the executor's "
                                                       "4MiB; 0 = whole tensors).")] = "4MiB",
    trace: Annotated[Optional[Path], typer.Option("--trace", help="Write a Chrome/Perfetto trace of the workload.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Replay a plan as events on accelerator, link and CPU: Gantt of one decode step + summary."""
    from .gantt import gantt, summary_table
    from .plan import load_plan
    from .simulate import simulate_plan
    from .trace import decode_step_events, whole_workload_events, workload_metadata, write_trace
    from .units import parse_bytes
    check_out_path(trace)
    plan = load_plan(plan_file)
    profile = load_hardware(hw, vram, ram, host_bw) if hw else None
    if profile is None and (vram or ram or host_bw):
        from .hardware import with_overrides
        profile = with_overrides(plan.profile, parse_bytes(vram, "--vram") if vram else None,
                                 parse_bytes(ram, "--ram") if ram else None, host_bw)
    result = simulate_plan(plan, profile, buffers=buffers, prefetch=prefetch,
                           copy_chunk_bytes=parse_bytes(chunk, "--chunk") if chunk not in ("0", "") else 0)
    if trace is not None:
        write_trace(trace, whole_workload_events(result, plan), workload_metadata(result, plan))
    if json_out:
        print_json({"decode_step_s": result.decode_step_s, "prefill_s": result.prefill_s,
                    "ilp_decode_step_s": result.ilp_decode_step_s, "ilp_prefill_s": result.ilp_prefill_s,
                    "busy_fraction": result.busy_fraction, "decode_bound": result.decode_bound,
                    "per_stage_diff_s": dict(result.per_stage_diff_s)})
        return
    name = (profile or plan.profile).name
    console.print(gantt(decode_step_events(result), width=min(console.width, 120),
                        title=f"one decode step of {plan.model.name} on {name}"))
    console.print(summary_table(result))
    if trace is not None:
        console.print(f"trace written to [bold]{trace}[/]: open it in chrome://tracing or https://ui.perfetto.dev")


@app.command("compare")
def compare_hardware(
    model: Annotated[str, typer.Argument(help="model.yaml, config.json, .gguf or preset name.")],
    hw: Annotated[list[str], typer.Option("--hw", help="Profiles to compare (repeat the option).")],
    vram: VramOpt = None, ram: RamOpt = None, host_bw: HostBwOpt = None,
    prompt: PromptOpt = None, gen: GenOpt = None, batch: BatchOpt = None,
    time_limit: TimeLimitOpt = 10.0, json_out: JsonOpt = False,
) -> None:
    """Solve the best plan on each profile and compare them in one table."""
    from .errors import InfeasiblePlanError
    from .render_compare import hardware_table
    model_file = load_model(model)
    rows = []
    for name in hw:
        profile = load_hardware(name, vram, ram, host_bw)
        workload = resolve_workload(model_file, prompt, gen, batch)
        scn = Scenario(model_file.spec, profile, workload)
        try:
            with console.status(f"solving for {profile.name}...", spinner="dots") if not json_out else _nullcontext():
                solution = solve_placement(scn, SolverOptions(time_limit_s=time_limit))
            rows.append((name, profile, solution.prediction, ""))
        except InfeasiblePlanError as exc:
            rows.append((name, profile, None, str(exc)))
    if json_out:
        print_json([{"profile": p.name, "fits": pr is not None, "reason": why,
                     **({"ttft_s": pr.ttft_s, "decode_tokens_per_s": pr.decode_tokens_per_s,
                         "decode_bound": pr.bound("decode")} if pr else {}),
                     "price_usd": p.price_usd or None} for _, p, pr, why in rows])
        return
    console.print(f"[bold]{model_line(model_file.spec)}[/]")
    console.print(hardware_table(rows))
    for name, profile, _, _ in rows:
        console.print(f"  {name}: {profile.name}", highlight=False)


@hw_app.command("list")
def hw_list(json_out: JsonOpt = False) -> None:
    """The shipped profiles with their key figures."""
    from .hwtable import profiles_overview_table
    profiles = [load_profile(name) for name in shipped_profile_names()]
    if json_out:
        print_json([{"name": n, "accelerator": p.accelerator.name, "vram_bytes": p.accelerator.memory_bytes,
                     "mem_bw_gbps": p.accelerator.mem_bw_gbps, "h2d_gbps": p.link.h2d_gbps,
                     "host_memory_bytes": p.host.memory_bytes, "host_mem_bw_gbps": p.host.mem_bw_gbps,
                     "source": p.source.kind} for n, p in zip(shipped_profile_names(), profiles)])
        return
    console.print(profiles_overview_table(profiles, shipped_profile_names()))


@hw_app.command("show")
def hw_show(profile: Annotated[str, typer.Argument(help="Shipped profile name or YAML file.")],
            json_out: JsonOpt = False) -> None:
    """Print one profile as a table (measured and datasheet profiles are marked)."""
    from .hwtable import profile_table
    from .schema import to_dict
    p = load_profile(profile)
    if json_out:
        print_json(to_dict(p))
        return
    console.print(profile_table(p))


def _parse_acceptance(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        rate = float(value)
    except ValueError:
        rate = -1.0
    if not sep or not name or not 0.0 <= rate <= 1.0:
        raise OffplanError(f"--acceptance {text!r}: write NAME=RATE with RATE between 0 and 1, e.g. llama-3.2-1b=0.75")
    return name, rate


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
