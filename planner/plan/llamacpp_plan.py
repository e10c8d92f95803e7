"""Plans for the llama.cpp runtime: made from a LlamaPlacement, re-evaluated with llama.cpp's
cost model, turned back into a command line."""

from __future__ import annotations

from dataclasses import replace

from planner.cost.evaluate import Prediction
from planner.cost.llamacpp import LlamaPlacement, LlamaScenario, evaluate_llamacpp
from planner.cost.llamacpp_place import from_placement, to_placement
from planner.cost.options import Scenario
from planner.hardware.profile import HardwareProfile
from planner.plan.record import Plan, make_plan


def make_llamacpp_plan(scn: LlamaScenario, lp: LlamaPlacement, strategy: str, prediction: Prediction | None = None,
                       solver: str = "", solver_status: str = "", solve_time_s: float = 0.0,
                       objective_s: float = 0.0) -> Plan:
    prediction = prediction or evaluate_llamacpp(scn, lp)
    plan = make_plan(Scenario(scn.spec, scn.profile, scn.workload), to_placement(scn, lp), strategy, prediction,
                     solver, solver_status, solve_time_s, objective_s)
    return replace(plan, runtime="llamacpp", llamacpp=scn.settings, tensor_types=dict(scn.types))


def llama_scenario(plan: Plan, profile: HardwareProfile | None = None) -> LlamaScenario:
    from planner.cost.llamacpp import LlamaCppSettings
    return LlamaScenario(plan.model, profile or plan.profile, plan.workload, plan.llamacpp or LlamaCppSettings(),
                         dict(plan.tensor_types))


def evaluate_llamacpp_plan(plan: Plan, profile: HardwareProfile | None = None) -> Prediction:
    scn = llama_scenario(plan, profile)
    lp, _ = from_placement(scn, plan.placement)
    return evaluate_llamacpp(scn, lp)


def llamacpp_export(plan: Plan) -> tuple[LlamaScenario, LlamaPlacement, list[str]]:
    """The llama.cpp placement nearest to any plan, with what had to change."""
    scn = llama_scenario(plan)
    lp, notes = from_placement(scn, plan.placement)
    return scn, lp, notes
