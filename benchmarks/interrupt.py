"""How fast Ctrl-C stops offplan: SIGINT to a child `offplan` in the middle of its work, time
until it exits (expected: exit code 130, "interrupted" on stderr).

    python benchmarks/interrupt.py            # solve (70B example) and run (tiny example)

The solve case waits until the solver thread has started (Linux /proc), the run case until
torch is loaded, then one more second, so the signal lands in the work itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ROOT / "tests" / "assets" / "loopback-test.yaml"


def child(*args: object) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "planner.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 120
    while not ready(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def interrupt(label: str, proc: subprocess.Popen, ready, settle_s: float) -> None:
    wait_for(proc, ready)
    time.sleep(settle_s)
    if proc.poll() is not None:
        print(f"{label:<8} finished before the signal (exit {proc.returncode})")
        return
    start = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    stop_s = time.perf_counter() - start
    print(f"{label:<8} exit {proc.returncode}, stopped {stop_s:.3f} s after SIGINT, stderr {err.strip()[-40:]!r}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.yaml"
        proc = child("solve", ROOT / "examples" / "llama-3.1-70b.yaml", "--hw", "rtx4090", "--no-draft",
                     "--time-limit", "60", "--out", out)
        interrupt("solve", proc, lambda pid: threads(pid) >= 2, 0.5)
        plan = Path(tmp) / "tiny.yaml"
        subprocess.run([sys.executable, "-m", "planner.cli", "solve", ROOT / "examples" / "tiny.yaml", "--hw",
                        LOOPBACK, "--out", plan], check=True, capture_output=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        interrupt("run", child("run", plan, "--synthetic", "--json", Path(tmp) / "r.json"), torch_loaded, 1.0)
        print("files left:", sorted(p.name for p in Path(tmp).iterdir()))


if __name__ == "__main__":
    main()
