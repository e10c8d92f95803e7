"""Placing a layer's routed experts as a plan says (DESIGN §3): `gpu_experts` of them resident
on the accelerator, the rest in host memory, computed by the host worker while the
accelerator computes its own, and summed.

Which experts are resident comes from the plan's routing table (most routed tokens first;
index order without a table). The hidden states go down once per layer and the host
experts' outputs come up once, in one tensor. Every expert's weighted output is then added in
expert index order, as executor/moe.py's all-resident path adds them, so an offloaded plan
computes the same sums in the same order as a resident one. For prefill, a bank whose plan
copies its host experts up (`prefill_streamed`) copies them for the pass and runs them on the
accelerator.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from planner.plan.record import Plan
from planner.model.spec import TensorSpec

from .hostmem import Uplink, on_host, to_host
from .moe import Expert, SparseMoE
from .streams import Devices

WORKER_PREFIX = "offplan-experts"


def resident_order(plan: Plan, bank: TensorSpec) -> list[int]:
    """Experts of `bank` by routed tokens in the plan's routing table, most used first."""
    counts = (plan.routing or {}).get(bank.layer)
    if not counts:
        return list(range(bank.experts))
    return sorted(range(bank.experts), key=lambda e: (-counts[e], e))


def _contribution(expert: Expert, flat: torch.Tensor, token: torch.Tensor, top_pos: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """expert(x) * routing weight for the routed rows; flat [n, hidden] -> [m, hidden]."""
    return expert(flat[token]) * weight[token, top_pos, None]


def _routes(index: torch.Tensor, experts: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """expert -> (top_pos, token) of the rows routed to it, for those that have any."""
    out = {}
    for e in experts:
        top_pos, token = torch.where(index.T == e)
        if token.numel():
            out[e] = (top_pos, token)
    return out


class SplitExperts:
    """`SparseMoE.dispatch` for a bank split between accelerator and host."""

    def __init__(self, block: SparseMoE, resident: list[int], host: list[int], prefill_copied: bool,
                 devices: Devices, engine, uplink: Uplink, worker: ThreadPoolExecutor, stats):
        self.block, self.resident, self.host = block, sorted(resident), sorted(host)
        self.prefill_copied, self.devices, self.engine = prefill_copied, devices, engine
        self.uplink, self.worker, self.stats = uplink, worker, stats

    def _host_part(self, flat: torch.Tensor, index: torch.Tensor, weight: torch.Tensor):
        start = time.perf_counter()
        routes = _routes(index, self.host)
        ys = [_contribution(self.block.experts[e], flat, token, pos, weight) for e, (pos, token) in routes.items()]
        self.stats.cpu_s += time.perf_counter() - start
        return routes, (torch.cat(ys) if ys else None)

    def __call__(self, flat: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(flat)  # [n, hidden] on the accelerator
        if self.prefill_copied and self.engine.phase == "prefill":
            return self._all_on_accelerator(flat, index, weight, out)
        moved = time.perf_counter()
        host_inputs = (to_host(flat, self.devices), to_host(index, self.devices), to_host(weight, self.devices))
        self.stats.xfer_s += time.perf_counter() - moved
        future = self.worker.submit(self._host_part, *host_inputs)
        routes = _routes(index, self.resident)
        ys = {e: _contribution(self.block.experts[e], flat, token, pos, weight) for e, (pos, token) in routes.items()}
        host_routes, host_y = future.result()
        if host_y is not None:
            sent = time.perf_counter()
            host_y = self.uplink.send(host_y)  # every host expert's output in one upload
            self.stats.xfer_s += time.perf_counter() - sent
            sizes = [token.numel() for _, token in host_routes.values()]
            for e, y in zip(host_routes, torch.split(host_y, sizes)):
                ys[e] = y
                routes[e] = (host_routes[e][0], host_routes[e][1].to(flat.device))
        self.stats.calls += 1
        for e in sorted(ys):  # index order, as the all-resident path adds them
            out.index_add_(0, routes[e][1], ys[e].to(out.dtype))
        return out

    def _all_on_accelerator(self, flat, index, weight, out):
        """Prefill with the host experts copied up for this pass (then dropped)."""
        for e, (pos, token) in sorted(_routes(index, list(range(len(self.block.experts)))).items()):
            expert = self.block.experts[e]
            if e in self.host:
                expert = _copy_to(expert, self.devices)
            out.index_add_(0, token, _contribution(expert, flat, token, pos, weight).to(out.dtype))
        return out


def _copy_to(expert: Expert, devices: Devices) -> Expert:
    """A copy of `expert` on the accelerator (a real copy on the loopback device too)."""
    copy = Expert.__new__(Expert)
    nn.Module.__init__(copy)
    copy._names = expert._names
    for name in expert._names:
        linear = getattr(expert, name)
        moved = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
        moved.weight = nn.Parameter(linear.weight.detach().to(devices.accelerator, copy=True), requires_grad=False)
        setattr(copy, name, moved)
    return copy


def expert_linears(experts: nn.ModuleList, bank_name: str) -> list[tuple[str, nn.Linear]]:
    """(plan-style name, Linear) of every matrix of every expert of a bank, in order:
    `layers.3.mlp.experts.5.gate_proj` (Mixtral: `.5.w1`)."""
    return [(f"{bank_name}.{e}.{attr}", getattr(expert, attr))
            for e, expert in enumerate(experts) for attr in expert._names]


def place_bank(block: SparseMoE, bank: TensorSpec, plan: Plan, devices: Devices, engine, uplink: Uplink,
               worker_pool: list, stats) -> int:
    """Place the experts of `bank` (held by `block`); returns the bytes made resident.
    `worker_pool` holds the shared host worker once one is needed (created here)."""
    placement = plan.placement
    n = placement.experts_on_gpu(bank)
    order = resident_order(plan, bank)
    resident, host = order[:n], order[n:]
    moved = 0
    for e in resident:
        block.experts[e].to(devices.accelerator)
        moved += sum(p.numel() * p.element_size() for p in block.experts[e].parameters())
    for e in host:
        for param in block.experts[e].parameters():
            param.data = on_host(param.data, devices)
    if host:
        if not worker_pool:
            worker_pool.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_PREFIX))
        block.dispatch = SplitExperts(block, resident, host, placement.streams_for_prefill(bank.name), devices,
                                      engine, uplink, worker_pool[0], stats)
    return moved
