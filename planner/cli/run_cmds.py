"""Commands that execute on this machine and need the [run] extra (torch): run, profile,
acceptance, sensitivity. Registered on the `offplan` app by planner/cli/app.py; torch is imported
inside each command so `offplan solve` never loads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from planner.cli.common import (GenOpt, PromptOpt, ThreadsOpt, check_out_path, check_writable_dir, console,
                                 err_console, load_model, load_plan_file)
from planner.errors import OffplanError
from planner.cli.render import model_line
from planner.units import error_pct, fmt_bytes, fmt_seconds


def run(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `offplan solve --out`.", metavar="PLAN")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Hugging Face safetensors directory.")] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Random weights of the planned shape.")] = False,
    draft_checkpoint: Annotated[Optional[Path], typer.Option("--draft-checkpoint",
                                                             help="Checkpoint of the plan's draft model.")] = None,
    prompt: PromptOpt = None, gen: GenOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of synthetic weights and prompts.")] = 0,
    threads: ThreadsOpt = None,
    profile_layers: Annotated[bool, typer.Option("--profile-layers", help="Time every stage.")] = False,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON.")] = None,
    trace: Annotated[Optional[Path], typer.Option("--trace", help="Write the measured timeline as a "
                                                                  "Chrome/Perfetto trace.")] = None,
) -> None:
    """Execute a plan with PyTorch; compare measured with predicted speed."""
    from planner.cli.render_run import comparison_table, stage_table
    from planner.schema import atomic_write
    inputs = {"PLAN": plan_file, "--checkpoint": checkpoint, "--draft-checkpoint": draft_checkpoint}
    check_out_path(json_file, "--json", inputs)
    check_out_path(trace, "--trace", {**inputs, "--json": json_file})
    if checkpoint is not None and synthetic:
        raise OffplanError("--checkpoint and --synthetic: give one of them")
    plan = load_plan_file(plan_file)
    try:
        from executor.run import RunOptions, run_plan
    except ModuleNotFoundError as exc:
        raise missing_run_extra("run", exc) from None
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
    else:
        console.print("accelerator memory: peak reserved by PyTorch plus what the card holds outside it "
                      "(context, other processes), against the plan plus its reserve")
    if m.host_page_locked_bytes:
        console.print(f"host memory for the link: {fmt_bytes(m.host_page_locked_bytes)} "
                      f"({'page-locked' if not m.accelerator_peak_is_accounted else 'page-locked on CUDA'}: "
                      "streamed weights and activation staging)")
    if m.stages:
        console.print(stage_table(m.stages))
    if trace is not None:
        from planner.simulate.trace import write_trace
        write_trace(trace, list(m.events), {"source": "measured", "model": plan.model.name, "device": report.device,
                                            "workload": vars(wl)})
        console.print(f"measured trace written to [bold]{trace}[/] ({len(m.events)} events): open it in "
                      "chrome://tracing or https://ui.perfetto.dev")
    if json_file is not None:
        atomic_write(json_file, json.dumps(run_report_json(report), indent=2) + "\n")
        console.print(f"report written to [bold]{json_file}[/]")


def run_report_json(report) -> dict:
    from planner.schema import to_dict
    m = report.measured
    return {
        "model": report.plan.model.name, "profile": report.plan.profile.name, "device": report.device,
        "workload": vars(report.workload),
        "comparisons": [{"metric": n, "predicted": p, "measured": v, "unit": u,
                         "error_pct": error_pct(p, v)} for n, p, v, u in report.comparisons()],
        "measured": {k: v for k, v in to_dict(m).items() if k not in ("events",)},
        "predicted": to_dict(report.predicted),
    }


def profile(
    quick: Annotated[bool, typer.Option("--quick", help="Fewer sizes and repeats than the full run.")] = False,
    threads: ThreadsOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Profile file (default hwprofiles/<host>-<gpu>.yaml).")] = None,
) -> None:
    """Measure this machine (link, accelerator, host) and write a hardware profile."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from planner.hardware.profile import save_profile
    from planner.cli.render_hw import profile_table
    check_out_path(out, "--out")
    if out is None:  # the default, hwprofiles/<host>-<gpu>.yaml, is named after measuring
        default_dir = Path("hwprofiles")
        check_writable_dir(default_dir if default_dir.is_dir() else Path.cwd(),
                           "profile (writes to hwprofiles/ by default; give --out FILE)")
    try:
        from executor.profiler import busy_note, default_profile_path, profile_machine
    except ModuleNotFoundError as exc:
        raise missing_run_extra("profile", exc) from None
    busy = busy_note(threads)
    if busy:
        err_console.print(f"[bold yellow]warning:[/] {busy}", highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("profiling", total=1.0)

        def progress(step: str, fraction: float) -> None:
            bar.update(task, description=step, completed=fraction)
        measured = profile_machine(quick=quick, threads=threads, progress=progress)
    path = out or default_profile_path(measured)
    save_profile(measured, path)
    console.print(profile_table(measured))
    console.print(f"profile written to [bold]{path}[/]; use it with `offplan solve MODEL --hw {path}`")


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
        from executor.speculative import load_prompts, measure_acceptance, prompt_tensors
        from executor.weights import load_checkpoint
    except ModuleNotFoundError as exc:
        raise missing_run_extra("acceptance", exc) from None
    with console.status("loading models...", spinner="dots") as status:
        target_spec, target_model = load_checkpoint(target)
        draft_spec, draft_model = load_checkpoint(draft)
        token_lists = load_prompts(prompts, vocab=target_spec.vocab)
        status.update(f"speculative decoding of {len(token_lists)} prompts")
        rate, per_step = measure_acceptance(target_model, draft_model, prompt_tensors(token_lists), gamma, gen)
    console.print(f"acceptance of {draft_spec.name} for {target_spec.name}: [bold]{rate:.3f}[/] per token; "
                  f"{per_step:.2f} tokens per verify step at gamma {gamma} ({len(token_lists)} prompts)")
    console.print(f"use it with: offplan solve MODEL --acceptance {draft_spec.name}={rate:.3f}")


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
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from planner.model.ranks import save_rank_table
    check_out_path(out, "--out", {"SOURCE": source, "--calibration": calibration})
    try:
        rank_list = sorted({int(r) for r in ranks.split(",") if r.strip()})
    except ValueError:
        raise OffplanError(f"--ranks {ranks!r}: write whole numbers separated by commas, e.g. 0,8,16,32") from None
    if not rank_list or rank_list[0] < 0:
        raise OffplanError(f"--ranks {ranks!r}: need at least one rank, none negative")
    try:
        from executor.sensitivity import check_host_memory, random_prompts, sensitivity as measure, synthetic_sensitivity
        from executor.speculative import load_prompts, prompt_tensors
        from executor.weights import load_checkpoint
    except ModuleNotFoundError as exc:
        raise missing_run_extra("sensitivity", exc) from None
    spec = load_model(source).spec  # the shape only (config.json for a checkpoint): no weight read yet
    check_host_memory(spec, "sensitivity --synthetic" if synthetic else f"sensitivity {source}")
    if not synthetic:  # a corrupt checkpoint fails here, before any progress bar is drawn
        spec, model = load_checkpoint(source, dtype="fp32")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("left"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("quantizing and factorising", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)
        if synthetic:
            q = spec.quantization
            table = synthetic_sensitivity(spec, rank_list, bits or (q.bits if q else 4),
                                          group_size or (q.group_size if q else 128), progress=progress)
        else:
            prompts = (prompt_tensors(load_prompts(calibration, vocab=spec.vocab)) if calibration
                       else random_prompts(spec.vocab))
            table = measure(model, spec, bits or 4, group_size or 128, rank_list, prompts, progress=progress)
    save_rank_table(table, out)
    console.print(f"rank table of {len(table.tensors)} matrices ({table.method}) written to [bold]{out}[/]; use it "
                  f"with `offplan solve MODEL --quality max --rank-table {out}`")


def missing_run_extra(command: str, exc: ModuleNotFoundError) -> OffplanError:
    """`offplan run` and friends import torch lazily: a missing module means the extra is missing."""
    return OffplanError(f"offplan {command} needs the [run] extra (pip install 'offplan[run]'): "
                        f"{exc.name} is missing")


def routing(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory of a mixture-of-experts model.")],
    prompts: Annotated[Path, typer.Option("--prompts", help="One prompt per line: token ids, or JSON "
                                                            '{"tokens": [...]}.')],
    out: Annotated[Path, typer.Option("--out", "-o", help="Write the routing table (routing.yaml).")],
) -> None:
    """Count the tokens each expert of each MoE layer receives (for `solve --routing`)."""
    from planner.model.routing import save_routing
    check_out_path(out, "--out", {"CHECKPOINT": checkpoint, "--prompts": prompts})
    try:
        from executor.routing import measure_routing
        from executor.speculative import load_prompts, prompt_tensors
        from executor.weights import load_checkpoint
    except ModuleNotFoundError as exc:
        raise missing_run_extra("routing", exc) from None
    with console.status("loading the model...", spinner="dots") as status:
        spec, model = load_checkpoint(checkpoint)
        if spec.moe is None:
            raise OffplanError(f"{checkpoint}: {spec.name} has no routed experts; routing tables are for "
                               "mixture-of-experts models")
        token_lists = load_prompts(prompts, vocab=spec.vocab)
        status.update(f"routing {len(token_lists)} prompts")
        table = measure_routing(model, prompt_tensors(token_lists))
    save_routing(table, out)
    shares = [table.top_share(layer, max(spec.moe.experts // 4, 1)) for layer in table.layers]
    console.print(f"routed {table.tokens} tokens through {len(table.layers)} MoE layers; the most used quarter "
                  f"of the experts took {min(shares):.0%}-{max(shares):.0%} of each layer's routed tokens")
    console.print(f"routing table written to [bold]{out}[/]; use it with `offplan solve MODEL --routing {out}`")
