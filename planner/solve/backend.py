"""The MILP solvers offplan drives through PuLP: HiGHS in-process (highspy), CBC as fallback.

Every solver offplan builds comes from `pick_solver`, so two rules hold for every solve:
- the solver writes nothing to stdout (HiGHS prints a banner from C++ the first time a
  `Highs` object is made, whatever PuLP's `msg` says, so that moment runs with the process's
  stdout file descriptor pointed at /dev/null); `--json` output stays JSON;
- Ctrl-C stops a solve promptly: HiGHS runs in a worker thread and the main thread waits in
  short slices, so KeyboardInterrupt is raised in Python at once; the solver's interrupt
  callbacks then stop HiGHS at its next check and the interrupt propagates.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings
from typing import Iterator

import pulp

from planner.errors import OffplanError

SOLVER_CHOICES = ("auto", "highs", "cbc")
_WAIT_SLICE_S = 0.05  # how often the waiting main thread lets Python see a pending Ctrl-C


def available_solvers() -> list[str]:
    """Names of the solvers installed, in order of preference."""
    names = ["HiGHS"] if pulp.HiGHS().available() else []
    if _cbc().available():
        names.append("CBC")
    return names


def _cbc(**options) -> pulp.LpSolver:
    """PuLP's bundled CBC (deprecated in PuLP 3 in favour of a separately installed CBC)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**options)


def check_solver_name(name: str) -> str:
    """'auto' | 'highs' | 'cbc' (any case); anything else is refused naming what is installed."""
    key = name.strip().lower()
    if key not in SOLVER_CHOICES:
        installed = ", ".join(available_solvers()) or "none"
        raise OffplanError(f"--solver {name}: not supported; choose auto, highs or cbc (installed: {installed})")
    return key


def pick_solver(solver: str, time_limit_s: float, gap_rel: float, threads: int = 0) -> tuple[str, pulp.LpSolver]:
    """(display name, PuLP solver) for `solver` in SOLVER_CHOICES; 'auto' prefers HiGHS."""
    key = check_solver_name(solver)
    extra = {"threads": threads} if threads else {}
    if key in ("auto", "highs"):
        highs = QuietHiGHS(msg=False, timeLimit=time_limit_s, gapRel=gap_rel, **extra)
        if highs.available():
            return "HiGHS", highs
        if key == "highs":
            raise OffplanError("--solver highs: highspy is not installed (pip install highspy)")
    cbc = _cbc(msg=False, timeLimit=time_limit_s, gapRel=gap_rel, **extra)
    if not cbc.available():
        raise OffplanError("no MILP solver found: install highspy (pip install highspy)")
    return "CBC", cbc


@contextlib.contextmanager
def stdout_silenced() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null for the block (C and C++ writes included)."""
    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
    except (AttributeError, OSError, ValueError):
        fd = 1
    for stream in (sys.stdout, sys.__stdout__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no stdout at all (closed): nothing to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), fd)
        yield
    finally:
        _flush_c_stdio()
        os.dup2(saved, fd)
        os.close(saved)


def _flush_c_stdio() -> None:
    """fflush(NULL): what C code buffered goes to /dev/null, not to the restored stdout."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


class QuietHiGHS(pulp.HiGHS):
    """PuLP's in-process HiGHS, silent from construction on and interruptible with Ctrl-C."""

    def createAndConfigureSolver(self, lp):  # noqa: N802 (PuLP's method name)
        with stdout_silenced():
            super().createAndConfigureSolver(lp)
        lp.solverModel.setOptionValue("output_flag", False)
        lp.solverModel.HandleUserInterrupt = True  # the interrupt callbacks poll cancelSolve()

    def callSolver(self, lp):  # noqa: N802
        highs = lp.solverModel
        thread = highs.startSolve()
        try:
            while thread.is_alive():
                thread.join(_WAIT_SLICE_S)
        except KeyboardInterrupt:
            highs.cancelSolve()
            thread.join()
            raise
