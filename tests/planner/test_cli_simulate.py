"""`offplan simulate` and `offplan compare` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from planner.plan import load_plan
from planner.trace import read_trace

EXAMPLES = Path(__file__).parent.parent.parent / "examples"


def offplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True)


def test_simulate_prints_a_gantt_and_writes_a_trace(tmp_path):
    plan = tmp_path / "plan.yaml"
    assert offplan("solve", str(EXAMPLES / "llama-3.1-8b.yaml"), "--hw", "rtx3060", "--out", str(plan)).returncode == 0
    trace = tmp_path / "trace.json"
    result = offplan("simulate", str(plan), "--trace", str(trace))
    assert result.returncode == 0, result.stderr
    for word in ("accelerator", "h2d", "cpu", "simulated vs ILP"):
        assert word in result.stdout
    events, meta = read_trace(trace)
    assert events and {e.phase for e in events} >= {"prefill", "decode"}
    assert json.loads(trace.read_text())["traceEvents"]
    ideal = json.loads(offplan("simulate", str(plan), "--json", "--chunk", "0", "--prefetch", "next-stage").stdout)
    real = json.loads(offplan("simulate", str(plan), "--json").stdout)
    assert ideal["ilp_decode_step_s"] == real["ilp_decode_step_s"] == load_plan(plan).predicted.decode_step_s
    assert real["decode_step_s"] <= ideal["decode_step_s"]  # copying in pieces lets activations through
    other = json.loads(offplan("simulate", str(plan), "--json", "--hw", "rtx5090").stdout)
    assert other["ilp_decode_step_s"] < real["ilp_decode_step_s"]  # the same placement on a faster card


def test_compare_solves_each_profile():
    result = offplan("compare", str(EXAMPLES / "llama-3.1-8b.yaml"), "--hw", "rtx3060", "--hw", "rtx4090", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["profile"] for r in rows][0].startswith("NVIDIA GeForce RTX 3060")
    assert all(r["fits"] for r in rows)
    assert rows[1]["decode_tokens_per_s"] > rows[0]["decode_tokens_per_s"]
