"""Hardware profiles as rich tables: one profile in full (`offplan hw show`, `offplan profile`)
and many side by side (`offplan hw list`). Pure formatting; no torch."""

from __future__ import annotations

from rich.table import Table

from planner.cli.render_fit import FitTable
from planner.hardware.profile import HardwareProfile, pcie_gbps
from planner.units import fmt_bytes, fmt_seconds, fmt_sig

Row = tuple[str, str, str]  # (figure, value, field path for its spread or citation)


def fmt_rate(value: float) -> str:
    """A figure with as many digits as it deserves: 1,555 / 25.0 / 3.14 / 0.0672."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return fmt_sig(value, 3)


def fmt_time(t_s: float) -> str:
    """Like fmt_seconds, with a decimal below 10 µs: per-call overheads are often below 1 µs."""
    return f"{fmt_sig(t_s * 1e6, 2)} µs" if t_s < 1e-5 else fmt_seconds(t_s)


def fmt_size_short(n_bytes: float) -> str:
    """65536 -> '64K', 1073741824 -> '1G' (curve points)."""
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n_bytes >= scale:
            return f"{fmt_sig(n_bytes / scale, 4)}{unit}"
    return f"{fmt_sig(n_bytes, 4)}B"


def curve_text(curve: tuple[tuple[float, float], ...]) -> str:
    """'64K 3.2 · 1M 9.1 · 1G 12.4 GB/s'."""
    return " · ".join(f"{fmt_size_short(size)} {fmt_rate(gbps)}" for size, gbps in sorted(curve)) + " GB/s"


def source_text(profile: HardwareProfile) -> str:
    """'measured on 2026-11-21 17:40 UTC' or 'datasheet, 14 citations'."""
    s = profile.source
    if profile.is_measured:
        return f"measured on {s.date}" if s.date else "measured"
    dated = f" ({s.date})" if s.date else ""
    return f"datasheet{dated}, {_citations(s.citations)}"


def _citations(citations: dict[str, str]) -> str:
    return f"{len(citations)} citation{'s' if len(citations) != 1 else ''}"


def _flops_rows(prefix: str, flops_tflops: dict[str, float]) -> list[Row]:
    return [(f"matmul {dtype}", f"{fmt_rate(tflops)} TFLOPS", f"{prefix}.flops_tflops.{dtype}")
            for dtype, tflops in flops_tflops.items()]


def _accelerator_rows(p: HardwareProfile) -> list[Row]:
    a = p.accelerator
    rows: list[Row] = [("name", a.name, "accelerator.name"),
                       ("memory", fmt_bytes(a.memory_bytes), "accelerator.memory_bytes")]
    if a.used_by_others_bytes:
        rows.append(("used by others", fmt_bytes(a.used_by_others_bytes), "accelerator.used_by_others_bytes"))
    rows += [("usable", f"{fmt_bytes(p.vram_usable_bytes)} (after reserve)", ""),
             ("memory bandwidth", f"{fmt_rate(a.mem_bw_gbps)} GB/s", "accelerator.mem_bw_gbps"),
             *_flops_rows("accelerator", a.flops_tflops),
             ("matmul efficiency", f"{a.matmul_efficiency:.0%} of peak", "accelerator.matmul_efficiency"),
             ("GEMV efficiency", f"{a.gemv_efficiency:.0%} of memory bandwidth",
              "accelerator.gemv_efficiency"),
             *_size_rows("accelerator", a.gemv_size_factor), *_packed_rows("accelerator", a.gemv_gbps),
             ("operator overhead", fmt_time(a.op_overhead_s), "accelerator.op_overhead_s")]
    if a.layer_overhead_s:
        rows.append(("decode overhead", f"{fmt_time(a.layer_overhead_s)} per layer, "
                     f"{fmt_time(a.head_overhead_s)} per step", "accelerator.layer_overhead_s"))
    if a.elementwise_gbps:
        rows.append(("prefill element-wise", f"{fmt_rate(a.elementwise_gbps)} GB/s", "accelerator.elementwise_gbps"))
    if a.attention_tflops:
        rows.append(("prefill attention", f"{fmt_rate(a.attention_tflops)} TFLOPS", "accelerator.attention_tflops"))
    if a.split_overhead_s:
        rows.append(("split KV attention", f"+{fmt_time(a.split_overhead_s)} per layer",
                     "accelerator.split_overhead_s"))
    if a.pcie_generation and a.pcie_width:
        rows.append(("PCIe", f"gen{a.pcie_generation} x{a.pcie_width} "
                     f"({fmt_rate(pcie_gbps(a.pcie_generation, a.pcie_width))} GB/s per direction)",
                     "accelerator.pcie_generation"))
    return rows


def _link_rows(p: HardwareProfile) -> list[Row]:
    k = p.link
    rows: list[Row] = [("host → device", f"{fmt_rate(k.h2d_gbps)} GB/s (pinned)", "link.h2d_gbps"),
                       ("device → host", f"{fmt_rate(k.d2h_gbps)} GB/s (pinned)", "link.d2h_gbps"),
                       ("latency", f"{fmt_time(k.latency_s)} per transfer", "link.latency_s")]
    for label, name, pinned in (("h2d by size", "h2d_curve", None), ("d2h by size", "d2h_curve", None),
                                ("h2d pageable", "h2d_pageable_curve", k.h2d_curve),
                                ("d2h pageable", "d2h_pageable_curve", k.d2h_curve)):
        curve = getattr(k, name)
        if curve and curve != pinned:
            rows.append((label, curve_text(curve), f"link.{name}"))
    return rows


def _host_rows(p: HardwareProfile) -> list[Row]:
    h = p.host
    threads = f" ({h.threads} thread{'s' if h.threads != 1 else ''} used)" if h.threads else ""
    attention = (f"{fmt_rate(h.attention_gbps)} GB/s of KV cache" if h.attention_gbps
                 else f"{fmt_rate(h.mem_bw_gbps * h.gemv_efficiency)} GB/s of KV cache (from bandwidth)")
    rows: list[Row] = [("name", h.name, "host.name"),
                       ("cores", f"{h.cores}{threads}", "host.cores"),
                       ("memory", fmt_bytes(h.memory_bytes), "host.memory_bytes")]
    if h.available_bytes:
        rows.append(("available", fmt_bytes(h.available_bytes), "host.available_bytes"))
    bus = (f"{fmt_rate(h.bus_gbps)} GB/s with streaming and matmuls at once" if h.bus_gbps
           else "= memory bandwidth (not measured)")
    rows += [("memory bandwidth", f"{fmt_rate(h.mem_bw_gbps)} GB/s", "host.mem_bw_gbps"),
             ("memory bus", bus, "host.bus_gbps"),
             *([("matmuls beside a copy", f"{fmt_sig(h.copy_slowdown_s_per_gb * 1e3, 2)} ms slower per GB copied",
                 "host.copy_slowdown_s_per_gb")] if h.copy_slowdown_s_per_gb else []),
             *_flops_rows("host", h.flops_tflops),
             ("matmul efficiency", f"{h.matmul_efficiency:.0%} of peak", "host.matmul_efficiency"),
             ("GEMV efficiency", f"{h.gemv_efficiency:.0%} of memory bandwidth", "host.gemv_efficiency"),
             *_size_rows("host", h.gemv_size_factor), *_packed_rows("host", h.gemv_gbps),
             ("operator overhead", fmt_time(h.op_overhead_s), "host.op_overhead_s"),
             ("attention", attention, "host.attention_gbps"),
             *([("worker hand-off", f"{fmt_time(h.task_overhead_s)} per compensation branch",
                 "host.task_overhead_s")] if h.task_overhead_s else [])]
    return rows


def _packed_rows(prefix: str, gemv_gbps) -> list[Row]:
    """Batch-1 speed of the executor's dequantizing matmul, when measured (in packed bytes)."""
    packed = [(dt, curve[0][1]) for dt, curve in gemv_gbps.items() if dt.startswith("int") and curve]
    if not packed:
        return []
    text = " · ".join(f"{dt} {fmt_rate(gbps)} GB/s" for dt, gbps in packed)
    return [("quantized GEMV", f"{text} (packed bytes)", f"{prefix}.gemv_gbps")]


def _size_rows(prefix: str, factor) -> list[Row]:
    """The GEMV size factor as one row: '2M 71% · 16M 86% · 64M 100%'."""
    if not factor:
        return []
    points = " · ".join(f"{fmt_size_short(size)} {f:.0%}" for size, f in factor)
    return [("GEMV by matrix size", points, f"{prefix}.gemv_size_factor")]


def _reserve_rows(p: HardwareProfile) -> list[Row]:
    price = f"${p.price_usd:,.0f}" if p.price_usd else "unknown"
    return [("accelerator", fmt_bytes(p.reserve_bytes), "reserve_bytes"),
            ("host", fmt_bytes(p.host_reserve_bytes), "host_reserve_bytes"),
            ("price", price, "price_usd")]


def _evidence(p: HardwareProfile, path: str) -> str:
    """Spread of a measured figure ('2.1%'), or whether a datasheet figure is cited."""
    if not path:
        return ""
    if p.is_measured:
        spread = p.spread.get(path)
        return f"{spread:.1%}" if spread is not None else ""
    cited = any(path == key or path.startswith(key + ".") for key in p.source.citations)
    return "cited" if cited else ""


def profile_table(profile: HardwareProfile) -> FitTable:
    """Every figure of one profile with units, its spread (measured) or citation (datasheet);
    the caption says where the figures come from."""
    table = Table(title=profile.name, caption=source_text(profile), title_justify="left",
                  caption_justify="left")
    table.add_column("part", style="bold", no_wrap=True)
    table.add_column("figure", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("spread" if profile.is_measured else "source", justify="right", no_wrap=True)
    sections = (("accelerator", _accelerator_rows(profile)), ("link", _link_rows(profile)),
                ("host", _host_rows(profile)), ("reserve", _reserve_rows(profile)))
    for part, rows in sections:
        for i, (figure, value, path) in enumerate(rows):
            table.add_row(part if i == 0 else "", figure, value, _evidence(profile, path),
                          end_section=i == len(rows) - 1)
    return FitTable(table)


def profiles_overview_table(profiles: list[HardwareProfile], names: list[str] | None = None) -> FitTable:
    """Key figures of several profiles, one row each. `names`: what to pass to `--hw` for each
    (shipped names such as 'rtx4090'); default: each profile's own name. The name is never
    shortened; at 80 columns the last columns are left out."""
    table = Table(title="Hardware profiles", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("accelerator")
    for column in ("VRAM", "mem bw\nGB/s", "bf16\nTFLOPS", "link\nGB/s", "host RAM", "host bw\nGB/s",
                   "price"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("source", no_wrap=True)
    for p, name in zip(profiles, names or [p.name for p in profiles]):
        a = p.accelerator
        bf16 = a.flops_tflops.get("bf16")
        table.add_row(name, a.name, fmt_bytes(a.memory_bytes) if a.present else "none", fmt_rate(a.mem_bw_gbps),
                      fmt_rate(bf16) if bf16 is not None else "—", fmt_rate(p.link.h2d_gbps),
                      fmt_bytes(p.host.memory_bytes), fmt_rate(p.host.mem_bw_gbps),
                      f"${p.price_usd:,.0f}" if p.price_usd else "—", p.source.kind)
    return FitTable(table, optional=("mem bw GB/s", "bf16 TFLOPS", "link GB/s", "host RAM", "host bw GB/s", "price",
                                     "source"))
