"""Layer groups of the placement MILP: contiguous runs of layers that share one configuration
(DESIGN §3)."""

from __future__ import annotations

# Up to this many layers the exact one-group-per-layer model solves in about a second.
EXACT_LAYERS = 4


def layer_groups(n_layers: int, max_groups: int) -> list[tuple[int, int]]:
    """Split layers into contiguous (first, size) groups that share one configuration.

    Decoder layers are identical, so one group per layer makes the MILP highly symmetric and
    branch-and-bound cannot close its gap. Groups of distinct sizes 1, 2, 4, 8, ... (plus the
    remainder) still let many counts of layers take any configuration (every count up to the
    sum of the powers), with no two interchangeable groups, so the solver proves optimality
    in seconds; the boundaries between groups are modelled exactly. Models of at most
    EXACT_LAYERS layers (or `max_groups`, if smaller) get one group per layer."""
    if n_layers <= min(max_groups, EXACT_LAYERS):
        return [(i, 1) for i in range(n_layers)]
    sizes, size = [], 1
    while len(sizes) < max_groups - 1 and sum(sizes) + size <= n_layers:
        sizes.append(size)
        size *= 2
    if n_layers > sum(sizes):
        sizes.append(n_layers - sum(sizes))
    groups, first = [], 0
    for size in sizes:
        groups.append((first, size))
        first += size
    return groups


def segment_groups(spec, max_groups: int) -> list[tuple[int, int]]:
    """layer_groups within each run of identically built layers: a mixture-of-experts model's
    dense first layers (moe.dense_first) never share a group with its expert layers."""
    first_moe = spec.moe.dense_first if spec.moe is not None else 0
    if first_moe == 0 or spec.layers <= min(max_groups, EXACT_LAYERS):
        return layer_groups(spec.layers, max_groups)
    dense = layer_groups(first_moe, max(max_groups // 3, 1))
    routed = layer_groups(spec.layers - first_moe, max(max_groups - len(dense), 1))
    return dense + [(first + first_moe, size) for first, size in routed]
