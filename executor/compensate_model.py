"""Turn a float model into its quantized, residual-compensated twin, in place.

Every attention / MLP Linear becomes a QuantLinear (rank 0) or a CompensatedLinear whose
rank-r branch `(x·A)·B` runs on the host in a worker thread beside the backbone matmul.
Ranks come from a plan (`placement.ranks`), a mapping tensor name -> rank, or one rank for
every matrix. Backbones stay on the device their float weights were on; factors live on
the host. Where tensors are placed (resident, streamed) is executor/offload.py's job.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import torch
from torch import Tensor, nn

from planner.errors import PlanError, SpecError
from planner.plan.record import Plan
from planner.model.ranks import quantized_tensors
from planner.model.spec import Quantization

from .compensation import CompensatedLinear
from .model import Transformer
from .quant import quant_linear_from

WORKER_PREFIX = "offplan-compensation"


class CompensationHandle:
    """The swapped modules of a compensated model, their timers, and the worker thread.

    `close()` ends the worker pool when this handle created it (a `pool` passed in is left
    to its owner); the model still runs afterwards only if every rank is 0."""

    def __init__(self, model: Transformer, modules: dict[str, nn.Module], ranks: dict[str, int],
                 pool: ThreadPoolExecutor, owns_pool: bool):
        self.model = model
        self.modules = modules  # tensor name -> QuantLinear | CompensatedLinear
        self.ranks = ranks  # tensor name -> rank actually built (clamped to min(in, out))
        self._pool = pool
        self._owns_pool = owns_pool

    def compensated(self) -> dict[str, CompensatedLinear]:
        return {name: m for name, m in self.modules.items() if isinstance(m, CompensatedLinear)}

    @property
    def factor_bytes(self) -> int:
        """Host bytes held by every A and B."""
        return sum(m.factor_bytes for m in self.compensated().values())

    @property
    def host_branch_s(self) -> float:
        """Host compute time of all branches since the last reset_timers()."""
        return sum(m.host_branch_s for m in self.compensated().values())

    @property
    def wait_s(self) -> float:
        """Time forwards blocked on branches after their backbone matmul (exposed branch time)."""
        return sum(m.wait_s for m in self.compensated().values())

    def reset_timers(self) -> None:
        for m in self.compensated().values():
            m.reset_timers()

    def close(self) -> None:
        if self._owns_pool:
            self._pool.shutdown(wait=True)
            self._owns_pool = False

    def __enter__(self) -> "CompensationHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parent(model: Transformer, name: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = name.rpartition(".")
    return model.model.get_submodule(parent_path), attr


def _requested_ranks(plan_or_ranks: Plan | Mapping[str, int] | int, names: list[str]) -> dict[str, int]:
    if isinstance(plan_or_ranks, Plan):
        requested = dict(plan_or_ranks.placement.ranks)
    elif isinstance(plan_or_ranks, int) and not isinstance(plan_or_ranks, bool):
        requested = dict.fromkeys(names, plan_or_ranks)
    elif isinstance(plan_or_ranks, Mapping):
        requested = dict(plan_or_ranks)
    else:
        raise PlanError(f"ranks: expected a plan, a mapping tensor -> rank or one rank, got {plan_or_ranks!r}")
    unknown = sorted(set(requested) - set(names))
    if unknown:
        raise PlanError(f"ranks.{unknown[0]}: not a quantized matrix of this model (attention and MLP "
                        "matrices only); the plan was made for another model?")
    for name, rank in requested.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise PlanError(f"ranks.{name}: expected a whole number >= 0, got {rank!r}")
    return requested


def _quantization(plan_or_ranks: object, bits: int | None, group_size: int | None,
                  symmetric: bool | None) -> tuple[int, int, bool]:
    q = plan_or_ranks.model.quantization if isinstance(plan_or_ranks, Plan) else None
    if (bits is None or group_size is None) and q is None:
        raise SpecError("quantization: not given and the plan's model is not quantized; pass bits and "
                        "group_size (or solve a model.yaml with `quantization:`)")
    q = q or Quantization()
    return (q.bits if bits is None else bits, q.group_size if group_size is None else group_size,
            q.symmetric if symmetric is None else symmetric)


def compensate_model(model: Transformer, plan_or_ranks: Plan | Mapping[str, int] | int,
                     bits: int | None = None, group_size: int | None = None, symmetric: bool | None = None,
                     calibration_moments: Mapping[str, Tensor] | None = None,
                     pool: ThreadPoolExecutor | None = None, factor_dtype: torch.dtype = torch.float32,
                     cache_dequantized: bool = False) -> CompensationHandle:
    """Quantize every attention / MLP Linear of `model` (in place) and give each its rank.

    `plan_or_ranks`: a Plan (its `placement.ranks`; quantization defaults to the plan's model),
    a mapping tensor name -> rank (absent = 0), or one rank for all. Rank 0 gives a plain
    QuantLinear; a rank above min(in, out) is clamped to it (full rank removes the whole
    error). `calibration_moments` (tensor name -> E[x xᵀ], from
    executor.sensitivity.collect_second_moments on the float model) makes the factors
    activation-aware. All branches share one worker thread (`pool`, or one the handle owns)."""
    spec = model.spec
    names = [t.name for t in quantized_tensors(spec)]
    requested = _requested_ranks(plan_or_ranks, names)
    bits, group_size, symmetric = _quantization(plan_or_ranks, bits, group_size, symmetric)
    moments = dict(calibration_moments or {})
    owns_pool = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_PREFIX)
    modules: dict[str, nn.Module] = {}
    built: dict[str, int] = {}
    try:
        for name in names:
            parent, attr = _parent(model, name)
            linear = getattr(parent, attr)
            if not isinstance(linear, nn.Linear):
                raise PlanError(f"{name}: already replaced by {type(linear).__name__}; compensate a float model")
            rank = min(requested.get(name, 0), min(linear.in_features, linear.out_features))
            if rank == 0:
                module = quant_linear_from(linear, bits, group_size, symmetric, cache_dequantized)
            else:
                module = CompensatedLinear.from_linear(linear, rank, bits, group_size, symmetric,
                                                       moments.get(name), factor_dtype=factor_dtype,
                                                       cache_dequantized=cache_dequantized, pool=pool)
            setattr(parent, attr, module)
            modules[name] = module
            built[name] = rank
    except BaseException:
        if owns_pool:
            pool.shutdown(wait=True)
        raise
    return CompensationHandle(model, modules, built, pool, owns_pool)
