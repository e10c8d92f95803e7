"""Plan: the placement, the scenario it was made for, its predicted breakdown, provenance.

A plan file is self-contained: the executor runs it and `simulate` replays it without the
model.yaml or profile it came from. `load_plan(save_plan(p)) == p` exactly.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace
from pathlib import Path

from planner import __version__
from planner.cost.options import Scenario
from planner.errors import PlanError
from planner.hardware.profile import HardwareProfile
from planner.model.placement import Placement, check_placement
from planner.cost.evaluate import Prediction, evaluate
from planner.cost.llamacpp import LlamaCppSettings
from planner.schema import atomic_write, check_version, dump_yaml, from_dict, read_yaml, stable_hash, to_dict
from planner.model.spec import ModelSpec, Workload
from planner.units import fmt_bytes

PLAN_VERSION = 1


@dataclass(frozen=True)
class Draft:
    """The speculative-decoding draft model chosen for the plan."""

    name: str
    spec: ModelSpec
    gamma: int  # draft length
    acceptance: float  # per-token acceptance rate assumed by the planner


@dataclass(frozen=True)
class StageSummary:
    name: str
    decode_s: float
    decode_acc_s: float
    decode_cpu_s: float
    decode_xfer_s: float
    decode_hidden_cpu_s: float
    decode_link_s: float
    prefill_s: float


@dataclass(frozen=True)
class MemorySummary:
    weights_bytes: int
    kv_bytes: int
    buffer_bytes: int
    workspace_bytes: int
    draft_bytes: int
    compensation_bytes: int
    reserve_bytes: int
    capacity_bytes: int


@dataclass(frozen=True)
class PredictedSummary:
    """The prediction in plain numbers, as written to the plan file and compared by `run`."""

    ttft_s: float
    prefill_s: float
    decode_step_s: float
    decode_tokens_per_s: float
    total_s: float
    expected_tokens: float
    decode_bound: str
    prefill_bound: str
    decode_by_resource_s: dict[str, float]
    prefill_by_resource_s: dict[str, float]
    recovered_error: float
    vram: MemorySummary
    host: MemorySummary
    stages: tuple[StageSummary, ...]


@dataclass(frozen=True)
class Provenance:
    offplan_version: str
    created: str
    strategy: str  # ilp | accelerate | llamacpp | stream-all | ...
    model_hash: str
    profile_name: str
    profile_hash: str
    solver: str = ""
    solver_status: str = ""
    solve_time_s: float = 0.0
    objective_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    workload: Workload
    profile: HardwareProfile
    placement: Placement
    predicted: PredictedSummary
    provenance: Provenance
    draft: Draft | None = None
    rank_choices: tuple[int, ...] = (0,)
    rank_recovery: dict[str, dict[int, float]] = field(default_factory=dict)
    routing: dict[int, tuple[float, ...]] | None = None  # MoE layer -> routed tokens per expert
    runtime: str = "offplan"  # offplan | llamacpp (planner/cost/runtime.py)
    llamacpp: LlamaCppSettings | None = None  # llama.cpp options the plan was made for
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF tensor -> GGML type, when known

    def scenario(self, profile: HardwareProfile | None = None) -> Scenario:
        d = self.draft
        return Scenario(self.model, profile or self.profile, self.workload,
                        d.spec if d else None, d.gamma if d else 0, d.acceptance if d else 0.0,
                        self.rank_choices, self.rank_recovery, self.routing)

    def routed_share(self, bank, n: int) -> float:
        """Share of expert bank `bank`'s routed tokens that its n most used experts take."""
        from planner.cost.moe import expert_probs, routed_share
        return routed_share(expert_probs(self.scenario(), bank), n)

    def evaluate(self, profile: HardwareProfile | None = None) -> Prediction:
        if self.runtime == "llamacpp":
            from planner.plan.llamacpp_plan import evaluate_llamacpp_plan
            return evaluate_llamacpp_plan(self, profile)
        return evaluate(self.scenario(profile), self.placement)


def summarize(prediction: Prediction) -> PredictedSummary:
    def mem(m) -> MemorySummary:
        return MemorySummary(m.weights_bytes, m.kv_bytes, m.buffer_bytes, m.workspace_bytes, m.draft_bytes,
                             m.compensation_bytes, m.reserve_bytes, m.capacity_bytes)

    stages = tuple(StageSummary(s.name, s.decode_s, s.decode_path.acc_s, s.decode_path.cpu_s,
                                s.decode_path.xfer_s, s.decode_path.hidden_cpu_s, s.decode_link_s, s.prefill_s)
                   for s in prediction.stages)
    return PredictedSummary(prediction.ttft_s, prediction.prefill_s, prediction.decode_step_s,
                            prediction.decode_tokens_per_s, prediction.total_s, prediction.expected_tokens,
                            prediction.bound("decode"), prediction.bound("prefill"),
                            prediction.by_resource("decode"), prediction.by_resource("prefill"),
                            prediction.recovered_error, mem(prediction.vram), mem(prediction.host), stages)


def make_plan(scn: Scenario, placement: Placement, strategy: str, prediction: Prediction | None = None,
              solver: str = "", solver_status: str = "", solve_time_s: float = 0.0, objective_s: float = 0.0,
              draft_name: str = "") -> Plan:
    prediction = prediction or evaluate(scn, placement)
    provenance = Provenance(__version__, _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            strategy, stable_hash(scn.spec), scn.profile.name, scn.profile.digest,
                            solver, solver_status, solve_time_s, objective_s)
    draft = Draft(draft_name or scn.draft.name, scn.draft, scn.gamma, scn.acceptance) if scn.draft else None
    return Plan(scn.spec, scn.workload, scn.profile, placement, summarize(prediction), provenance, draft,
                scn.rank_choices, scn.rank_recovery, scn.routing)


def plan_to_yaml(plan: Plan) -> str:
    return dump_yaml({"version": PLAN_VERSION, **to_dict(plan)})


def save_plan(plan: Plan, path: str | Path) -> None:
    atomic_write(path, plan_to_yaml(plan))


def plan_from_data(data: object, where: str = "plan") -> Plan:
    _check_kind(data, where)
    body = check_version(data, where, PLAN_VERSION, PlanError)
    plan = from_dict(Plan, body, "", PlanError)
    check_placement(plan.model, plan.placement)
    if plan.provenance.model_hash != stable_hash(plan.model):
        raise PlanError(f"{where}: the model section was edited after planning (hash mismatch); "
                        "solve again instead of editing a plan by hand")
    return plan


def _check_kind(data: object, where: str) -> None:
    """Say which kind of offplan file was given where a plan was expected."""
    if not isinstance(data, dict) or "placement" in data:
        return
    if "model" in data and "profile" not in data:
        raise PlanError(f"{where}: this is a model file; give a plan from `offplan solve MODEL --hw HW --out plan.yaml`")
    if {"accelerator", "link", "host"} <= set(data):
        raise PlanError(f"{where}: this is a hardware profile; give a plan from `offplan solve MODEL --hw HW "
                        "--out plan.yaml`")


def load_plan(path: str | Path) -> Plan:
    try:
        return plan_from_data(read_yaml(path, PlanError), str(path))
    except PlanError as exc:
        message = str(exc)
        raise PlanError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def check_plan_fits(plan: Plan, where: str = "plan") -> None:
    """Re-check a loaded plan against its own profile: a placement edited by hand may put more
    on a device than the profile offers. Raises PlanError naming the device and the excess."""
    prediction = plan.evaluate()
    devices = ((f"the accelerator ({plan.profile.accelerator.name})", prediction.vram),
               ("the host", prediction.host))
    for device, use in devices:
        if use.used_bytes > use.capacity_bytes:
            raise PlanError(f"{where}: the placement needs {fmt_bytes(use.used_bytes)} of memory on {device}, "
                            f"{fmt_bytes(use.used_bytes - use.capacity_bytes)} more than the "
                            f"{fmt_bytes(use.capacity_bytes)} the profile offers; solve again instead of "
                            "editing a plan by hand")


def with_profile(plan: Plan, profile: HardwareProfile) -> Plan:
    """The same placement re-predicted on other hardware (for `simulate --hw`)."""
    scn = plan.scenario(profile)
    return replace(make_plan(scn, plan.placement, plan.provenance.strategy), draft=plan.draft)
