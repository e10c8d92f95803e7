"""The commands that execute (run, sensitivity, profile) on bad input and on Ctrl-C: one line
and exit 2 for a corrupt checkpoint or a model too big for this machine's memory; "interrupted"
and exit 130 with no file left for a real SIGINT."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tiny_checkpoint

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
LOOPBACK = TESTS / "assets" / "loopback-test.yaml"
sys.path.insert(0, str(TESTS / "planner"))
from test_cli_safety import offplan_child, offplan_here, one_line_error  # noqa: E402


@pytest.fixture
def run_here(capsys, monkeypatch):
    return lambda *args: offplan_here(capsys, monkeypatch, *args)


@pytest.fixture(scope="module")
def checkpoint_and_plan(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    checkpoint = write_tiny_checkpoint(folder / "tiny")
    plan = folder / "plan.yaml"
    child = offplan_child("solve", checkpoint, "--hw", LOOPBACK, "--prompt", "32", "--gen", "8", "--out", plan)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    return checkpoint, plan


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "absurd header":
        return struct.pack("<Q", 2**62) + data[8:]  # a header longer than any file
    if how == "not json":
        return struct.pack("<Q", 10) + b"{not json}" + data[18:]
    return b"\x00garbage" * 16


@pytest.mark.parametrize("how", ["truncated", "absurd header", "not json", "garbage"])
def test_a_corrupt_checkpoint_is_one_line(run_here, checkpoint_and_plan, tmp_path, how):
    checkpoint, plan = checkpoint_and_plan
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(_corrupt(weights.read_bytes(), how))
    one_line_error(run_here("run", plan, "--checkpoint", broken), "model.safetensors", "safetensors")
    out = tmp_path / "ranks.yaml"
    one_line_error(run_here("sensitivity", broken, "--out", out), "model.safetensors", "safetensors")
    assert not out.exists()


def test_sensitivity_refuses_a_model_bigger_than_this_machines_memory(run_here, tmp_path):
    out = tmp_path / "ranks.yaml"
    line = one_line_error(run_here("sensitivity", "llama-3.1-405b", "--synthetic", "--out", out),
                          "--synthetic", "llama-3.1-405b", "TiB", "available")
    assert "needs 1.5 TiB" in line  # 405 G parameters x 4 bytes
    assert list(tmp_path.iterdir()) == []


def test_check_host_memory_counts_fp32_weights():
    from conftest import tiny_spec
    from executor.sensitivity import check_host_memory
    from planner.errors import OffplanError
    spec = tiny_spec()
    check_host_memory(spec, "x", available_bytes=spec.params * 4)
    with pytest.raises(OffplanError, match="x: tiny needs"):
        check_host_memory(spec, "x", available_bytes=spec.params * 4 - 1)


# ---- Ctrl-C ------------------------------------------------------------------------------------

def _torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _interrupt_once_torch_is_loaded(child: subprocess.Popen, settle_s: float) -> tuple[str, str]:
    deadline = time.monotonic() + 120
    while not _torch_loaded(child.pid) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(settle_s)  # into the measuring / running itself
    assert child.poll() is None, "the command ended before it could be interrupted"
    child.send_signal(signal.SIGINT)
    return child.communicate(timeout=60)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches the child's libraries in /proc")
@pytest.mark.parametrize("command", ["profile", "run"])
def test_ctrl_c_exits_130_and_leaves_no_file(command, tmp_path_factory, tmp_path):
    out = tmp_path / "out.yaml"
    if command == "profile":
        child = offplan_child("profile", "--quick", "--out", out)
    else:  # the 400 MiB example model: making its weights and running it take seconds
        plan = tmp_path_factory.mktemp("plan") / "plan.yaml"
        solved = offplan_child("solve", ROOT / "examples" / "tiny.yaml", "--hw", LOOPBACK, "--out", plan)
        assert solved.wait(timeout=120) == 0
        child = offplan_child("run", plan, "--synthetic", "--json", out)
    stdout, stderr = _interrupt_once_torch_is_loaded(child, 1.0)
    assert child.returncode == 130, (stdout, stderr)
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
