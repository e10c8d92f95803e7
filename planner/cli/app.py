"""The `offplan` command line: thin commands over the library, rich output."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from planner.cli.common import (BatchOpt, CpuCoresOpt, DramOpt, GenOpt, HostBwOpt, HwOpt, JsonOpt, PromptOpt, RamOpt,
                         RuntimeOpt, SolverOpt, TimeLimitOpt,
                         VramOpt, check_out_path, console, load_hardware, load_model, load_plan_file, print_json,
                         resolve_workload,
                         run_app)
from planner.cli.help import OffplanGroup, offplan_version
from planner.cli.llamacpp_cmds import CtxOpt, QuantOpt, predict, solve_llamacpp_command
from planner.cost.runtime import runtime_named
from planner.cli.run_cmds import acceptance, profile, routing, run, sensitivity
from planner.hardware.profile import load_profile, shipped_profile_names
from planner.solve.ilp import SolverOptions
from planner.plan.record import save_plan
from planner.cli.render import model_line, plan_json, render_solve
from planner.errors import OffplanError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=OffplanGroup,
                  help="Plan and run LLMs on a GPU that is too small for them.")
hw_app = typer.Typer(no_args_is_help=True, cls=OffplanGroup, help="Hardware profiles: list the shipped ones, show one.")
app.add_typer(hw_app, name="hw")


def _routing(path: Path | None, model_file, runtime: str, no_draft: bool) -> dict | None:
    """The routing table of `solve --routing`, checked against the model."""
    if path is None:
        return None
    if runtime_named(runtime).name == "llamacpp":
        raise OffplanError("--routing: llama.cpp keeps a layer's experts together, so which experts are used "
                           "does not change its plan; use it with --runtime offplan")
    if model_file.drafts and not no_draft:
        raise OffplanError("--routing: not combined with the model file's draft candidates yet; add --no-draft")
    from planner.model.routing import load_routing
    return load_routing(path, model_file.spec).layers


def _print_version(value: bool) -> None:
    if value:
        console.print(f"offplan {offplan_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                                   callback=_print_version)] = False) -> None:
    """Plan and run LLMs on a GPU that is too small for them."""


@app.command()
def solve(
    model: Annotated[str, typer.Argument(help="model.yaml, HF config.json (or its directory), .gguf, or a preset name.")],
    hw: HwOpt,
    vram: VramOpt = None, ram: RamOpt = None, host_bw: HostBwOpt = None,
    dram: DramOpt = None, cpu_cores: CpuCoresOpt = None,
    prompt: PromptOpt = None, gen: GenOpt = None, batch: BatchOpt = None,
    runtime: RuntimeOpt = "offplan", quant: QuantOpt = None, ctx: CtxOpt = None,
    compare: Annotated[bool, typer.Option("--compare", help="Also score what accelerate / llama.cpp / "
                                                             "stream-all would pick (with --runtime llamacpp: "
                                                             "--fit, largest -ngl, smallest --n-cpu-moe).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the plan as YAML.")] = None,
    json_out: JsonOpt = False,
    time_limit: TimeLimitOpt = 10.0,
    solver: SolverOpt = "auto",
    no_draft: Annotated[bool, typer.Option("--no-draft", help="Ignore the model file's draft candidates.")] = False,
    accept: Annotated[list[str], typer.Option("--acceptance", metavar="NAME=RATE",
                                              help="Measured acceptance of a draft (repeat; see "
                                                   "`offplan acceptance`).")] = [],
    quality: Annotated[Optional[str], typer.Option("--quality", help="Quantized models: 'max' (recover the most "
                       "error within --slack of the fastest plan) or R in 0..1 (fastest plan recovering R).")] = None,
    slack: Annotated[float, typer.Option("--slack", help="With --quality max: allowed slow-down, 0.02 = 2%.")] = 0.02,
    rank_table: Annotated[Optional[Path], typer.Option("--rank-table", help="ranks.yaml from `offplan "
                                                                            "sensitivity`.")] = None,
    routing_file: Annotated[Optional[Path], typer.Option("--routing", help="MoE models: routing.yaml from "
                                                                           "`offplan routing`.")] = None,
) -> None:
    """Find the fastest placement that fits (and the best draft model), and say why."""
    check_out_path(out, "--out", {"MODEL": model, "--hw": hw, "--rank-table": rank_table, "--routing": routing_file})
    model_file = load_model(model)
    routing = _routing(routing_file, model_file, runtime, no_draft)
    profile = load_hardware(hw, vram, ram, host_bw, dram, cpu_cores)
    workload = resolve_workload(model_file, prompt, gen, batch)
    if runtime_named(runtime).name == "llamacpp":
        return solve_llamacpp_command(model, model_file, profile, workload, quant, compare, out, json_out,
                                      SolverOptions(time_limit_s=time_limit, solver=solver), ctx)
    if not profile.accelerator.present:
        raise OffplanError(f"--hw {hw}: a machine without a GPU; offplan's executor needs one (or the loopback "
                           "profile from `offplan profile`): plan a CPU-only llama.cpp run with --runtime llamacpp")
    from planner.solve.entry import SolveRequest, solve_model
    from planner.solve.quality import parse_quality
    quality_mode, quality_value = parse_quality(quality)
    if accept and (no_draft or not model_file.drafts):
        raise OffplanError("--acceptance: " + ("--no-draft ignores the drafts" if no_draft else
                           f"{model} lists no draft models (add `drafts:` to the model file)"))
    request = SolveRequest(
        model_file, profile, workload,
        SolverOptions(time_limit_s=time_limit, solver=solver, quality=quality_value, quality_mode=quality_mode,
                      slack=slack),
        drafts=not no_draft, acceptance=dict(_parse_acceptance(a) for a in accept),
        rank_table=rank_table, compare=compare, routing=routing)
    if json_out:
        result = solve_model(request)
    else:
        what = "searching drafts x draft lengths..." if model_file.drafts and not no_draft else "solving placement ILP..."
        with console.status(what, spinner="dots") as status:
            result = solve_model(replace(request, progress=lambda line: status.update(line)))
    if out is not None:
        save_plan(result.plan, out)
    if json_out:
        print_json(plan_json(result.plan, result.baselines))
        return
    render_solve(console, result)
    if out is not None:
        console.print(f"plan written to [bold]{out}[/]")


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
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="llamacpp: the plan as llama.cpp would run it "
                                                                     "(default for llama.cpp plans).")] = None,
) -> None:
    """Replay a plan as events on accelerator, link and CPU: Gantt of one decode step + summary."""
    from planner.cli.render_gantt import gantt, summary_table
    from planner.simulate.engine import simulate_plan
    from planner.simulate.trace import decode_step_events, whole_workload_events, workload_metadata, write_trace
    from planner.units import parse_bytes
    check_out_path(trace, "--trace", {"PLAN": plan_file, "--hw": hw})
    plan = load_plan_file(plan_file)
    profile = load_hardware(hw, vram, ram, host_bw) if hw else None
    if (runtime_named(runtime).name == "llamacpp") if runtime else plan.runtime == "llamacpp":
        from planner.cli.llamacpp_cmds import simulate_llamacpp
        return simulate_llamacpp(plan, profile, json_out)
    if profile is None and (vram or ram or host_bw):
        from planner.hardware.profile import with_overrides
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
    time_limit: TimeLimitOpt = 10.0, json_out: JsonOpt = False, runtime: RuntimeOpt = "offplan",
) -> None:
    """Solve the best plan on each profile and compare them in one table."""
    from planner.errors import InfeasiblePlanError, SolverStoppedError
    from planner.cli.render_compare import hardware_table
    model_file = load_model(model)
    rows = []
    if runtime_named(runtime).name == "llamacpp":
        from planner.cli.llamacpp_cmds import solve_llamacpp_rows
        rows = solve_llamacpp_rows(model_file, hw, lambda n: load_hardware(n, vram, ram, host_bw),
                                   lambda m: resolve_workload(m, prompt, gen, batch),
                                   SolverOptions(time_limit_s=time_limit))
        hw = []
    from planner.solve.entry import SolveRequest, solve_model
    for name in hw:
        profile = load_hardware(name, vram, ram, host_bw)
        request = SolveRequest(model_file, profile, resolve_workload(model_file, prompt, gen, batch),
                               SolverOptions(time_limit_s=time_limit), drafts=False)
        try:
            with console.status(f"solving for {profile.name}...", spinner="dots") if not json_out else _nullcontext():
                solution = solve_model(request).solution
            rows.append((name, profile, solution.prediction, ""))
        except SolverStoppedError as exc:  # nothing is known about fitting: not a "no" row
            raise SolverStoppedError(f"--hw {name}: {exc}") from None
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


app.command()(predict)
app.command()(run)
app.command()(profile)
app.command()(acceptance)
app.command()(sensitivity)
app.command()(routing)


@app.command()
def export(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `offplan solve --out`.", metavar="PLAN")],
    to: Annotated[str, typer.Option("--to", help="llamacpp (flags), hf (device_map JSON), ktransformers (MoE "
                                                 "flags of SGLang-KT) or json (the plan).")] = "llamacpp",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write to a file instead of stdout.")] = None,
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="llamacpp: a llama-server command line for "
                       "the nearest llama.cpp placement, with its predicted speed (default for plans solved "
                       "with --runtime llamacpp).")] = None,
) -> None:
    """Translate a plan for other runtimes (what they cannot express is said on stderr)."""
    import shlex
    from planner.cli.common import err_console
    from planner.plan.export import hf_device_map, llamacpp_args, plan_json
    from planner.schema import atomic_write
    check_out_path(out, "--out", {"PLAN": plan_file})
    plan = load_plan_file(plan_file)
    llama_runtime = runtime_named(runtime).name == "llamacpp" if runtime else plan.runtime == "llamacpp"
    if to == "llamacpp" and llama_runtime:
        from planner.cli.llamacpp_cmds import export_llamacpp_text
        text, notes = export_llamacpp_text(plan)
    elif to == "llamacpp":
        args, notes = llamacpp_args(plan)
        text = " ".join(shlex.quote(a) for a in args) + "\n"
    elif to == "hf":
        device_map, notes = hf_device_map(plan)
        text = json.dumps(device_map, indent=1) + "\n"
    elif to == "ktransformers":
        from planner.plan.export_moe import ktransformers_args
        args, notes = ktransformers_args(plan)
        text = " ".join(shlex.quote(a) for a in args) + "\n"
    elif to == "json":
        text, notes = plan_json(plan) + "\n", []
    else:
        raise OffplanError(f"--to {to!r}: choose llamacpp, hf, ktransformers or json")
    for note in notes:
        err_console.print(f"note: {note}", highlight=False)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write(out, text)
        console.print(f"written to [bold]{out}[/]")


@hw_app.command("list")
def hw_list(json_out: JsonOpt = False) -> None:
    """The shipped profiles with their key figures."""
    from planner.cli.render_hw import profiles_overview_table
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
    from planner.cli.render_hw import profile_table
    from planner.schema import to_dict
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
