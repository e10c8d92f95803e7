"""What every command shares: options, loading model + hardware + workload, the console,
and the top-level handler that turns known errors into one line (exit code 2)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Mapping, Optional

import typer
from rich.console import Console
from rich.markup import escape

from planner.errors import OffplanError
from planner.hardware.host import with_host
from planner.hardware.profile import HardwareProfile, load_profile, with_overrides
from planner.model.modelfile import ModelFile, load_model_file
from planner.model.spec import Workload
from planner.solve.backend import check_solver_name
from planner.units import check_count, check_positive, check_seconds, fmt_bytes, parse_bytes

console = Console()
err_console = Console(stderr=True)

# ---- shared options ---------------------------------------------------------------------------
HwOpt = Annotated[str, typer.Option("--hw", help="Hardware profile: a shipped name (see `offplan hw list`) "
                                                 "or a YAML file from `offplan profile`.")]
VramOpt = Annotated[Optional[str], typer.Option("--vram", help="Accelerator memory offplan may use, e.g. 10GiB "
                                                              "(replaces the profile's figure).")]
RamOpt = Annotated[Optional[str], typer.Option("--ram", help="Host memory, e.g. 64GiB.")]


def _positive(field: str):
    return lambda value: None if value is None else check_positive(value, field)


def _count(field: str):
    return lambda value: None if value is None else check_count(value, field)


HostBwOpt = Annotated[Optional[float], typer.Option("--host-bw", help="Host DRAM bandwidth in GB/s.",
                                                    callback=_positive("--host-bw"))]
DramOpt = Annotated[Optional[str], typer.Option("--dram", help="Host DRAM as TYPE-RATExCHANNELS, e.g. ddr5-6400x2 "
                                                              "(sets the host bandwidth).")]
CpuCoresOpt = Annotated[Optional[int], typer.Option("--cpu-cores", help="Host CPU cores (threads) to use.",
                                                    callback=_count("--cpu-cores"))]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="offplan (its own executor) or llamacpp (plan and "
                                                           "predict llama.cpp).")]
PromptOpt = Annotated[Optional[int], typer.Option("--prompt", help="Prompt tokens per sequence.",
                                                  callback=_count("--prompt"))]
GenOpt = Annotated[Optional[int], typer.Option("--gen", help="Generated tokens per sequence.",
                                               callback=_count("--gen"))]
BatchOpt = Annotated[Optional[int], typer.Option("--batch", help="Sequences decoded together.",
                                                 callback=_count("--batch"))]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.",
                                                   callback=_count("--threads"))]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
TimeLimitOpt = Annotated[float, typer.Option("--time-limit", help="Solver time limit in seconds.",
                                             callback=lambda value: check_seconds(value, "--time-limit"))]
SolverOpt = Annotated[str, typer.Option("--solver", help="auto (HiGHS if installed, else CBC), highs, cbc.",
                                        callback=check_solver_name)]

DEFAULT_WORKLOAD = Workload(batch=1, prompt=512, gen=128)


def load_hardware(hw: str, vram: str | None, ram: str | None, host_bw: float | None,
                  dram: str | None = None, cpu_cores: int | None = None) -> HardwareProfile:
    if host_bw is not None and dram is not None:
        raise OffplanError("--host-bw and --dram: give one of them (--dram sets the host bandwidth)")
    if host_bw is not None:
        check_positive(host_bw, "--host-bw")
    profile = load_profile(hw)
    vram_bytes = parse_bytes(vram, "--vram") if vram else None
    if vram_bytes is not None and vram_bytes <= profile.reserve_bytes:
        raise OffplanError(f"--vram {vram}: not more than the runtime reserve of {fmt_bytes(profile.reserve_bytes)} "
                           f"that profile {hw!r} keeps; give more --vram")
    ram_bytes = parse_bytes(ram, "--ram") if ram else None
    if ram_bytes is not None and ram_bytes <= profile.host_reserve_bytes:
        raise OffplanError(f"--ram {ram}: not more than the {fmt_bytes(profile.host_reserve_bytes)} profile {hw!r} "
                           "keeps for the OS; give more --ram")
    return with_host(with_overrides(profile, vram_bytes, ram_bytes, host_bw), dram, cpu_cores)


def resolve_workload(model: ModelFile, prompt: int | None, gen: int | None, batch: int | None) -> Workload:
    base = model.workload or DEFAULT_WORKLOAD
    for flag, value in (("--prompt", prompt), ("--gen", gen), ("--batch", batch)):
        if value is not None and value <= 0:
            raise OffplanError(f"{flag}: must be a positive whole number, got {value}")
    workload = Workload(batch=batch or base.batch, prompt=prompt or base.prompt, gen=gen or base.gen)
    if workload.context > model.spec.max_context:
        raise OffplanError(f"--prompt + --gen: {workload.context} tokens exceed the model's context of "
                           f"{model.spec.max_context}")
    return workload


def load_model(source: str) -> ModelFile:
    return load_model_file(source)


def load_plan_file(path: Path):
    """A plan file, re-checked against its profile (a hand edit may overfill a device)."""
    from planner.plan.record import check_plan_fits, load_plan
    plan = load_plan(path)
    check_plan_fits(plan, str(path))
    return plan


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def check_out_path(out: Path | None, flag: str = "--out",
                   inputs: Mapping[str, object | None] | None = None) -> None:
    """Fail before any work if `out` cannot be written or names one of the command's files.

    `inputs` maps how each file was given ("MODEL", "--hw", ...) to its path (None, a preset
    name or a directory are fine: only files that exist, and a directory's model files, count).
    Writability is probed by creating and removing a file beside `out`."""
    if out is None:
        return
    path = out.expanduser()
    parent = path.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise OffplanError(f"{flag} {out}: {parent} is a file, not a directory")
    if not parent.exists():
        raise OffplanError(f"{flag} {out}: directory {parent} does not exist")
    if path.is_dir():
        raise OffplanError(f"{flag} {out}: is a directory, expected a file name")
    for label, source in (inputs or {}).items():
        for candidate in _files_of(source):
            if _same_file(path, candidate):
                what = label if label.startswith("-") else f"the {label}"
                raise OffplanError(f"{flag} {out}: is the same file as {what} {source}; offplan never "
                                   f"overwrites a file it reads, give another {flag}")
    check_writable_dir(parent, f"{flag} {out}")


def check_writable_dir(directory: Path, label: str) -> None:
    """Create and remove a file in `directory` (as root, os.access says yes even where nothing
    can be created); OffplanError naming `label` if that fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".offplan-write-check.", dir=directory)
    except OSError as exc:
        raise OffplanError(f"{label}: cannot write in {directory} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


_MODEL_FILE_GLOBS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.gguf")


def _files_of(source: object | None) -> list[Path]:
    """The files a command reads for one input: the file itself, or a directory's model files."""
    if source is None or isinstance(source, bool):
        return []
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return [f for pattern in _MODEL_FILE_GLOBS for f in path.glob(pattern)]
    return [path]


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def run_app(app: typer.Typer) -> None:
    """Run the CLI; known errors become one line on stderr and exit code 2."""
    debug = os.environ.get("OFFPLAN_DEBUG") == "1"
    try:
        code = app(standalone_mode=False)
    except OffplanError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        _exit_interrupted()
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except Exception as exc:  # click usage errors and file-system errors
        # typer may vendor its own click, so usage errors are recognised by what they offer.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, OSError) and not debug:
            where = escape(str(exc.filename or ''))
            err_console.print(f"[bold red]error:[/] {escape(str(exc.strerror or exc))}: {where}", highlight=False)
            sys.exit(2)
        raise
    # Without standalone mode typer turns Ctrl-C (and typer.Exit(n)) into a returned code.
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == 130:
            _exit_interrupted()
        sys.exit(code)


def _exit_interrupted() -> None:
    """Ctrl-C: say so and exit 130 at once. Output files are written by rename, so nothing is
    half-written; the process ends without running C++ static destructors, which abort while
    an interrupted HiGHS still has worker threads."""
    err_console.print("interrupted")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(130)
