"""Every bad input (DESIGN §7) gives one clear line naming the field, exit code 2, and no
traceback; good input gives valid JSON and plan files. Runs the command line's own entry point
in-process (the same exit code and output as a child process, without starting Python each
time); test_cli_safety.py runs child processes for what only a process shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import offplan_in_process

from planner.plan.record import load_plan, plan_to_yaml
from planner.schema import stable_hash

TESTS = Path(__file__).resolve().parents[1]
ASSETS = TESTS / "assets"
TINY = TESTS.parent / "examples" / "tiny.yaml"
SMALL = ASSETS / "model_small.yaml"
SMALL_HW = ASSETS / "profile_small.yaml"


def offplan(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return offplan_in_process(*args, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ")
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert result.stdout == ""
    return line


# ---- model files ------------------------------------------------------------------------------

@pytest.mark.parametrize("asset,needles", [
    ("bad_model_malformed.yaml", ("malformed YAML", "line 4")),
    ("bad_model_unknown_key.yaml", ("unknown key", "colour", "allowed:")),
    ("bad_model_zero_layers.yaml", ("model.layers", "must be positive", "0")),
    ("bad_model_negative_hidden.yaml", ("model.hidden", "must be positive", "-5")),
    ("bad_model_heads.yaml", ("heads", "6", "hidden 256", "head_dim")),
])
def test_bad_model_file(asset, needles):
    result = offplan("solve", ASSETS / asset, "--hw", SMALL_HW)
    line = assert_one_line_error(result, *needles)
    assert asset in line  # which file


def test_missing_model_file(tmp_path):
    assert_one_line_error(offplan("solve", tmp_path / "missing.yaml", "--hw", SMALL_HW), "missing.yaml",
                          "file not found")


def test_unknown_top_level_key_in_model_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(SMALL.read_text().replace("workload:", "wrokload:"))
    assert_one_line_error(offplan("solve", path, "--hw", SMALL_HW), "unknown key", "wrokload", "allowed:")


def test_unknown_preset_lists_the_known_ones():
    assert_one_line_error(offplan("solve", "llama-9", "--hw", SMALL_HW), "llama-9", "llama-3.1-8b")


# ---- models that fit nowhere ------------------------------------------------------------------

def test_model_too_big_for_host_memory_names_host_memory():
    line = assert_one_line_error(offplan("solve", "llama-3.1-70b", "--hw", "rtx4090", "--ram", "64GiB"),
                                 "host memory", "GiB", "--ram")
    assert "needs" in line and "available" in line


def test_vram_too_small_for_the_workspace_names_accelerator_memory():
    assert_one_line_error(offplan("solve", TINY, "--hw", "rtx3060", "--vram", "1.02GiB", "--prompt", "4000",
                                  "--gen", "10"), "accelerator memory", "workspace", "--vram")


def test_tiny_vram_and_ram_fit_nowhere():
    assert_one_line_error(offplan("solve", TINY, "--hw", "rtx3060", "--vram", "1.1GiB", "--ram", "6.1GiB"),
                          "host memory", "MiB", "available")


def test_context_longer_than_the_model_allows():
    assert_one_line_error(offplan("solve", TINY, "--hw", "rtx3060", "--prompt", "5000"), "--prompt", "4096")


# ---- hardware profiles ------------------------------------------------------------------------

@pytest.mark.parametrize("asset,needles", [
    ("bad_profile_unknown_key.yaml", ("unknown key", "host.", "turbo")),
    ("bad_profile_missing_field.yaml", ("host.mem_bw_gbps", "missing")),
    ("bad_profile_negative_bw.yaml", ("link.h2d_gbps", "must be positive", "-12")),
])
def test_bad_profile_file(asset, needles):
    line = assert_one_line_error(offplan("solve", SMALL, "--hw", ASSETS / asset), *needles)
    assert asset in line


def test_unknown_shipped_profile_lists_the_shipped_ones():
    assert_one_line_error(offplan("solve", SMALL, "--hw", "rtx9090"), "--hw rtx9090", "rtx4090", "rtx3060")


def test_a_model_file_given_as_profile():
    assert_one_line_error(offplan("solve", SMALL, "--hw", SMALL), "unknown key", "model")


# ---- command-line values ------------------------------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (("--vram", "banana"), ("--vram", "banana", "GiB")),
    (("--ram", "-3GiB"), ("--ram",)),
    (("--vram", "0"), ("--vram", "positive")),
    (("--prompt", "0"), ("--prompt", "positive")),
    (("--gen", "-4"), ("--gen", "positive")),
    (("--batch", "0"), ("--batch", "positive")),
    (("--host-bw", "0"), ("--host-bw", "positive")),
])
def test_bad_option_values(args, needles):
    assert_one_line_error(offplan("solve", SMALL, "--hw", SMALL_HW, *args), *needles)


def test_out_into_a_missing_directory_writes_nothing(tmp_path):
    target = tmp_path / "missing" / "plan.yaml"
    assert_one_line_error(offplan("solve", SMALL, "--hw", SMALL_HW, "--out", target), "--out", "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_out_naming_a_directory(tmp_path):
    assert_one_line_error(offplan("solve", SMALL, "--hw", SMALL_HW, "--out", tmp_path), "--out", "directory")
    assert list(tmp_path.iterdir()) == []


# ---- plans ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_plan_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    result = offplan("solve", SMALL, "--hw", SMALL_HW, "--out", path)
    assert result.returncode == 0, result.stderr
    return path


def test_simulate_refuses_a_plan_for_another_model(small_plan_file, tmp_path):
    data = yaml.safe_load(small_plan_file.read_text())
    data["model"]["layers"] = 5
    other = replace(load_plan(small_plan_file).model, layers=5)
    data["provenance"]["model_hash"] = stable_hash(other)
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert_one_line_error(offplan("simulate", path), "layers.4.", "another model")


def test_simulate_refuses_an_edited_plan(small_plan_file, tmp_path):
    data = yaml.safe_load(small_plan_file.read_text())
    data["model"]["vocab"] = 4096
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert_one_line_error(offplan("simulate", path), "edited", "solve again")


def test_simulate_refuses_a_missing_plan(tmp_path):
    assert_one_line_error(offplan("simulate", tmp_path / "nope.yaml"), "nope.yaml", "file not found")


def test_simulate_refuses_a_model_file_given_as_plan():
    assert_one_line_error(offplan("simulate", SMALL), "model_small.yaml")


# ---- good input -------------------------------------------------------------------------------

def test_solve_json_and_out_on_the_shipped_example(tmp_path):
    out = tmp_path / "plan.yaml"
    result = offplan("solve", TINY, "--hw", "rtx3060", "--json", "--out", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # stdout is nothing but the JSON document
    assert data["model"] == "tiny-llama"
    assert data["ttft_s"] > 0 and data["decode_tokens_per_s"] > 0
    assert data["workload"] == {"batch": 1, "prompt": 256, "gen": 64}
    plan = load_plan(out)
    assert plan.predicted.ttft_s == pytest.approx(data["ttft_s"], rel=1e-12)
    assert plan.predicted.decode_tokens_per_s == pytest.approx(data["decode_tokens_per_s"], rel=1e-12)
    assert plan.evaluate().total_s == pytest.approx(data["total_s"], rel=1e-12)
    assert plan.provenance.strategy == "ilp"
    assert plan_to_yaml(plan) == out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]


def test_solve_compare_json_lists_no_faster_baseline():
    result = offplan("solve", SMALL, "--hw", SMALL_HW, "--vram", "520MiB", "--compare", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    names = [b["name"] for b in data["baselines"]]
    assert names == ["accelerate", "llamacpp", "stream-all"]
    for b in data["baselines"]:
        if b["fits"]:
            assert b["total_s"] >= data["total_s"] * (1 - 1e-4), b


def test_solve_prints_tables():
    result = offplan("solve", SMALL, "--hw", SMALL_HW)
    assert result.returncode == 0, result.stderr
    assert "Placement" in result.stdout and "Predicted speed" in result.stdout
    assert result.stderr.strip() == ""


def test_debug_mode_shows_the_traceback(tmp_path):
    env = dict(os.environ, OFFPLAN_DEBUG="1")
    result = subprocess.run([sys.executable, "-m", "planner.cli", "solve", str(tmp_path / "x.yaml"), "--hw",
                             str(SMALL_HW)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr and "SpecError" in result.stderr


# ---- formerly known defects (fixed) ----------------------------------------------------------

@pytest.mark.parametrize("args", [("solve", SMALL), ("solve", SMALL, "--hw", SMALL_HW, "--prompt", "abc")],
                         ids=["missing --hw", "--prompt abc"])
def test_usage_errors_exit_2_without_a_traceback(args):
    result = offplan(*args)
    assert "Traceback" not in result.stderr, result.stderr[-300:]
    assert result.returncode == 2
    assert "--hw" in result.stderr or "--prompt" in result.stderr


def test_vram_below_the_reserve_names_vram():
    result = offplan("solve", SMALL, "--hw", SMALL_HW, "--vram", "300MiB")
    assert_one_line_error(result, "--vram")


def test_out_under_a_regular_file_names_out(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    result = offplan("solve", SMALL, "--hw", SMALL_HW, "--out", blocker / "plan.yaml")
    assert_one_line_error(result, "--out")
