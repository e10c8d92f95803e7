"""apply_plan(model, plan): put every tensor where the plan says, from outside the model.

- `gpu` weights move to the accelerator and stay there (plain nn.Linear).
- `stream` weights live in one host pool (executor/hostmem.py: page-locked on CUDA, sized
  to the streamed bytes); a PrefetchEngine copies the next stage's weights into one of two
  accelerator buffers while the current stage computes.
- `cpu` weights stay in ordinary host memory and are computed there; activations cross the
  link (up through one staging buffer). A cpu weight marked `prefill_streamed` is streamed
  like a `stream` weight during prefill, so it lives in the pool too.
- Quantized weights (executor/quant.py) stay packed wherever they are: streamed ones move
  their codes, scales and zero points and run a fused quantized kernel there. A
  compensated matrix keeps its CompensatedLinear, whose backbone becomes the placed one, so
  its host branch runs beside the streamed or host matmul as it does beside a resident one.
- Each layer's KV cache is split as the plan says (executor/attention.py).

The model code (executor/model.py) knows nothing of this: modules are swapped and forward
pre-hooks are registered, the way gpt-fast applies tensor parallelism.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from planner.errors import PlanError
from planner.plan.record import Plan

from .attention import HybridKVCache, split_tokens
from .compensation import CompensatedLinear
from .model import KVCache, Transformer
from .moe import module_path
from .offload_moe import expert_linears, place_bank
from . import qkernels
from .quant import QuantizedTensor, QuantLinear, quant_matmul
from .hostmem import HostPool, Uplink, on_host, to_host
from .streams import Devices, PrefetchEngine

PHASES = ("prefill", "decode")


@dataclass
class LinearStats:
    """Seconds spent by the cpu-computed linears (compute, and activations over the link)."""

    cpu_s: float = 0.0
    xfer_s: float = 0.0
    calls: int = 0


@dataclass(frozen=True)
class FloatKernel:
    """y = x·Wᵀ + b from the tensors (W [out, in],)."""

    def __call__(self, x: Tensor, tensors: tuple[Tensor, ...], bias: Tensor | None) -> Tensor:
        return F.linear(x, tensors[0], bias)  # [..., out]


@dataclass(frozen=True, eq=False)
class QuantKernel:
    """y = x·deq(Q)ᵀ + b from the storage of a QuantizedTensor of `layout` (packed codes,
    scales[, zeros]), on whichever device those tensors are: QuantLinear's own matmul."""

    layout: QuantizedTensor  # shapes, bits and group size; its own storage is the host copy

    def __call__(self, x: Tensor, tensors: tuple[Tensor, ...], bias: Tensor | None) -> Tensor:
        return quant_matmul(x, self.layout.with_storage(tensors), bias)  # [..., out]


class PlacedLinear(nn.Module):
    """A Linear whose weight is not resident: its host tensors are streamed into a buffer
    slot, or computed on the host. `engine.phase` decides per call which (a cpu weight may
    stream for prefill). `kernel` is the matmul over those tensors: float or dequantizing."""

    def __init__(self, kernel: FloatKernel | QuantKernel, host_tensors: tuple[Tensor, ...],
                 bias: Tensor | None, name: str, device: str, prefill_streamed: bool,
                 devices: Devices, engine: PrefetchEngine, stats: LinearStats, uplink: Uplink):
        super().__init__()
        self.name, self.placement, self.prefill_streamed = name, device, prefill_streamed
        self.devices, self.engine, self.stats, self.uplink = devices, engine, stats, uplink
        self.kernel = kernel
        self.host_tensors = host_tensors  # what streams (from the pool) and what the host multiplies
        self.host_bias = None if bias is None else on_host(bias.detach(), devices)
        self.device_bias = None if bias is None else bias.detach().to(devices.accelerator)
        self.recorder = None  # executor.recorder.Recorder when tracing
        self.stage = name.split(".self_attn")[0].split(".mlp")[0].replace("layers.", "layer ")

    def streams_now(self) -> bool:
        return self.placement == "stream" or (self.prefill_streamed and self.engine.phase == "prefill")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] on the accelerator
        if self.streams_now():
            return self.kernel(x, self.engine.views(self.name), self.device_bias)  # [..., out]
        start = time.perf_counter()
        x_host = to_host(x, self.devices)
        moved = time.perf_counter()
        y_host = self.kernel(x_host, self.host_tensors, self.host_bias)  # [..., out] on the host
        computed = time.perf_counter()
        if self.recorder is not None:
            r = self.recorder
            r.add("cpu", self.name, moved - r.t0, computed - r.t0, self.stage)
        y = self.uplink.send(y_host)
        done = time.perf_counter()
        self.stats.cpu_s += computed - moved
        self.stats.xfer_s += (moved - start) + (done - computed)
        self.stats.calls += 1
        return y


class HostEmbedding(nn.Module):
    """Token lookup in host memory; only the looked-up rows cross the link."""

    def __init__(self, weight: torch.Tensor, devices: Devices, uplink: Uplink):
        super().__init__()
        self.devices, self.uplink = devices, uplink
        self.host_weight = on_host(weight, devices)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens [batch, t]
        rows = F.embedding(tokens.to(self.devices.host), self.host_weight)  # [batch, t, hidden]
        return self.uplink.send(rows)


@dataclass
class OffloadHandle:
    """What apply_plan installed: the engine, the caches, counters and memory accounting."""

    model: Transformer
    plan: Plan
    devices: Devices
    engine: PrefetchEngine
    caches: list[nn.Module]
    linear_stats: LinearStats
    resident_bytes: int
    pool: HostPool
    uplink: Uplink
    hooks: list = field(default_factory=list)
    recorder: object = None
    on_close: list = field(default_factory=list)  # callbacks run by close() (e.g. compensation workers)

    def begin(self, phase: str) -> None:
        """Start a forward pass of `phase`: prefetch the first streamed stage."""
        if self.recorder is not None:
            self.recorder.phase = phase
        self.engine.begin(phase)

    @property
    def device_kv_bytes(self) -> int:
        total = 0
        for cache in self.caches:
            if isinstance(cache, HybridKVCache):
                total += sum(t.numel() * t.element_size() for t in (cache._dev_k, cache._dev_v))
            else:
                total += sum(t.numel() * t.element_size() for t in (cache.k, cache.v))
        return total

    @property
    def accelerator_bytes(self) -> int:
        """Bytes offplan holds on the accelerator: resident weights, stream buffers, device KV."""
        return self.resident_bytes + self.engine.buffer_bytes + self.device_kv_bytes

    @property
    def page_locked_bytes(self) -> int:
        """Host bytes offplan page-locks on CUDA (the same buffers, unlocked, on the loopback):
        the streamed-weight pool and the activation staging buffer."""
        return self.pool.n_bytes + self.uplink.staging_bytes

    def reset_caches(self) -> None:
        self.model.truncate_caches(0)

    def record(self, recorder) -> None:
        """Record measured events into `recorder` (see executor/recorder.py)."""
        self.engine.set_recorder(recorder)
        for module in self.model.modules():
            if isinstance(module, PlacedLinear):
                module.recorder = recorder
        self.recorder = recorder

    def close(self) -> None:
        for callback in self.on_close:
            callback()
        for hook in self.hooks:
            hook.remove()
        self.engine.close()
        self.uplink.close()
        self.pool.close()
        for cache in self.caches:
            if isinstance(cache, HybridKVCache):
                cache.close()


def _check_model(model: Transformer, plan: Plan) -> None:
    names = {n[len("model."):] if n.startswith("model.") else n for n, _ in model.named_modules()}
    missing = [t.name for t in plan.model.tensors() if module_path(plan.model, t.name) not in names]
    if missing:
        raise PlanError(f"plan: tensor {missing[0]!r} is not in the model (the plan was made for another model)")


def host_tensors(module: nn.Linear | QuantLinear) -> tuple[Tensor, ...]:
    """What a placed linear keeps on the host: a quantized one's packed storage (codes,
    scales[, zeros]), so it streams and is multiplied as packed integers; else its weight."""
    if isinstance(module, QuantLinear):
        return module.quantized().storage
    return (module.weight.detach(),)  # [out, in]


def placed_linear(module: nn.Linear | QuantLinear, name: str, device: str, prefill_streamed: bool,
                  devices: Devices, engine: PrefetchEngine, stats: LinearStats, uplink: Uplink,
                  pool: HostPool) -> PlacedLinear:
    """The PlacedLinear of a float or quantized Linear. A weight that streams (in any phase)
    is copied into `pool`; a host-computed one stays where it is (moved to the host if not)."""
    streams = device == "stream" or prefill_streamed
    tensors = tuple(pool.carve(t) if streams else on_host(t, devices) for t in host_tensors(module))
    common = (name, device, prefill_streamed, devices, engine, stats, uplink)
    if isinstance(module, QuantLinear):
        return PlacedLinear(QuantKernel(module.quantized().with_storage(tensors)), tensors, module.bias, *common)
    return PlacedLinear(FloatKernel(), tensors, module.bias, *common)


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _module(model: Transformer, name: str) -> tuple[nn.Module, str]:
    """Parent module and attribute name of tensor `name` (plan naming)."""
    path = name if name == "lm_head" else f"model.{module_path(model.spec, name)}"
    parent_path, _, attr = path.rpartition(".")
    return model.get_submodule(parent_path) if parent_path else model, attr


def apply_plan(model: Transformer, plan: Plan, devices: Devices | None = None,
               max_tokens: int | None = None, timed: bool = False) -> OffloadHandle:
    """Place `model`'s tensors as `plan` says and install its KV caches. The model must hold
    its weights on the host (as loaded); resident ones are moved to the accelerator.
    `timed`: split KV caches time their parts (on CUDA that waits for timing events inside
    every step, so only per-layer profiling asks for it)."""
    _check_model(model, plan)
    devices = devices or Devices.detect()
    placement = plan.placement
    stats = LinearStats()
    dtype = next(p.dtype for n, p in model.named_parameters() if "norm" in n)
    engine = PrefetchEngine(devices)
    uplink = Uplink(devices)
    _pack_placed(model, plan, devices)
    pool = HostPool(_streamed_host_tensors(model, plan), devices)
    workers: list = []  # the host worker of split expert banks, once one is needed
    resident_bytes = _place_weights(model, plan, devices, engine, stats, uplink, pool, workers)
    engine.allocate()
    engine.stage_names = {i: f"layer {i}" for i in range(plan.model.layers)}
    engine.stage_names[plan.model.layers] = "head"

    # ---- KV caches ---------------------------------------------------------------------------
    max_tokens = max_tokens or plan.workload.context
    caches: list[nn.Module] = []
    for layer, c in zip(model.model.layers, placement.kv_host_fraction):
        attn = layer.self_attn
        host_tokens = split_tokens(c, max_tokens)
        if host_tokens:
            cache = HybridKVCache(plan.workload.batch, max_tokens, attn.kv_heads, attn.head_dim, dtype,
                                  devices.accelerator, host_tokens=host_tokens, host_device=devices.host,
                                  timed=timed)
        else:
            cache = KVCache(plan.workload.batch, max_tokens, attn.kv_heads, attn.head_dim, dtype,
                            devices.accelerator)
        attn.kv_cache = cache
        caches.append(cache)

    # ---- prefetch hooks: entering stage s waits for its weights and prefetches stage s+1 ----
    hooks = [layer.register_forward_pre_hook(_stage_hook(engine, i)) for i, layer in enumerate(model.model.layers)]
    hooks.append(model.model.norm.register_forward_pre_hook(_stage_hook(engine, plan.model.layers)))
    handle = OffloadHandle(model, plan, devices, engine, caches, stats, resident_bytes, pool, uplink, hooks)
    handle.on_close.extend(worker.shutdown for worker in workers)
    return handle


def _stage_hook(engine: PrefetchEngine, stage: int):
    def hook(module, args):
        engine.enter(stage)
    return hook


def _base_linear(module: nn.Module) -> nn.Module:
    """The matrix a placement moves: a compensated matrix's quantized backbone, else itself."""
    return module.quant if isinstance(module, CompensatedLinear) else module


def _pack_placed(model: Transformer, plan: Plan, devices: Devices) -> None:
    """Each non-resident quantized matrix takes, in place, the layout of the fused kernel that
    will multiply it (executor/qkernels.py); resident ones pack on their first forward."""
    for t in plan.model.tensors():
        device = plan.placement.device(t.name)
        if device == "gpu" or t.group == "embed" or t.experts:
            continue
        module = _base_linear(getattr(*_module(model, t.name)))
        if isinstance(module, QuantLinear):
            module.pack_to(qkernels.placed_layout(devices.accelerator, device,
                                                  plan.placement.streams_for_prefill(t.name)))


def _streamed_host_tensors(model: Transformer, plan: Plan) -> list[Tensor]:
    """The host tensors of every matrix that streams in some phase: what the pool holds."""
    placement = plan.placement
    out = [tensor for t in plan.model.tensors() if t.group != "embed" and not t.experts
           and (placement.device(t.name) == "stream" or placement.streams_for_prefill(t.name))
           for tensor in host_tensors(_base_linear(getattr(*_module(model, t.name))))]
    for t in plan.model.tensors():  # a streamed expert bank: every matrix of every expert
        if t.experts and placement.device(t.name) == "stream":
            out += [tensor for _, linear in expert_linears(getattr(*_module(model, t.name)), t.name)
                    for tensor in host_tensors(linear)]
    return out


def _place_weights(model: Transformer, plan: Plan, devices: Devices, engine: PrefetchEngine,
                   stats: LinearStats, uplink: Uplink, pool: HostPool, workers: list) -> int:
    """Swap in placed modules and register streamed weights; returns the resident bytes.
    Matrices are carved into the pool one at a time and their modules dropped, so the host
    never holds a second copy of all streamed weights."""
    placement, resident_bytes = plan.placement, 0
    stage_of = {t.name: (t.layer if t.layer is not None else plan.model.layers) for t in plan.model.tensors()}
    for t in plan.model.tensors():
        device = placement.device(t.name)
        parent, attr = _module(model, t.name)
        module = getattr(parent, attr)
        if t.experts and device == "stream":  # every expert matrix streams in with its layer
            for name, linear in expert_linears(module, t.name):
                expert, attr = module.get_submodule(name[len(t.name) + 1:].rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
                placed = placed_linear(linear, name, "stream", False, devices, engine, stats, uplink, pool)
                engine.register(name, stage_of[t.name], placed.host_tensors, PHASES)
                setattr(expert, attr, placed)
            continue
        if t.experts:  # a layer's routed experts: some resident, the rest on the host worker
            resident_bytes += place_bank(parent, t, plan, devices, engine, uplink, workers, stats)
            continue
        if t.group == "embed":
            weight = module.weight.detach()
            if device == "gpu":
                module.to(devices.accelerator)
                resident_bytes += weight.numel() * weight.element_size() if not plan.model.tied_embeddings else 0
            else:
                setattr(parent, attr, HostEmbedding(weight, devices, uplink))
            continue
        if device == "gpu":
            module.to(devices.accelerator)
            resident_bytes += _module_bytes(module)
            continue
        placed = placed_linear(_base_linear(module), t.name, device, placement.streams_for_prefill(t.name),
                               devices, engine, stats, uplink, pool)
        if device == "stream" or placed.prefill_streamed:
            phases = PHASES if device == "stream" else ("prefill",)
            engine.register(t.name, stage_of[t.name], placed.host_tensors, phases)
        if isinstance(module, CompensatedLinear):
            module.quant = placed  # its branch is submitted before, and added after, the placed matmul
        else:
            setattr(parent, attr, placed)
    if plan.model.tied_embeddings and placement.device("lm_head") != "gpu" and placement.device("embed_tokens") == "gpu":
        # The lookup table is the lm_head weight, which lives on the host: look up there, in
        # the head's own host copy when it is a float matrix (no second copy of the table).
        head = model.lm_head
        table = head.host_tensors[0] if isinstance(head, PlacedLinear) and isinstance(head.kernel, FloatKernel) \
            else model.model.embed_tokens.weight.detach()
        model.model.embed_tokens = HostEmbedding(table, devices, uplink)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data = param.data.to(devices.accelerator)
            resident_bytes += param.numel() * param.element_size()
    return resident_bytes
