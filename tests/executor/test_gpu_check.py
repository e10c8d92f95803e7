"""benchmarks/gpu_check.py runs unchanged on the loopback device: in its reduced mode every
plan kind runs, gives the resident tokens, and reports overlap, memory and speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
ASSETS = ROOT / "tests" / "assets"
PLANS = ("resident", "stream", "cpu", "kv split", "mixed", "int8 resident", "int8 mixed", "int4 resident",
         "int4 mixed")


@pytest.mark.slow
def test_gpu_check_reduced_mode_runs_every_plan_kind_on_the_loopback_device():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny-only",
                           "--profile", str(ASSETS / "loopback-test.yaml"), "--model", str(ASSETS / "model_small.yaml"),
                           "--prompt", "16", "--gen", "6", "--threads", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device: loopback")
    rows = {}
    for line in lines:
        for plan in PLANS:
            if line.startswith(f"tiny  {plan} "):
                rows[plan] = line[len(f"tiny  {plan:<13} "):].split()
    assert set(rows) == set(PLANS)
    for plan, (tokens, overlap, *rest) in rows.items():
        assert tokens == "yes", plan
        streams = plan.endswith(("stream", "mixed"))
        assert overlap.endswith("%") if streams else overlap == "-", plan
        ttft, ttft_pred, tok_s, tok_s_pred = (float(x) for x in rest[-4:])
        assert min(ttft, ttft_pred, tok_s, tok_s_pred) > 0, plan
    assert "tokens equal to the resident run: yes, every plan" in done.stdout
    assert max(len(line) for line in lines) <= 80


def test_a_divergence_is_reported_as_the_number_of_leading_tokens_that_agree():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
    try:
        spec.loader.exec_module(gpu_check)
    finally:
        del sys.modules["gpu_check"]
    reference = ((1, 2, 3, 4), (5, 6, 7, 8))
    assert gpu_check.matched(reference, reference) == "yes"
    assert gpu_check.matched(((1, 2, 9, 4), (5, 6, 7, 8)), reference) == "2/4"
    assert gpu_check.matched(((1, 2, 3, 4), (0, 6, 7, 8)), reference) == "0/4"
    assert gpu_check.matched(reference, None) == "-"
