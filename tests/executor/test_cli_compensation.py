"""`offplan sensitivity` writes a rank table that `offplan solve --quality` uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import offplan_in_process as offplan
from planner.model.ranks import load_rank_table
from planner.plan.record import load_plan

ASSETS = Path(__file__).parent.parent / "assets"
MODEL = """version: 1
model: {name: qtiny, family: llama, layers: 2, hidden: 128, intermediate: 256, heads: 4, kv_heads: 2, vocab: 256,
        dtype: fp32}
quantization: {bits: 4, group_size: 32, symmetric: true}
compensation: {ranks: [0, 8, 16, 32]}
workload: {batch: 1, prompt: 32, gen: 8}
"""


@pytest.mark.slow
def test_sensitivity_table_feeds_a_quality_constrained_plan(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(MODEL)
    ranks = tmp_path / "ranks.yaml"
    result = offplan("sensitivity", str(model), "--synthetic", "--ranks", "0,8,16,32", "--out", str(ranks))
    assert result.returncode == 0, result.stderr
    assert re.search(r"14/14 +\d+:\d\d:\d\d left \d+:\d\d:\d\d", result.stdout)  # progress with time left
    table = load_rank_table(ranks)
    assert len(table.tensors) == 14  # 7 matrices x 2 layers
    for errors in table.tensors.values():  # error left falls with rank, and rank 0 leaves all of it
        values = [errors[r] for r in (0, 8, 16, 32)]
        assert values[0] == 1.0 and values == sorted(values, reverse=True) and values[-1] < 0.5
    plan_path = tmp_path / "plan.yaml"
    result = offplan("solve", str(model), "--hw", str(ASSETS / "loopback-test.yaml"), "--vram", "100MiB",
                     "--quality", "0.4", "--rank-table", str(ranks), "--out", str(plan_path))
    assert result.returncode == 0, result.stderr
    assert "compensation:" in result.stdout
    plan = load_plan(plan_path)
    assert plan.predicted.recovered_error >= 0.4 - 1e-9
    assert any(r > 0 for r in plan.placement.ranks.values())
    assert plan.evaluate().recovered_error == plan.predicted.recovered_error  # ranks survive the file


def test_quality_errors_are_one_line(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(MODEL)
    hw = str(ASSETS / "loopback-test.yaml")
    for args, word in ((("--quality", "0.99"), "--quality"), (("--quality", "lots"), "--quality"),
                       (("--rank-table", str(tmp_path / "none.yaml")), "--rank-table")):
        result = offplan("solve", str(model), "--hw", hw, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert word in result.stderr and len(result.stderr.strip().splitlines()) == 1
