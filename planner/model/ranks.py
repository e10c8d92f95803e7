"""Rank tables for residual compensation: how much quantization error a rank-r branch leaves.

A rank table (`ranks.yaml`, written by `offplan sensitivity`) holds, for every quantized
matrix, the *remaining* fraction of its quantization output-error energy at each rank,
tail(r) / tail(0) (1.0 at rank 0, 0.0 at full rank), measured activation-aware when
calibration prompts were run, else from the plain SVD of the error. The planner reads it as
*recovered* fractions, 1 - remaining, keyed by tensor kind (q_proj, down_proj, ...): the
mean over layers. Kind-level recovery keeps the ILP small (layers sharing a configuration
share their coefficients, see planner/solve/groups.py) and is what `Scenario.rank_recovery` holds.

    version: 1
    model: llama-3.1-8b
    bits: 4
    group_size: 128
    symmetric: true
    method: activation-aware        # activation-aware | plain | prior
    ranks: [0, 8, 16, 32]
    tensors:                        # tensor name -> rank -> remaining error fraction
      layers.0.self_attn.q_proj: {0: 1.0, 8: 0.71, 16: 0.55, 32: 0.36}
    kinds:                          # optional: kind -> rank -> remaining (mean over layers)
      q_proj: {0: 1.0, 8: 0.69, 16: 0.52, 32: 0.33}
    output_error:                   # optional: ‖x E‖ / ‖x Wᵀ‖ of each matrix at rank 0
      layers.0.self_attn.q_proj: 0.081

When no table is given the planner uses a *prior*, not a measurement (`default_table`): the
energy a rank-r truncated SVD captures from an i.i.d. Gaussian matrix of the tensor's shape
(Marchenko-Pastur law). Rounding error of a quantized weight is close to such a matrix, so
real tables (structured errors, anisotropic activations) recover at least as much: the prior
is conservative. For a square matrix it recovers 3.8% of the error at r = 1% of min(rows,
cols), 17% at 5%, 31% at 10%, 62% at 25%, 89% at 50%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from planner.errors import SpecError
from planner.model.modelfile import Compensation
from planner.schema import atomic_write, check_version, dump_yaml, read_yaml
from planner.model.spec import ModelSpec, Quantization

RANKS_VERSION = 1
METHODS = ("activation-aware", "plain", "prior")
DEFAULT_RANKS = (0, 8, 16, 32, 64, 128)
_KEYS = ("model", "bits", "group_size", "symmetric", "method", "ranks", "tensors", "kinds", "output_error")
_TOLERANCE = 1e-9  # rounding slack on fractions read back from YAML
_PRIOR_STEPS = 4096  # quadrature points of the Marchenko-Pastur integrals


@dataclass(frozen=True)
class RankTable:
    model: str
    bits: int
    group_size: int
    ranks: tuple[int, ...]  # ascending, starts at 0
    tensors: dict[str, dict[int, float]]  # tensor name -> rank -> remaining error fraction
    kinds: dict[str, dict[int, float]] = field(default_factory=dict)  # kind -> rank -> remaining
    output_error: dict[str, float] = field(default_factory=dict)  # tensor name -> rel. output error at rank 0
    symmetric: bool = True
    method: str = "plain"


def kind_of(name: str) -> str:
    """'layers.3.mlp.down_proj' -> 'down_proj' (also for experts: '...experts.2.up_proj')."""
    return name.rsplit(".", 1)[-1]


def quantized_tensors(spec: ModelSpec):
    """The matrices a quantized backbone quantizes (and may compensate): attention and MLP."""
    return tuple(t for t in spec.tensors() if t.group in ("attn", "mlp"))


# ---- kind-level aggregation and interpolation ------------------------------------------------

def aggregate_kinds(tensors: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Mean remaining fraction over the layers of each kind, rank by rank."""
    grouped: dict[str, list[dict[int, float]]] = {}
    for name, curve in tensors.items():
        grouped.setdefault(kind_of(name), []).append(curve)
    return {kind: {r: sum(c[r] for c in curves) / len(curves) for r in curves[0]}
            for kind, curves in grouped.items()}


def kind_remaining(table: RankTable) -> dict[str, dict[int, float]]:
    """The table's `kinds` section, or the mean over layers of its `tensors` when absent."""
    return dict(table.kinds) if table.kinds else aggregate_kinds(table.tensors)


def interpolate_remaining(curve: dict[int, float], rank: int) -> float:
    """Remaining fraction at `rank`, linear between the table's ranks.

    The tail energy of sorted singular values is convex in the rank, so the chord lies above
    it: interpolation never overstates what a rank recovers. Above the largest rank measured
    the value there is kept (also conservative)."""
    points = sorted(curve.items())
    if rank <= points[0][0]:
        return points[0][1] if rank == points[0][0] else 1.0
    for (r0, v0), (r1, v1) in zip(points, points[1:]):
        if rank <= r1:
            return v0 + (v1 - v0) * (rank - r0) / (r1 - r0)
    return points[-1][1]


def rank_recovery(table: RankTable, rank_choices: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """`Scenario.rank_recovery`: kind -> rank -> recovered fraction (1 - remaining) for
    every rank the planner offers."""
    return {kind: {r: (0.0 if r == 0 else min(max(1.0 - interpolate_remaining(curve, r), 0.0), 1.0))
                   for r in rank_choices}
            for kind, curve in kind_remaining(table).items()}


def compensation_settings(spec: ModelSpec, compensation: Compensation | None = None,
                          table: RankTable | None = None) -> tuple[tuple[int, ...], dict[str, dict[int, float]]]:
    """(`Scenario.rank_choices`, `Scenario.rank_recovery`) for `spec`.

    Ranks offered: model.yaml's `compensation.ranks`, else the table's ranks, else
    DEFAULT_RANKS. Recovery, first found: the rank table (ranks.yaml), model.yaml's inline
    `compensation.table` (kind -> rank -> *recovered* fraction); kinds neither lists get the
    prior. An unquantized model gets no compensation: ((0,), {})."""
    if spec.quantization is None:
        return (0,), {}
    if compensation is not None:
        choices = check_ranks(list(compensation.ranks), "compensation.ranks")
    else:
        choices = table.ranks if table is not None else DEFAULT_RANKS
    recovery = rank_recovery(default_table(spec, choices), choices)
    if table is not None:
        check_table(table, spec)
        recovery.update(rank_recovery(table, choices))
    elif compensation is not None and compensation.table:
        recovery.update(_inline_recovery(compensation.table, spec, choices))
    return choices, recovery


def _inline_recovery(table: dict, spec: ModelSpec, choices: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """model.yaml's `compensation.table` (recovered fractions) as remaining curves, so the
    same validation and interpolation apply; rank 0 recovers nothing."""
    kinds = {t.kind for t in quantized_tensors(spec)}
    remaining = {}
    for kind, curve in table.items():
        if kind not in kinds:
            raise SpecError(f"compensation.table.{kind}: model {spec.name!r} has no {kind!r} matrices; "
                            f"use one of {', '.join(sorted(kinds))}")
        if not isinstance(curve, dict):
            raise SpecError(f"compensation.table.{kind}: expected a mapping rank -> recovered fraction")
        points = {0: 1.0}
        for key, value in curve.items():
            rank = _rank_key(key, f"compensation.table.{kind}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise SpecError(f"compensation.table.{kind}.{rank}: recovered fraction must be between 0 and 1, "
                                f"got {value!r}")
            if rank:
                points[rank] = 1.0 - float(value)
        remaining[kind] = _curve(points, tuple(sorted(points)), f"compensation.table.{kind}")
    return {kind: {r: (0.0 if r == 0 else 1.0 - interpolate_remaining(curve, r)) for r in choices}
            for kind, curve in remaining.items()}


# ---- the prior ----------------------------------------------------------------------------------

def prior_recovered(rows: int, cols: int, rank: int) -> float:
    """Energy fraction a rank-`rank` truncated SVD captures from a rows x cols i.i.d. Gaussian
    matrix, in the large-matrix limit (Marchenko-Pastur law with aspect β = min/max).

    With λ = (1+β) - 2√β cos θ the law's density and energy become smooth in θ ∈ [0, π]:
    count density (2/π) sin²θ / λ(θ), energy density (2/π) sin²θ (mean eigenvalue 1). Sum both
    from the largest eigenvalue (θ = π) down until the count reaches rank / min(rows, cols)."""
    small, large = min(rows, cols), max(rows, cols)
    target = min(rank / small, 1.0)
    if target <= 0.0:
        return 0.0
    if target >= 1.0:
        return 1.0
    beta = small / large
    centre, half_width = 1.0 + beta, 2.0 * math.sqrt(beta)
    step = math.pi / _PRIOR_STEPS
    count = energy = 0.0
    for k in range(_PRIOR_STEPS):
        theta = math.pi - (k + 0.5) * step
        weight = 2.0 / math.pi * math.sin(theta) ** 2 * step
        lam = centre - half_width * math.cos(theta)
        if count + weight / lam >= target:
            return min(energy + lam * (target - count), 1.0)  # part of this slice, energy = λ·count
        count += weight / lam
        energy += weight
    return 1.0


def default_table(spec: ModelSpec, ranks: tuple[int, ...] = DEFAULT_RANKS) -> RankTable:
    """The Marchenko-Pastur prior for every kind of `spec` (a prior, not a measurement)."""
    ranks = check_ranks(ranks, "ranks")
    shapes = {t.kind: (t.rows, t.cols) for t in quantized_tensors(spec)}
    kinds = {kind: {r: 1.0 - prior_recovered(rows, cols, r) for r in ranks} for kind, (rows, cols) in shapes.items()}
    q = spec.quantization or Quantization()
    return RankTable(spec.name, q.bits, q.group_size, ranks, {}, kinds, {}, q.symmetric, "prior")


# ---- validation ----------------------------------------------------------------------------------

def check_ranks(ranks: object, where: str) -> tuple[int, ...]:
    """Sorted distinct non-negative whole numbers, with 0 (no branch) added."""
    if not isinstance(ranks, (list, tuple)) or not ranks:
        raise SpecError(f"{where}: expected a list of ranks such as [0, 8, 16, 32], got {ranks!r}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise SpecError(f"{where}: ranks must be whole numbers >= 0, got {r!r}")
    return tuple(sorted(set(ranks) | {0}))


def _rank_key(key: object, where: str) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    raise SpecError(f"{where}: rank {key!r} is not a whole number")


def _curve(data: object, ranks: tuple[int, ...], where: str) -> dict[int, float]:
    """One rank -> remaining mapping: exactly the table's ranks, values in [0, 1], non-increasing."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping rank -> remaining fraction, got {data!r}")
    curve = {}
    for key, value in data.items():
        rank = _rank_key(key, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"{where}.{rank}: expected a number between 0 and 1, got {value!r}")
        if not -_TOLERANCE <= value <= 1.0 + _TOLERANCE:
            raise SpecError(f"{where}.{rank}: remaining fraction {value!r} is outside 0..1")
        curve[rank] = min(max(float(value), 0.0), 1.0)
    if set(curve) != set(ranks):
        missing = sorted(set(ranks) - set(curve))
        what = f"no entry for rank {missing[0]}" if missing else f"rank {sorted(set(curve) - set(ranks))[0]} is not in `ranks`"
        raise SpecError(f"{where}: {what}; every tensor lists exactly the ranks of `ranks:`")
    values = [curve[r] for r in ranks]
    for (r0, v0), (r1, v1) in zip(zip(ranks, values), zip(ranks[1:], values[1:])):
        if v1 > v0 + 1e-6:
            raise SpecError(f"{where}: remaining fraction rises from {v0:g} at rank {r0} to {v1:g} at rank "
                            f"{r1}; a larger rank never leaves more error (re-run offplan sensitivity)")
    return curve


def table_from_data(data: object, where: str = "ranks.yaml") -> RankTable:
    body = check_version(data, where, RANKS_VERSION, SpecError)
    unknown = sorted(set(body) - set(_KEYS))
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(_KEYS)}")
    for key in ("model", "bits", "group_size", "ranks"):
        if key not in body:
            raise SpecError(f"{where}: missing {key!r} (required)")
    model, bits, group_size = body["model"], body["bits"], body["group_size"]
    if not isinstance(model, str) or not model:
        raise SpecError(f"{where}: model: expected the model's name, got {model!r}")
    for key, value in (("bits", bits), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SpecError(f"{where}: {key}: must be a positive whole number, got {value!r}")
    symmetric = body.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise SpecError(f"{where}: symmetric: expected true or false, got {symmetric!r}")
    method = body.get("method", "plain")
    if method not in METHODS:
        raise SpecError(f"{where}: method: {method!r} is not one of {', '.join(METHODS)}")
    ranks = check_ranks(body["ranks"], f"{where}: ranks")
    sections = {}
    for key in ("tensors", "kinds"):
        section = body.get(key) or {}
        if not isinstance(section, dict):
            raise SpecError(f"{where}: {key}: expected a mapping name -> {{rank: remaining fraction}}")
        sections[key] = {str(name): _curve(curve, ranks, f"{where}: {key}.{name}") for name, curve in section.items()}
    if not sections["tensors"] and not sections["kinds"]:
        raise SpecError(f"{where}: no 'tensors:' or 'kinds:' entries; write the table with offplan sensitivity")
    output_error = body.get("output_error") or {}
    if not isinstance(output_error, dict):
        raise SpecError(f"{where}: output_error: expected a mapping tensor name -> relative error")
    errors = {}
    for name, value in output_error.items():
        if str(name) not in sections["tensors"]:
            raise SpecError(f"{where}: output_error.{name}: not listed under 'tensors:'")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise SpecError(f"{where}: output_error.{name}: expected a number >= 0, got {value!r}")
        errors[str(name)] = float(value)
    return RankTable(model, bits, group_size, ranks, sections["tensors"], sections["kinds"], errors,
                     symmetric, method)


def check_table(table: RankTable, spec: ModelSpec, where: str = "ranks.yaml") -> None:
    """Raise SpecError when `table` was measured for another model or another quantization."""
    shapes = {t.name: t for t in quantized_tensors(spec)}
    kinds = {t.kind for t in shapes.values()}
    for name in table.tensors:
        if name not in shapes:
            raise SpecError(f"{where}: tensor {name!r} is not a quantized matrix of model {spec.name!r}; "
                            "the table was measured for another model (re-run offplan sensitivity)")
    for kind in table.kinds:
        if kind not in kinds:
            raise SpecError(f"{where}: kinds.{kind}: model {spec.name!r} has no {kind!r} matrices")
    q = spec.quantization
    if q is not None and (q.bits, q.group_size, q.symmetric) != (table.bits, table.group_size, table.symmetric):
        raise SpecError(f"{where}: measured for {table.bits}-bit, group {table.group_size}, symmetric "
                        f"{table.symmetric}, but the model is quantized to {q.bits}-bit, group {q.group_size}, "
                        f"symmetric {q.symmetric}; re-run offplan sensitivity with the model's quantization")


# ---- files ---------------------------------------------------------------------------------------

def table_to_yaml(table: RankTable) -> str:
    def curves(section: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
        return {name: {int(r): float(v) for r, v in sorted(curve.items())} for name, curve in section.items()}

    data = {"version": RANKS_VERSION, "model": table.model, "bits": table.bits, "group_size": table.group_size,
            "symmetric": table.symmetric, "method": table.method, "ranks": list(table.ranks),
            "tensors": curves(table.tensors)}
    if table.kinds:
        data["kinds"] = curves(table.kinds)
    if table.output_error:
        data["output_error"] = {name: float(v) for name, v in table.output_error.items()}
    return dump_yaml(data)


def save_rank_table(table: RankTable, path: str | Path) -> None:
    atomic_write(path, table_to_yaml(table))


def load_rank_table(path: str | Path) -> RankTable:
    return table_from_data(read_yaml(path, SpecError), str(path))
