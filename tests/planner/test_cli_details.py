"""Details a user meets in the first minutes: file permissions, --version, the help text, letter
case of names, plain numbers in tables. No torch."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import replace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from planner.cli.app import app
from planner.cli.render_hw import fmt_rate, fmt_size_short, fmt_time, profile_table
from planner.hardware.profile import load_profile
from planner.model.presets import preset
from planner.schema import atomic_write
from planner.units import fmt_sig

runner = CliRunner()


@pytest.fixture
def umask():
    """Set the process umask for one test, then put it back."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write(tmp_path / "plan.yaml", "x: 1\n")
    assert stat.S_IMODE((tmp_path / "plan.yaml").stat().st_mode) == mode
    atomic_write(tmp_path / "plan.yaml", "x: 2\n")  # replacing keeps to the rule too
    assert stat.S_IMODE((tmp_path / "plan.yaml").stat().st_mode) == mode


def test_solve_out_file_is_readable_by_others_under_the_usual_umask(tmp_path, umask):
    umask(0o022)
    out = tmp_path / "plan.yaml"
    result = runner.invoke(app, ["solve", "examples/tiny.yaml", "--hw", "rtx4090", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert re.fullmatch(r"offplan \S+\n", result.output)


@pytest.mark.parametrize("argv", [["solve", "--help"], ["simulate", "--help"], ["hw", "show", "--help"], ["--help"]])
def test_help_names_arguments_in_capitals_and_shows_no_bool(argv):
    result = runner.invoke(app, argv, env={"COLUMNS": "100"})
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    assert not re.search(r"\{\w+\}", result.output)  # no '{model}'
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    if argv[0] == "solve":
        assert usage.rstrip().endswith("[OPTIONS] MODEL")
        assert "--compare" in result.output and "--json" in result.output
        assert "NAME=RATE" in result.output and "list[" not in result.output
    if argv[:2] == ["hw", "show"]:
        assert usage.rstrip().endswith("[OPTIONS] PROFILE")


def test_preset_and_profile_names_ignore_letter_case():
    assert preset("Llama-3.1-8B") == preset("llama-3.1-8b")
    assert load_profile("RTX4090") == load_profile("rtx4090")
    result = runner.invoke(app, ["solve", "LLAMA-3.2-1B", "--hw", "RTX4090", "--json"])
    assert result.exit_code == 0, result.output
    assert '"model": "llama-3.2-1b"' in result.output


@pytest.mark.parametrize("value, digits, text", [(680.4, 2, "680"), (0.0006721, 3, "0.000672"), (1.10, 2, "1.1"),
                                                 (123456, 3, "123,000"), (1e-7, 2, "0.0000001"), (99.95, 2, "100")])
def test_fmt_sig_is_plain_decimal(value, digits, text):
    assert fmt_sig(value, digits) == text


def test_no_exponent_notation_in_tables():
    for value in (1e-6, 3.2e-5, 0.00042, 680.0, 12345.6):
        for text in (fmt_rate(value), fmt_time(value), fmt_size_short(value * 2**30)):
            assert "e+" not in text and "e-" not in text, text
    p = load_profile("rtx4090")
    slow = replace(p, host=replace(p.host, copy_slowdown_s_per_gb=0.68, bus_gbps=40.0))
    console = Console(record=True, width=120)
    console.print(profile_table(slow))
    text = console.export_text()
    assert "680 ms slower per GB copied" in text
    assert not re.search(r"\d[eE][+-]\d", text)
