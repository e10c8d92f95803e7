"""Profiles as tables: figures with units, spreads beside measured figures, citations beside
datasheet ones, and the overview `offplan hw list` prints. No torch."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from rich.console import Console

from planner.hardware.profile import Accelerator, HardwareProfile, Host, Link, Source, load_profile
from planner.cli.render_hw import (
    curve_text,
    fmt_rate,
    fmt_time,
    fmt_size_short,
    profile_table,
    profiles_overview_table,
    source_text,
)

from planner.hardware.profile import pcie_gbps

GIB, MIB = 2**30, 2**20
CURVE = ((65536.0, 9.5), (16777216.0, 12.25), (1073741824.0, 12.5))


def measured() -> HardwareProfile:
    cpu = dict(mem_bw_gbps=24.0, flops_tflops={"fp32": 0.18, "bf16": 0.81}, gemv_efficiency=0.7,
               matmul_efficiency=1.0, op_overhead_s=1.1e-6)
    return HardwareProfile(
        name="box-loopback",
        accelerator=Accelerator(name="loopback (CPU: Test CPU)", memory_bytes=11 * GIB, loopback=True, **cpu),
        link=Link(h2d_gbps=12.5, d2h_gbps=12.0, latency_s=8e-7, h2d_curve=CURVE, d2h_curve=CURVE,
                  h2d_pageable_curve=CURVE, d2h_pageable_curve=CURVE),
        host=Host(name="Test CPU", cores=2, memory_bytes=11 * GIB, attention_gbps=9.0,
                  available_bytes=11 * GIB, threads=2, **cpu),
        source=Source(kind="measured", date="2026-11-21 17:40 UTC", notes="loopback"),
        reserve_bytes=64 * MIB, host_reserve_bytes=GIB,
        spread={"link.h2d_gbps": 0.034, "accelerator.flops_tflops.bf16": 0.125, "host.attention_gbps": 0.5})


def render(table) -> str:
    console = Console(record=True, width=120)
    console.print(table)
    return console.export_text()


def row(text: str, *words: str) -> str:
    """The first line holding all `words`."""
    return next(line for line in text.splitlines() if all(w in line for w in words))


def test_measured_profile_table_shows_units_spreads_and_date():
    text = render(profile_table(measured()))
    assert "box-loopback" in text and "measured on 2026-11-21 17:40 UTC" in text
    assert "3.4%" in row(text, "host → device", "12.5 GB/s")
    assert "12.5%" in row(text, "matmul bf16", "0.81 TFLOPS")
    assert "50.0%" in row(text, "attention", "9.00 GB/s")
    assert "%" not in row(text, "matmul fp32")  # no spread recorded for it
    assert "64K 9.50 · 16M 12.2 · 1G 12.5 GB/s" in row(text, "h2d by size")
    assert "pageable" not in text  # identical to the pinned curves: not repeated
    assert "0.8 µs per transfer" in row(text, "latency")
    assert "1.1 µs" in row(text, "operator overhead")
    for word in ("spread", "accelerator", "link", "host", "reserve", "11.0 GiB", "64.0 MiB", "unknown"):
        assert word in text


def test_datasheet_profile_table_marks_cited_figures_and_counts_citations():
    p = load_profile("rtx4090")
    text = render(profile_table(p))
    assert f"{len(p.source.citations)} citations" in text and "datasheet" in text
    assert "cited" in row(text, "memory bandwidth", "1,008 GB/s")
    assert "cited" in row(text, "matmul bf16")  # cited as accelerator.flops_tflops
    assert "gen4 x16 (31.5 GB/s per direction)" in text
    assert "h2d pageable" in text  # differs from the pinned curve
    assert "spread" not in text


def test_source_text_and_pageable_rows():
    p = measured()
    datasheet = replace(p, source=Source(kind="datasheet", citations={"a": "x"}))
    assert source_text(datasheet) == "datasheet, 1 citation"
    slower = tuple((s, g / 2) for s, g in CURVE)
    text = render(profile_table(replace(p, link=replace(p.link, h2d_pageable_curve=slower))))
    assert "h2d pageable" in text and "d2h pageable" not in text


def test_overview_lists_every_profile_with_key_figures():
    profiles = [measured(), load_profile("rtx4090"), load_profile("t4")]
    text = render(profiles_overview_table(profiles, ["box-loopback", "rtx4090", "t4"]))
    box = row(text, "box-loopback")
    for value in ("11.0 GiB", "24.0", "0.81", "12.5", "measured", "—"):
        assert value in box
    rtx = row(text, "rtx4090")
    for value in ("24.0 GiB", "1,008", "165", "25.0", "64.0 GiB", "$1,800", "datasheet"):
        assert value in rtx
    assert "—" in row(text, "t4 ")  # no bf16 figure on a T4
    assert "TFLOPS" in text and "GB/s" in text


def test_overview_defaults_to_profile_names():
    assert "box-loopback" in render(profiles_overview_table([measured()]))


@pytest.mark.parametrize("value, text", [(1555.0, "1,555"), (25.0, "25.0"), (3.14159, "3.14"),
                                         (0.06721, "0.0672")])
def test_fmt_rate(value, text):
    assert fmt_rate(value) == text


def test_small_formatters():
    assert fmt_size_short(65536) == "64K" and fmt_size_short(GIB) == "1G" and fmt_size_short(512) == "512B"
    assert curve_text(((2 * MIB, 4.0), (65536, 2.0))) == "64K 2.00 · 2M 4.00 GB/s"
    assert pcie_gbps(4, 16) == pytest.approx(31.5, abs=0.01)
    assert pcie_gbps(5, 8) == pytest.approx(31.5, abs=0.01)
    assert pcie_gbps(0, 0) == 0.0
    assert fmt_time(8e-7) == "0.8 µs" and fmt_time(1e-5) == "10 µs" and fmt_time(0.0123) == "12.3 ms"


def test_hwtable_does_not_import_torch():
    code = "import sys, planner.cli.render_hw; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
