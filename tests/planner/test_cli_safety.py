"""What a user relies on whatever they type: `--json` prints only JSON, no command overwrites
its own input, Ctrl-C says "interrupted" and exits 130 leaving no file, nonsense values are
refused in one line (exit 2) naming the option, and a solver stop is not called "does not fit".

Most cases run the command line in-process (fast); the ones about what reaches the process's
file descriptors or how it reacts to a real SIGINT run a child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planner.errors import OffplanError
from planner.solve.backend import check_solver_name, pick_solver

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
ASSETS = TESTS / "assets"
TINY = ROOT / "examples" / "tiny.yaml"
BIG = ROOT / "examples" / "llama-3.1-70b.yaml"
SMALL = ASSETS / "model_small.yaml"
SMALL_HW = ASSETS / "profile_small.yaml"


def offplan_here(capsys, monkeypatch, *args: object) -> tuple[int, str, str]:
    """Run the command line in this process, through the same entry point as the script."""
    from planner.cli.app import app
    from planner.cli.common import run_app
    monkeypatch.setattr(sys, "argv", ["offplan", *map(str, args)])
    monkeypatch.delenv("OFFPLAN_DEBUG", raising=False)
    code = 0
    try:
        run_app(app)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def offplan_child(*args: object, cwd: Path | None = None, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OFFPLAN_DEBUG"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), COLUMNS="80", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "planner.cli", *map(str, args)], cwd=cwd or ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    code, out, err = result
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert out == ""
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def run_here(capsys, monkeypatch):
    return lambda *args: offplan_here(capsys, monkeypatch, *args)


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory) -> Path:
    """A folder with the small model, its profile and a plan solved from them."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "model.yaml").write_text(SMALL.read_text())
    (folder / "profile.yaml").write_text(SMALL_HW.read_text())
    child = offplan_child("solve", folder / "model.yaml", "--hw", folder / "profile.yaml", "--out", folder / "plan.yaml")
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    return folder


# ---- 1. --json is JSON, in a fresh process with the solver installed ---------------------------

def test_solve_json_stdout_is_only_json_in_a_fresh_process():
    child = offplan_child("solve", TINY, "--hw", "rtx4090", "--json", "--solver", "highs")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert json.loads(out)["model"] == "tiny-llama"  # a solver banner on fd 1 would break this
    assert "HiGHS" not in err


def test_compare_json_stdout_is_only_json_in_a_fresh_process():
    child = offplan_child("compare", TINY, "--hw", "rtx4090", "--hw", "rtx3060", "--json")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert [row["profile"].split()[2] for row in json.loads(out)] == ["RTX", "RTX"]


@pytest.mark.parametrize("args", [
    ("simulate", "{plan}", "--json"),
    ("export", "{plan}", "--to", "json"),
    ("export", "{plan}", "--to", "hf"),
    ("hw", "list", "--json"),
    ("hw", "show", "rtx4090", "--json"),
])
def test_every_json_output_parses(run_here, plan_dir, args):
    code, out, err = run_here(*(a.format(plan=plan_dir / "plan.yaml") for a in args))
    assert code == 0, err
    json.loads(out)


def test_highs_is_the_default_solver_and_unknown_solvers_are_named():
    name, _ = pick_solver("auto", 1.0, 1e-4)
    assert name == "HiGHS"  # a base dependency: `solve` must not fall back to CBC
    assert pick_solver("CBC", 1.0, 1e-4)[0] == "CBC"
    with pytest.raises(OffplanError, match="--solver gurobi.*auto, highs or cbc.*installed: HiGHS"):
        check_solver_name("gurobi")


# ---- 2. an output is never one of the inputs ---------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (("solve", "{d}/model.yaml", "--hw", "{d}/profile.yaml", "--out", "{d}/model.yaml"), ("--out", "MODEL")),
    (("solve", "{d}/model.yaml", "--hw", "{d}/profile.yaml", "--out", "{d}/profile.yaml"), ("--out", "--hw")),
    (("solve", "{d}/model.yaml", "--hw", "{d}/profile.yaml", "--out", "{d}/./sub/../model.yaml"), ("MODEL",)),
    (("export", "{d}/plan.yaml", "--to", "json", "--out", "{d}/plan.yaml"), ("--out", "PLAN")),
    (("simulate", "{d}/plan.yaml", "--trace", "{d}/plan.yaml"), ("--trace", "PLAN")),
    (("run", "{d}/plan.yaml", "--synthetic", "--json", "{d}/plan.yaml"), ("--json", "PLAN")),
    (("run", "{d}/plan.yaml", "--synthetic", "--json", "{d}/r.json", "--trace", "{d}/r.json"), ("--trace", "--json")),
    (("sensitivity", "{d}/model.yaml", "--synthetic", "--out", "{d}/model.yaml"), ("--out", "SOURCE")),
])
def test_an_output_that_is_an_input_is_refused_and_nothing_changes(run_here, plan_dir, args, needles):
    (plan_dir / "sub").mkdir(exist_ok=True)
    before = snapshot(plan_dir)
    line = one_line_error(run_here(*(a.format(d=plan_dir) for a in args)), *needles)
    assert "another" in line
    assert snapshot(plan_dir) == before


def test_a_symlink_to_the_input_is_the_input(run_here, plan_dir, tmp_path):
    link = tmp_path / "link.yaml"
    link.symlink_to(plan_dir / "plan.yaml")
    before = snapshot(plan_dir)
    one_line_error(run_here("export", plan_dir / "plan.yaml", "--to", "json", "--out", link), "PLAN")
    assert snapshot(plan_dir) == before


def test_an_output_where_nothing_can_be_created_fails_before_any_work(run_here):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc (a directory where even root cannot create files)")
    line = one_line_error(run_here("profile", "--out", "/proc/offplan-profile.yaml"),
                          "--out /proc/offplan-profile.yaml", "cannot write")
    assert ".offplan-profile.yaml." not in line  # the user's path, not a temporary name


# ---- 3. Ctrl-C --------------------------------------------------------------------------------

def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="watches the child's threads in /proc")
def test_ctrl_c_during_a_solve_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / "plan.yaml"
    child = offplan_child("solve", BIG, "--hw", "rtx4090", "--no-draft", "--time-limit", "60", "--out", out)
    deadline = time.monotonic() + 60
    while _threads(child.pid) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the solver runs in its own thread: its start means the ILP is being solved
    assert child.poll() is None, "the solve ended before it could be interrupted"
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=30)
    assert child.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted"]
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # neither the plan nor a temporary file


# ---- 5. nonsense values ------------------------------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (("--host-bw", "inf"), ("--host-bw", "inf")),
    (("--host-bw", "nan"), ("--host-bw", "nan")),
    (("--ram", "1e400GiB"), ("--ram", "1e400GiB")),
    (("--vram", "1e30GiB"), ("--vram",)),
    (("--time-limit", "-1"), ("--time-limit", "-1")),
    (("--time-limit", "nan"), ("--time-limit", "nan")),
    (("--time-limit", "inf"), ("--time-limit",)),
    (("--solver", "gurobi"), ("--solver gurobi", "highs", "cbc", "installed")),
    (("--prompt", "0"), ("--prompt", "positive")),
])
def test_nonsense_option_values_are_refused(run_here, args, needles):
    one_line_error(run_here("solve", SMALL, "--hw", SMALL_HW, *args), *needles)


@pytest.mark.parametrize("args", [
    ("simulate", "{plan}", "--host-bw", "inf"),
    ("compare", str(SMALL), "--hw", str(SMALL_HW), "--host-bw", "nan"),
    ("run", "{plan}", "--synthetic", "--threads", "0"),
    ("profile", "--threads", "0"),
])
def test_nonsense_values_are_refused_by_every_command(run_here, plan_dir, args):
    args = tuple(a.format(plan=plan_dir / "plan.yaml") for a in args)
    one_line_error(run_here(*args), args[-2])


# ---- 6. the right diagnosis ------------------------------------------------------------------

def test_a_solver_stop_without_a_plan_is_not_called_a_misfit(run_here):
    line = one_line_error(run_here("solve", TINY, "--hw", "rtx4090", "--time-limit", "0"),
                          "stopped without a plan", "0 s", "--time-limit")
    assert "fits" not in line and "--ram" not in line


def test_acceptance_needs_drafts(run_here):
    one_line_error(run_here("solve", TINY, "--hw", "rtx4090", "--acceptance", "llama-3.2-1b=0.7"),
                   "--acceptance", "tiny.yaml", "no draft")
    one_line_error(run_here("solve", ROOT / "examples" / "llama-3.1-70b-draft.yaml", "--hw", "rtx4090",
                            "--no-draft", "--acceptance", "llama-3.2-1b=0.7"), "--acceptance", "--no-draft")


@pytest.mark.parametrize("command", [("simulate",), ("export", "--to", "json"), ("run", "--synthetic")])
def test_a_plan_edited_to_overfill_the_device_is_refused_on_load(run_here, plan_dir, tmp_path, command):
    import yaml
    data = yaml.safe_load((plan_dir / "plan.yaml").read_text())
    accelerator = data["profile"]["accelerator"]
    used = load_plan_used_vram(plan_dir / "plan.yaml")
    accelerator["memory_bytes"] = data["profile"]["reserve_bytes"] + used // 2  # half of what the plan puts there
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data, sort_keys=False))
    line = one_line_error(run_here(command[0], edited, *command[1:]), "edited.yaml", accelerator["name"],
                          "more than", "solve again")
    assert "MiB" in line or "KiB" in line


def load_plan_used_vram(path: Path) -> int:
    from planner.plan.record import load_plan
    return load_plan(path).evaluate().vram.used_bytes


# ---- 6. the right diagnosis (continued) --------------------------------------------------------

@pytest.mark.parametrize("command", [("simulate",), ("export",), ("run", "--synthetic")])
def test_a_model_file_given_as_a_plan_is_named(run_here, command):
    one_line_error(run_here(command[0], TINY, *command[1:]), "tiny.yaml", "this is a model file", "offplan solve")


@pytest.mark.parametrize("field,value", [("vocab", "1e30"), ("layers", "100000000"), ("hidden", "1e12")])
def test_an_absurd_model_size_names_the_field(run_here, tmp_path, field, value):
    import re
    model = tmp_path / "model.yaml"
    model.write_text(re.sub(rf"(\n\s*{field}:)\s*[^,\n}}]+", rf"\1 {value}", TINY.read_text(), count=1))
    assert value in model.read_text()
    line = one_line_error(run_here("solve", model, "--hw", "rtx4090"), "model.yaml", f"{field}:", "beyond")
    assert "TiB" not in line


def test_profile_checks_its_default_folder_before_measuring(run_here, monkeypatch):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc (a directory where even root cannot create files)")
    monkeypatch.chdir("/proc")
    one_line_error(run_here("profile"), "hwprofiles/", "--out", "cannot write")
