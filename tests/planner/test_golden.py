"""`offplan solve --json` for the shipped examples on three shipped profiles, held fixed: the
same placement, memory and predicted times as the recorded outputs in tests/planner/golden/.

A change that moves these on purpose (a corrected formula, a new cost term) regenerates them:
`OFFPLAN_REGEN_GOLDEN=1 python -m pytest -q tests/planner/test_golden.py`, and the commit
says why the numbers moved. Solved in-process through planner.solve.entry, as `solve` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from planner.cli.common import load_hardware, resolve_workload
from planner.cli.render import plan_json
from planner.model.modelfile import load_model_file
from planner.solve.entry import SolveRequest, solve_model
from planner.solve.ilp import SolverOptions

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
KEYS = ("model", "workload", "ttft_s", "decode_step_s", "total_s", "placement", "vram_used_bytes",
        "host_used_bytes", "draft", "experts")
TIMES = ("ttft_s", "decode_step_s", "total_s")
REGEN = os.environ.get("OFFPLAN_REGEN_GOLDEN") == "1"
# Every recorded plan was proven optimal within the default 10 s; the solver's search is
# deterministic, so a limit no loaded machine reaches gives the same plans every time.
TIME_LIMIT_S = 600.0


def _solve_json(example: str, profile: str) -> dict:
    """What `offplan solve examples/EXAMPLE.yaml --hw PROFILE --json` prints, pruned to KEYS."""
    model_file = load_model_file(str(ROOT / "examples" / f"{example}.yaml"))
    request = SolveRequest(model_file, load_hardware(profile, None, None, None),
                           resolve_workload(model_file, None, None, None), SolverOptions(time_limit_s=TIME_LIMIT_S))
    out = plan_json(solve_model(request).plan)
    return {k: out[k] for k in KEYS if k in out}


def _cases():
    """Every golden file; the large models' solves take seconds each (marked slow)."""
    for path in sorted(GOLDEN.glob("*.json")):
        slow = not path.stem.startswith(("tiny", "llama-3.1-8b"))
        yield pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("path", list(_cases()))
def test_solve_matches_the_recorded_output(path):
    example, profile = path.stem.split("--")
    got = json.loads(json.dumps(_solve_json(example, profile)))  # the same types as the file's
    if REGEN:
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got["placement"] == want["placement"]
    for key in TIMES:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert {k: v for k, v in got.items() if k not in TIMES} == {k: v for k, v in want.items() if k not in TIMES}
