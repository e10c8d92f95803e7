"""Shared test helpers: a tiny ModelSpec, a tiny Hugging Face-format checkpoint, and
`offplan_in_process` (the command line through its entry point, without a child process).

Import the plain functions with `from conftest import tiny_spec, write_tiny_checkpoint`, or use
the `tiny_checkpoint` fixture. torch is imported lazily so planner tests stay torch-free.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.model.spec import ModelSpec


def tiny_spec(**overrides) -> ModelSpec:
    """A 2-layer Llama-family fp32 model with grouped-query attention (4 heads, 2 KV heads);
    any ModelSpec field can be overridden."""
    fields = dict(name="tiny", family="llama", layers=2, hidden=64, intermediate=128, heads=4,
                  kv_heads=2, vocab=96, dtype="fp32", max_context=256)
    fields.update(overrides)
    return ModelSpec(**fields)


def write_tiny_checkpoint(out_dir: Path, spec: ModelSpec | None = None, seed: int = 0) -> Path:
    """Write config.json + model.safetensors of a synthetic model of `spec` (default tiny_spec())."""
    from executor.weights import save_checkpoint, synthetic_model

    spec = spec or tiny_spec()
    return save_checkpoint(synthetic_model(spec, seed=seed), spec, out_dir)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """Directory of a tiny Llama checkpoint (tiny_spec(), seed 0) in Hugging Face layout."""
    return write_tiny_checkpoint(tmp_path / "tiny-llama")


def offplan_in_process(*args: object, cwd: Path | None = None) -> "subprocess.CompletedProcess":
    """`offplan ARGS` through the script's own entry point, in this process: the same exit code,
    stdout and stderr as a child process, without starting Python and importing torch again.
    (What reaches the file descriptors, or a real signal, needs a child process.)"""
    import contextlib
    import io
    import os
    import subprocess
    import sys

    from planner.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    argv, here, debug = sys.argv, os.getcwd(), os.environ.pop("OFFPLAN_DEBUG", None)
    code = 0
    try:
        sys.argv = ["offplan", *map(str, args)]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        if debug is not None:
            os.environ["OFFPLAN_DEBUG"] = debug
    return subprocess.CompletedProcess(["offplan", *map(str, args)], code, out.getvalue(), err.getvalue())
