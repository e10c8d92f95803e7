"""Timeline records shared by the simulator (planner/simulate/engine.py) and the executor's
recorder (executor/recorder.py), so that simulated and measured runs read and trace alike.
No dependencies beyond the standard library."""

from __future__ import annotations

from dataclasses import dataclass

# `memory`: the host memory bus, one event per stage spanning the bus time the stage rule
# charges it (planner/cost/stage.py); measured timelines have none.
RESOURCES = ("accelerator", "h2d", "d2h", "cpu", "memory")
PHASES = ("prefill", "decode", "draft")
STREAM_PREFIX = "stream "  # event names of weight copies: "stream layers.3.mlp.up_proj"
KINDS = ("compute", "stream", "transfer", "cpu", "memory")


@dataclass(frozen=True)
class Event:
    resource: str  # one of RESOURCES
    name: str
    start_s: float
    end_s: float
    stage: str  # "layer 3", "head", "draft"
    phase: str  # prefill | decode | draft


def kind_of(resource: str, name: str) -> str:
    """compute | stream | transfer | cpu | memory: what an event spends its resource on."""
    if resource == "accelerator":
        return "compute"
    if resource in ("cpu", "memory"):
        return resource
    return "stream" if name.startswith(STREAM_PREFIX) else "transfer"


def event_kind(event: Event) -> str:
    return kind_of(event.resource, event.name)
