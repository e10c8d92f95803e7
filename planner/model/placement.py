"""Placement: the decision the ILP makes (and a baseline picks), independent of its cost.

A placement says, for each weight tensor, where it is stored and computed; for each layer,
what fraction of the KV cache (oldest tokens) lives in host memory; and, for quantized
tensors, the rank of the CPU-side residual-compensation branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from planner.errors import PlanError
from planner.model.spec import ModelSpec

DEVICES = ("gpu", "stream", "cpu")
# Embedding lookups read a few rows: streaming the whole table is never useful.
EMBED_DEVICES = ("gpu", "cpu")


@dataclass(frozen=True)
class Placement:
    devices: dict[str, str]  # tensor name -> gpu | stream | cpu
    kv_host_fraction: tuple[float, ...]  # per layer, fraction of the KV cache in host memory
    prefill_streamed: tuple[str, ...] = ()  # cpu tensors copied to the accelerator for prefill
    ranks: dict[str, int] = field(default_factory=dict)  # compensated tensor -> rank (absent = 0)
    # expert bank -> experts resident on the accelerator (absent: all on gpu, none otherwise)
    gpu_experts: dict[str, int] = field(default_factory=dict)

    def device(self, name: str) -> str:
        return self.devices[name]

    def rank(self, name: str) -> int:
        return self.ranks.get(name, 0)

    def experts_on_gpu(self, t) -> int:
        """How many experts of bank `t` (a TensorSpec) are resident on the accelerator."""
        if t.name in self.gpu_experts:
            return self.gpu_experts[t.name]
        return t.experts if self.devices[t.name] in ("gpu", "stream") else 0

    def streams_for_prefill(self, name: str) -> bool:
        return name in self.prefill_streamed


def uniform_placement(spec: ModelSpec, device: str, kv_host_fraction: float = 0.0) -> Placement:
    """Every tensor on `device` (embeddings on the host unless `device` is gpu)."""
    devices = {}
    for t in spec.tensors():
        allowed = EMBED_DEVICES if t.group == "embed" else DEVICES
        devices[t.name] = device if device in allowed else "cpu"
    return Placement(devices, (kv_host_fraction,) * spec.layers)


def check_placement(spec: ModelSpec, placement: Placement) -> None:
    """Raise PlanError if `placement` does not describe exactly the tensors of `spec`."""
    names = [t.name for t in spec.tensors()]
    missing = [n for n in names if n not in placement.devices]
    if missing:
        raise PlanError(f"placement: no device for tensor {missing[0]!r} (the plan was made for another model?)")
    extra = sorted(set(placement.devices) - set(names))
    if extra:
        raise PlanError(f"placement: tensor {extra[0]!r} is not part of model {spec.name!r}")
    for t in spec.tensors():
        allowed = EMBED_DEVICES if t.group == "embed" else DEVICES
        if placement.devices[t.name] not in allowed:
            raise PlanError(f"placement.{t.name}: device {placement.devices[t.name]!r} is not one of "
                            f"{', '.join(allowed)}")
    for name in placement.prefill_streamed:
        if placement.devices.get(name) != "cpu":
            raise PlanError(f"prefill_streamed: {name!r} is not a cpu tensor")
    if len(placement.kv_host_fraction) != spec.layers:
        raise PlanError(f"kv_host_fraction: {len(placement.kv_host_fraction)} entries for "
                        f"{spec.layers} layers")
    if any(not 0.0 <= c <= 1.0 for c in placement.kv_host_fraction):
        raise PlanError("kv_host_fraction: every entry must be between 0 and 1")
    for name, count in placement.gpu_experts.items():
        bank = spec.by_name.get(name)
        if bank is None or not bank.experts or not 0 <= count <= bank.experts:
            raise PlanError(f"gpu_experts.{name}: not an expert bank of this model, or a count outside "
                            f"0..{bank.experts if bank is not None else 0}")
        if count not in (0, bank.experts) and placement.devices[name] != "cpu":
            raise PlanError(f"gpu_experts.{name}: a split bank ({count} of {bank.experts} resident) must have "
                            "device cpu for the rest")
    for name, rank in placement.ranks.items():
        if name not in spec.by_name or rank < 0:
            raise PlanError(f"ranks.{name}: not a tensor of this model, or a negative rank")


def with_devices(placement: Placement, updates: dict[str, str]) -> Placement:
    devices = dict(placement.devices)
    devices.update(updates)
    streamed = tuple(n for n in placement.prefill_streamed if devices[n] == "cpu")
    return replace(placement, devices=devices, prefill_streamed=streamed)
