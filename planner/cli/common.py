"""What every command shares: options, loading model + hardware + workload, the console,
and the top-level handler that turns known errors into one line (exit code 2)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from planner.errors import OffplanError
from planner.hardware.host import with_host
from planner.hardware.profile import HardwareProfile, load_profile, with_overrides
from planner.model.modelfile import ModelFile, load_model_file
from planner.model.spec import Workload
from planner.units import fmt_bytes, parse_bytes

console = Console()
err_console = Console(stderr=True)

# ---- shared options ---------------------------------------------------------------------------
HwOpt = Annotated[str, typer.Option("--hw", help="Hardware profile: a shipped name (see `offplan hw list`) "
                                                 "or a YAML file from `offplan profile`.")]
VramOpt = Annotated[Optional[str], typer.Option("--vram", help="Accelerator memory offplan may use, e.g. 10GiB "
                                                              "(replaces the profile's figure).")]
RamOpt = Annotated[Optional[str], typer.Option("--ram", help="Host memory, e.g. 64GiB.")]
HostBwOpt = Annotated[Optional[float], typer.Option("--host-bw", help="Host DRAM bandwidth in GB/s.")]
DramOpt = Annotated[Optional[str], typer.Option("--dram", help="Host DRAM as TYPE-RATExCHANNELS, e.g. ddr5-6400x2 "
                                                              "(sets the host bandwidth).")]
CpuCoresOpt = Annotated[Optional[int], typer.Option("--cpu-cores", help="Host CPU cores (threads) to use.")]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="offplan (its own executor) or llamacpp (plan and "
                                                           "predict llama.cpp).")]
PromptOpt = Annotated[Optional[int], typer.Option("--prompt", help="Prompt tokens per sequence.")]
GenOpt = Annotated[Optional[int], typer.Option("--gen", help="Generated tokens per sequence.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch", help="Sequences decoded together.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
TimeLimitOpt = Annotated[float, typer.Option("--time-limit", help="Solver time limit in seconds.")]
SolverOpt = Annotated[str, typer.Option("--solver", help="auto (HiGHS if installed, else CBC), highs, cbc.")]

DEFAULT_WORKLOAD = Workload(batch=1, prompt=512, gen=128)


def load_hardware(hw: str, vram: str | None, ram: str | None, host_bw: float | None,
                  dram: str | None = None, cpu_cores: int | None = None) -> HardwareProfile:
    if host_bw is not None and dram is not None:
        raise OffplanError("--host-bw and --dram: give one of them (--dram sets the host bandwidth)")
    if host_bw is not None and host_bw <= 0:
        raise OffplanError(f"--host-bw: must be positive, got {host_bw}")
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


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def check_out_path(out: Path | None) -> None:
    """Fail before any work if the output cannot be written."""
    if out is None:
        return
    parent = out.expanduser().resolve().parent
    if parent.exists() and not parent.is_dir():
        raise OffplanError(f"--out {out}: {parent} is a file, not a directory")
    if not parent.exists():
        raise OffplanError(f"--out {out}: directory {parent} does not exist")
    if out.is_dir():
        raise OffplanError(f"--out {out}: is a directory, expected a file name")
    if not os.access(parent, os.W_OK):
        raise OffplanError(f"--out {out}: directory {parent} is not writable")


def run_app(app: typer.Typer) -> None:
    """Run the CLI; known errors become one line on stderr and exit code 2."""
    debug = os.environ.get("OFFPLAN_DEBUG") == "1"
    try:
        app(standalone_mode=False)
    except OffplanError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
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
