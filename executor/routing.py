"""Measure a routing table: run the model's routers over prompts and count, per MoE layer,
the tokens routed to each expert (planner/model/routing.py writes and reads the table)."""

from __future__ import annotations

import torch

from planner.errors import SpecError
from planner.model.routing import RoutingTable

from .model import Transformer
from .moe import SparseMoE


def measure_routing(model: Transformer, prompts: list[torch.Tensor]) -> RoutingTable:
    """Forward every prompt ([1, t] token ids) once, without a cache, counting the top-k
    choices of every router: layer -> tokens per expert."""
    spec = model.spec
    blocks = {i: block for i, layer in enumerate(model.model.layers)
              for block in layer.children() if isinstance(block, SparseMoE)}
    if not blocks:
        raise SpecError(f"routing: {spec.name} has no routed experts")
    counts = {i: torch.zeros(len(block.experts), dtype=torch.int64) for i, block in blocks.items()}
    originals = {i: block.route for i, block in blocks.items()}

    def counting(layer: int):
        def route(flat: torch.Tensor):
            index, weight = originals[layer](flat)
            counts[layer] += torch.bincount(index.flatten().cpu(), minlength=len(blocks[layer].experts))
            return index, weight
        return route

    for layer, block in blocks.items():
        block.route = counting(layer)
    tokens = 0
    try:
        with torch.no_grad():
            for prompt in prompts:
                model(prompt)
                tokens += prompt.numel()
    finally:
        for layer, block in blocks.items():
            del block.route  # back to the class's method
    return RoutingTable(spec.name, tokens, {i: tuple(float(c) for c in counts[i].tolist()) for i in blocks})
