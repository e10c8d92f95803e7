"""Commands for the llama.cpp runtime: `predict`, and `solve` / `compare` / `export` /
`simulate` with `--runtime llamacpp`. Thin: parse, call the library, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from planner.cli.render_fit import FitTable
from planner.cli.common import (BatchOpt, CpuCoresOpt, DramOpt, GenOpt, HostBwOpt, HwOpt, JsonOpt, PromptOpt, RamOpt,
                                VramOpt, console, err_console, load_hardware, load_model, print_json, resolve_workload)
from planner.cost.llamacpp import LlamaScenario
from planner.cost.llamacpp_tensors import types_for_ftype, types_from_gguf
from planner.errors import OffplanError
from planner.model.modelfile import ModelFile
from planner.units import fmt_bytes

CtxOpt = Annotated[Optional[int], typer.Option("--ctx", help="With --runtime llamacpp: the context (-c) to plan "
                                                          "the KV cache for; default prompt + gen.")]
QuantOpt = Annotated[Optional[str], typer.Option("--quant", help="llama.cpp file type of the weights when MODEL "
                                                                 "is not a .gguf, e.g. Q4_K_M, Q8_0, IQ4_XS.")]


def tensor_types(model: str, model_file: ModelFile, quant: str | None) -> dict[str, str]:
    """Per-tensor GGML types: the GGUF header's, or those of llama.cpp file type `quant`."""
    if quant is not None:
        return types_for_ftype(model_file.spec, quant)
    if model.endswith(".gguf") and Path(model).is_file():
        return types_from_gguf(model)
    return {}


def model_arg(model: str, quant: str | None, spec_name: str) -> str:
    if model.endswith(".gguf"):
        return model
    return f"{spec_name}-{quant}.gguf" if quant else f"{spec_name}.gguf"


def predict(
    model: Annotated[str, typer.Argument(help="A .gguf file, model.yaml, HF config.json or a preset name.")],
    hw: HwOpt,
    llamacpp: Annotated[str, typer.Option("--llamacpp", help="llama.cpp flags to score, e.g. \"-ngl 30 -ot "
                                                             "'ffn_.*_exps=CPU' -c 8192 -nkvo\".")],
    vram: VramOpt = None, ram: RamOpt = None, host_bw: HostBwOpt = None,
    dram: DramOpt = None, cpu_cores: CpuCoresOpt = None,
    prompt: PromptOpt = None, gen: GenOpt = None, batch: BatchOpt = None,
    quant: QuantOpt = None, json_out: JsonOpt = False,
) -> None:
    """Predict llama.cpp's speed and memory for the given flags (llama-bench's pp and tg)."""
    from planner.solve.llamacpp_predict import predict_llamacpp
    model_file = load_model(model)
    profile = load_hardware(hw, vram, ram, host_bw, dram, cpu_cores)
    workload = resolve_workload(model_file, prompt, gen, batch)
    types = tensor_types(model, model_file, quant)
    forecast = predict_llamacpp(model_file.spec, profile, workload, llamacpp, types)
    if not types and model_file.spec.quantization is None and not json_out:
        err_console.print(f"note: weights priced as {model_file.spec.dtype}; give a .gguf or --quant "
                          "(e.g. Q4_K_M) for a quantized file", highlight=False)
    if json_out:
        print_json(forecast.as_json())
        return
    for note in forecast.notes:
        err_console.print(f"note: {note}", highlight=False)
    scn, pr = forecast.scenario, forecast.prediction
    console.print(f"[bold]{scn.spec.name}[/] on {profile.name}", highlight=False)
    console.print(f"llama.cpp {llamacpp}", highlight=False)
    console.print(forecast_table(scn, pr, forecast.prefill_tok_s, forecast.decode_tok_s))
    if not forecast.fits:
        where = "GPU" if not pr.vram.fits else "host"
        console.print(f"[bold red]does not fit[/]: {where} memory over by "
                      f"{fmt_bytes(_over(pr.vram if where == 'GPU' else pr.host))}", highlight=False)


def _over(mem) -> int:
    return mem.used_bytes - mem.capacity_bytes


def forecast_table(scn: LlamaScenario, pr, pp_tok_s: float, tg_tok_s: float) -> FitTable:
    wl = scn.workload
    t = Table(title="predicted (llama-bench's meaning)", title_justify="left")
    t.add_column("test", no_wrap=True)
    t.add_column("tok/s", justify="right", no_wrap=True)
    t.add_column("bound by")
    t.add_row(f"pp{wl.prompt}" + (f" x{wl.batch}" if wl.batch > 1 else ""), f"{pp_tok_s:,.1f}", pr.bound("prefill"))
    t.add_row(f"tg{wl.gen} (after the prompt)", f"{tg_tok_s:,.2f}", pr.bound("decode"))
    if scn.has_gpu:
        t.add_row("GPU memory", f"{fmt_bytes(pr.vram.used_bytes)} of {fmt_bytes(pr.vram.capacity_bytes)}",
                  "fits" if pr.vram.fits else "over")
    t.add_row("host memory", f"{fmt_bytes(pr.host.used_bytes)} of {fmt_bytes(pr.host.capacity_bytes)}",
              "fits" if pr.host.fits else "over")
    return FitTable(t)


def baselines_table(rows) -> FitTable:
    """Flags are folded, never shortened: they are meant to be copied."""
    t = Table(title="llama.cpp choices, same cost model", title_justify="left")
    t.add_column("choice", no_wrap=True)
    t.add_column("flags", overflow="fold")
    for name in ("pp tok/s", "tg tok/s", "GPU mem"):
        t.add_column(name, justify="right", no_wrap=True)
    for name, note, pred, pp in rows:
        if pred is None:
            t.add_row(name, note, "-", "-", "-")
        else:
            t.add_row(name, note, f"{pp:,.1f}", f"{pred.decode_tokens_per_s:,.2f}", fmt_bytes(pred.vram.used_bytes))
    return FitTable(t)


def solve_llamacpp_command(model: str, model_file: ModelFile, profile, workload, quant: str | None, compare: bool,
                           out: Path | None, json_out: bool, options, ctx: int | None = None) -> None:
    from planner.plan.llamacpp_command import ollama_lines
    from planner.plan.llamacpp_plan import make_llamacpp_plan
    from planner.plan.record import save_plan
    from planner.solve.llamacpp_solve import solve_for_llamacpp
    from planner.cost.llamacpp import LlamaCppSettings
    if ctx is not None and ctx < workload.context:
        raise OffplanError(f"--ctx {ctx}: must hold the prompt and the generated tokens ({workload.context})")
    scn = LlamaScenario(model_file.spec, profile, workload, LlamaCppSettings(ctx=ctx or 0),
                        tensor_types(model, model_file, quant))
    result = solve_for_llamacpp(scn, options, model_arg(model, quant, model_file.spec.name), compare)
    sol, cmd = result.solution, result.command
    if out is not None:
        save_plan(make_llamacpp_plan(scn, sol.placement, "ilp", sol.prediction, sol.solver, sol.status,
                                     sol.solve_time_s, sol.objective_s), out)
    pr = sol.prediction
    pp, tg = result.prefill_tok_s(pr), pr.decode_tokens_per_s
    fit = result.fit
    if json_out:
        print_json({"runtime": "llamacpp", "model": scn.spec.name, "profile": profile.name,
                    "command": cmd.line(), "args": list(cmd.args), "ngl": cmd.ngl, "n_cpu_moe": cmd.n_cpu_moe,
                    "nkvo": cmd.nkvo, "ollama": ollama_lines(cmd, scn.ctx_tokens), "prefill_tok_s": pp,
                    "decode_tok_s": tg, "fits": pr.fits, "accelerator_bytes": pr.vram.used_bytes,
                    "host_bytes": pr.host.used_bytes, "bound_by": pr.bound("decode"), "solver": sol.solver,
                    "status": sol.status, "fit_choice": fit.note, "speedup_over_fit": result.speedup_over_fit,
                    "baselines": [{"name": b.name, "flags": b.note, "fits": b.prediction is not None,
                                   **({"prefill_tok_s": result.prefill_tok_s(b.prediction),
                                       "decode_tok_s": b.prediction.decode_tokens_per_s}
                                      if b.prediction else {})} for b in result.baselines]})
        return
    console.print(f"[bold]{scn.spec.name}[/] for llama.cpp on {profile.name}; batch {workload.batch}, "
                  f"prompt {workload.prompt}, generate {workload.gen}", highlight=False)
    console.print(f"solved with {sol.solver} in {sol.solve_time_s:.2f} s ({sol.status}; {sol.n_variables} variables)",
                  highlight=False)
    if model_file.drafts:
        err_console.print("note: draft candidates in the model file are not planned for llama.cpp", highlight=False)
    console.print(forecast_table(scn, pr, pp, tg))
    console.print("run it with:", highlight=False)
    console.print(f"  {cmd.line()}", highlight=False, soft_wrap=True)
    for line in ollama_lines(cmd, scn.ctx_tokens):
        console.print(f"  Ollama Modelfile: {line}", highlight=False)
    if fit.prediction is None:
        console.print(f"llama.cpp --fit: {fit.note}", highlight=False)
    else:
        gain = result.speedup_over_fit - 1.0
        fit_pp, fit_tg = result.prefill_tok_s(fit.prediction), fit.prediction.decode_tokens_per_s
        console.print(f"vs llama.cpp --fit ({fit.note}): {gain:+.1%} overall; pp {fit_pp:,.1f} -> {pp:,.1f} tok/s, "
                      f"tg {fit_tg:,.2f} -> {tg:,.2f} tok/s", highlight=False)
    if compare:
        rows = [("offplan", "the command above", pr, pp)]
        rows += [(b.name, b.note, b.prediction, result.prefill_tok_s(b.prediction) if b.prediction else 0.0)
                 for b in result.baselines]
        console.print(baselines_table(rows))
    if out is not None:
        console.print(f"plan written to [bold]{out}[/]")


def export_llamacpp_text(plan) -> tuple[str, list[str]]:
    """`export --runtime llamacpp`: the llama-server line (and Ollama lines), notes with the
    predicted llama.cpp figures for it."""
    from planner.cost.llamacpp import evaluate_llamacpp
    from planner.plan.llamacpp_command import llamacpp_command, ollama_lines
    from planner.plan.llamacpp_plan import llamacpp_export
    scn, lp, notes = llamacpp_export(plan)
    cmd = llamacpp_command(scn, lp, f"{plan.model.name}.gguf")
    pred = evaluate_llamacpp(scn, lp)
    wl = scn.workload
    notes.append(f"predicted for llama.cpp: pp{wl.prompt} {wl.batch * wl.prompt / pred.prefill_s:,.1f} tok/s, "
                 f"tg{wl.gen} {pred.decode_tokens_per_s:,.2f} tok/s; GPU {fmt_bytes(pred.vram.used_bytes)} of "
                 f"{fmt_bytes(pred.vram.capacity_bytes)}")
    lines = [cmd.line()] + [f"# Ollama Modelfile: {line}" for line in ollama_lines(cmd, scn.ctx_tokens)]
    return "\n".join(lines) + "\n", notes


def simulate_llamacpp(plan, profile, json_out: bool) -> None:
    """`simulate --runtime llamacpp`: llama.cpp runs each step after the other, so its timeline
    is the per-stage sum; shown stage by stage with the resource each spends."""
    from planner.cost.llamacpp import evaluate_llamacpp
    from planner.plan.llamacpp_plan import llama_scenario
    from planner.cost.llamacpp_place import from_placement
    scn = llama_scenario(plan, profile)
    lp, notes = from_placement(scn, plan.placement)
    pred = evaluate_llamacpp(scn, lp)
    if json_out:
        print_json({"runtime": "llamacpp", "decode_step_s": pred.decode_step_s, "prefill_s": pred.prefill_s,
                    "decode_bound": pred.bound("decode"), "prefill_bound": pred.bound("prefill"),
                    "stages": [{"name": s.name, "decode_s": s.decode_s, "prefill_s": s.prefill_s,
                                "gpu_s": s.decode_path.acc_s, "cpu_s": s.decode_path.cpu_s,
                                "switch_s": s.decode_path.xfer_s} for s in pred.stages], "notes": notes})
        return
    for note in notes:
        err_console.print(f"note: {note}", highlight=False)
    t = Table(title=f"llama.cpp, one decode step of {plan.model.name} (steps run in sequence)",
              title_justify="left")
    for name in ("stage", "GPU ms", "CPU ms", "switch ms", "prefill ms"):
        t.add_column(name, justify="left" if name == "stage" else "right")
    for s in pred.stages:
        p = s.decode_path
        t.add_row(s.name, f"{p.acc_s * 1e3:.3f}", f"{p.cpu_s * 1e3:.3f}", f"{p.xfer_s * 1e3:.3f}",
                  f"{s.prefill_s * 1e3:.1f}")
    console.print(t)
    console.print(f"decode step {pred.decode_step_s * 1e3:.2f} ms ({pred.decode_tokens_per_s:,.2f} tok/s, bound by "
                  f"{pred.bound('decode')}); prefill {pred.prefill_s:.3f} s", highlight=False)


def solve_llamacpp_rows(model_file: ModelFile, names: list[str], load, workload_for, options) -> list:
    """`compare --runtime llamacpp`: the fastest llama.cpp placement on each profile."""
    from planner.errors import InfeasiblePlanError
    from planner.solve.llamacpp_ilp import solve_llamacpp
    rows = []
    for name in names:
        profile = load(name)
        scn = LlamaScenario(model_file.spec, profile, workload_for(model_file))
        try:
            rows.append((name, profile, solve_llamacpp(scn, options).prediction, ""))
        except InfeasiblePlanError as exc:
            rows.append((name, profile, None, str(exc)))
    return rows
