"""Shared test helpers: a tiny ModelSpec and a tiny Hugging Face-format checkpoint.

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
