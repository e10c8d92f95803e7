"""Host description on the command line: DRAM shorthand, core count, the CPU-only profile."""

from __future__ import annotations

import pytest

from planner.errors import HardwareError
from planner.hardware.host import STREAM_FRACTION, parse_dram, with_host
from planner.hardware.profile import load_profile


@pytest.mark.parametrize("text, peak_gbps", [("ddr5-6400x2", 102.4), ("DDR4-3200x8", 204.8), ("ddr5-4800x12", 460.8)])
def test_dram_peak_is_channels_times_rate_times_8_bytes(text, peak_gbps):
    assert parse_dram(text).peak_gbps == pytest.approx(peak_gbps)


@pytest.mark.parametrize("text", ["ddr5", "ddr5-6400", "ddr6-6400x2", "ddr5-64x2", "ddr5-6400x0", "6400x2"])
def test_bad_dram_spelling_is_one_line_naming_the_form(text):
    with pytest.raises(HardwareError, match=r"--dram .*ddr5-6400x2") as info:
        parse_dram(text)
    assert "\n" not in str(info.value)


def test_dram_and_cores_replace_the_host_figures():
    base = load_profile("rtx4090")
    p = with_host(base, "ddr5-4800x2", 8)
    assert p.host.mem_bw_gbps == pytest.approx(76.8 * STREAM_FRACTION)
    assert p.host.cores == 8 and p.host.threads == 8
    assert p.host.flops_tflops["fp32"] == pytest.approx(base.host.flops_tflops["fp32"] / 2)
    assert "ddr5-4800x2" in p.name and p.accelerator == base.accelerator


def test_cpu_profile_has_no_accelerator_memory():
    p = load_profile("cpu")
    assert not p.accelerator.present and p.vram_usable_bytes == 0
    q = with_host(p, "ddr5-4800x2", 16)
    assert q.accelerator.mem_bw_gbps == q.host.mem_bw_gbps


def test_cli_rejects_bad_dram_with_exit_2():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "planner.cli", "solve", "llama-3.2-1b", "--hw", "cpu",
                        "--dram", "ddr5-fast"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--dram 'ddr5-fast'" in r.stderr
