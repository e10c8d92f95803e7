"""The cost model (DESIGN §4): pure functions from (tensor, placement, profile, workload)
to seconds and bytes. The only place formulas live.

The planner sees every decision as a choice among *options*: each weight tensor has one
option per (device, prefill mode, compensation rank), each layer's KV cache one option per
host fraction. An option carries everything the step time and memory need. The ILP
(ilp.py) picks one option per item; `predict.evaluate` scores a fixed placement by looking
up the same options, so the two always agree, and brute force can enumerate them.

Units: seconds (`_s`), bytes (`_bytes`), flop counts; bandwidths in the profile are GB/s.
The per-operator rooflines and transfer times these options are built from live in
planner/cost/roofline.py; host-memory traffic in planner/cost/membus.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

from planner.hardware.profile import HardwareProfile
from planner.cost.membus import weight_bus
from planner.cost.roofline import (PathCost, acc_op_s, d2h_s, expected_tokens_per_step, h2d_s, host_op_s, parallel,
                                   touched_fraction)
from planner.model.spec import DTYPE_BYTES, ModelSpec, TensorSpec, Workload

# Element-wise operators per decoder layer (2 norms, rotary, 2 residual adds, activation,
# gate product, cache append): each costs one operator overhead on the accelerator, when the
# profile has no measured per-layer overhead.
ELEMENTWISE_OPS_PER_LAYER = 8
# Compensation factors A, B live on the host in fp32 whatever the model's dtype: the branch
# is a CPU matmul, and fp32 is what CPUs multiply fastest and what the executor builds.
FACTOR_DTYPE = "fp32"
# Operators whose overhead the option tables already charge: per layer 7 matmuls and the
# attention; per step the embedding lookup and the lm_head.
CHARGED_OPS_PER_LAYER = 8
CHARGED_OPS_PER_HEAD = 2


@dataclass(frozen=True)
class Scenario:
    """Everything fixed while the ILP chooses placements: model, machine, workload, draft."""

    spec: ModelSpec
    profile: HardwareProfile
    workload: Workload
    draft: ModelSpec | None = None
    gamma: int = 0  # draft length; 0 = no speculation
    acceptance: float = 0.0
    rank_choices: tuple[int, ...] = (0,)  # compensation ranks offered per quantized tensor
    rank_recovery: dict[str, dict[int, float]] = field(default_factory=dict)  # tensor kind -> rank -> recovered fraction
    routing: dict[int, tuple[float, ...]] | None = None  # MoE layer -> routed tokens per expert (planner/cost/moe.py)

    @property
    def verify_tokens(self) -> int:
        return self.gamma + 1

    @property
    def decode_rows(self) -> int:
        """Rows through each weight matrix per decode (verify) step."""
        return self.workload.batch * self.verify_tokens

    @property
    def prefill_rows(self) -> int:
        return self.workload.batch * self.workload.prompt

    @property
    def expected_tokens(self) -> float:
        return expected_tokens_per_step(self.acceptance, self.gamma) if self.draft else 1.0

    @property
    def compute_dtype(self) -> str:
        """Activations and matmul arithmetic: the model's dtype (packed weights are dequantized to it)."""
        return self.spec.dtype

    @property
    def weight_dtype(self) -> str:
        """The dtype weights are stored in: int4 / int8 when quantized."""
        q = self.spec.quantization
        return f"int{q.bits}" if q else self.spec.dtype

    @property
    def act_bytes(self) -> int:
        return self.spec.weight_elt_bytes

    @cached_property
    def decode_steps(self) -> float:
        """Verify steps after the first token (which prefill yields)."""
        return max(self.workload.gen - 1, 0) / self.expected_tokens


# ---- options ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorOption:
    device: str  # gpu | stream | cpu
    prefill_streamed: bool  # cpu tensor copied to the accelerator for prefill
    rank: int  # compensation rank (0 = none)
    decode: PathCost  # per decode step
    prefill: PathCost  # whole prefill
    decode_link_s: float  # h2d time to bring the weight in before each decode step
    prefill_link_s: float
    decode_act_h2d_s: float  # activations this item sends up the link while its stage runs
    prefill_act_h2d_s: float
    vram_bytes: int  # resident on the accelerator
    buffer_bytes: int  # needs a streaming buffer slot this large
    host_bytes: int  # weight storage in host memory
    comp_bytes: int  # compensation factors A, B in host memory
    recovered: float  # fraction of quantization error recovered by the branch
    # Host memory bus (planner/cost/membus.py): reads during its own stage, and the traffic of
    # prefetching it, which runs during the stage before (like decode_link_s).
    decode_bus_s: float = 0.0
    prefill_bus_s: float = 0.0
    decode_fetch_bus_s: float = 0.0
    prefill_fetch_bus_s: float = 0.0
    # Compute time the stage before loses while this weight streams in (loopback).
    decode_fetch_slow_s: float = 0.0
    prefill_fetch_slow_s: float = 0.0
    gpu_experts: int = 0  # an expert bank: how many of its experts are resident


@dataclass(frozen=True)
class KVOption:
    host_fraction: float
    decode: PathCost
    prefill: PathCost
    decode_act_h2d_s: float  # O_c and L_c sent up per step (shares the link with streaming)
    vram_bytes: int
    host_bytes: int
    decode_bus_s: float = 0.0  # host memory bus: attention reads of one decode step


def _weight_read_dtype(scn: Scenario, t: TensorSpec) -> str:
    """Attention and MLP matrices of a quantized model are packed; embeddings and the head stay float."""
    return scn.weight_dtype if t.group in ("attn", "mlp") else scn.compute_dtype


def matmul_on_acc(scn: Scenario, t: TensorSpec, rows: int) -> PathCost:
    n_bytes = t.n_bytes * touched_fraction(t.route_prob, rows) + rows * (t.rows + t.cols) * scn.act_bytes
    return PathCost(acc_s=acc_op_s(scn.profile, scn.compute_dtype, rows * t.flops_per_token, n_bytes, rows,
                                   t.n_bytes, _weight_read_dtype(scn, t)))


def _matmul_on_host(scn: Scenario, t: TensorSpec, rows: int) -> PathCost:
    n_bytes = t.n_bytes * touched_fraction(t.route_prob, rows) + rows * (t.rows + t.cols) * scn.act_bytes
    cpu = host_op_s(scn.profile, scn.compute_dtype, rows * t.flops_per_token, n_bytes, rows, t.n_bytes,
                    _weight_read_dtype(scn, t))
    xfer = d2h_s(scn.profile, rows * t.cols * scn.act_bytes) + h2d_s(scn.profile, rows * t.rows * scn.act_bytes)
    return PathCost(cpu_s=cpu, xfer_s=xfer)


def _embed_lookup(scn: Scenario, device: str, rows: int) -> PathCost:
    if device == "gpu":
        return PathCost(acc_s=scn.profile.accelerator.op_overhead_s)
    row_bytes = rows * scn.spec.hidden * scn.act_bytes
    return PathCost(cpu_s=scn.profile.host.op_overhead_s, xfer_s=h2d_s(scn.profile, row_bytes))


def compensation_branch(scn: Scenario, t: TensorSpec, rank: int, rows: int) -> PathCost:
    """CPU branch (x·A)·B of a rank-`rank` residual in fp32, with x down and the correction up."""
    factor_bytes = compensation_bytes(scn, t, rank)
    flops = 2.0 * rows * rank * (t.rows + t.cols)
    cpu = (host_op_s(scn.profile, FACTOR_DTYPE, flops, factor_bytes, rows, factor_bytes)
           + scn.profile.host.op_overhead_s)
    xfer = d2h_s(scn.profile, rows * t.cols * scn.act_bytes) + h2d_s(scn.profile, rows * t.rows * scn.act_bytes)
    return PathCost(cpu_s=cpu, xfer_s=xfer)


def compensation_bytes(scn: Scenario, t: TensorSpec, rank: int) -> int:
    """Host bytes of A [in, rank] and B [rank, out], kept in fp32 (executor/compensate_model.py)."""
    return rank * (t.rows + t.cols) * DTYPE_BYTES[FACTOR_DTYPE]


def tensor_options(scn: Scenario, t: TensorSpec) -> list[TensorOption]:
    """Every way to place tensor `t`, with its decode/prefill cost and memory."""
    if t.experts:
        from planner.cost.moe import expert_options
        return expert_options(scn, t)
    W = t.n_bytes
    dec_rows = scn.decode_rows
    # Prefill: the lm_head only runs on the last position of each sequence.
    pf_rows = scn.workload.batch if t.group == "head" else scn.prefill_rows
    if t.group == "embed":
        row_bytes = scn.spec.hidden * scn.act_bytes
        return [TensorOption(d, False, 0, _embed_lookup(scn, d, dec_rows), _embed_lookup(scn, d, pf_rows),
                             0.0, 0.0, h2d_s(scn.profile, dec_rows * row_bytes) if d == "cpu" else 0.0,
                             h2d_s(scn.profile, pf_rows * row_bytes) if d == "cpu" else 0.0,
                             W if d == "gpu" else 0, 0, W if d == "cpu" else 0, 0, 0.0)
                for d in ("gpu", "cpu")]
    acc_dec, acc_pf = matmul_on_acc(scn, t, dec_rows), matmul_on_acc(scn, t, pf_rows)
    link_s = h2d_s(scn.profile, W)
    ranks = scn.rank_choices if (scn.spec.quantization and t.group in ("attn", "mlp")) else (0,)
    options = []
    def up_s(rows: int) -> float:  # the output of a host computation going back up
        return h2d_s(scn.profile, rows * t.rows * scn.act_bytes)

    handoff = PathCost(cpu_s=scn.profile.host.task_overhead_s)  # always on the path: the join waits for it
    for rank in ranks:
        if rank:
            branch = compensation_branch(scn, t, rank, dec_rows)
            dec = parallel(acc_dec, branch) + handoff
            pf = parallel(acc_pf, compensation_branch(scn, t, rank, pf_rows)) + handoff
            recovered = scn.rank_recovery.get(t.kind, {}).get(rank, 0.0)
        else:
            dec, pf, recovered = acc_dec, acc_pf, 0.0
        comp = compensation_bytes(scn, t, rank)
        act_dec, act_pf = (up_s(dec_rows), up_s(pf_rows)) if rank else (0.0, 0.0)
        options.append(TensorOption("gpu", False, rank, dec, pf, 0.0, 0.0, act_dec, act_pf, W, 0, 0, comp,
                                    recovered))
        options.append(TensorOption("stream", False, rank, dec, pf, link_s, link_s, act_dec, act_pf, 0, W, W,
                                    comp, recovered))
    options.append(TensorOption("cpu", False, 0, _matmul_on_host(scn, t, dec_rows),
                                _matmul_on_host(scn, t, pf_rows), 0.0, 0.0, up_s(dec_rows), up_s(pf_rows),
                                0, 0, W, 0, 0.0))
    options.append(TensorOption("cpu", True, 0, _matmul_on_host(scn, t, dec_rows), acc_pf,
                                0.0, link_s, up_s(dec_rows), 0.0, 0, W, W, 0, 0.0))
    read_dec = W * touched_fraction(t.route_prob, dec_rows)
    read_pf = W * touched_fraction(t.route_prob, pf_rows)
    return [_with_bus(scn, o, read_dec, read_pf, W) for o in options]


def _with_bus(scn: Scenario, o: TensorOption, read_decode_bytes: float, read_prefill_bytes: float,
              weight_bytes: int) -> TensorOption:
    bus = weight_bus(scn.profile, o.device, o.prefill_streamed, read_decode_bytes, read_prefill_bytes,
                     weight_bytes)
    return replace(o, decode_bus_s=bus.own_decode_s, prefill_bus_s=bus.own_prefill_s,
                   decode_fetch_bus_s=bus.fetch_decode_s, prefill_fetch_bus_s=bus.fetch_prefill_s,
                   decode_fetch_slow_s=bus.slow_decode_s, prefill_fetch_slow_s=bus.slow_prefill_s)


def matmul_rows(scn: Scenario, t: TensorSpec, phase: str) -> int:
    """Rows through `t`: prefill runs lm_head on the last position of each sequence only."""
    if phase != "prefill":
        return scn.decode_rows
    return scn.workload.batch if t.group == "head" else scn.prefill_rows


def activation_transfer_s(scn: Scenario, t: TensorSpec, rows: int) -> tuple[float, float]:
    """(d2h of the input [rows, cols], h2d of the output [rows, rows_out]) around host work on `t`."""
    return (d2h_s(scn.profile, rows * t.cols * scn.act_bytes), h2d_s(scn.profile, rows * t.rows * scn.act_bytes))


def layer_dispatch_s(profile: HardwareProfile) -> float:
    """Fixed time of one decoder layer beyond its matmuls' and attention's own overhead: the
    measured per-layer overhead when the profile has one, else an operator count."""
    a = profile.accelerator
    if a.layer_overhead_s > 0:
        return max(a.layer_overhead_s - CHARGED_OPS_PER_LAYER * a.op_overhead_s, 0.0)
    return ELEMENTWISE_OPS_PER_LAYER * a.op_overhead_s


def head_dispatch_s(profile: HardwareProfile) -> float:
    """Fixed time per step outside the layers (final norm, argmax, the generation loop)."""
    a = profile.accelerator
    if a.head_overhead_s > 0:
        return max(a.head_overhead_s - CHARGED_OPS_PER_HEAD * a.op_overhead_s, 0.0)
    return 3 * a.op_overhead_s


def elementwise_bytes(hidden: int, intermediate: int, rows: float, act_bytes: int) -> float:
    """The traffic counted for one layer's element-wise operators (2 norms, rotary, 2 residual
    adds, activation, gate product): `rows` x (6 hidden + 3 intermediate) elements. The
    profiler rates the executor's real operators against this same count (elementwise_gbps)."""
    return rows * (6 * hidden + 3 * intermediate) * act_bytes


def layer_fixed(scn: Scenario, rows: int) -> PathCost:
    """Element-wise work of one decoder layer (norms, rotary, residuals, activation)."""
    spec = scn.spec
    n_bytes = elementwise_bytes(spec.hidden, spec.ffn_width, rows, scn.act_bytes)
    a = scn.profile.accelerator
    rate_gbps = a.elementwise_gbps or a.mem_bw_gbps
    return PathCost(acc_s=layer_dispatch_s(scn.profile) + n_bytes / (rate_gbps * 1e9))


def head_fixed(scn: Scenario, rows: int) -> PathCost:
    """Final norm and the greedy argmax over the vocabulary."""
    a = scn.profile.accelerator
    n_bytes = rows * (scn.spec.hidden + scn.spec.vocab) * 4
    return PathCost(acc_s=head_dispatch_s(scn.profile) + n_bytes / (a.mem_bw_gbps * 1e9))
