"""Turn plans and predictions into text a person can read at a glance (rich tables), and
into plain data for `--json`."""

from __future__ import annotations

from itertools import groupby

from rich.table import Table

from planner.cli.render_fit import FitTable

from planner.plan.record import MemorySummary, Plan
from planner.model.spec import ModelSpec
from planner.units import fmt_bytes, fmt_seconds

RESOURCE_WORDS = {"accelerator": "accelerator compute", "cpu": "CPU compute", "transfers": "activation transfers",
                  "link": "weight streaming (PCIe)", "memory": "host memory bandwidth"}


def _devices_phrase(names_devices: list[tuple[str, str]]) -> str:
    devices = {d for _, d in names_devices}
    if len(devices) == 1:
        return devices.pop()
    parts = []
    for device in ("gpu", "stream", "cpu"):
        names = [n.replace("_proj", "") for n, d in names_devices if d == device]
        if names:
            parts.append(f"{','.join(names)} {device}")
    return " / ".join(parts)


def layer_signature(plan: Plan, layer: int) -> str:
    """'mlp stream, attn gpu, KV 25% host' for one layer."""
    p = plan.placement
    tensors = plan.model.layer_tensors(layer)
    attn = [(t.kind, p.device(t.name)) for t in tensors if t.group == "attn"]
    mlp = [(t.kind, p.device(t.name)) for t in tensors if t.group in ("mlp", "router")]
    banks = [t for t in tensors if t.experts]
    all_devices = {d for _, d in attn + mlp}
    if len(all_devices) == 1 and not banks:
        text = f"all {all_devices.pop()}"
    elif banks and not mlp:
        text = f"attn {_devices_phrase(attn)}"
    else:
        text = f"attn {_devices_phrase(attn)}; mlp {_devices_phrase(mlp)}"
    for bank in banks:
        text += "; " + experts_phrase(plan, bank)
    streamed = [t for t in tensors if p.streams_for_prefill(t.name)]
    if streamed:
        text += " (cpu weights streamed for prefill)" if len(streamed) == sum(
            1 for t in tensors if p.device(t.name) == "cpu") else " (some cpu weights streamed for prefill)"
    c = p.kv_host_fraction[layer]
    if c > 0:
        text += f"; KV {c:.0%} host"
    by_rank: dict[int, list[str]] = {}
    for t in tensors:
        if p.rank(t.name):
            by_rank.setdefault(p.rank(t.name), []).append(t.kind.replace("_proj", ""))
    if by_rank:
        text += "; compensation " + ", ".join(f"{','.join(kinds)} rank {rank}"
                                               for rank, kinds in sorted(by_rank.items()))
    return text


def experts_phrase(plan: Plan, bank) -> str:
    """'experts: 38 of 128 on the GPU, taking 61% of routed tokens' for one layer's expert bank."""
    p = plan.placement
    if p.device(bank.name) == "stream":
        return f"experts {bank.experts} streamed"
    n = p.experts_on_gpu(bank)
    if n in (0, bank.experts):
        return f"experts {'gpu' if n else 'cpu'}"
    share = plan.routed_share(bank, n)
    return f"experts: {n} of {bank.experts} on the GPU, taking {share:.0%} of routed tokens"


def placement_ranges(plan: Plan) -> list[tuple[str, str]]:
    """Consecutive layers with the same signature merged: [('0-41', 'all gpu'), ...]."""
    rows = []
    signatures = [(i, layer_signature(plan, i)) for i in range(plan.model.layers)]
    for sig, group in groupby(signatures, key=lambda item: item[1]):
        layers = [i for i, _ in group]
        span = f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
        rows.append((span, sig))
    p = plan.placement
    rows.append(("embed", p.device("embed_tokens") + (" (tied to lm_head)" if plan.model.tied_embeddings else "")))
    rows.append(("lm_head", p.device("lm_head") + (" (streamed for prefill)" if p.streams_for_prefill("lm_head") else "")))
    return rows


def placement_table(plan: Plan) -> FitTable:
    table = Table(title="Placement", title_justify="left")
    table.add_column("layers", justify="right", style="bold", no_wrap=True)
    table.add_column("where the weights live and run")
    for span, sig in placement_ranges(plan):
        table.add_row(span, sig)
    return FitTable(table)


def memory_table(plan: Plan) -> FitTable:
    table = Table(title="Memory per device", title_justify="left")
    table.add_column("")
    table.add_column("accelerator", justify="right", no_wrap=True)
    table.add_column("host", justify="right", no_wrap=True)
    vram, host = plan.predicted.vram, plan.predicted.host
    for label, attr in (("weights", "weights_bytes"), ("KV cache", "kv_bytes"), ("buffers", "buffer_bytes"),
                        ("workspace", "workspace_bytes"), ("draft model", "draft_bytes"),
                        ("compensation", "compensation_bytes")):
        a, h = getattr(vram, attr), getattr(host, attr)
        if a or h:
            table.add_row(label, fmt_bytes(a) if a else "-", fmt_bytes(h) if h else "-")
    cells = []
    for m in (vram, host):
        used = _used(m)
        text = f"{fmt_bytes(used)} of {fmt_bytes(m.capacity_bytes)}"
        cells.append(f"[red]{text}[/]" if used > m.capacity_bytes else f"[bold]{text}[/]")
    table.add_row("[bold]used of available[/]", *cells)
    table.add_row("reserved (runtime / OS)", fmt_bytes(vram.reserve_bytes) if vram.reserve_bytes else "-",
                  fmt_bytes(host.reserve_bytes) if host.reserve_bytes else "-")
    return FitTable(table)


def _used(m: MemorySummary) -> int:
    return m.weights_bytes + m.kv_bytes + m.buffer_bytes + m.workspace_bytes + m.draft_bytes + m.compensation_bytes


def speed_table(plan: Plan) -> FitTable:
    pr = plan.predicted
    table = Table(title="Predicted speed", title_justify="left")
    table.add_column("phase")
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("rate", justify="right", no_wrap=True)
    table.add_column("bound by")
    prompt_tokens = plan.workload.batch * plan.workload.prompt
    table.add_row("prefill (time to first token)", fmt_seconds(pr.ttft_s),
                  f"{prompt_tokens / pr.prefill_s:,.0f} tok/s", _bound_text(pr.prefill_by_resource_s))
    table.add_row("decode step", fmt_seconds(pr.decode_step_s), f"{pr.decode_tokens_per_s:,.2f} tok/s",
                  _bound_text(pr.decode_by_resource_s))
    table.add_row("whole workload", fmt_seconds(pr.total_s), "", "")
    return FitTable(table)


def _bound_text(shares: dict[str, float]) -> str:
    total = sum(shares.values()) or 1.0
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    top = [f"{RESOURCE_WORDS[k]} {v / total:.0%}" for k, v in ranked if v / total >= 0.1]
    return ", ".join(top[:2])


def fmt_count(n: float) -> str:
    """7.3M, 30.5B: a parameter count in the unit that keeps it readable."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def model_line(spec: ModelSpec) -> str:
    q = spec.quantization
    weights = f"int{q.bits} g{q.group_size}" if q else spec.dtype
    if spec.weight_bits:  # a GGUF file: each tensor kind has its own type
        weights = f"{8 * spec.weight_bytes / max(spec.params, 1):.2f} bits per weight"
    active = f" ({fmt_count(spec.active_params)} active)" if spec.moe is not None else ""
    return (f"{spec.name}: {fmt_count(spec.params)} parameters{active}, {spec.layers} layers, {weights}, "
            f"{fmt_bytes(spec.weight_bytes)} of weights")


def plan_json(plan: Plan, baselines: list | None = None) -> dict:
    pr = plan.predicted
    out = {
        "model": plan.model.name, "profile": plan.profile.name, "workload": vars(plan.workload),
        "ttft_s": pr.ttft_s, "decode_step_s": pr.decode_step_s, "decode_tokens_per_s": pr.decode_tokens_per_s,
        "total_s": pr.total_s, "decode_bound": pr.decode_bound, "prefill_bound": pr.prefill_bound,
        "placement": [{"layers": span, "placement": sig} for span, sig in placement_ranges(plan)],
        "vram_used_bytes": _used(pr.vram), "vram_capacity_bytes": pr.vram.capacity_bytes,
        "host_used_bytes": _used(pr.host), "host_capacity_bytes": pr.host.capacity_bytes,
        "solver": plan.provenance.solver, "solver_status": plan.provenance.solver_status,
        "solve_time_s": plan.provenance.solve_time_s,
    }
    banks = [t for t in plan.model.tensors() if t.experts]
    if banks:  # per MoE layer: resident experts and the share of routed tokens they take
        on_gpu = {t.layer: plan.placement.experts_on_gpu(t) for t in banks}
        out["experts"] = [{"layer": t.layer, "on_gpu": on_gpu[t.layer], "of": t.experts,
                           "routed_share": plan.routed_share(t, on_gpu[t.layer])} for t in banks]
    if plan.draft:
        out["draft"] = {"name": plan.draft.name, "gamma": plan.draft.gamma, "acceptance": plan.draft.acceptance,
                        "expected_tokens": pr.expected_tokens}
    if baselines is not None:
        out["baselines"] = [
            {"name": b.name, "note": b.note, "fits": b.prediction is not None,
             **({"ttft_s": b.prediction.ttft_s, "decode_tokens_per_s": b.prediction.decode_tokens_per_s,
                 "total_s": b.prediction.total_s} if b.prediction else {})} for b in baselines]
    return out


def compare_table(plan: Plan, baselines: list) -> FitTable:
    pr = plan.predicted
    table = Table(title="offplan vs what other tools would pick (same cost model)", title_justify="left")
    table.add_column("strategy", no_wrap=True)
    table.add_column("their choice")
    for col in ("time to\nfirst token", "decode\ntok/s", "whole\nworkload", "offplan is\nfaster by"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_row("[bold]offplan (ILP)[/]", plan.provenance.solver_status, fmt_seconds(pr.ttft_s),
                  f"{pr.decode_tokens_per_s:,.2f}", fmt_seconds(pr.total_s), "")
    for b in baselines:
        if b.prediction is None:
            table.add_row(b.name, f"{b.note} (does not fit)", "-", "-", "-", "-")
            continue
        p = b.prediction
        table.add_row(b.name, b.note, fmt_seconds(p.ttft_s), f"{p.decode_tokens_per_s:,.2f}",
                      fmt_seconds(p.total_s), f"{p.total_s / pr.total_s:.2f}x")
    return FitTable(table)


def render_solve(console, result) -> None:
    """Everything `offplan solve` prints for a SolveResult (planner/solve/entry.py)."""
    plan, solution, search = result.plan, result.solution, result.search
    wl = plan.workload
    console.print(f"[bold]{model_line(plan.model)}[/]")
    console.print(f"on {plan.profile.name}; batch {wl.batch}, prompt {wl.prompt}, generate {wl.gen}")
    within = f", within {solution.gap:.1%} of optimal" if solution.gap == solution.gap and solution.gap > 0 else ""
    console.print(f"solved with {solution.solver} in {fmt_seconds(solution.solve_time_s)} ({solution.status}{within}; "
                  f"{solution.n_variables} variables)" + (f"; {len(search.candidates)} draft combinations "
                                                          f"considered" if search else ""))
    console.print(placement_table(plan))
    console.print(memory_table(plan))
    console.print(speed_table(plan))
    ct = result.compensation
    if ct is not None:
        console.print(f"compensation: {ct.tensors} matrices with a CPU branch; predicted recovered error "
                      f"{plan.predicted.recovered_error:.1%} of the quantization error; CPU branch "
                      f"{fmt_seconds(ct.branch_s)} per step, {fmt_seconds(ct.hidden_s)} hidden behind the "
                      f"accelerator, {fmt_seconds(ct.exposed_s)} exposed")
    if search is not None:
        from planner.cli.render_search import alternatives_table, draft_summary
        console.print(draft_summary(search))
        console.print(alternatives_table(search))
    if result.baselines is not None:
        console.print(compare_table(plan, result.baselines))
