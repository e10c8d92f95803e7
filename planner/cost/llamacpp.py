"""The cost model of llama.cpp (planner/cost/runtime.py says what it can express).

Everything runs one operator after another: there is no prefetch, so a step is the sum of
its parts, not a max of overlapping resources.
- Decode (one token per sequence): a GPU-held matrix streams from GPU memory, a host-held
  one is multiplied by the CPU from DRAM; attention reads its layer's KV cache where it
  lives. Each change of device along the graph (the scheduler's "splits") costs a
  synchronisation plus the activation copy (`switch`).
- Prompt processing, micro-batch by micro-batch (-ub): a host-held matrix is copied to the
  GPU and used there when the micro-batch has at least 32 tokens, the copy before the
  compute, every micro-batch again; attention stays with its KV cache, so a host-held cache
  sends every layer's activations down and back up.
- Memory: GPU = its weights, the KV cache of offloaded layers at -c tokens, the compute
  buffer for one micro-batch; the CUDA context is the profile's reserve. Host = the rest of
  the weights (token embeddings always), the host KV cache and the CPU compute buffer.

The efficiencies llama.cpp reaches that no datasheet gives are in LlamaCppFit. Their values
were fitted by `python benchmarks/published.py --fit` on the even-numbered half of the
llama.cpp rows with stated hardware in benchmarks/published/rows.yaml (mean |log error| over
their pp and tg figures); the same script reports the other half as held out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from planner.cost.evaluate import MemoryUse, Prediction, StageTime
from planner.cost.llamacpp_tensors import GgufTensor, gguf_tensors
from planner.cost.roofline import PathCost, curve_gbps, roofline_s, touched_fraction
from planner.cost.runtime import LLAMACPP
from planner.errors import PlanError
from planner.hardware.profile import HardwareProfile, flops_for
from planner.model.spec import ModelSpec, Workload

KV_TYPE_BITS = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0,
                "Q4_0": 4.5, "IQ4_NL": 4.5}
ACT_BYTES = 4  # llama.cpp passes activations between backends in F32


@dataclass(frozen=True)
class LlamaCppFit:
    """What llama.cpp reaches where no datasheet says (fitted, see the module docstring)."""

    switch_s: float = 100e-6  # one change of backend in the graph: stream sync, copy call, CPU threads waking
    token_s: float = 600e-6  # fixed cost per decode step (graph build, launches not hidden, sampling)
    gpu_prefill_efficiency: float = 0.8  # share of the fp16 tensor peak prompt matmuls reach
    cpu_prefill_efficiency: float = 0.35  # share of the host's best peak flops prompt matmuls reach
    core_read_gbps: float = 30.0  # DRAM read rate one CPU thread sustains in a quantized GEMV
    cpu_op_s: float = 20e-6  # per CPU-computed matmul or attention and pass: the threads' barrier and wake-up
    cpu_expert_efficiency: float = 0.3  # expert banks' prompt matmuls on the CPU, relative to dense ones
    gpu_op_s: float = 0.0  # per GPU matmul or attention and pass: kernel launch and tail not hidden
    cpu_attention_efficiency: float = 0.6  # CPU attention over a host cache, relative to CPU prompt matmuls
    cpu_read_efficiency: float = 0.9  # share of the host's achievable DRAM bandwidth decode matmuls read at


FIT = LlamaCppFit()


@dataclass(frozen=True)
class LlamaCppSettings:
    """llama.cpp options that change speed or memory but not placement."""

    ubatch: int = LLAMACPP.micro_batch_tokens  # -ub
    batch: int = 2048  # -b, the logical batch; micro-batches are min(-ub, -b)
    ctx: int = 0  # -c; 0 = prompt + generated tokens
    flash_attn: bool = True  # -fa (auto: on where the GPU supports it)
    mmap: bool = True  # host-held weights in pageable (mmap) memory, not pinned
    threads: int = 0  # -t; 0 = every core
    cache_type_k: str = "F16"
    cache_type_v: str = "F16"
    # False: builds before llama.cpp PR #6083 (March 2024), where host-held weights were
    # multiplied by the CPU at every batch size.
    offload_large_batches: bool = True
    # True: builds of 2023, which computed logits for every prompt token, not only the last.
    logits_all: bool = False

    @property
    def micro_batch(self) -> int:
        return max(min(self.ubatch, self.batch), 1)


@dataclass(frozen=True)
class LlamaScenario:
    spec: ModelSpec
    profile: HardwareProfile
    workload: Workload
    settings: LlamaCppSettings = LlamaCppSettings()
    types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> GGML type
    fit: LlamaCppFit = FIT

    @cached_property
    def tensors(self) -> tuple[GgufTensor, ...]:
        return gguf_tensors(self.spec, self.types)

    @property
    def has_gpu(self) -> bool:
        return self.profile.accelerator.present

    @property
    def ctx_tokens(self) -> int:
        return self.settings.ctx or self.workload.context

    @property
    def decode_steps(self) -> float:
        return float(max(self.workload.gen - 1, 0))

    @property
    def kv_type_scale(self) -> float:
        """Cache bytes relative to the model's own element size (-ctk / -ctv; F16 by default)."""
        bits = (KV_TYPE_BITS[self.settings.cache_type_k] + KV_TYPE_BITS[self.settings.cache_type_v]) / 2
        return bits / (8 * self.spec.weight_elt_bytes)

    @property
    def kv_bytes_per_token_layer(self) -> float:
        """Mean cache bytes per token and layer (sliding-window layers hold at most their window)."""
        return self.spec.mean_kv_bytes_per_token_layer(self.ctx_tokens) * self.kv_type_scale

    def micro_batches(self) -> list[tuple[int, int]]:
        """(tokens, cache depth at its start) of each prompt micro-batch (sequences back to back)."""
        total, ub = self.workload.batch * self.workload.prompt, self.settings.micro_batch
        return [(min(ub, total - start), start) for start in range(0, total, ub)]


@dataclass(frozen=True)
class LlamaPlacement:
    """A llama.cpp placement: which GGUF matrices sit on the GPU, and per layer whether the KV
    cache (and attention) does. Token embeddings are always in host memory."""

    gpu: frozenset[str]
    kv_gpu: tuple[bool, ...]
    nkvo: bool = False  # -nkvo: attention over host caches forced to the CPU, prompt batches included


# ---- rates ------------------------------------------------------------------------------------

def _threads(scn: LlamaScenario) -> int:
    cores = scn.profile.host.threads or scn.profile.host.cores
    return min(scn.settings.threads, cores) if scn.settings.threads else cores


def host_read_gbps(scn: LlamaScenario) -> float:
    """DRAM bytes/s llama.cpp's CPU matmuls read weights at: the host's achievable bandwidth
    times llama.cpp's read efficiency, capped by what the threads in use can pull."""
    h = scn.profile.host
    return min(h.mem_bw_gbps, _threads(scn) * scn.fit.core_read_gbps) * scn.fit.cpu_read_efficiency


def host_flops(scn: LlamaScenario) -> float:
    h = scn.profile.host
    cores = scn.profile.host.threads or h.cores
    return max(h.flops_tflops.values()) * 1e12 * _threads(scn) / cores * scn.fit.cpu_prefill_efficiency


def gpu_read_gbps(scn: LlamaScenario) -> float:
    a = scn.profile.accelerator
    return a.mem_bw_gbps * a.gemv_efficiency


def gpu_flops(scn: LlamaScenario) -> float:
    return flops_for(scn.profile.accelerator.flops_tflops, "fp16") * scn.fit.gpu_prefill_efficiency


def h2d_weight_s(scn: LlamaScenario, n_bytes: float) -> float:
    """Copy of a host-held matrix to the GPU: from pageable memory when mmap'ed."""
    link = scn.profile.link
    curve = link.h2d_pageable_curve if scn.settings.mmap and link.h2d_pageable_curve else link.h2d_curve
    return link.latency_s + n_bytes / (curve_gbps(curve, n_bytes, link.h2d_gbps) * 1e9)


def switch_s(scn: LlamaScenario, rows: int) -> float:
    """One change of backend with `rows` activation rows crossing the link."""
    link = scn.profile.link
    act = rows * scn.spec.hidden * ACT_BYTES
    return scn.fit.switch_s + link.latency_s + act / (curve_gbps(link.h2d_curve, act, link.h2d_gbps) * 1e9)


# ---- per-item costs ---------------------------------------------------------------------------

def _matmul(scn: LlamaScenario, t: GgufTensor, rows: int, device: str) -> PathCost:
    read = t.n_bytes * touched_fraction(t.route_prob, rows)
    flops = t.flops_per_token * rows
    if device == "gpu":
        return PathCost(acc_s=roofline_s(flops, read, gpu_flops(scn), gpu_read_gbps(scn) * 1e9, scn.fit.gpu_op_s))
    # Expert banks multiply a few rows per expert (rows x active / experts): the CPU kernels'
    # blocking pays for it.
    cpu_flops = host_flops(scn) * (scn.fit.cpu_expert_efficiency if t.kind.endswith("_exps") else 1.0)
    return PathCost(cpu_s=roofline_s(flops, read, cpu_flops, host_read_gbps(scn) * 1e9, scn.fit.cpu_op_s))


def weight_decode(scn: LlamaScenario, t: GgufTensor, device: str) -> PathCost:
    if t.kind == "token_embd":
        return PathCost()
    return _matmul(scn, t, scn.workload.batch, device)


def copied_to_gpu(scn: LlamaScenario, rows: int) -> bool:
    return scn.has_gpu and scn.settings.offload_large_batches and rows >= LLAMACPP.prefill_copy_min_rows


def weight_prefill(scn: LlamaScenario, t: GgufTensor, device: str) -> PathCost:
    """The whole prompt: every micro-batch (the output matrix only for the last one, one row
    per sequence: llama-bench and servers take logits of the last prompt token)."""
    if t.kind == "token_embd":
        return PathCost()
    if t.kind == "output" and not scn.settings.logits_all:
        return _matmul(scn, t, scn.workload.batch, device)
    total = PathCost()
    for rows, _ in scn.micro_batches():
        if device == "gpu":
            total = total + _matmul(scn, t, rows, "gpu")
        elif copied_to_gpu(scn, rows):
            total = total + PathCost(xfer_s=h2d_weight_s(scn, t.n_bytes)) + _matmul(scn, t, rows, "gpu")
        else:
            total = total + _matmul(scn, t, rows, "cpu")
    return total


def _attention_s(scn: LlamaScenario, rows: int, depth: float, on_gpu: bool, sequences: int = 1) -> PathCost:
    """`rows` query rows over `depth` cached tokens (per sequence), reading the cache once per sequence."""
    spec = scn.spec
    flops = 4.0 * spec.heads * spec.head_dim * rows * depth
    kv_bytes = scn.kv_bytes_per_token_layer * depth * sequences
    if on_gpu:
        return PathCost(acc_s=roofline_s(flops, kv_bytes, gpu_flops(scn), gpu_read_gbps(scn) * 1e9, scn.fit.gpu_op_s))
    cpu_flops = host_flops(scn) * scn.fit.cpu_attention_efficiency  # per-head kernels, not tiled GEMMs
    return PathCost(cpu_s=roofline_s(flops, kv_bytes, cpu_flops, host_read_gbps(scn) * 1e9, scn.fit.cpu_op_s))


def attention_decode(scn: LlamaScenario, on_gpu: bool) -> PathCost:
    wl = scn.workload
    return _attention_s(scn, wl.batch, wl.prompt + wl.gen / 2.0, on_gpu, wl.batch)


def attention_prefill(scn: LlamaScenario, on_gpu: bool, nkvo: bool = False) -> PathCost:
    """Causal attention of each micro-batch over the cache before it and itself.

    A host-held cache of a layer llama.cpp did not offload is read by the GPU in a big micro-
    batch: the scheduler puts attention with its GPU neighbours and copies the cache views up
    (and the new keys and values down into the cache). With -nkvo llama.cpp pins attention to
    the CPU ("all nodes between the KV store and the attention output are run on the CPU")."""
    total = PathCost()
    per_seq = scn.workload.prompt
    for rows, start in scn.micro_batches():
        depth = start % per_seq + rows / 2.0
        if on_gpu or nkvo or not copied_to_gpu(scn, rows):
            total = total + _attention_s(scn, rows, depth, on_gpu)
            continue
        cache_bytes = scn.kv_bytes_per_token_layer * (start % per_seq + rows)
        copies = h2d_weight_s(scn, cache_bytes) + h2d_weight_s(scn, scn.kv_bytes_per_token_layer * rows)
        total = total + _attention_s(scn, rows, depth, True) + PathCost(xfer_s=copies)
    return total


# ---- where each step of the graph runs --------------------------------------------------------

def layer_sequence(scn: LlamaScenario, layer: int) -> list[str]:
    """GGUF tensor names of `layer` in graph order, with 'attention' where attention runs."""
    names = [t.name for t in scn.tensors if t.layer == layer]
    kinds = [t.kind for t in scn.tensors if t.layer == layer]
    at = next((i + 1 for i, k in enumerate(kinds) if k == "attn_v"), 0)
    return names[:at] + ["attention"] + names[at:]


def _switches(devices: list[bool]) -> int:
    return sum(1 for a, b in zip(devices, devices[1:]) if a != b)


def step_devices(scn: LlamaScenario, lp: LlamaPlacement, weights_on_gpu: bool) -> list[list[bool]]:
    """Per stage (layers, then the head), whether each step runs on the GPU; the first entry of
    the head stage is the embedding lookup (always on the CPU) and precedes layer 0."""
    out = []
    for layer in range(scn.spec.layers):
        attention_gpu = lp.kv_gpu[layer] or (weights_on_gpu and not lp.nkvo)
        out.append([attention_gpu if n == "attention" else (weights_on_gpu or n in lp.gpu)
                    for n in layer_sequence(scn, layer)])
    out.append([False, "output.weight" in lp.gpu])
    return out


def stage_switches(scn: LlamaScenario, lp: LlamaPlacement, weights_on_gpu: bool) -> list[int]:
    """Device changes charged to each stage: inside it, and on entering it."""
    stages = step_devices(scn, lp, weights_on_gpu)
    embed, output = stages[-1]
    counts, previous = [], embed
    for devices in stages[:-1]:
        counts.append(_switches([previous, *devices]))
        previous = devices[-1]
    counts.append(int(previous != output))
    return counts


def switch_costs(scn: LlamaScenario) -> tuple[PathCost, list[tuple[PathCost, bool]]]:
    """(one switch in a decode step, [(one switch over these micro-batches, weights on the GPU)])."""
    decode = PathCost(xfer_s=switch_s(scn, scn.workload.batch))
    big = [r for r, _ in scn.micro_batches() if copied_to_gpu(scn, r)]
    small = [r for r, _ in scn.micro_batches() if not copied_to_gpu(scn, r)]
    prefill = []
    if big:
        prefill.append((PathCost(xfer_s=sum(switch_s(scn, r) for r in big)), True))
    if small:
        prefill.append((PathCost(xfer_s=sum(switch_s(scn, r) for r in small)), False))
    return decode, prefill


# ---- evaluate ---------------------------------------------------------------------------------

def check_llama_placement(scn: LlamaScenario, lp: LlamaPlacement) -> None:
    names = {t.name for t in scn.tensors}
    unknown = sorted(lp.gpu - names)
    if unknown:
        raise PlanError(f"placement: {unknown[0]!r} is not a tensor of {scn.spec.name}")
    if len(lp.kv_gpu) != scn.spec.layers:
        raise PlanError(f"kv_gpu: {len(lp.kv_gpu)} entries for {scn.spec.layers} layers")
    if "token_embd.weight" in lp.gpu:
        raise PlanError("token_embd.weight: llama.cpp keeps token embeddings in host memory")
    if not scn.has_gpu and (lp.gpu or any(lp.kv_gpu)):
        raise PlanError(f"{scn.profile.name} has no GPU: nothing can be offloaded")


def evaluate_llamacpp(scn: LlamaScenario, lp: LlamaPlacement) -> Prediction:
    """Predicted llama.cpp prompt processing, decode step and memory for placement `lp`."""
    check_llama_placement(scn, lp)
    dev = {t.name: ("gpu" if t.name in lp.gpu else "cpu") for t in scn.tensors}
    one_switch_d, prefill_switches = switch_costs(scn)
    sw_d = stage_switches(scn, lp, False)
    sw_p = [(cost, stage_switches(scn, lp, on_gpu)) for cost, on_gpu in prefill_switches]
    stages = []
    for i in range(scn.spec.layers + 1):
        layer = i if i < scn.spec.layers else None
        items = [t for t in scn.tensors if t.layer == layer]
        dec = sum((weight_decode(scn, t, dev[t.name]) for t in items), PathCost())
        pre = sum((weight_prefill(scn, t, dev[t.name]) for t in items), PathCost())
        if layer is not None:
            dec = dec + attention_decode(scn, lp.kv_gpu[layer])
            pre = pre + attention_prefill(scn, lp.kv_gpu[layer], lp.nkvo)
        else:
            dec = dec + PathCost(acc_s=scn.fit.token_s) if scn.has_gpu else dec + PathCost(cpu_s=scn.fit.token_s)
        dec = dec + _times(one_switch_d, sw_d[i])
        for cost, counts in sw_p:
            pre = pre + _times(cost, counts[i])
        stages.append(StageTime.of_paths(f"layer {i}" if layer is not None else "head", dec, pre))
    vram, host = memory_llamacpp(scn, lp)
    return Prediction(tuple(stages), 0.0, 0.0, 0.0, 1.0, scn.workload.batch, scn.decode_steps, vram, host, 0.0)


def _times(cost: PathCost, n: int) -> PathCost:
    return PathCost(cost.acc_s * n, cost.cpu_s * n, cost.xfer_s * n)


# ---- memory -----------------------------------------------------------------------------------

def compute_buffer_bytes(scn: LlamaScenario, output_here: bool) -> int:
    """One micro-batch's activations: hidden states, the widest FFN intermediate, logits of
    the micro-batch when the output matrix is here, and without flash attention one layer's
    attention scores (F32, micro-batch x context x heads)."""
    s, rows = scn.spec, scn.settings.micro_batch
    ffn = s.moe.expert_intermediate * s.moe.active if s.moe else s.intermediate
    per_row = 4 * s.hidden + 2 * ffn + (s.vocab if output_here else 0)
    scores = 0 if scn.settings.flash_attn else rows * scn.ctx_tokens * s.heads
    return int((rows * per_row + scores) * ACT_BYTES)


def memory_llamacpp(scn: LlamaScenario, lp: LlamaPlacement) -> tuple[MemoryUse, MemoryUse]:
    p = scn.profile
    gpu_w = sum(t.n_bytes for t in scn.tensors if t.name in lp.gpu)
    host_w = sum(t.n_bytes for t in scn.tensors if t.name not in lp.gpu)
    kv_layer = scn.workload.batch * scn.ctx_tokens * scn.kv_bytes_per_token_layer
    n_kv_gpu = sum(lp.kv_gpu)
    norms_gpu = int(scn.spec.norm_bytes * n_kv_gpu / scn.spec.layers)
    used_gpu = scn.has_gpu  # the CUDA backend reserves its compute buffer even at -ngl 0
    out_gpu = "output.weight" in lp.gpu
    vram = MemoryUse(gpu_w + norms_gpu, int(kv_layer * n_kv_gpu),
                     compute_buffer_bytes(scn, out_gpu) if used_gpu else 0, 0, 0, 0,
                     p.reserve_bytes + p.accelerator.used_by_others_bytes, p.vram_usable_bytes)
    host = MemoryUse(host_w + scn.spec.norm_bytes - norms_gpu, int(kv_layer * (scn.spec.layers - n_kv_gpu)),
                     compute_buffer_bytes(scn, not out_gpu), 0, 0, 0, p.host_reserve_bytes, p.host_usable_bytes)
    return vram, host
