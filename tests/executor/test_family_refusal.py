"""Families the executor does not build are refused in one line, before anything is loaded."""

from __future__ import annotations

import pytest

from conftest import offplan_in_process


@pytest.mark.parametrize("preset", ["gpt-oss-20b", "gemma-3-27b", "deepseek-v3", "glm-4.5-air"])
def test_run_refuses_a_planned_only_family_in_one_line(tmp_path, preset):
    plan = tmp_path / "plan.yaml"
    solved = offplan_in_process("solve", preset, "--hw", "h200", "--ram", "1024GiB", "--out", plan)
    assert solved.returncode == 0, solved.stderr
    result = offplan_in_process("run", plan, "--synthetic")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the executor does not run" in lines[0] and "Traceback" not in result.stderr
