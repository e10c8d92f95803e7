"""Routing tables: how many routed tokens each expert of each MoE layer received on a prompt
set (`offplan routing` measures one; `offplan solve --routing FILE` plans with it).

File (YAML, version 1):

    version: 1
    model: qwen3-30b-a3b        # the model it was measured on (informational)
    tokens: 4096                # prompt tokens that were routed
    layers:                     # MoE layer -> tokens routed to expert 0, 1, ...
      0: [512, 31, 977, ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from planner.errors import SpecError
from planner.model.spec import ModelSpec
from planner.schema import atomic_write, check_version, read_yaml

ROUTING_VERSION = 1


@dataclass(frozen=True)
class RoutingTable:
    model: str
    tokens: int
    layers: dict[int, tuple[float, ...]] = field(default_factory=dict)

    def top_share(self, layer: int, n: int) -> float:
        """Share of layer `layer`'s routed tokens that its n most used experts took."""
        counts = sorted(self.layers.get(layer, ()), reverse=True)
        total = sum(counts)
        return sum(counts[:n]) / total if total else 0.0


def save_routing(table: RoutingTable, path: str | Path) -> None:
    import yaml
    body = {"version": ROUTING_VERSION, "model": table.model, "tokens": table.tokens,
            "layers": {int(layer): [int(c) if float(c).is_integer() else float(c) for c in counts]
                       for layer, counts in sorted(table.layers.items())}}
    atomic_write(Path(path), yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=100))


def load_routing(path: str | Path, spec: ModelSpec) -> RoutingTable:
    """Read a routing table and check it fits `spec` (its MoE layers and expert count)."""
    where = str(path)
    data = check_version(read_yaml(Path(path), SpecError), where, ROUTING_VERSION, SpecError)
    unknown = sorted(set(data) - {"model", "tokens", "layers"})
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed: model, tokens, layers")
    if spec.moe is None:
        raise SpecError(f"--routing: {spec.name} has no routed experts; a routing table applies to "
                        "mixture-of-experts models")
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise SpecError(f"{where}: layers: expected a mapping of MoE layer -> tokens per expert")
    table = {}
    for key, counts in layers.items():
        layer = _layer(key, where)
        if not spec.is_moe_layer(layer) or layer >= spec.layers:
            raise SpecError(f"{where}: layers.{layer}: not a mixture-of-experts layer of {spec.name} "
                            f"(layers {spec.moe.dense_first}-{spec.layers - 1})")
        if not isinstance(counts, list) or len(counts) != spec.moe.experts:
            raise SpecError(f"{where}: layers.{layer}: expected {spec.moe.experts} token counts (one per expert), "
                            f"got {len(counts) if isinstance(counts, list) else counts!r}")
        if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0 for c in counts):
            raise SpecError(f"{where}: layers.{layer}: token counts must be numbers >= 0")
        table[layer] = tuple(float(c) for c in counts)
    tokens = data.get("tokens", 0)
    return RoutingTable(str(data.get("model", "")), int(tokens) if isinstance(tokens, int) else 0, table)


def _layer(key: object, where: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise SpecError(f"{where}: layers: key {key!r} is not a layer number") from None
