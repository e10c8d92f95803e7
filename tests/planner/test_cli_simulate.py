"""`offplan simulate`, `compare` and `export` from the command line (run in-process: the
script's entry point without a new interpreter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import offplan_in_process as offplan
from planner.plan.record import load_plan
from planner.simulate.trace import read_trace

EXAMPLES = Path(__file__).parent.parent.parent / "examples"
pytestmark = pytest.mark.slow  # real solves of the 8B example


@pytest.fixture(scope="module")
def plan_8b(tmp_path_factory) -> Path:
    """`offplan solve` of the 8B example on an RTX 3060, written to a plan file."""
    plan = tmp_path_factory.mktemp("plan") / "plan.yaml"
    result = offplan("solve", str(EXAMPLES / "llama-3.1-8b.yaml"), "--hw", "rtx3060", "--out", str(plan),
                     "--time-limit", "5")  # any plan will do: a loaded machine may not prove the best
    assert result.returncode == 0, result.stderr
    return plan


def test_simulate_prints_a_gantt_and_writes_a_trace(tmp_path, plan_8b):
    plan = plan_8b
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
    result = offplan("compare", str(EXAMPLES / "llama-3.1-8b.yaml"), "--hw", "rtx3060", "--hw", "rtx4090", "--json",
                     "--time-limit", "5")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["profile"] for r in rows][0].startswith("NVIDIA GeForce RTX 3060")
    assert all(r["fits"] for r in rows)
    assert rows[1]["decode_tokens_per_s"] > rows[0]["decode_tokens_per_s"]


def test_export_llamacpp_flags_name_exactly_the_tensors_the_plan_keeps_off_the_gpu(plan_8b):
    import re
    import shlex
    plan_path = plan_8b
    plan = load_plan(plan_path)
    result = offplan("export", str(plan_path))
    assert result.returncode == 0, result.stderr
    args = shlex.split(result.stdout)
    assert args[:2] == ["-ngl", "999"]
    kinds = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
             "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
    named = set()
    for pattern in args[3::2]:
        m = re.fullmatch(r"blk\\\.\(([0-9|]+)\)\\\.(\w+)\\\.weight=CPU", pattern)
        if m:
            for layer in m.group(1).split("|"):
                group = "self_attn" if kinds[m.group(2)] in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                named.add(f"layers.{layer}.{group}.{kinds[m.group(2)]}")
    off_gpu = {t.name for t in plan.model.tensors() if t.layer is not None and plan.placement.device(t.name) != "gpu"}
    assert named == off_gpu and off_gpu
    hf = json.loads(offplan("export", str(plan_path), "--to", "hf").stdout)
    assert hf["model.layers.0.mlp.down_proj"] == (0 if plan.placement.device("layers.0.mlp.down_proj") == "gpu" else "cpu")
    bad = offplan("export", str(plan_path), "--to", "xml")
    assert bad.returncode == 2 and "--to" in bad.stderr
