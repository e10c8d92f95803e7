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
) -> None:
    """Find the fastest placement that fits, and say why."""
    check_out_path(out)
    model_file = load_model(model)
    profile = load_hardware(hw, vram, ram, host_bw)
    workload = resolve_workload(model_file, prompt, gen, batch)
    scn = Scenario(model_file.spec, profile, workload)
    tables = option_tables(scn)
    with console.status("solving placement ILP...", spinner="dots") if not json_out else _nullcontext():
        solution = solve_placement(scn, SolverOptions(time_limit_s=time_limit, solver=solver), tables)
    plan = make_plan(scn, solution.placement, "ilp", solution.prediction, solution.solver, solution.status,
                     solution.solve_time_s, solution.objective_s)
    baselines = run_baselines(scn, tables) if compare else None
    if out is not None:
        save_plan(plan, out)
    if json_out:
        print_json(plan_json(plan, baselines))
        return
    console.print(f"[bold]{model_line(plan.model)}[/]")
    console.print(f"on {profile.name}; batch {workload.batch}, prompt {workload.prompt}, generate {workload.gen}")
    console.print(f"solved with {solution.solver} in {fmt_seconds(solution.solve_time_s)} ({solution.status}; "
                  f"{solution.n_variables} variables)")
    console.print(placement_table(plan))
    console.print(memory_table(plan))
    console.print(speed_table(plan))
    if baselines is not None:
        console.print(compare_table(plan, baselines))
    if out is not None:
        console.print(f"plan written to [bold]{out}[/]")


@app.command()
def run(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `offplan solve --out`.", metavar="PLAN")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Hugging Face safetensors directory.")] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Random weights of the planned shape.")] = False,
    prompt: PromptOpt = None, gen: GenOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of synthetic weights and prompts.")] = 0,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
    profile_layers: Annotated[bool, typer.Option("--profile-layers", help="Time every stage.")] = False,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON.")] = None,
) -> None:
    """Execute a plan with PyTorch; compare measured with predicted speed."""
    from .plan import load_plan
    from .render_run import comparison_table, stage_table
    from .schema import atomic_write
    check_out_path(json_file)
    if checkpoint is not None and synthetic:
        raise OffplanError("--checkpoint and --synthetic: give one of them")
    plan = load_plan(plan_file)
    try:
        from executor.run import RunOptions, run_plan
    except ImportError as exc:
        raise OffplanError(f"offplan run needs the [run] extra (pip install 'offplan[run]'): {exc.name} is missing")
    options = RunOptions(checkpoint=checkpoint, synthetic=synthetic, seed=seed, prompt=prompt, gen=gen,
                         threads=threads, profile_layers=profile_layers)
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
    console.print(profiles_overview_table(profiles))


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


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
